"""Spacing transforms MONAI lacks: the paper's random-spacing patch sampler, the invertible
inference resampling that follows a spacing policy, and the fused way back to native labels.

All three resample through :mod:`custom_networks.pipeline.resample` (anti-aliasing and linear interpolation
as one small matrix per axis). None of them keeps per-image state on the instance: one instance
is safe to share between the threads of a ``CacheDataset`` and the processes of a ``DataLoader``.
Every decision (the working spacing, a budget's choice) travels in the data dict and in the
image's applied-operations record, where ``Invertd``, :class:`NativeLabelsd` and the app read it.

Intensities: images are z-scored once, at their native resolution and before any resampling,
with MONAI's ``NormalizeIntensityd(nonzero=..., channel_wise=True)`` at inference and the same
statistics and masking rule inside :class:`RandSpacingPatchd` in training. So the network sees the
same input in both: with ``nonzero=True`` (skull-stripped MR, BraTS) background voxels are exactly
0, foreground voxels have mean 0 and std 1 over the native volume; resampling then blurs the
boundary alike in both.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import Compose, InvertibleTransform, MapTransform, Randomizable
from monai.utils import TraceKeys, ensure_tuple_rep

from .resample import antialias_sigma, labels_to_native, resample_axes, resample_to_native, resample_to_spacing
from ..spacing import SpacingRange, parse_spacing, working_spacing

__all__ = ["NativeLabelsd", "RandSpacingPatchd", "SpacingPolicyd", "antialias_sigma", "image_spacing", "zscore_stats"]


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


def zscore_stats(img: torch.Tensor, nonzero: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std ``(C, 1, ...)`` as MONAI's ``NormalizeIntensity(channel_wise=True)``
    computes them: over all voxels, or over the non-zero voxels (``nonzero=True``), population std."""
    flat = img.reshape(img.shape[0], -1).float()
    if nonzero:
        mask = flat != 0
        count = mask.sum(1).clamp_min(1)
        mean = (flat * mask).sum(1) / count
        var = (((flat - mean[:, None]) * mask) ** 2).sum(1) / count
    else:
        mean, var = flat.mean(1), flat.var(1, unbiased=False)
    std = var.sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant channel is only centred, as MONAI does
    shape = (img.shape[0],) + (1,) * (img.dim() - 1)
    return mean.view(shape), std.view(shape)


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
        target_spacing: for the FS baseline: the patch is first acquired at the drawn spacing (as
            above, on a grid slightly larger than the patch) and then resampled to this fixed
            spacing (mm), so a fixed-spacing model learns the blur of coarse acquisitions. The
            ``spacing_key`` entry then holds ``target_spacing``.
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
        target_spacing: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.spacing_range = SpacingRange.from_config(spacing_range)
        self.target_spacing = (
            parse_spacing(target_spacing, self.spacing_range.spatial_dims, "target_spacing") if target_spacing is not None else None
        )
        if int(samples_per_spacing) < 1:
            raise ValueError(f"samples_per_spacing must be >= 1, got {samples_per_spacing}.")
        self.samples_per_spacing = int(samples_per_spacing)
        # the random draws of one sample happen under this lock, so that threads sharing the
        # instance never mix one sample's spacing with another's; the resampling runs outside it
        self._lock = threading.Lock()
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

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_lock", None)  # DataLoader workers get their own lock
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def randomize(self, data=None) -> tuple[tuple[float, ...], np.ndarray]:
        """Draw one sample's spacing (a new one every ``samples_per_spacing`` calls) and the random
        numbers its centre is made of; callers hold the lock."""
        if self._drawn % self.samples_per_spacing == 0:
            self._spacing = self.spacing_range.sample(self.R)
        self._drawn += 1
        return self._spacing, self.R.rand(3 + self.spacing_range.spatial_dims)

    def _center(self, shape, source, target, label, u: np.ndarray) -> np.ndarray:
        """Patch centre in source voxel coordinates (continuous), from the uniform draws ``u``."""
        half = (np.asarray(self.patch_size) - 1) / 2 * np.asarray(target) / np.asarray(source)
        if label is not None and u[0] < self.pos_fraction:
            label = label[0] if label.shape[0] == 1 else label.argmax(0)
            label = label.as_tensor() if isinstance(label, MetaTensor) else label
            # class indices are small non-negative integers: bincount is far cheaper than unique
            values = torch.nonzero(torch.bincount(label.reshape(-1).long().clamp_min(0))[1:]).reshape(-1) + 1
            if len(values):
                value = values[min(int(u[1] * len(values)), len(values) - 1)]
                voxels = torch.nonzero(label == value)
                return voxels[min(int(u[2] * len(voxels)), len(voxels) - 1)].cpu().numpy().astype(float)
        size = np.asarray(shape, dtype=float)
        low, high = half, size - 1 - half
        return np.where(low <= high, low + u[3:] * np.maximum(high - low, 0), (size - 1) / 2)

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
        with self._lock:
            target, u = self.randomize()
        label = d.get(self.label_key) if self.label_key else None
        patch_spacing = self.target_spacing or target
        center = self._center(shape, source, patch_spacing, label, u)

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
        if self.target_spacing:
            # FS training: simulate an acquisition at the drawn spacing on a grid one voxel wider
            # than the patch, then resample that to the fixed output spacing
            step = np.asarray(target) / np.asarray(source)
            coarse = [c[0] - st + np.arange(int(np.ceil((c[-1] - c[0]) / st)) + 3) * st for c, st in zip(coords, step)]
            fine = [(c - g[0]) / st for c, g, st in zip(coords, coarse, step)]

        # the patch's affine: voxel j of the patch is source voxel coords[0] + j * factor
        to_source = np.diag(np.append(factor, 1.0))
        to_source[:dims, -1] = [c[0] for c in coords]
        for key, mode in zip(keys, self.mode):
            img = d[key]
            src = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
            if mode == "bilinear" and self.normalize:
                # the inference normalisation: NormalizeIntensityd at native resolution, before
                # resampling (bundles run it in the cached part of the chain and pass normalize=False)
                src = _zscore(src, self.nonzero)
            if self.target_spacing:
                acquired = resample_axes(src.float() if mode == "bilinear" else src, coarse, antialias_sigma(source, target), mode)
                out = resample_axes(acquired, fine, antialias_sigma(target, patch_spacing), mode)
            else:
                out = resample_axes(src.float() if mode == "bilinear" else src, coords, antialias_sigma(source, target), mode)
            if mode == "bilinear":
                out = out * valid
            else:
                out = out.to(src.dtype)
            affine = img.affine if isinstance(img, MetaTensor) else torch.eye(dims + 1, dtype=torch.float64)
            new_affine = affine.to(torch.float64) @ torch.as_tensor(to_source, dtype=torch.float64)
            d[key] = MetaTensor(out, affine=new_affine, meta={k: v for k, v in getattr(img, "meta", {}).items() if k != "affine"})
        d[self.spacing_key] = torch.tensor(patch_spacing, dtype=torch.float32)
        return d


