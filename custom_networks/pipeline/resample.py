"""The one resampler: images to a working spacing and predictions back to the native grid.

Every spacing change in the project goes through this module: the training patches
(:class:`~custom_networks.pipeline.transforms.RandSpacingPatchd`), inference resampling
(:class:`~custom_networks.pipeline.transforms.SpacingPolicyd`), its inverse, and the fused way back from
class probabilities on the working grid to labels on the native grid (:func:`labels_to_native`).

Why not MONAI's ``GaussianSmooth`` + ``Spacing``: the grids here are axis-aligned with the source
grid (the same directions, another spacing), so anti-aliasing and linear interpolation factor into
one small matrix per axis. Applied block by block along each axis (a block of output voxels reads
only the source span it needs), the same result costs a fraction of a 3D Gaussian filter followed
by ``grid_sample`` on the CPU and runs on any device; one axis at a time, the most shrinking
first, so that later passes read a smaller volume. ``tests/test_resample.py`` checks equality with MONAI's
``GaussianSmooth`` + ``Spacing`` and ``Invertd`` + ``AsDiscreted``.

Grids follow MONAI's ``Spacing`` (``scale_extent=False``): working voxel ``j`` sits at source voxel
coordinate ``j * factor`` with ``factor = working / native`` per axis, and the working grid has
``round((n - 1) / factor) + 1`` voxels, so its first voxel is the source's first voxel.

Units: spacings in mm, coordinates in voxels, both in tensor axis order; images are channel-first
``(C, *spatial)``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers.convutils import gaussian_1d

__all__ = [
    "antialias_sigma",
    "axis_operator",
    "labels_to_native",
    "resample_axes",
    "resample_to_native",
    "resample_to_spacing",
    "working_grid",
]

# output voxels per block of one axis operator: large enough for efficient matrix products, small
# enough that a block reads little more than the source span its outputs need
_BLOCK = 32


def antialias_sigma(source: Sequence[float], target: Sequence[float]) -> tuple[float, ...]:
    """Gaussian sigma per axis (in source voxels) before resampling ``source`` -> ``target`` mm.

    ``(factor - 1) / 2`` for a downsampling factor ``target / source`` (as scikit-image's
    ``resize(anti_aliasing=True)``), 0 on axes that are kept or upsampled.
    """
    return tuple(max(0.0, (t / s - 1.0) / 2.0) for s, t in zip(source, target))


def working_grid(shape: Sequence[int], native: Sequence[float], working: Sequence[float]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Shape of the working grid and the factor ``working / native`` per axis (MONAI ``Spacing``'s grid).

    Args:
        shape: native spatial shape (voxels).
        native: native spacing (mm).
        working: working spacing (mm).
    """
    factor = tuple(float(w) / float(s) for s, w in zip(native, working))
    out = tuple(max(1, int(np.round((int(n) - 1) / f + 1.0))) for n, f in zip(shape, factor))
    return out, factor


def axis_operator(coords: np.ndarray, n: int, sigma: float = 0.0, padding: str = "zeros", device=None) -> torch.Tensor:
    """``(P, n)`` matrix along one axis: Gaussian smoothing (``sigma`` source voxels, zero outside),
    then linear interpolation at the ``P`` source coordinates ``coords``.

    ``padding="zeros"``: a coordinate outside ``[0, n - 1]`` reads zeros beyond the edge (as
    ``grid_sample(padding_mode="zeros", align_corners=True)``); ``"border"``: it is clamped to the
    edge (``padding_mode="border"``).
    """
    pos = torch.as_tensor(np.asarray(coords, dtype=np.float64), device=device)
    if padding == "border":
        pos = pos.clamp(0, n - 1)
    elif padding != "zeros":
        raise ValueError(f"padding {padding!r} must be 'zeros' or 'border'.")
    grid = torch.arange(n, dtype=torch.float64, device=device)
    op = (1 - (pos[:, None] - grid[None, :]).abs()).clamp_min(0)  # linear interpolation ("hat") weights
    if sigma > 0:
        # MONAI's own discretised Gaussian, as in its GaussianFilter (zero padding at the edges)
        taps = gaussian_1d(torch.tensor(float(sigma)), truncated=4.0, approx="erf", normalize=True).to(device, torch.float64)
        radius = (len(taps) - 1) // 2
        diff = (grid[:, None] - grid[None, :]).long()
        blur = torch.where(diff.abs() <= radius, taps[(diff + radius).clamp(0, 2 * radius)], torch.zeros((), dtype=torch.float64, device=device))
        op = op @ blur
    return op.float()


