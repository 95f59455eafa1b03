"""Spacing transforms MONAI lacks: the paper's random-spacing patch sampler, and the invertible
inference resampling that follows a spacing policy (with anti-aliasing)."""

from __future__ import annotations

import math
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.networks.layers.convutils import gaussian_1d
from monai.transforms import GaussianSmooth, InvertibleTransform, MapTransform, Randomizable, Spacing
from monai.utils import ensure_tuple_rep

from .spacing import SpacingRange, parse_spacing, working_spacing

__all__ = ["RandSpacingPatchd", "SpacingPolicyd", "antialias_sigma", "image_spacing"]


def image_spacing(img: torch.Tensor, spatial_dims: int | None = None) -> tuple[float, ...]:
    """Voxel spacing (mm, tensor axis order) of a channel-first image, from its affine.

    Raises:
        ValueError: if ``img`` carries no affine (a plain tensor or array).
    """
    if not isinstance(img, MetaTensor):
        raise ValueError(
            f"cannot read the voxel spacing of a {type(img).__name__}; load images with MONAI's "
            "LoadImaged (MetaTensor with an affine) or pass the spacing explicitly."
        )
    dims = spatial_dims or img.dim() - 1
    return tuple(float(v) for v in affine_to_spacing(img.affine, r=dims))


def antialias_sigma(source: Sequence[float], target: Sequence[float]) -> tuple[float, ...]:
    """Gaussian sigma per axis (in source voxels) before resampling ``source`` -> ``target`` mm.

    ``(factor - 1) / 2`` for a downsampling factor ``target / source`` (as scikit-image's
    ``resize(anti_aliasing=True)``), 0 on axes that are kept or upsampled.
    """
    return tuple(max(0.0, (t / s - 1.0) / 2.0) for s, t in zip(source, target))


