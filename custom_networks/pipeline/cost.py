"""What inference at a working spacing will cost, and the finest spacing that fits a budget.

HyperSpace lets a user trade resolution for time and memory with one model. This module turns a
budget ("at most 8 GB of GPU memory", "at most 20 s on this CPU") into a working spacing:
:class:`InferenceCost` predicts the time and peak memory of sliding-window inference on an image
at a candidate spacing from a few calibrated constants, and :class:`BudgetSpacing` walks the
candidates from fine to coarse and keeps the finest one that fits. ``BudgetSpacing`` is a spacing
policy for :class:`~custom_networks.pipeline.transforms.SpacingPolicyd`.

Units: spacings in mm, shapes in voxels, both in tensor axis order; times in seconds; memory in
bytes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .profiling import best_of
from ..spacing import SpacingRange, parse_spacing

__all__ = ["WINDOWS", "BudgetSpacing", "InferenceCost", "candidate_spacings", "window_count", "working_shape"]


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


WINDOWS = ("patch", "whole", "auto")


@dataclass(frozen=True)
class InferenceCost:
    """Predicted time and peak memory of sliding-window inference, from calibrated constants.

    Two ways to cover the working grid: ``"patch"`` slides windows of ``roi_size`` (shrunk on axes
    where the image is smaller, as :class:`~custom_networks.pipeline.batching.SpacingSlidingWindowInferer`
    does), ``"whole"`` runs one window over the whole grid (padded to ``divisor``). A window of
    ``v`` voxels is predicted to take ``seconds_per_window * (v / prod(roi_size)) ** voxel_exponent``
    (a forward is not linear in the voxels: on a CPU a window several times the calibrated size
    leaves the caches and costs more per voxel, which the exponent fitted between two probe sizes
    carries over) and to add ``window_bytes * v / prod(roi_size)`` of memory; a spacing whose
    weights are not generated yet adds ``generation_seconds``. On top of the windows: ``native_voxels *
    seconds_per_voxel`` for the steps after the decision that touch the native grid (anti-aliased
    resampling, the fused way back to labels, writing them; measured with the pipeline's own
    functions), and ``4 * working_voxels * (in_channels + out_channels + 1)`` bytes for the float32
    input, output aggregate and count map kept for the whole working grid. Reading and z-scoring
    the image are not predicted: they have happened when the policy decides, and callers pass the
    time they took.

    Args:
        roi_size: sliding window size (voxels).
        overlap: sliding window overlap (0..1).
        in_channels, out_channels: the network's.
        seconds_per_window: one ``roi_size`` window's forward with cached weights.
        seconds_per_voxel: time of the native-grid steps per native voxel.
        window_bytes: peak memory one ``roi_size`` window's forward adds (CUDA allocator on a GPU,
            resident set size on the CPU).
        device: where the constants were measured, e.g. ``"cpu"`` or ``"cuda:0"``.
        divisor: the network's size divisor (``UNetLayout.divisor``).
        voxel_exponent: how the window time grows with its voxel count (1: linearly).
        generation_seconds: generating one spacing's weights (0 for a plain network).
    """

    roi_size: tuple[int, ...]
    overlap: float
    in_channels: int
    out_channels: int
    seconds_per_window: float
    seconds_per_voxel: float
    window_bytes: float
    device: str = "cpu"
    divisor: int = 1
    voxel_exponent: float = 1.0
    generation_seconds: float = 0.0

    def _padded(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(-(-int(s) // self.divisor) * self.divisor for s in shape)

    def window_shape(self, shape: Sequence[int], window: str = "patch") -> tuple[int, ...]:
        """The window that covers a working grid of ``shape`` in mode ``"patch"`` or ``"whole"``."""
        padded = self._padded(shape)
        return padded if window == "whole" else tuple(min(r, p) for r, p in zip(self.roi_size, padded))

    def predict(self, native_spacing: Sequence[float], native_shape: Sequence[int], working: Sequence[float], window: str = "patch",
                elapsed_s: float = 0.0) -> dict:
        """Predicted ``seconds``, ``memory_bytes``, ``windows``, working ``shape`` and ``window`` for one image.

        ``seconds`` is the whole request: ``elapsed_s`` already spent (reading and z-scoring the
        image), then resampling, the windows, the way back to native labels and writing them.
        """
        if window not in ("patch", "whole"):
            raise ValueError(f"window {window!r} must be 'patch' or 'whole'.")
        shape = working_shape(native_spacing, native_shape, working)
        win = self.window_shape(shape, window)
        windows = 1 if window == "whole" else window_count(shape, self.roi_size, self.overlap)
        scale = float(np.prod(win)) / float(np.prod(self.roi_size))
        seconds = (float(elapsed_s) + self.generation_seconds + windows * self.seconds_per_window * scale**self.voxel_exponent
                   + float(np.prod(native_shape)) * self.seconds_per_voxel)
        memory = self.window_bytes * scale + 4.0 * float(np.prod(shape)) * (self.in_channels + self.out_channels + 1)
        return {"seconds": seconds, "memory_bytes": memory, "windows": windows, "shape": shape, "window": window}

    def choose_window(self, shape: Sequence[int], memory_budget_bytes: float | None) -> str:
        """``"whole"`` when one window over the whole grid fits the budget and is predicted to be
        faster than the overlapping patches, else ``"patch"``; ``None`` or ``<= 0``: no limit."""
        padded = self._padded(shape)
        if padded == self.window_shape(shape):
            return "patch"  # one patch already covers the image: the same computation
        scale = float(np.prod(padded)) / float(np.prod(self.roi_size))
        if memory_budget_bytes and memory_budget_bytes > 0 and self.window_bytes * scale > memory_budget_bytes:
            return "patch"
        patch_scale = float(np.prod(self.window_shape(shape))) / float(np.prod(self.roi_size))
        patches = window_count(shape, self.roi_size, self.overlap) * patch_scale**self.voxel_exponent
        return "whole" if scale**self.voxel_exponent <= patches else "patch"

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
        divisor: int | None = None,
    ) -> "InferenceCost":
        """Measure the constants on this machine: window forwards and the native-grid steps.

        ``network(x, spacing)`` runs on zeros of half the window size per axis (rounded up to the
        divisor) and of the whole window: once to generate and cache the weights, then the
        fastest of two timed calls each. The time of a ``roi_size`` window and the exponent of
        its growth with the voxel count are read off the two sizes; the memory is scaled from the
        larger one. Generating weights (a :class:`~custom_networks.nets.hypernetwork.HyperNetwork`'s
        ``generate_params``) is timed for a new spacing. The divisor is read from
        ``network.layout`` when not given.
        """
        device = torch.device(device)
        roi_size = tuple(int(r) for r in roi_size)
        divisor = int(divisor or getattr(getattr(network, "layout", None), "divisor", 1) or 1)
        half = tuple(max(divisor, -(-(r // 2) // divisor) * divisor) for r in roi_size)
        full = tuple(max(divisor, -(-r // divisor) * divisor) for r in roi_size)
        s = torch.tensor([list(spacing)], dtype=torch.float32, device=device)
        timed = []
        with torch.no_grad():
            for probe in (half, full) if full != half else (half,):
                x = torch.zeros((1, in_channels, *probe), device=device)
                # the fastest of two calls after one that generates and caches the weights
                seconds, nbytes = best_of(lambda: network(x, s), device, repeats=2)
                timed.append((float(np.prod(probe)), seconds, nbytes))
        exponent = 1.0
        if len(timed) == 2 and timed[0][1] > 0 and timed[1][1] > 0:
            # clamped: timer noise on small probes must not turn into a sub-linear or explosive model
            exponent = min(1.5, max(1.0, math.log(timed[1][1] / timed[0][1]) / math.log(timed[1][0] / timed[0][0])))
        voxels, seconds, nbytes = timed[-1]
        scale = float(np.prod(roi_size)) / voxels
        generation = 0.0
        inner = getattr(network, "network", network)  # a UNetEngine around the network
        if hasattr(inner, "generate_params"):
            new = s + 0.0123  # a spacing not in the cache
            with torch.no_grad():
                generation = best_of(lambda: inner.generate_params(new), device, repeats=2)[0]
        seconds_per_voxel = _calibrate_native_steps(in_channels, out_channels)
        return cls(
            roi_size, float(overlap), int(in_channels), int(out_channels), seconds * scale**exponent, seconds_per_voxel,
            float(max(nbytes, 1)) * scale, str(device), divisor, exponent, generation,
        )


def _calibrate_native_steps(
    in_channels: int, out_channels: int, shapes=((128, 128, 96), (192, 192, 144)), factor: float = 2.5, repeats: int = 3
) -> float:
    """Seconds per native voxel of the steps after the spacing decision that touch the native grid
    (resampling, the way back to labels, writing an ``.nrrd``), measured with the pipeline's own
    functions on generated images (blobs, so that the way back meets label boundaries as in real
    images) at a working spacing ``factor`` times the native one, the fastest of ``repeats`` per
    size after a smaller warm-up pass (imports, allocator). Reading and z-scoring happen before the
    decision; the policy is told the time they took.

    The figure is the marginal cost between the two sizes of ``shapes``: per voxel, a 1.5 M-voxel
    image costs 1.5x to 2x what a 57 M-voxel one does (fixed costs per call), so one small image
    scaled linearly over-predicted a 0.5 mm brain's native-grid steps by 2x. ``factor`` 2.5 lies
    within the working / native ratios a budget picks (1.5 to 6); measured on a 2-core CPU the cost
    per voxel at 1.5 is 1.5x that at 6."""
    import tempfile

    from monai.data import MetaTensor

    from ..data.fileio import write_label
    from .profiling import best_of
    from .resample import labels_to_native, working_grid
    from .transforms import SpacingPolicyd

    rng = np.random.RandomState(0)
    resample = SpacingPolicyd("image", policy="target", target_spacing=[factor] * 3)
    small, big = (tuple(int(v) for v in shape) for shape in shapes)
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size, n in ((tuple(v // 2 for v in small), 1), (small, max(1, int(repeats))), (big, max(1, int(repeats)))):
            image = MetaTensor(torch.as_tensor(rng.rand(in_channels, *size), dtype=torch.float32), affine=torch.eye(4, dtype=torch.float64))
            grid_shape, _ = working_grid(size, (1.0,) * 3, (factor,) * 3)
            grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, m) for m in grid_shape], indexing="ij"))
            centres = torch.as_tensor(rng.uniform(-0.5, 0.5, (out_channels, 3)), dtype=torch.float32)
            scores = torch.stack([0.3 - ((grid - c[:, None, None, None]) ** 2).sum(0).sqrt() for c in centres]) * 10

            def steps():
                resample({"image": image})
                labels = labels_to_native(scores, (factor,) * 3, size, softmax=True)
                write_label(labels, os.path.join(tmp, "label.nrrd"), affine=np.eye(4))

            timings[size] = best_of(steps, "cpu", n)[0]
    marginal = (timings[big] - timings[small]) / float(np.prod(big) - np.prod(small))
    # a noisy pair of timings could give a marginal below zero or above the average: keep it between
    # a tenth of the big image's average cost and that average
    average = timings[big] / float(np.prod(big))
    return float(min(max(marginal, 0.1 * average), average))


@dataclass
class BudgetSpacing:
    """A spacing policy: the finest candidate spacing whose predicted cost fits the budget.

    Use as ``SpacingPolicyd(keys, policy=BudgetSpacing(cost, ...))``, which calls :meth:`decide`
    per image and stores its account (spacing, predicted seconds and memory, whether it fits, how
    many candidates were looked at) in the data dict; the instance itself keeps nothing per image.
    When nothing fits, the coarsest candidate is used and ``"fits"`` is ``False``.

    Args:
        cost: the calibrated cost model.
        trained_range: candidates are clamped to it (``None``: not clamped).
        time_budget_s: largest predicted time of the whole request (s); ``None`` or ``<= 0``: no limit.
        memory_budget_gb: largest predicted peak memory (GB = 1e9 bytes); ``None`` or ``<= 0``: no limit.
        window: how the working grid is covered: ``"patch"``, ``"whole"``, or ``"auto"`` (per
            candidate, :meth:`InferenceCost.choose_window` under the memory budget).
        time_margin: the share of the time budget kept free for the spread between runs: the
            predicted time must fit ``(1 - time_margin) * time_budget_s``. The default 0.1: on a
            2-core CPU the same request's total varied by up to 10 % between runs, and a
            prediction within 5 % then still missed a 5 s budget by 0.17 s.
    """

    cost: InferenceCost
    trained_range: SpacingRange | None = None
    time_budget_s: float | None = None
    memory_budget_gb: float | None = None
    window: str = "patch"
    time_margin: float = 0.1

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
        if self.window not in WINDOWS:
            raise ValueError(f"window {self.window!r} must be one of {WINDOWS}.")
        margin = self.time_margin
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= float(margin) < 1:
            raise ValueError(f"time_margin must be a share of the budget in [0, 1); got {margin!r}.")
        self.time_margin = float(margin)

    def window_for(self, shape: Sequence[int]) -> str:
        """The window mode for a working grid of ``shape``."""
        if self.window != "auto":
            return self.window
        budget = self.memory_budget_gb * 1e9 if self.memory_budget_gb and self.memory_budget_gb > 0 else None
        return self.cost.choose_window(shape, budget)

    def fits(self, predicted: dict) -> bool:
        if self.time_budget_s and self.time_budget_s > 0 and predicted["seconds"] > self.time_budget_s * (1 - self.time_margin):
            return False
        if self.memory_budget_gb and self.memory_budget_gb > 0 and predicted["memory_bytes"] > self.memory_budget_gb * 1e9:
            return False
        return True

    def decide(self, native_spacing: Sequence[float], native_shape: Sequence[int], elapsed_s: float = 0.0) -> dict:
        """The finest fitting spacing for one image and why: ``{"spacing", "predicted_seconds",
        "predicted_memory_gb", "fits", "window", "candidates"}`` (``elapsed_s``: already spent)."""
        native = parse_spacing(list(native_spacing), len(native_shape), what="image spacing")
        candidates = candidate_spacings(native, self.trained_range)
        for spacing in candidates:
            window = self.window_for(working_shape(native, native_shape, spacing))
            predicted = self.cost.predict(native, native_shape, spacing, window, elapsed_s)
            if self.fits(predicted):
                break
        return {
            "spacing": list(spacing),
            "predicted_seconds": round(predicted["seconds"], 3),
            "predicted_memory_gb": round(predicted["memory_bytes"] / 1e9, 4),
            "fits": self.fits(predicted),
            "window": predicted["window"],
            "candidates": len(candidates),
        }

    def __call__(self, native_spacing: Sequence[float], native_shape: Sequence[int]) -> tuple[float, ...]:
        return tuple(self.decide(native_spacing, native_shape)["spacing"])
