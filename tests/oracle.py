"""An oracle segmentation network whose answer is known, and the test images it is run on.

:class:`ThresholdNetwork` segments "first input channel > threshold" (class 1) against everything
else (class 0). The inference pipelines z-score the image before the network, so the images here
are built such that "z-score > threshold" is a known foreground mask of the file's own voxels:

- an object (an off-centre ellipsoid plus an offset cube, grown until it holds half of the voxels
  it competes for) at a high intensity, the rest at a low one. With half of the voxels in the
  object, the z-score of a two-level image is exactly +1 in the object and -1 elsewhere, and its
  zero lies half-way up the object's edge also after blurring and resampling (so a coarser working
  grid moves the boundary by a fraction of a voxel, not outwards);
- for BraTS (z-score over non-zero voxels only), the same inside a "head" ellipsoid, with exact
  zeros outside it, which stay 0 after z-scoring and so are class 0 for any threshold > 0.

The object is asymmetric on every axis and the array axes have different lengths, so a mirrored,
transposed or shifted label changes many voxels.

Geometry is given as ITK sees it (LPS, index order i, j, k): ``spacing``, ``origin`` and a
``direction`` whose columns are the index axes. :func:`write_image` writes NIfTI, NRRD or
MetaImage through ITK; :func:`ras_affine` is the NIfTI (RAS) affine of the same geometry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = [
    "GEOMETRIES", "ImageCase", "ThresholdNetwork", "cases_for", "core_image", "dice", "expected_label", "object_image",
    "ras_affine", "read_itk", "write_image",
]

BACKGROUND_LOGIT = -1e4  # every class beyond 0 and 1


class ThresholdNetwork(nn.Module):
    """Logits ``[-s (x - t), s (x - t), -1e4, ...]`` of the first input channel ``x``.

    Class 1 where ``x > threshold``, class 0 where ``x < threshold``, every other class (if
    ``out_channels > 2``) practically impossible. ``spacing`` and any other constructor argument a
    bundle's ``network_def`` passes (``spatial_dims``, ``in_channels``, ``channels``,
    ``hidden_features``, ...) are accepted and ignored.

    The network holds one dummy parameter (never used in ``forward``): its ``state_dict`` is a
    valid checkpoint, code that asks for ``next(network.parameters())`` (device, dtype) works, and
    an empty checkpoint (``{}``) loads too (the dummy keeps its value).
    """

    def __init__(self, out_channels: int = 2, threshold: float = 0.0, sharpness: float = 20.0, **ignored):
        super().__init__()
        if int(out_channels) < 2:
            raise ValueError(f"out_channels must be at least 2 (background and foreground), got {out_channels}.")
        self.out_channels = int(out_channels)
        self.threshold = float(threshold)
        self.sharpness = float(sharpness)
        self.dummy = nn.Parameter(torch.zeros(()))
        self.register_load_state_dict_pre_hook(_keep_dummy)

    def forward(self, x: torch.Tensor, spacing=None) -> torch.Tensor:
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        d = self.sharpness * (x[:, :1].float() - self.threshold)
        rest = torch.full((x.shape[0], self.out_channels - 2, *x.shape[2:]), BACKGROUND_LOGIT, dtype=d.dtype, device=d.device)
        return torch.cat([-d, d, rest], dim=1)


def _keep_dummy(module, state_dict, prefix, *args) -> None:
    state_dict.setdefault(prefix + "dummy", module.dummy.detach().clone())


# --- geometry -------------------------------------------------------------------------------------

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def _rotation(axis, degrees: float) -> np.ndarray:
    """Rodrigues' rotation matrix about ``axis``."""
    a = np.asarray(axis, dtype=float)
    a = a / np.linalg.norm(a)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = math.radians(degrees)
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * k @ k