def _apply_leading(x: torch.Tensor, op: torch.Tensor) -> torch.Tensor:
    """``op @ x`` along axis 1 of ``x`` ``(C, n, R)`` (``op``: ``(P, n)``), giving ``(C, P, R)``.

    The operator is banded (each output reads a few neighbouring source voxels), so it is applied
    in blocks of :data:`_BLOCK` outputs, each a dense product with the contiguous source span it
    reads: no gathered copy of the input, and little work on zeros.
    """
    c, n, r = x.shape
    p = op.shape[0]
    if p <= _BLOCK or n <= 2 * _BLOCK:
        return torch.matmul(op.to(x.dtype), x)
    out = x.new_empty((c, p, r))
    support = (op != 0).cpu().numpy()
    for j0 in range(0, p, _BLOCK):
        j1 = min(p, j0 + _BLOCK)
        used = np.flatnonzero(support[j0:j1].any(0))
        if len(used) == 0:
            out[:, j0:j1] = 0
            continue
        lo, hi = int(used[0]), int(used[-1]) + 1
        out[:, j0:j1] = torch.matmul(op[j0:j1, lo:hi].to(x.dtype), x[:, lo:hi])
    return out


def _apply_axis(x: torch.Tensor, axis: int, op: torch.Tensor) -> torch.Tensor:
    """``x`` ``(C, *S)`` with spatial axis ``axis`` (1-based, size ``n``) replaced by ``op @ x`` along it."""
    moved = x if axis == 1 else torch.movedim(x, axis, 1).contiguous()
    shape = moved.shape
    out = _apply_leading(moved.reshape(shape[0], shape[1], -1), op).view(shape[0], op.shape[0], *shape[2:])
    return out if axis == 1 else torch.movedim(out, 1, axis)


def _nearest_axis(x: torch.Tensor, axis: int, coords: np.ndarray, padding: str) -> torch.Tensor:
    n = x.shape[axis]
    index = np.rint(coords).astype(np.int64)
    picked = x.index_select(axis, torch.as_tensor(index.clip(0, n - 1), device=x.device))
    if padding == "border":
        return picked
    inside = torch.as_tensor((index >= 0) & (index < n), device=x.device)
    view = [1] * picked.dim()
    view[axis] = -1
    return picked * inside.view(view).to(picked.dtype)


def resample_axes(
    src: torch.Tensor,
    coords: Sequence[np.ndarray],
    sigma: Sequence[float] | None = None,
    mode: str = "bilinear",
    padding: str = "zeros",
) -> torch.Tensor:
    """Sample ``src`` ``(C, *S)`` at the outer product of per-axis source voxel coordinates.

    ``"bilinear"`` (images, probabilities): Gaussian anti-aliasing of ``sigma`` source voxels per
    axis (0: none), then linear interpolation, the same as MONAI's ``GaussianFilter`` followed by
    ``grid_sample(align_corners=True)``. Only the region the coordinates need is read, one axis
    at a time (the most shrinking first), so that later passes read a smaller volume.
    ``"nearest"`` (labels) picks voxels by index and keeps the dtype. ``padding``: ``"zeros"`` or
    ``"border"`` outside ``src`` (see :func:`axis_operator`).

    Returns:
        ``(C, len(coords[0]), len(coords[1]), ...)``, float32 for ``"bilinear"``.
    """
    dims = src.dim() - 1
    if len(coords) != dims:
        raise ValueError(f"{len(coords)} coordinate arrays for an image of {dims} spatial axes {tuple(src.shape)}.")
    if mode == "nearest":
        out = src
        for a, c in enumerate(coords):
            out = _nearest_axis(out, a + 1, c, padding)
        return out
    if mode != "bilinear":
        raise ValueError(f"mode {mode!r} is not supported; expected 'bilinear' (images) or 'nearest' (labels).")
    sigma = tuple(sigma) if sigma is not None else (0.0,) * dims
    shape = src.shape[1:]
    # crop to the region the coordinates and the Gaussian's support need
    margin = [int(math.ceil(4 * s)) + 1 for s in sigma]
    lo = [min(max(0, int(math.floor(c.min())) - m), n - 1) for c, m, n in zip(coords, margin, shape)]
    hi = [max(min(n, int(math.ceil(c.max())) + m + 1), l + 1) for c, m, n, l in zip(coords, margin, shape, lo)]
    region = src[(slice(None),) + tuple(slice(l, h) for l, h in zip(lo, hi))].float()
    ops = [axis_operator(np.asarray(c) - l, h - l, s, padding, src.device) for c, l, h, s in zip(coords, lo, hi, sigma)]
    # the axis that shrinks the volume most goes first, so the later passes read less
    order = sorted(range(dims), key=lambda a: ops[a].shape[0] / region.shape[a + 1])
    out = region
    for a in order:
        out = _apply_axis(out, a + 1, ops[a])
    return out.contiguous()