def _zscore(src: torch.Tensor, nonzero: bool) -> torch.Tensor:
    """``src`` z-scored per channel as ``NormalizeIntensity(nonzero, channel_wise=True)`` does
    (:func:`zscore_stats`); with ``nonzero`` zeros stay 0."""
    mean, std = zscore_stats(src, nonzero)
    out = (src.float() - mean) / std
    return torch.where(src != 0, out, torch.zeros((), dtype=out.dtype, device=out.device)) if nonzero else out


def _same_spacing(a: Sequence[float], b: Sequence[float]) -> bool:
    return bool(np.allclose(a, b, rtol=1e-6, atol=0))


class SpacingPolicyd(MapTransform, InvertibleTransform):
    """Resample images to the working spacing a policy chooses; invertible with ``Invertd``.

    The working spacing of each image comes from its own spacing and the policy (see
    :func:`~custom_networks.spacing.working_spacing`): ``"native"`` (no resampling), ``"target"``
    (``target_spacing``), or ``"clamp"`` (axes outside ``trained_range`` moved to its nearest
    edge). Axes that are downsampled are first smoothed with a Gaussian (:func:`antialias_sigma`),
    as in training. The grid is MONAI ``Spacing``'s (same directions and first voxel, the new
    spacing), the resampling :func:`~custom_networks.pipeline.resample.resample_axes` (border padding).
    The operation is recorded in each image's applied operations, so MONAI's ``Invertd`` (linear,
    or nearest for ``nearest_interp``) and :class:`NativeLabelsd` (fused, to labels) map a
    prediction back to the input's native geometry exactly (shape and affine).

    Stored in the data dict: the working spacing under ``spacing_key`` as a ``(D,)`` float32
    tensor, and what decided it under ``decision_key``: ``{"policy", "native_spacing",
    "spacing"}``, plus the policy's own account for a policy object with a ``decide`` method (e.g.
    :class:`~custom_networks.pipeline.cost.BudgetSpacing`, which is handed the seconds already spent on the
    request when the data dict holds a ``time.perf_counter()`` start under ``start_key``).

    Z-score images before this transform (``NormalizeIntensityd``, at native resolution): the same
    normalisation as the training patches of :class:`RandSpacingPatchd`.

    Args:
        keys: images to resample; the first decides the working spacing.
        policy: ``"native"``, ``"target"`` or ``"clamp"``; or a callable
            ``(native_spacing, spatial_shape) -> working_spacing`` (mm, tensor axis order) that
            decides per image, or an object with ``decide(native_spacing, spatial_shape,
            elapsed_s) -> {"spacing": ..., ...}``.
        target_spacing: mm for ``"target"``: a number, a sequence or a string like ``"1.5,1.5,3"``.
        trained_range: the model's spacing range for ``"clamp"``.
        mode: interpolation per key (``"bilinear"`` images, ``"nearest"`` labels).
        spacing_key: where the working spacing is stored.
        decision_key: where the decision is stored.
        start_key: where the request's start time may be found (see above).
    """

    def __init__(
        self,
        keys: KeysCollection,
        policy: Any = "native",
        target_spacing=None,
        trained_range=None,
        mode: str | Sequence[str] = "bilinear",
        spacing_key: str = "spacing",
        decision_key: str = "spacing_decision",
        start_key: str = "request_start",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if not callable(policy) and not hasattr(policy, "decide"):
            # validate now so a wrong option fails before any image is read
            working_spacing((1.0, 1.0, 1.0), policy, target_spacing, trained_range)
        self.policy = policy
        self.target_spacing = target_spacing
        self.trained_range = trained_range
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        for m in self.mode:
            if m not in ("bilinear", "nearest"):
                raise ValueError(f"mode {m!r} is not supported; expected 'bilinear' (images) or 'nearest' (labels).")
        self.spacing_key = spacing_key
        self.decision_key = decision_key
        self.start_key = start_key

    def decide(self, native: Sequence[float], shape: Sequence[int], data: Mapping | None = None) -> dict:
        """The working spacing for an image of ``native`` spacing and spatial ``shape``, as a dict."""
        native = tuple(float(s) for s in native)
        if hasattr(self.policy, "decide"):
            start = (data or {}).get(self.start_key)
            elapsed = time.perf_counter() - float(start) if start is not None else 0.0
            decision = dict(self.policy.decide(native, tuple(shape), elapsed))
            policy = type(self.policy).__name__
        elif callable(self.policy):
            decision = {"spacing": tuple(float(s) for s in self.policy(native, tuple(shape)))}
            policy = getattr(self.policy, "__name__", type(self.policy).__name__)
        else:
            decision = {"spacing": working_spacing(native, self.policy, self.target_spacing, self.trained_range)}
            policy = self.policy
        spacing = parse_spacing(list(decision["spacing"]), len(native), what="working spacing")
        return {"policy": policy, "native_spacing": list(native), **decision, "spacing": list(spacing)}

    def resample(self, img: torch.Tensor, target: Sequence[float], mode: str = "bilinear") -> MetaTensor:
        """One image to ``target`` mm, its applied-operations record extended (see class doc)."""
        if not isinstance(img, MetaTensor):
            img = MetaTensor(img)
        native = image_spacing(img)
        shape = tuple(img.shape[1:])
        src = img.as_tensor()
        if _same_spacing(native, target):
            out, factor = src, (1.0,) * len(native)
        else:
            out, factor = resample_to_spacing(src, native, target, mode)
        native_affine = img.affine.to(torch.float64)
        affine = native_affine @ torch.diag(torch.tensor([*factor, 1.0], dtype=torch.float64))
        result = MetaTensor(out, affine=affine, meta={k: v for k, v in img.meta.items() if k != "affine"})
        result.applied_operations = list(img.applied_operations)
        self.push_transform(
            result,
            orig_size=shape,
            extra_info={"factor": list(factor), "native_affine": native_affine.tolist(), "mode": mode},
        )
        return result

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        decision = self.decide(image_spacing(d[keys[0]]), d[keys[0]].shape[1:], d)
        for key, mode in zip(keys, self.mode):
            d[key] = self.resample(d[key], decision["spacing"], mode)
        d[self.spacing_key] = torch.tensor(decision["spacing"], dtype=torch.float32)
        d[self.decision_key] = decision
        return d

    def inverse_image(self, img: MetaTensor, nearest: bool = False) -> MetaTensor:
        """``img`` on the working grid back to the native grid of the recorded operation."""
        op = self.pop_transform(img)
        info = op[TraceKeys.EXTRA_INFO]
        shape = tuple(int(s) for s in op[TraceKeys.ORIG_SIZE])
        mode = "nearest" if nearest or info["mode"] == "nearest" else "bilinear"
        src = img.as_tensor()
        if all(f == 1.0 for f in info["factor"]) and tuple(src.shape[1:]) == shape:
            out = src
        else:
            out = resample_to_native(src if mode == "nearest" else src.float(), info["factor"], shape, mode)
        result = MetaTensor(out, affine=torch.tensor(info["native_affine"], dtype=torch.float64), meta={k: v for k, v in img.meta.items() if k != "affine"})
        result.applied_operations = list(img.applied_operations)
        return result

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.inverse_image(d[key])
        return d


class NativeLabelsd(MapTransform):
    """The fused way back: class scores on the working grid to a label map in the input's geometry.

    Equals ``Activationsd(softmax=True)`` + ``Invertd(nearest_interp=False)`` + ``AsDiscreted(
    argmax=True)`` over the preprocessing ``transform`` (tested), but never holds the class
    probabilities on the native grid: :func:`~custom_networks.pipeline.resample.labels_to_native`
    interpolates only near label boundaries. The transforms before the :class:`SpacingPolicyd`
    step (e.g. ``Orientationd``) are then inverted on the label with MONAI's own inverses.

    Args:
        keys: the network output ``(C, *working)`` (logits, or probabilities with ``softmax=False``).
        transform: the preprocessing ``Compose`` that produced the network input.
        orig_keys: the preprocessed image whose applied operations are inverted.
        softmax: apply a softmax over classes first (linear interpolation of probabilities, as
            MONAI's bundles do with ``Invertd`` after ``Activationsd``).
        dtype: label dtype.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        transform: Compose | None = None,
        orig_keys: KeysCollection = "image",
        softmax: bool = True,
        dtype: torch.dtype | str = torch.uint8,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if not isinstance(transform, Compose):
            raise ValueError(f"NativeLabelsd needs the preprocessing Compose as 'transform', got {type(transform).__name__}.")
        self.transform = transform
        self.orig_keys = ensure_tuple_rep(orig_keys, len(self.keys))
        self.softmax = softmax
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype

    def _split(self, ops: list) -> tuple[SpacingPolicyd, dict, Compose]:
        """The resampling step, its record, and the invertible steps before it."""
        steps = list(self.transform.flatten().transforms)
        for i in range(len(ops) - 1, -1, -1):
            for j, t in enumerate(steps):
                if isinstance(t, SpacingPolicyd) and ops[i].get(TraceKeys.ID) == id(t):
                    return t, i, Compose(steps[:j])
        raise ValueError(
            "NativeLabelsd found no SpacingPolicyd operation of its 'transform' in the image's applied "
            "operations; pass the preprocessing that produced the network input."
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, orig_key in self.key_iterator(d, self.orig_keys):
            image = d[orig_key]
            ops = list(image.applied_operations)
            step, index, earlier = self._split(ops)
            info = ops[index][TraceKeys.EXTRA_INFO]
            shape = tuple(int(s) for s in ops[index][TraceKeys.ORIG_SIZE])
            scores = d[key].as_tensor() if isinstance(d[key], MetaTensor) else torch.as_tensor(d[key])
            labels = labels_to_native(scores, info["factor"], shape, self.dtype, softmax=self.softmax)
            label = MetaTensor(labels, affine=torch.tensor(info["native_affine"], dtype=torch.float64), meta={k: v for k, v in image.meta.items() if k != "affine"})
            label.applied_operations = ops[:index]
            # the steps before the resampling (reorientation), with MONAI's inverses, as Invertd does
            d[key] = earlier.inverse({orig_key: label})[orig_key]
        return d