# direction matrices in ITK's LPS convention, columns = index axes i, j, k
GEOMETRIES = {
    # i runs towards Right, j towards Anterior, k towards Superior (nibabel axcodes RAS)
    "ras": LPS_TO_RAS,
    # ITK's identity: i towards Left, j towards Posterior, k towards Superior (axcodes LPS)
    "lps": np.eye(3),
    # axes swapped, as a sagittal acquisition stores them: i runs superior -> inferior, j anterior ->
    # posterior, k (the slices) right -> left
    "sagittal": np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]),
    # RAS tilted by 20 degrees about an oblique axis (every index axis leaves its anatomical axis)
    "oblique": _rotation([1.0, 2.0, 3.0], 20.0) @ LPS_TO_RAS,
    # RAS with thick slices along one axis (spacing below)
    "aniso": LPS_TO_RAS,
}

# the file's index-axis lengths (i, j, k): all different, so a transposed label has the wrong shape
SHAPE = (40, 34, 28)


def _ras_spacing_to_file(direction: np.ndarray, ras_spacing) -> tuple[float, ...]:
    """File-order (i, j, k) spacing of an image whose index axes point along ``direction``,
    given the spacing along the anatomical axes L-R, P-A, I-S (MONAI's axis order after
    ``Orientationd("RAS")``)."""
    anatomical = np.abs(direction).argmax(axis=0)  # the anatomical axis each index axis runs along
    return tuple(float(ras_spacing[a]) for a in anatomical)


# per data set, the spacing along L-R, P-A, I-S (mm): inside its trained range
# (BraTS U(1, 3); SPIDER U(1, 5) x U(0.2, 1.5)^2, thick sagittal slices; MM-WHS U(0.5, 3.5))
RAS_SPACINGS = {
    "brats": {"default": (1.2, 1.3, 1.4), "aniso": (1.1, 1.05, 2.9)},
    "spider": {"default": (3.0, 1.2, 1.3), "aniso": (3.5, 0.8, 0.7)},
    "mmwhs": {"default": (1.2, 1.3, 1.4), "aniso": (0.8, 0.75, 3.0)},
}
ORIGIN = (-21.5, 13.25, 7.0)  # LPS, mm