def resample_to_spacing(src: torch.Tensor, native: Sequence[float], target: Sequence[float], mode: str = "bilinear") -> tuple[torch.Tensor, tuple[float, ...]]:
    """``src`` ``(C, *S)`` at ``native`` mm to the working grid of ``target`` mm (:func:`working_grid`),
    anti-aliased where an axis shrinks, border padding; returns the image and ``factor``
    (``target / native`` per axis; the working affine is ``native_affine @ diag(factor, 1)``).
    ``src`` itself comes back (factor 1) when the spacings are the same."""
    out_shape, factor = working_grid(src.shape[1:], native, target)
    if all(abs(f - 1.0) <= 1e-6 for f in factor):
        return src, (1.0,) * len(factor)
    coords = [np.arange(m) * f for m, f in zip(out_shape, factor)]
    sigma = antialias_sigma(native, target) if mode == "bilinear" else None
    return resample_axes(src if mode == "nearest" else src.float(), coords, sigma, mode, padding="border"), factor


def _native_positions(native_shape: Sequence[int], factor: Sequence[float], working_shape: Sequence[int]) -> list[np.ndarray]:
    """Working-grid coordinate of every native voxel, per axis (border-clamped)."""
    return [np.clip(np.arange(n) / f, 0, m - 1) for n, f, m in zip(native_shape, factor, working_shape)]


