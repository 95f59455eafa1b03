"""What inference at a working spacing will cost, and the finest spacing that fits a budget.

HyperSpace lets a user trade resolution for time and memory with one model. This module turns a
budget ("at most 8 GB of GPU memory", "at most 20 s on this CPU") into a working spacing:
:class:`InferenceCost` predicts the time and peak memory of sliding-window inference on an image
at a candidate spacing from a few calibrated constants, and :class:`BudgetSpacing` walks the
candidates from fine to coarse and keeps the finest one that fits. ``BudgetSpacing`` is a spacing
policy for :class:`~custom_networks.transforms.SpacingPolicyd`.

Units: spacings in mm, shapes in voxels, both in tensor axis order; times in seconds; memory in
bytes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from monai.transforms import GaussianSmooth, Spacing

from .spacing import SpacingRange, parse_spacing

__all__ = ["BudgetSpacing", "InferenceCost", "candidate_spacings", "window_count", "working_shape"]


def working_shape(native_spacing: Sequence[float], native_shape: Sequence[int], working: Sequence[float]) -> tuple[int, ...]:
    """Grid size of an image resampled from ``native_spacing`` to ``working`` (same field of view)."""
    return tuple(max(1, int(round(n * s / w))) for n, s, w in zip(native_shape, native_spacing, working))


def window_count(shape: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """Number of windows MONAI's ``sliding_window_inference`` runs on an image of ``shape``.

    Follows its scan: an image smaller than the window is padded to one window; otherwise windows
    start every ``int(roi * (1 - overlap))`` voxels (``roi`` when the image equals the window), the
    last one flush with the far edge.
    """
    n = 1
    for size, roi in zip(shape, roi_size):
        if size <= roi:
            continue
        interval = max(int(roi * (1 - overlap)), 1)
        n *= int(math.ceil((size - roi) / interval)) + 1
    return n


def candidate_spacings(native: Sequence[float], trained_range: SpacingRange | None = None, factor: float = 1.15) -> list[tuple[float, ...]]:
    """Working spacings to consider for an image of spacing ``native``, finest first.

    Candidate ``r`` coarsens every axis finer than ``r`` to ``r`` and leaves coarser axes alone, so a
    0.8 x 0.8 x 5 mm image goes 0.8 x 0.8 x 5 -> 0.92 x 0.92 x 5 -> ... -> 5 x 5 x 5 mm: the fine
    in-plane axes are given up first and no axis is ever made finer than the image. Each candidate
    is clamped to ``trained_range`` (so the first one is the ``clamp`` policy's spacing). ``r``
    grows geometrically by ``factor`` up to the coarsest spacing that matters (the trained range's
    top or the image's coarsest axis).
    """
    native = tuple(float(s) for s in native)
    top = max(native) if trained_range is None else max(max(native), max(trained_range.high))
    # the first level is the finest native axis itself; later ones are rounded to 0.1 um so that
    # reported spacings read well
    levels, r = [min(native)], min(native) * factor
    while r < top * factor:
        levels.append(min(round(r, 4), top))
        r *= factor
    out: list[tuple[float, ...]] = []
    for r in levels:
        spacing = tuple(max(s, r) for s in native)
        if trained_range is not None:
            spacing = trained_range.clamp(spacing)
        if not out or not np.allclose(spacing, out[-1], rtol=0, atol=1e-4):
            out.append(spacing)
    return out


@dataclass(frozen=True)
class InferenceCost:
    """Predicted time and peak memory of sliding-window inference, from calibrated constants.

    ``seconds = windows * seconds_per_window + native_voxels * seconds_per_voxel`` (the second term:
    anti-aliasing, resampling to the working grid and inverting the class probabilities back to
    the native grid). ``memory_bytes = window_bytes + 4 * working_voxels * (in_channels +
    out_channels + 1)`` (one window's forward, plus the float32 input, the output aggregate and the
    count map that ``sliding_window_inference`` keeps for the whole working grid).

    Args:
        roi_size: sliding window size (voxels).
        overlap: sliding window overlap (0..1).
        in_channels, out_channels: the network's.
        seconds_per_window: one window's forward with cached weights.
        seconds_per_voxel: pre/post-processing time per native voxel.
        window_bytes: peak memory one window's forward adds (device memory on CUDA).
        device: where the constants were measured, e.g. ``"cpu"`` or ``"cuda:0"``.
    """

    roi_size: tuple[int, ...]
    overlap: float
    in_channels: int
    out_channels: int
    seconds_per_window: float
    seconds_per_voxel: float
    window_bytes: float
    device: str = "cpu"

    def predict(self, native_spacing: Sequence[float], native_shape: Sequence[int], working: Sequence[float]) -> dict:
        """Predicted ``seconds``, ``memory_bytes``, ``windows`` and working ``shape`` for one image."""
        shape = working_shape(native_spacing, native_shape, working)
        windows = window_count(shape, self.roi_size, self.overlap)
        voxels = float(np.prod(shape))
        seconds = windows * self.seconds_per_window + float(np.prod(native_shape)) * self.seconds_per_voxel
        memory = self.window_bytes + 4.0 * voxels * (self.in_channels + self.out_channels + 1)
        return {"seconds": seconds, "memory_bytes": memory, "windows": windows, "shape": shape}

    @classmethod
    def calibrate(
        cls,
        network: torch.nn.Module,
        roi_size: Sequence[int],
        overlap: float,
        in_channels: int,
        out_channels: int,
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        device: str | torch.device = "cpu",
        repeats: int = 2,
    ) -> "InferenceCost":
        """Measure the constants on this machine: a few window forwards and one resampling.

        ``network(x, spacing)`` is called on zeros of ``roi_size``; the first call also generates
        and caches the weights, so the fastest of ``repeats`` calls after it is kept.
        """
        device = torch.device(device)
        roi_size = tuple(int(r) for r in roi_size)
        x = torch.zeros((1, in_channels, *roi_size), device=device)
        s = torch.tensor([list(spacing)], dtype=torch.float32, device=device)
        times = []
        with torch.no_grad():
            network(x, s)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            for _ in range(max(1, repeats)):
                start = time.perf_counter()
                network(x, s)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
        if device.type == "cuda":
            window_bytes = float(torch.cuda.max_memory_allocated(device) - base)
        else:
            # no allocator statistics on the CPU: the input, the output and a few feature maps
            window_bytes = 4.0 * float(np.prod(roi_size)) * (in_channels + 8 * out_channels)
        # pre/post-processing: anti-aliasing and resampling of one image channel plus the class
        # probabilities, timed on a small volume and scaled per voxel
        size = 48
        vol = torch.rand((in_channels + out_channels, size, size, size))
        start = time.perf_counter()
        Spacing(pixdim=(1.5, 1.5, 1.5), mode="bilinear")(GaussianSmooth(sigma=0.5)(vol))
        seconds_per_voxel = (time.perf_counter() - start) / size**3
        return cls(roi_size, float(overlap), int(in_channels), int(out_channels), min(times), seconds_per_voxel, window_bytes, str(device))


@dataclass
class BudgetSpacing:
    """A spacing policy: the finest candidate spacing whose predicted cost fits the budget.

    Use as ``SpacingPolicyd(keys, policy=BudgetSpacing(cost, ...))``. After a call, ``decision``
    holds what was chosen and why (spacing, predicted seconds and memory, whether it fits, how many
    candidates were looked at). When nothing fits, the coarsest candidate is used and
    ``decision["fits"]`` is ``False``.

    Args:
        cost: the calibrated cost model.
        trained_range: candidates are clamped to it (``None``: not clamped).
        time_budget_s: largest predicted time (s); ``None`` or ``<= 0``: no limit.
        memory_budget_gb: largest predicted peak memory (GB = 1e9 bytes); ``None`` or ``<= 0``: no limit.
    """

    cost: InferenceCost
    trained_range: SpacingRange | None = None
    time_budget_s: float | None = None
    memory_budget_gb: float | None = None
    decision: dict = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        for name in ("time_budget_s", "memory_budget_gb"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            if isinstance(value, bool) or not math.isfinite(number):
                raise ValueError(f"{name} must be a finite number (<= 0 for no limit); got {value!r}.")
            setattr(self, name, number)
        if self.trained_range is not None:
            self.trained_range = SpacingRange.from_config(self.trained_range)

    def fits(self, predicted: dict) -> bool:
        if self.time_budget_s and self.time_budget_s > 0 and predicted["seconds"] > self.time_budget_s:
            return False
        if self.memory_budget_gb and self.memory_budget_gb > 0 and predicted["memory_bytes"] > self.memory_budget_gb * 1e9:
            return False
        return True

    def __call__(self, native_spacing: Sequence[float], native_shape: Sequence[int]) -> tuple[float, ...]:
        native = parse_spacing(list(native_spacing), len(native_shape), what="image spacing")
        candidates = candidate_spacings(native, self.trained_range)
        for spacing in candidates:
            predicted = self.cost.predict(native, native_shape, spacing)
            if self.fits(predicted):
                break
        self.decision = {
            "spacing": list(spacing),
            "predicted_seconds": round(predicted["seconds"], 3),
            "predicted_memory_gb": round(predicted["memory_bytes"] / 1e9, 4),
            "fits": self.fits(predicted),
            "candidates": len(candidates),
        }
        return spacing