@dataclass(frozen=True)
class ImageCase:
    """One test image: its geometry (ITK, LPS) and file format."""

    geometry: str
    fmt: str  # "nii", "nrrd" or "mha"
    spacing: tuple[float, ...]  # file (index) order, mm
    direction: np.ndarray
    origin: tuple[float, ...] = ORIGIN
    shape: tuple[int, ...] = SHAPE

    @property
    def name(self) -> str:
        """File stem and MONAI Label image id (no dots: the datastore strips the extension)."""
        return f"{self.geometry}-{self.fmt}"

    @property
    def filename(self) -> str:
        return self.name + {"nii": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha"}[self.fmt]

    @property
    def ras_spacing(self) -> tuple[float, ...]:
        """Spacing along L-R, P-A, I-S (the order of MONAI's tensor axes after Orientationd RAS)."""
        anatomical = np.abs(self.direction).argmax(axis=0)
        out = [0.0] * 3
        for axis, a in enumerate(anatomical):
            out[a] = self.spacing[axis]
        return tuple(out)


FORMATS = ("nii", "nrrd", "mha")


def cases_for(dataset: str, geometries=tuple(GEOMETRIES), formats=FORMATS) -> list[ImageCase]:
    """The test images of one data set: every geometry in every format."""
    out = []
    for g in geometries:
        direction = GEOMETRIES[g]
        ras = RAS_SPACINGS[dataset]["aniso" if g == "aniso" else "default"]
        for fmt in formats:
            out.append(ImageCase(g, fmt, _ras_spacing_to_file(direction, ras), direction))
    return out


def ras_affine(spacing, origin, direction) -> np.ndarray:
    """The NIfTI (RAS) 4x4 affine of an ITK (LPS) geometry."""
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ np.asarray(direction, dtype=float) @ np.diag(np.asarray(spacing, dtype=float))
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(origin, dtype=float)
    return affine


# --- images ---------------------------------------------------------------------------------------

def object_image(shape=SHAPE, head: bool = False, head_radius: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """``(intensities, object mask)``, both in file index order ``(i, j, k)``.

    The object is the union of an off-centre ellipsoid and an offset cube, grown (one common scale)
    until it holds half of the voxels: of the whole image, or of the head when ``head`` is true.
    The head is a centred ball of ``head_radius`` (in units of the field of view per axis, so
    0.7 leaves zeros only towards the corners). Intensities: object 300, rest 100, and 0 outside
    the head (int16, as MR images are stored).
    """
    u = np.meshgrid(*[np.linspace(0.0, 1.0, n) for n in shape], indexing="ij")
    ellipsoid = np.sqrt(sum(((c - m) / a) ** 2 for c, m, a in zip(u, (0.38, 0.58, 0.42), (0.33, 0.22, 0.27))))
    cube = np.max([np.abs(c - m) / 0.12 for c, m in zip(u, (0.78, 0.27, 0.74))], axis=0)
    f = np.minimum(ellipsoid, cube)
    inside = _ball(u, head_radius) if head else np.ones(shape, dtype=bool)
    mask = inside & (f < np.median(f[inside]))
    return _intensities(mask, inside), mask


def core_image(shape=(48, 48, 48), head_radius: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """A small head in a wide, empty field of view (as a skull-stripped brain is stored), its
    inner half (a concentric ball) bright: ``(intensities, object mask)`` as :func:`object_image`.

    The object stays several voxels away from the zeros, so on any working grid its boundary is
    a 300 -> 100 edge whose middle is z = 0 for z-score statistics of the head; what moves it is
    only statistics that are not those of the head.
    """
    u = np.meshgrid(*[np.linspace(0.0, 1.0, n) for n in shape], indexing="ij")
    r = np.sqrt(sum((c - 0.5) ** 2 for c in u)) / head_radius
    inside = r < 1.0
    mask = inside & (r < np.median(r[inside]))
    return _intensities(mask, inside), mask


def _ball(u, radius: float) -> np.ndarray:
    return np.sqrt(sum(((c - 0.5) / radius) ** 2 for c in u)) < 1.0


def _intensities(mask: np.ndarray, inside: np.ndarray) -> np.ndarray:
    return np.where(mask, 300, np.where(inside, 100, 0)).astype(np.int16)


def write_image(path: str, volume_ijk: np.ndarray, spacing, origin, direction) -> None:
    """Write a ``(i, j, k)`` array with an ITK geometry; the format follows the extension."""
    import itk

    image = itk.image_from_array(np.ascontiguousarray(np.transpose(volume_ijk, (2, 1, 0))))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(np.asarray(direction, dtype=np.float64))))
    itk.imwrite(image, path)


def read_itk(path: str) -> tuple[np.ndarray, dict]:
    """``(array in (i, j, k) order, geometry)`` of a file as ITK reads it."""
    import itk

    image = itk.imread(path)
    array = np.transpose(itk.array_from_image(image), (2, 1, 0))
    geometry = {
        "size": tuple(int(s) for s in itk.size(image)),
        "spacing": np.array(image.GetSpacing(), dtype=float),
        "origin": np.array(image.GetOrigin(), dtype=float),
        "direction": np.array(itk.array_from_matrix(image.GetDirection()), dtype=float),
    }
    return array, geometry


def expected_label(image: np.ndarray, nonzero: bool, threshold: float) -> np.ndarray:
    """The oracle's answer at the native grid, from the file's voxels: z-score (over the non-zero
    voxels only, zeros kept, when ``nonzero``), then ``> threshold``."""
    x = image.astype(np.float64)
    m = x != 0 if nonzero else np.ones(x.shape, dtype=bool)
    mean, std = x[m].mean(), x[m].std()
    z = np.where(m, (x - mean) / max(std, 1e-8), 0.0)
    return z > threshold


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total