def resample_to_native(img: torch.Tensor, factor: Sequence[float], native_shape: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """Inverse of resampling to a working grid of ``factor``: ``img`` ``(C, *working)`` back to
    ``(C, *native_shape)``, linear (or nearest) with border padding."""
    coords = _native_positions(native_shape, factor, img.shape[1:])
    return resample_axes(img, coords, None, mode, padding="border")


def _argmax0(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(0)`` (ties to the lower index) as a running comparison over the leading axis:
    several times faster on the CPU than a strided reduction over a short leading axis."""
    best, index = x[0].clone(), torch.zeros(x.shape[1:], dtype=torch.long, device=x.device)
    for c in range(1, x.shape[0]):
        better = x[c] > best
        best = torch.where(better, x[c], best)
        index.masked_fill_(better, c)
    return index


def labels_to_native(
    probs: torch.Tensor,
    factor: Sequence[float],
    native_shape: Sequence[int],
    dtype: torch.dtype = torch.uint8,
    points_per_chunk: int = 1 << 18,
    softmax: bool = False,
) -> torch.Tensor:
    """The fused way back: class scores ``(C, *working)`` to labels ``(1, *native_shape)``.

    Equals linear interpolation of every class to the native grid followed by the argmax over
    classes (``Invertd`` + ``AsDiscreted(argmax=True)``), without ever holding ``C`` x native
    voxels in float. A native voxel whose enclosing working cell has the same arg-max class at all
    its corners takes that class: linear interpolation is a convex combination of the corners, and
    a class that dominates every corner dominates the combination. Only voxels in the other cells
    (near label boundaries) are interpolated, ``points_per_chunk`` at a time. Ties between classes
    go to the lower class index, as ``argmax`` does.

    Args:
        probs: scores on the working grid (probabilities or logits: argmax of linearly interpolated
            logits differs from that of probabilities; pass what you would interpolate).
        factor: ``working / native`` spacing per axis (see :func:`working_grid`).
        native_shape: the native spatial shape.
        dtype: label dtype (``uint8`` holds up to 255 classes).
        points_per_chunk: boundary voxels interpolated at a time (memory: about ``12 * C`` bytes each).
        softmax: ``probs`` are logits: interpolate their softmax. The softmax is taken only at the
            corners that are interpolated (the argmax of a voxel is that of its logits), so no
            probability volume is ever allocated.
    """
    if not dtype.is_floating_point and probs.shape[0] > torch.iinfo(dtype).max + 1:
        raise ValueError(f"{probs.shape[0]} classes do not fit labels of dtype {dtype}.")
    dims = probs.dim() - 1
    working_shape = probs.shape[1:]
    device = probs.device
    labels = _argmax0(probs)
    if tuple(working_shape) == tuple(native_shape) and all(float(f) == 1.0 for f in factor):
        return labels.to(dtype)[None]
    # a single working voxel on an axis: repeat it so that every axis has cells
    reps = [1 + (m == 1) for m in working_shape]
    if any(r > 1 for r in reps):
        probs = probs.repeat(1, *reps)
        labels = labels.repeat(*reps)
    grid = probs.shape[1:]
    positions = _native_positions(native_shape, factor, working_shape)
    cells_np = [np.minimum(np.floor(p), m - 2).astype(np.int64) for p, m in zip(positions, grid)]
    cells = [torch.as_tensor(c, device=device) for c in cells_np]
    fractions = [torch.as_tensor(p - c, dtype=torch.float32, device=device) for p, c in zip(positions, cells_np)]
    # per cell: the corner label, and whether all 2^D corners agree
    lab = labels[None, None].float()
    pool = F.max_pool3d if dims == 3 else F.max_pool2d if dims == 2 else F.max_pool1d
    mixed = pool(lab, 2, stride=1)[0, 0] != -pool(-lab, 2, stride=1)[0, 0]
    out = labels[tuple(slice(0, m - 1) for m in grid)].to(dtype)
    # gather per axis onto the native grid (small dtypes, one pass each); the innermost axis
    # first, while the array is small, so that the big passes copy whole rows
    for a in reversed(range(dims)):
        out = out.index_select(a, cells[a])
        mixed = mixed.index_select(a, cells[a])
    out = out.contiguous()
    points = mixed.reshape(-1).nonzero().squeeze(1)  # flat native indices of voxels in mixed cells
    flat_probs = probs.reshape(probs.shape[0], -1)
    native_strides = [int(np.prod(native_shape[a + 1 :])) for a in range(dims)]
    grid_strides = [int(np.prod(grid[a + 1 :])) for a in range(dims)]
    flat_out = out.view(-1)
    for start in range(0, points.shape[0], points_per_chunk):
        flat = points[start : start + points_per_chunk]
        index = [(flat // native_strides[a]) % native_shape[a] for a in range(dims)]
        base = [cells[a][index[a]] for a in range(dims)]
        frac = [fractions[a][index[a]] for a in range(dims)]
        value = None
        for corner in range(2**dims):
            weight, offset = None, None
            for a in range(dims):
                bit = (corner >> (dims - 1 - a)) & 1
                w = frac[a] if bit else 1 - frac[a]
                o = (base[a] + bit) * grid_strides[a]
                weight = w if weight is None else weight * w
                offset = o if offset is None else offset + o
            corner_scores = flat_probs.index_select(1, offset).float()
            if softmax:
                corner_scores = torch.softmax(corner_scores, 0)
            term = corner_scores * weight[None]
            value = term if value is None else value.add_(term)
        flat_out[flat] = _argmax0(value).to(dtype)
    return out[None]
