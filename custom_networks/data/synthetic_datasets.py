"""Small generated data sets in the official BraTS 2021, SPIDER, MM-WHS and vessel (SMILE-UHURA) layouts.

None of the four data sets can be downloaded here, so the data list, the loaders and the bundles
are tested on generated cases that have the real folder layout, file formats, raw label values and
header conventions, at a size a CPU handles in seconds:

- BraTS 2021: ``<root>/BraTS2021_NNNNN/BraTS2021_NNNNN_{t1,t1ce,t2,flair,seg}.nii.gz``, a
  skull-stripped brain ellipsoid (exactly 0 outside) with a tumour: necrosis (1) inside an
  enhancing rim (4), surrounded by edema (2). Stored in the LPS voxel order of the real files.
- SPIDER: ``<root>/images/N_{t1,t2}.mha`` and ``<root>/masks/N_{t1,t2}.mha``, sagittal thick-slice
  volumes: a column of vertebral bodies along the spine labelled 1..N from the bottom, discs
  201.. below each body, the spinal canal (100) behind them, and the top vertebra cut by the field of
  view labelled 100 + N (SPIDER's "partially visible" code). Even cases store the slice axis first,
  odd cases last with a DICOM-like sagittal direction matrix: files written by different tools differ.
- MM-WHS MR: ``<root>/mr_train/mr_train_10XX_{image,label}.nii.gz``, nested and adjacent ellipsoids
  and tubes with the MM-WHS label values (205 myocardium around the 500 LV cavity, 420 / 421 left
  atrium, 550, 600, 820, 850); odd cases store the axes permuted.
- Vessels (7T ToF MRA, SMILE-UHURA / StudyForrest layout): ``<root>/{train,validate,test}/sub-NN.nii.gz``
  and the binary labels (0 / 1) of the same names in ``train_label/``, ``validate_label/``,
  ``test_label/``: a branching vessel tree (:func:`vessel_tree`, radii 2 mm down to 0.3 mm) bright
  on a darker background, as inflow makes blood in time-of-flight images. Cases go to the splits
  as :func:`~custom_networks.data.datalist.split_cases` would size them (5 cases: 3 / 1 / 1);
  odd cases are stored LPS.

Every structure has its own intensity plus Gaussian noise, so a small network can learn the task.
Anatomy is drawn in a canonical RAS voxel frame; case ``i`` has the spacing ``SPACINGS[name][i %
5]`` (mm, RAS tensor order: the order after ``DatasetSpec.load_transforms``, see
:mod:`custom_networks.data.datasets`); the seed draws the anatomy and the noise.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

from .datasets import get_dataset

__all__ = ["SPACINGS", "VESSEL_RADIUS_MM", "case_ids", "vessel_tree", "write_synthetic_dataset"]

# native spacing (mm) of case i, in RAS tensor order (axis 0 left-right, 1 back-front, 2 up the body)
SPACINGS = {
    "brats": ((1.0, 1.0, 1.0), (1.0, 1.0, 1.2), (0.9, 0.9, 1.0), (1.2, 1.2, 1.2), (1.0, 1.1, 1.5)),
    # thick sagittal slices along axis 0
    "spider": ((3.3, 0.6, 0.6), (4.0, 0.9, 0.9), (3.5, 0.7, 0.7), (4.4, 0.8, 0.8), (3.0, 1.0, 1.0)),
    "mmwhs": ((0.9, 0.9, 1.2), (1.5, 1.5, 2.0), (1.0, 1.0, 1.0), (1.2, 1.2, 1.6), (0.8, 0.8, 1.4)),
}
SPACINGS["spider_discs"] = SPACINGS["spider"]
# anisotropic, around the 7T ToF's 0.3 mm and up to the coarse end of the vessel spacing range
SPACINGS["vessel"] = ((0.3, 0.3, 0.45), (0.5, 0.5, 0.8), (0.6, 0.45, 0.5), (0.7, 0.7, 1.0), (0.4, 0.5, 0.6))

# field of view (mm) per RAS axis
_EXTENT_MM = {"brats": (48.0, 48.0, 32.0), "spider": (40.0, 36.0, 48.0), "mmwhs": (56.0, 56.0, 60.0), "vessel": (20.0, 20.0, 16.0)}
# vessel radii of the generated trees: the root's and the finest branches' (mm)
VESSEL_RADIUS_MM = (0.3, 2.0)

# stored voxel axis -> (RAS axis, direction): how the array on disk relates to the RAS frame
_RAS = ((0, 1), (1, 1), (2, 1))
_LPS = ((0, -1), (1, -1), (2, 1))  # BraTS files
_SAGITTAL_DICOM = ((1, -1), (2, -1), (0, 1))  # columns front->back, rows head->foot, slices left->right
_PERMUTED = ((0, -1), (2, 1), (1, 1))


def case_ids(dataset: str, n_cases: int) -> list[str]:
    """The case ids :func:`write_synthetic_dataset` uses, in the data set's own naming.

    Gaps and varying digit counts (SPIDER ``1, 5, 9, 13``) check that data lists sort and match ids
    rather than positions.
    """
    name = get_dataset(dataset).name
    if name == "brats":
        return [f"BraTS2021_{2 * i:05d}" for i in range(n_cases)]
    if name.startswith("spider"):
        return [str(1 + 4 * i) for i in range(n_cases)]
    if name == "vessel":  # StudyForrest's subject names; image and label share the file name
        return [f"sub-{i + 1:02d}.nii.gz" for i in range(n_cases)]
    return [str(1001 + i) for i in range(n_cases)]


def _grid(shape: Sequence[int], spacing: Sequence[float]) -> list[np.ndarray]:
    """Sparse voxel-centre coordinates (mm) per RAS axis; voxel 0 sits at 0 mm."""
    axes = [np.arange(n, dtype=np.float32) * s for n, s in zip(shape, spacing)]
    return np.meshgrid(*axes, indexing="ij", sparse=True)


def _ellipsoid(grid, center, radii) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


def _shape(extent: Sequence[float], spacing: Sequence[float]) -> tuple[int, ...]:
    return tuple(int(round(e / s)) for e, s in zip(extent, spacing))


def _stored(array: np.ndarray, spacing, origin_ras, layout):
    """The array as stored on disk and its RAS affine, for a stored-axis ``layout``."""
    stored = np.transpose(array, [axis for axis, _ in layout])
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    origin = np.asarray(origin_ras, float).copy()
    for j, (axis, sign) in enumerate(layout):
        affine[axis, j] = sign * spacing[axis]
        if sign < 0:
            stored = np.flip(stored, j)
            origin[axis] += spacing[axis] * (array.shape[axis] - 1)
    affine[:3, 3] = origin
    return np.ascontiguousarray(stored), affine


def _save_nifti(path: str, array: np.ndarray, spacing, origin_ras, layout, dtype) -> None:
    import nibabel as nib

    stored, affine = _stored(array, spacing, origin_ras, layout)
    image = nib.Nifti1Image(stored.astype(dtype), affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)


def _save_mha(path: str, array: np.ndarray, spacing, origin_ras, layout, dtype) -> None:
    try:
        import itk
    except ImportError as e:  # itk is an optional MONAI extra; SPIDER's .mha files need it
        raise ImportError("writing SPIDER .mha files needs ITK: pip install 'monai[itk]'") from e

    stored, affine = _stored(array, spacing, origin_ras, layout)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # ITK geometry is LPS, NIfTI / MONAI affines RAS
    stored_spacing = np.linalg.norm(lps[:3, :3], axis=0)
    # itk.image_from_array reads a numpy array as (k, j, i): the reverse of ITK's index order
    image = itk.image_from_array(np.ascontiguousarray(stored.astype(dtype).transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in stored_spacing])
    image.SetOrigin([float(o) for o in lps[:3, 3]])
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(lps[:3, :3] / stored_spacing)))
    itk.imwrite(image, path, compression=True)


def _noisy(image: np.ndarray, rng: np.random.RandomState, sigma: float) -> np.ndarray:
    return image + rng.normal(0.0, sigma, image.shape).astype(np.float32)


def _write_brats(root: str, index: int, case: str, spacing, rng: np.random.RandomState) -> None:
    shape = _shape(_EXTENT_MM["brats"], spacing)
    grid = _grid(shape, spacing)
    extent = np.asarray(_EXTENT_MM["brats"])
    brain_radii = extent / 2 * 0.88 * rng.uniform(0.93, 1.0, 3)
    brain = _ellipsoid(grid, extent / 2, brain_radii)
    # tumour centre well inside the brain, so the edema stays mostly within it
    center = extent / 2 + rng.uniform(-0.4, 0.4, 3) * brain_radii
    scale = rng.uniform(0.85, 1.15, 3)
    label = np.zeros(shape, np.uint8)
    for value, radius in ((2, 7.0), (4, 4.5), (1, 2.5)):  # edema, enhancing rim, necrosis: inner overwrites outer
        label[_ellipsoid(grid, center, radius * scale)] = value
    label[~brain] = 0
    contrasts = {  # brain, necrosis 1, edema 2, enhancing 4
        "t1": (100.0, 50.0, 80.0, 90.0),
        "t1ce": (100.0, 40.0, 85.0, 220.0),
        "t2": (80.0, 180.0, 160.0, 120.0),
        "flair": (90.0, 100.0, 200.0, 130.0),
    }
    origin = (-float(index), -239.0 + index, 5.0 * index)
    folder = os.path.join(root, case)
    os.makedirs(folder, exist_ok=True)
    for modality, (tissue, ncr, ed, et) in contrasts.items():
        image = np.full(shape, tissue, np.float32)
        for value, intensity in ((1, ncr), (2, ed), (4, et)):
            image[label == value] = intensity
        # skull-stripped: exactly 0 outside the brain, >= 1 inside
        image = np.where(brain, np.clip(_noisy(image, rng, 8.0), 1.0, None), 0.0)
        _save_nifti(os.path.join(folder, f"{case}_{modality}.nii.gz"), image, spacing, origin, _LPS, np.int16)
    _save_nifti(os.path.join(folder, f"{case}_seg.nii.gz"), label, spacing, origin, _LPS, np.uint8)


def _write_spider(root: str, index: int, case: str, spacing, rng: np.random.RandomState) -> None:
    extent = np.asarray(_EXTENT_MM["spider"])
    shape = _shape(extent, spacing)
    lr, ap, si = _grid(shape, spacing)
    body_center = (extent[0] / 2 + rng.uniform(-2, 2), 22.0 + rng.uniform(-2, 2))  # anterior (RAS: larger AP)
    body_radii = (12.0 * rng.uniform(0.9, 1.1), 8.0 * rng.uniform(0.9, 1.1))
    body_section = ((lr - body_center[0]) / body_radii[0]) ** 2 + ((ap - body_center[1]) / body_radii[1]) ** 2 <= 1
    disc_section = ((lr - body_center[0]) / (0.9 * body_radii[0])) ** 2 + ((ap - body_center[1]) / body_radii[1]) ** 2 <= 1
    canal_center = (body_center[0], body_center[1] - body_radii[1] - 4.5)  # posterior to the bodies
    canal = (lr - canal_center[0]) ** 2 + (ap - canal_center[1]) ** 2 <= 3.5**2

    label = np.zeros(shape, np.uint8)
    label[np.broadcast_to(canal, shape)] = 100
    body_height, disc_height = 7.0 * rng.uniform(0.9, 1.1), 3.0 * rng.uniform(0.9, 1.1)
    top = extent[2] - spacing[2] / 2
    z = rng.uniform(-2.0, 0.0)  # bottom of disc 201, the lowest structure
    k = 1
    while z < top:
        in_disc = (si >= z) & (si < z + disc_height)
        label[np.broadcast_to(disc_section & in_disc, shape)] = 200 + k
        z += disc_height
        in_body = (si >= z) & (si < z + body_height)
        # a body that the field of view cuts off carries SPIDER's "partially visible" code 100 + k
        label[np.broadcast_to(body_section & in_body, shape)] = 100 + k if z + body_height > top else k
        z += body_height
        k += 1

    contrasts = {"t1": (60.0, 160.0, 90.0, 25.0), "t2": (50.0, 90.0, 170.0, 200.0)}  # tissue, bone, disc, canal
    bone = (label >= 1) & (label <= 125) & (label != 100)
    disc = label > 200
    origin = (-20.0 - index, -30.0 + 2.0 * index, 100.0 + index)
    layout = _RAS if index % 2 == 0 else _SAGITTAL_DICOM
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "masks"), exist_ok=True)
    for modality, (tissue, bone_i, disc_i, canal_i) in contrasts.items():
        image = np.full(shape, tissue, np.float32)
        image[bone], image[disc], image[label == 100] = bone_i, disc_i, canal_i
        image = np.clip(_noisy(image, rng, 6.0), 0.0, None)
        _save_mha(os.path.join(root, "images", f"{case}_{modality}.mha"), image, spacing, origin, layout, np.uint16)
        _save_mha(os.path.join(root, "masks", f"{case}_{modality}.mha"), label, spacing, origin, layout, np.uint8)


def _write_mmwhs(root: str, index: int, case: str, spacing, rng: np.random.RandomState) -> None:
    extent = np.asarray(_EXTENT_MM["mmwhs"])
    shape = _shape(extent, spacing)
    grid = _grid(shape, spacing)
    lr, ap, si = grid
    c = extent / 2 + rng.uniform(-3, 3, 3)
    s = rng.uniform(0.9, 1.1, 3)  # heart size per axis
    label = np.zeros(shape, np.uint16)

    def tube(x: float, y: float, z0: float, radius: float) -> np.ndarray:
        """A vessel running up (axis 2) from height ``z0`` to the top of the field of view."""
        return np.broadcast_to(((lr - x) ** 2 + (ap - y) ** 2 <= radius**2) & (si >= z0), shape)

    lv_center, lv_radii = c + np.array([-6.0, 0.0, -6.0]) * s, np.array([8.0, 7.0, 10.0]) * s
    # painted back to front: later structures overwrite earlier ones where they touch
    label[tube(c[0] - 1 * s[0], c[1] + 3 * s[1], c[2] + 4 * s[2], 3.0)] = 820
    label[tube(c[0] + 6 * s[0], c[1] + 9 * s[1], c[2] + 6 * s[2], 3.0)] = 850
    la = _ellipsoid(grid, c + np.array([-6.0, -4.0, 9.0]) * s, np.array([7.0, 6.0, 5.0]) * s)
    label[la] = 420
    if index == 0:  # a few MM-WHS files label part of the left atrium 421
        label[la & (si > c[2] + 11 * s[2])] = 421
    label[_ellipsoid(grid, c + np.array([8.0, -2.0, 9.0]) * s, np.array([6.0, 6.0, 5.0]) * s)] = 550
    label[_ellipsoid(grid, c + np.array([8.0, 4.0, -6.0]) * s, np.array([6.0, 6.0, 9.0]) * s)] = 600
    label[_ellipsoid(grid, lv_center, lv_radii + 3.0)] = 205  # myocardium: a 3 mm shell around the cavity
    label[_ellipsoid(grid, lv_center, lv_radii)] = 500

    intensities = {0: 90.0, 205: 60.0, 420: 170.0, 421: 170.0, 500: 200.0, 550: 150.0, 600: 185.0, 820: 230.0, 850: 120.0}
    image = np.zeros(shape, np.float32)
    for value, intensity in intensities.items():
        image[label == value] = intensity
    image = np.clip(_noisy(image, rng, 8.0), 0.0, None)
    origin = (-80.0 + index, 40.0 - index, -120.0 + 3.0 * index)
    layout = _RAS if index % 2 == 0 else _PERMUTED
    folder = os.path.join(root, "mr_train")
    os.makedirs(folder, exist_ok=True)
    _save_nifti(os.path.join(folder, f"mr_train_{case}_image.nii.gz"), image, spacing, origin, layout, np.int16)
    _save_nifti(os.path.join(folder, f"mr_train_{case}_label.nii.gz"), label, spacing, origin, layout, np.uint16)


def _rotated(direction: np.ndarray, angle: float, rng: np.random.RandomState) -> np.ndarray:
    """``direction`` turned by ``angle`` (radians) towards a random perpendicular direction."""
    side = np.cross(direction, rng.normal(size=3))
    side /= np.linalg.norm(side)
    turned = np.cos(angle) * direction + np.sin(angle) * side
    return turned / np.linalg.norm(turned)


def _tree_segments(extent: np.ndarray, rng: np.random.RandomState, radius_mm: Sequence[float], levels: int = 5) -> list:
    """Straight pieces ``(start, end, radius)`` (mm) of a vessel tree entering through the left face.

    Level ``k`` of ``levels`` has the radius ``r_max (r_min / r_max) ** (k / (levels - 1))``, so the
    root has the largest radius and the leaves the smallest. Every branch forks into two children at
    different angles (the thinner one turning further); each branch is three pieces with a
    little curvature.
    """
    r_min, r_max = float(radius_mm[0]), float(radius_mm[1])
    start = np.array([0.0, extent[1] * rng.uniform(0.35, 0.65), extent[2] * rng.uniform(0.35, 0.65)])
    direction = np.array([1.0, rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3)])
    stack = [(start, direction / np.linalg.norm(direction), 0)]
    pieces = []
    while stack:
        point, direction, level = stack.pop()
        radius = r_max * (r_min / r_max) ** (level / (levels - 1))
        length = 0.3 * float(max(extent)) * 0.8**level * rng.uniform(0.8, 1.2)
        for _ in range(3):
            direction = direction + rng.normal(0.0, 0.12, 3)
            direction /= np.linalg.norm(direction)
            end = point + direction * length / 3
            pieces.append((point, end, radius))
            point = end
        if level + 1 < levels:
            stack.append((point, _rotated(direction, np.radians(rng.uniform(15, 35)), rng), level + 1))
            stack.append((point, _rotated(direction, np.radians(rng.uniform(40, 70)), rng), level + 1))
    return pieces


def vessel_tree(
    shape: Sequence[int],
    spacing: Sequence[float],
    rng: np.random.RandomState,
    radius_mm: Sequence[float] = VESSEL_RADIUS_MM,
    levels: int = 5,
    noise: float = 12.0,
    contrast: float = 150.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A branching vessel tree as a ToF-like image and its binary label, on a grid of ``shape`` at ``spacing`` mm.

    The image is ``100 + contrast * coverage`` plus Gaussian noise (``noise``), ``coverage`` the
    partial volume of the tubes in each voxel (a ramp one mean voxel size wide across the wall), so a
    vessel thinner than a voxel is dimmer, as in a real acquisition. The label marks the voxels whose
    centre lies within ``max(radius, half the voxel diagonal)`` of a centreline: a vessel thinner
    than a voxel is still one connected line of voxels, as an annotator draws it.

    Args:
        shape: voxels per axis (RAS order, voxel centre ``i`` at ``i * spacing`` mm).
        spacing: mm per axis.
        rng: draws the tree and the noise.
        radius_mm: ``(finest, root)`` radii in mm; the levels in between are spaced geometrically.
        levels: tree depth: ``2 ** levels - 1`` branches.

    Returns:
        ``(image, label)``: ``float32`` and ``uint8`` (0 / 1) arrays of ``shape``.
    """
    spacing = np.asarray(spacing, float)
    shape = tuple(int(n) for n in shape)
    extent = np.asarray(shape) * spacing
    coverage = np.zeros(shape, np.float32)
    label = np.zeros(shape, bool)
    half_diagonal = 0.5 * float(np.linalg.norm(spacing))
    ramp = float(spacing.mean())
    for a, b, radius in _tree_segments(extent, rng, radius_mm, levels):
        reach = max(radius, half_diagonal) + ramp
        lo = np.maximum(np.floor((np.minimum(a, b) - reach) / spacing).astype(int), 0)
        hi = np.minimum(np.ceil((np.maximum(a, b) + reach) / spacing).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue  # the piece lies outside the field of view
        window = tuple(slice(l, h) for l, h in zip(lo, hi))
        x, y, z = np.meshgrid(*[np.arange(l, h) * s for l, h, s in zip(lo, hi, spacing)], indexing="ij")
        points = np.stack([x, y, z], -1)
        ab = b - a
        t = np.clip(((points - a) @ ab) / max(float(ab @ ab), 1e-12), 0.0, 1.0)
        distance = np.linalg.norm(points - (a + t[..., None] * ab), axis=-1)
        label[window] |= distance <= max(radius, half_diagonal)
        coverage[window] = np.maximum(coverage[window], np.clip((radius - distance) / ramp + 0.5, 0.0, 1.0))
    image = _noisy(100.0 + contrast * coverage, rng, noise).astype(np.float32)
    return image, label.astype(np.uint8)


def _vessel_split_folder(index: int, n_cases: int) -> str:
    """The split folder of case ``index``: the first cases train, then validate, then test, sized as
    :func:`~custom_networks.data.datalist.split_cases` sizes its splits (all train below 3 cases)."""
    n_test = max(1, int(round(0.1 * n_cases))) if n_cases >= 3 else 0
    n_val = max(1, int(round(0.2 * n_cases))) if n_cases >= 3 else 0
    if index < n_cases - n_val - n_test:
        return "train"
    return "validate" if index < n_cases - n_test else "test"


def _write_vessel(root: str, index: int, case: str, spacing, rng: np.random.RandomState, n_cases: int = 1) -> None:
    image, label = vessel_tree(_shape(_EXTENT_MM["vessel"], spacing), spacing, rng)
    image = np.clip(image, 0.0, None)
    folder = _vessel_split_folder(index, n_cases)
    origin = (-10.0 + index, -20.0 - index, 30.0 + 2.0 * index)
    layout = _RAS if index % 2 == 0 else _LPS
    for sub, array, dtype in ((folder, image, np.int16), (folder + "_label", label, np.uint8)):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
        _save_nifti(os.path.join(root, sub, case), array, spacing, origin, layout, dtype)


_WRITERS: dict[str, Callable] = {
    "brats": _write_brats,
    "spider": _write_spider,
    "spider_discs": _write_spider,
    "mmwhs": _write_mmwhs,
    "vessel": _write_vessel,
}


def write_synthetic_dataset(dataset: str, root: str, n_cases: int = 5, seed: int = 0, spacings=None) -> str:
    """Write ``n_cases`` generated cases of ``dataset`` in its official layout under ``root``.

    Args:
        dataset: ``"brats"``, ``"spider"`` (also ``"spider_discs"``: the same files), ``"mmwhs"``
            or ``"vessel"``.
        root: the data set folder (created; existing files of the same names are overwritten).
        n_cases: number of cases; ids from :func:`case_ids`, spacings from :data:`SPACINGS` (cycled).
        seed: draws anatomy and noise.
        spacings: spacings (mm, RAS order) to cycle through instead of :data:`SPACINGS`, e.g.
            ``[[0.8, 0.8, 5.0]]`` for thick axial slices.

    Returns:
        ``root`` as an absolute path.
    """
    spec = get_dataset(dataset)
    if int(n_cases) < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}.")
    root = os.path.abspath(os.path.expanduser(str(root)))
    os.makedirs(root, exist_ok=True)
    rng = np.random.RandomState(seed)
    spacings = [tuple(float(v) for v in s) for s in spacings] if spacings is not None else SPACINGS[spec.name]
    if not spacings or any(len(s) != 3 or min(s) <= 0 for s in spacings):
        raise ValueError(f"spacings {spacings!r} must be a list of positive (x, y, z) spacings in mm.")
    for i, case in enumerate(case_ids(spec.name, int(n_cases))):
        extra = {"n_cases": int(n_cases)} if spec.name == "vessel" else {}  # the split folder depends on the count
        _WRITERS[spec.name](root, i, case, np.asarray(spacings[i % len(spacings)], float), rng, **extra)
    return root


if __name__ == "__main__":
    import sys

    import fire

    try:
        fire.Fire(write_synthetic_dataset)
    except ValueError as e:
        sys.exit(f"error: {e}")