def _mean_std(img: torch.Tensor, nonzero: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std ``(C, 1, ...)`` over all (or the non-zero) voxels."""
    flat = img.reshape(img.shape[0], -1).float()
    if nonzero:
        mask = flat != 0
        count = mask.sum(1).clamp_min(1)
        mean = (flat * mask).sum(1) / count
        var = (((flat - mean[:, None]) * mask) ** 2).sum(1) / count
    else:
        mean, var = flat.mean(1), flat.var(1, unbiased=False)
    shape = (img.shape[0],) + (1,) * (img.dim() - 1)
    return mean.view(shape), var.sqrt().clamp_min(1e-8).view(shape)


def _axis_operator(coords: np.ndarray, lo: int, hi: int, sigma: float, device) -> torch.Tensor:
    """``(P, hi - lo)`` matrix: Gaussian smoothing (``sigma`` voxels, zero outside the region) then
    linear interpolation at ``coords``, along one axis."""
    pos = torch.as_tensor(coords - lo, dtype=torch.float32, device=device)
    grid = torch.arange(hi - lo, dtype=torch.float32, device=device)
    op = (1 - (pos[:, None] - grid[None, :]).abs()).clamp_min(0)  # linear interpolation ("hat") weights
    if sigma > 0:
        # MONAI's own discretised Gaussian, as in its GaussianFilter
        taps = gaussian_1d(torch.tensor(float(sigma)), truncated=4.0, approx="erf", normalize=True).to(device, torch.float32)
        radius = (len(taps) - 1) // 2
        diff = (grid[:, None] - grid[None, :]).long()
        blur = torch.where(diff.abs() <= radius, taps[(diff + radius).clamp(0, 2 * radius)], torch.zeros((), device=device))
        op = op @ blur
    return op


def _resample(src: torch.Tensor, coords: Sequence[np.ndarray], sigma: Sequence[float], mode: str) -> torch.Tensor:
    """Sample ``src`` ``(C, *S)`` at the outer product of per-axis voxel coordinates ``coords``.

    The sampling grid is axis-aligned, so anti-aliasing and linear interpolation factor into one
    small matrix per axis, applied as matrix products over the region the patch needs; this is the
    same result as a Gaussian filter followed by ``grid_sample(align_corners=True)`` with zero
    padding, at a fraction of the cost on the CPU (a 3D Gaussian filter of a whole BraTS volume
    takes about 0.7 s on 2 cores). ``"nearest"`` (labels) picks voxels by index. Outside ``src``
    the result is 0.
    """
    shape = src.shape[1:]
    if mode == "nearest":
        out = src
        for a, (c, n) in enumerate(zip(coords, shape)):
            index = np.rint(c).astype(np.int64)
            inside = torch.as_tensor((index >= 0) & (index < n), device=src.device)
            picked = out.index_select(a + 1, torch.as_tensor(index.clip(0, n - 1), device=src.device))
            view = [1] * picked.dim()
            view[a + 1] = -1
            out = picked * inside.view(view).to(picked.dtype)
        return out
    margin = [int(math.ceil(4 * s)) + 1 for s in sigma]
    lo = [min(max(0, int(math.floor(c[0])) - m), n - 1) for c, m, n in zip(coords, margin, shape)]
    hi = [max(min(n, int(math.ceil(c[-1])) + m + 1), l + 1) for c, m, n, l in zip(coords, margin, shape, lo)]
    out = src[(slice(None),) + tuple(slice(l, h) for l, h in zip(lo, hi))]
    for a, (c, l, h, s) in enumerate(zip(coords, lo, hi, sigma)):
        op = _axis_operator(c, l, h, s, src.device)
        out = torch.movedim(torch.movedim(out, a + 1, -1) @ op.T, -1, a + 1)
    return out.contiguous()

class RandSpacingPatchd(Randomizable, MapTransform):
    """The HyperSpace training augmentation: resample to a random spacing, then take a patch.

    For each sample a spacing is drawn uniformly per axis from ``spacing_range`` and a patch of
    ``patch_size`` voxels at that spacing is sampled from the image, keeping the physical extent
    of the anatomy: the patch covers ``patch_size * spacing`` mm. Images are interpolated linearly
    after a Gaussian anti-aliasing filter on the axes that are downsampled
    (:func:`antialias_sigma`), labels by nearest neighbour, so they keep their integer values.
    Images are z-scored per channel with the statistics of the whole volume (the mean of a
    resampled volume equals the source's, its spread changes by the smoothing only), so a patch is
    normalised as the whole image is at inference; voxels outside the image are 0 in the image and
    background in the label.

    Crop, anti-aliasing and resampling read only the region the patch needs, as one small matrix
    per axis (the grid is axis-aligned), on the device the data is on: place
    ``ToDeviced(keys, "cuda")`` before this transform (e.g. after a ``CacheDataset``'s
    deterministic transforms) to resample on the GPU.

    The drawn spacing is stored under ``spacing_key`` as a ``(D,)`` float32 tensor (collated to
    ``(B, D)``), and the outputs are MetaTensors whose affine maps the patch into the scanner
    space of the source image.

    Args:
        keys: keys to resample; the first is the reference image.
        spacing_range: :class:`~custom_networks.spacing.SpacingRange` or ``[[low, high], ...]``
            per axis (mm, tensor axis order).
        patch_size: patch size in voxels, one per spatial axis.
        mode: ``"bilinear"`` (image) or ``"nearest"`` (label) per key.
        label_key: label used to centre patches on foreground; ``None`` samples uniformly.
        pos_fraction: probability of centring a patch on a labelled voxel (of a label value drawn
            uniformly among those present, so small structures are seen as often as large ones).
        normalize: z-score the ``"bilinear"`` keys.
        nonzero: z-score statistics over non-zero voxels only (skull-stripped MR, e.g. BraTS).
        spacing_key: where the drawn spacing is stored.
        samples_per_spacing: draw a new spacing every this many samples. Set it to the batch size
            (with ``drop_last=True``) for one spacing per batch, hence one generated weight set and
            one batched convolution per step: a DataLoader worker assembles whole batches.
        output_spacing: for the FS baseline: the patch is first acquired at the drawn spacing (as
            above, on a grid slightly larger than the patch) and then resampled to this fixed
            spacing (mm), so a fixed-spacing model learns the blur of coarse acquisitions. The
            ``spacing_key`` entry then holds ``output_spacing``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spacing_range,
        patch_size: Sequence[int],
        mode: str | Sequence[str] = ("bilinear", "nearest"),
        label_key: str | None = "label",
        pos_fraction: float = 0.5,
        normalize: bool = True,
        nonzero: bool = False,
        spacing_key: str = "spacing",
        samples_per_spacing: int = 1,
        output_spacing: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.spacing_range = SpacingRange.from_config(spacing_range)
        self.output_spacing = (
            parse_spacing(output_spacing, self.spacing_range.spatial_dims, "output_spacing") if output_spacing is not None else None
        )
        if int(samples_per_spacing) < 1:
            raise ValueError(f"samples_per_spacing must be >= 1, got {samples_per_spacing}.")
        self.samples_per_spacing = int(samples_per_spacing)
        self._drawn = 0
        self._spacing: tuple[float, ...] = ()
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) != self.spacing_range.spatial_dims or min(self.patch_size) < 1:
            raise ValueError(
                f"patch_size {list(patch_size)} must be {self.spacing_range.spatial_dims} positive voxel counts, "
                f"one per axis of the spacing range."
            )
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        for m in self.mode:
            if m not in ("bilinear", "nearest"):
                raise ValueError(f"mode {m!r} is not supported; expected 'bilinear' (images) or 'nearest' (labels).")
        if not 0.0 <= pos_fraction <= 1.0:
            raise ValueError(f"pos_fraction must be in [0, 1], got {pos_fraction}.")
        self.label_key = label_key
        self.pos_fraction = float(pos_fraction)
        self.normalize = normalize
        self.nonzero = nonzero
        self.spacing_key = spacing_key

    def set_random_state(self, seed=None, state=None) -> "RandSpacingPatchd":
        super().set_random_state(seed, state)
        self._drawn = 0  # a re-seeded transform repeats its draws exactly
        return self

    def randomize(self, data=None) -> None:
        """Draw the spacing (every ``samples_per_spacing`` calls); the centre is drawn per sample."""
        if self._drawn % self.samples_per_spacing == 0:
            self._spacing = self.spacing_range.sample(self.R)
        self._drawn += 1

    def _draw_center(self, shape, source, target, label) -> np.ndarray:
        """Patch centre in source voxel coordinates (continuous)."""
        half = (np.asarray(self.patch_size) - 1) / 2 * np.asarray(target) / np.asarray(source)
        if label is not None and self.R.rand() < self.pos_fraction:
            label = label[0] if label.shape[0] == 1 else label.argmax(0)
            label = label.as_tensor() if isinstance(label, MetaTensor) else label
            # class indices are small non-negative integers: bincount is far cheaper than unique
            values = torch.nonzero(torch.bincount(label.reshape(-1).long().clamp_min(0))[1:]).reshape(-1) + 1
            if len(values):
                value = values[self.R.randint(len(values))]
                voxels = torch.nonzero(label == value)
                return voxels[self.R.randint(len(voxels))].cpu().numpy().astype(float)
        size = np.asarray(shape, dtype=float)
        low, high = half, size - 1 - half
        return np.where(low <= high, low + self.R.rand(len(shape)) * np.maximum(high - low, 0), (size - 1) / 2)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        ref = d[keys[0]]
        dims = self.spacing_range.spatial_dims
        if ref.dim() != dims + 1:
            raise ValueError(
                f"'{keys[0]}' has shape {tuple(ref.shape)}; expected channel-first (C, {', '.join('S' * dims)})."
            )
        source = image_spacing(ref, dims)
        shape = tuple(ref.shape[1:])
        self.randomize()
        target = self._spacing
        label = d.get(self.label_key) if self.label_key else None
        center = self._draw_center(shape, source, self.output_spacing or target, label)

        patch_spacing = self.output_spacing or target
        factor = np.asarray(patch_spacing) / np.asarray(source)
        start = center - (np.asarray(self.patch_size) - 1) / 2 * factor
        # on axes kept at the source spacing, patch voxels sit on source voxels: an exact crop, no
        # interpolation blur, as the image is at native-spacing inference
        start = np.where(np.isclose(factor, 1.0), np.round(start), start)
        # source voxel coordinate of every patch voxel, per axis
        coords = [start[a] + np.arange(p) * factor[a] for a, p in enumerate(self.patch_size)]
        device = ref.device
        inside = [torch.as_tensor((c >= -1e-3) & (c <= n - 1 + 1e-3), device=device) for c, n in zip(coords, shape)]
        valid = inside[0]
        for m in inside[1:]:
            valid = valid[..., None] & m
        if self.output_spacing:
            # FS training: simulate an acquisition at the drawn spacing on a grid one voxel wider
            # than the patch, then resample that to the fixed output spacing
            step = np.asarray(target) / np.asarray(source)
            coarse = [c[0] - st + np.arange(int(math.ceil((c[-1] - c[0]) / st)) + 3) * st for c, st in zip(coords, step)]
            fine = [(c - g[0]) / st for c, g, st in zip(coords, coarse, step)]

        # the patch's affine: voxel j of the patch is source voxel coords[0] + j * factor
        to_source = np.diag(np.append(factor, 1.0))
        to_source[:dims, -1] = [c[0] for c in coords]
        for key, mode in zip(keys, self.mode):
            img = d[key]
            src = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
            if self.output_spacing:
                acquired = _resample(src.float(), coarse, antialias_sigma(source, target), mode)
                out = _resample(acquired, fine, antialias_sigma(target, patch_spacing), mode)
            else:
                out = _resample(src.float(), coords, antialias_sigma(source, target), mode)
            if mode == "bilinear":
                if self.normalize:
                    mean, std = _mean_std(src, self.nonzero)
                    out = (out - mean) / std
                out = out * valid
            else:
                out = out.to(src.dtype)
            affine = img.affine if isinstance(img, MetaTensor) else torch.eye(dims + 1, dtype=torch.float64)
            new_affine = affine.to(torch.float64) @ torch.as_tensor(to_source, dtype=torch.float64)
            d[key] = MetaTensor(out, affine=new_affine, meta={k: v for k, v in getattr(img, "meta", {}).items() if k != "affine"})
        d[self.spacing_key] = torch.tensor(patch_spacing, dtype=torch.float32)
        return d


class SpacingPolicyd(MapTransform, InvertibleTransform):
    """Resample images to the working spacing a policy chooses; invertible with ``Invertd``.

    The working spacing of each image comes from its own spacing and the policy (see
    :func:`~custom_networks.spacing.working_spacing`): ``"native"`` (no resampling), ``"target"``
    (``target_spacing``), or ``"clamp"`` (axes outside ``trained_range`` moved to its nearest
    edge). Axes that are downsampled are first smoothed with a Gaussian (:func:`antialias_sigma`),
    as in training; the resampling itself is MONAI's ``Spacing``, so ``Invertd`` maps a prediction
    back to the input's native geometry (shape, spacing, origin, direction). The working spacing is
    stored under ``spacing_key`` as a ``(D,)`` float32 tensor.

    Apply z-scoring (``NormalizeIntensityd``) after this transform: the paper normalises at the
    working resolution.

    Args:
        keys: images to resample; the first decides the working spacing.
        policy: ``"native"``, ``"target"`` or ``"clamp"``; or a callable
            ``(native_spacing, spatial_shape) -> working_spacing`` (mm, tensor axis order) that
            decides per image, e.g. :class:`~custom_networks.cost.BudgetSpacing`.
        target_spacing: mm for ``"target"``: a number, a sequence or a string like ``"1.5,1.5,3"``.
        trained_range: the model's spacing range for ``"clamp"``.
        mode: interpolation per key (``"bilinear"`` images, ``"nearest"`` labels).
        spacing_key: where the working spacing is stored.
    """

    def __init__(
        self,
        keys: KeysCollection,
        policy: str = "native",
        target_spacing=None,
        trained_range=None,
        mode: str | Sequence[str] = "bilinear",
        spacing_key: str = "spacing",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if not callable(policy):
            # validate now so a wrong option fails before any image is read
            working_spacing((1.0, 1.0, 1.0), policy, target_spacing, trained_range)
        self.policy = policy
        self.target_spacing = target_spacing
        self.trained_range = trained_range
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.spacing_key = spacing_key
        self.resampler = Spacing(pixdim=1.0, mode="bilinear", padding_mode="border", align_corners=True)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        native = image_spacing(d[keys[0]])
        if callable(self.policy):
            target = tuple(float(s) for s in self.policy(native, tuple(d[keys[0]].shape[1:])))
        else:
            target = working_spacing(native, self.policy, self.target_spacing, self.trained_range)
        self.resampler.pixdim = np.asarray(target, dtype=np.float64)
        for key, mode in zip(keys, self.mode):
            img = d[key]
            sigma = antialias_sigma(image_spacing(img), target)
            if mode != "nearest" and any(s > 0 for s in sigma):
                img = GaussianSmooth(sigma=[max(s, 1e-6) for s in sigma])(img)
            d[key] = self.resampler(img, mode=mode, padding_mode="border" if mode != "nearest" else "zeros")
        d[self.spacing_key] = torch.tensor(target, dtype=torch.float32)
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resampler.inverse(d[key])
        return d
