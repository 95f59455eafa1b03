"""Voxel spacings: validation, trained ranges, and the inference spacing policy.

Every spacing in this project is in millimetres, one value per spatial axis, in the order of the
tensor's spatial axes (for MONAI's channel-first images that is ``MetaTensor.pixdim``, i.e. the
NIfTI ``pixdim[1:4]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

__all__ = ["PHYSICAL_SPACING_MM", "SPACING_POLICIES", "SpacingRange", "as_spacing_tensor", "parse_spacing", "working_spacing"]

# the spacing policies, default first: "clamp", "native" and "target" are rules of the image's own
# spacing (working_spacing); "auto" is decided from a cost model and a budget
# (custom_networks.pipeline.cost.BudgetSpacing), so it is a policy object, not a rule here
SPACING_POLICIES = ("clamp", "native", "target", "auto")
# voxel spacings (mm) an image header can sensibly hold: below 10 um or above 5 cm the header is
# broken (a unit mix-up, a missing pixdim) rather than the scan unusual
PHYSICAL_SPACING_MM = (0.01, 50.0)


def _check_values(values: Sequence[float], what: str, expected: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if any(not math.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"{what} must be positive finite millimetres, {expected}; got {list(values)}.")
    return values


def parse_spacing(value, spatial_dims: int = 3, what: str = "spacing") -> tuple[float, ...]:
    """Parse a spacing given as a number (isotropic), a sequence, or a string such as ``"1.5,1.5,3"``.

    Returns:
        a tuple of ``spatial_dims`` positive floats (mm).

    Raises:
        ValueError: naming the value, if it is empty, not numeric, of the wrong length, or not
            positive and finite.
    """
    expected = f"one number or {spatial_dims} numbers such as '{','.join(['1.5'] * spatial_dims)}'"
    raw = value
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().reshape(-1).tolist()
    elif isinstance(value, np.ndarray):
        value = value.reshape(-1).tolist()
    if isinstance(value, str):
        parts = [p for p in value.replace("x", ",").replace(" ", ",").split(",") if p]
        try:
            value = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"{what} {raw!r} is not numeric; expected {expected} (mm).") from None
    if isinstance(value, (int, float)):
        value = [value] * spatial_dims
    try:
        value = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{what} {raw!r} is not numeric; expected {expected} (mm).") from None
    if len(value) == 1:
        value = value * spatial_dims
    if len(value) != spatial_dims:
        raise ValueError(f"{what} {raw!r} has {len(value)} values; expected {expected} (mm).")
    return _check_values(value, f"{what} {raw!r}", expected)


def as_spacing_tensor(spacing, batch_size: int, spatial_dims: int, device=None) -> torch.Tensor:
    """Validate the spacing handed to a network and return it as a ``(B, D)`` float32 tensor.

    Args:
        spacing: ``(B, D)`` tensor (mm, axis order = the image tensor's spatial axes); a ``(D,)``
            or ``(1, D)`` tensor or sequence is broadcast to the batch.
        batch_size: ``B``.
        spatial_dims: ``D``.
        device: device of the returned tensor.

    Raises:
        ValueError: if the spacing is missing, has the wrong shape, or has a non-positive or
            non-finite entry; the message names the value and the expected shape.
    """
    expected = f"a ({batch_size}, {spatial_dims}) tensor of voxel spacings in mm"
    if spacing is None:
        raise ValueError(f"spacing is missing; expected {expected} (e.g. from MetaTensor.pixdim).")
    if not isinstance(spacing, torch.Tensor):
        try:
            spacing = torch.as_tensor(spacing, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"spacing {spacing!r} is not numeric; expected {expected}.") from None
    if spacing.dim() == 1:
        spacing = spacing.unsqueeze(0)
    if spacing.dim() != 2 or spacing.shape[1] != spatial_dims or spacing.shape[0] not in (1, batch_size):
        raise ValueError(f"spacing has shape {tuple(spacing.shape)}; expected {expected}. Value: {spacing.tolist()}.")
    spacing = spacing.to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(spacing).all()) or bool((spacing <= 0).any()):
        raise ValueError(f"spacing {spacing.tolist()} must be positive and finite; expected {expected}.")
    return spacing.expand(batch_size, spatial_dims)


@dataclass(frozen=True)
class SpacingRange:
    """An axis-aligned box of spacings (mm), e.g. the range a model was trained on.

    Args:
        low: smallest spacing per axis (mm, tensor axis order).
        high: largest spacing per axis; equal to ``low`` on an axis that is not varied.

    Example::

        >>> SpacingRange((1.0, 0.2, 0.2), (5.0, 1.5, 1.5)).clamp((0.8, 0.3, 2.0))
        (1.0, 0.3, 1.5)
    """

    low: tuple[float, ...]
    high: tuple[float, ...]

    def __post_init__(self) -> None:
        low = _check_values(self.low, f"spacing range low {list(self.low)}", "one per axis")
        high = _check_values(self.high, f"spacing range high {list(self.high)}", "one per axis")
        if len(low) != len(high) or any(a > b for a, b in zip(low, high)):
            raise ValueError(f"spacing range low {list(low)} must have the length of high {list(high)} and not exceed it.")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    @classmethod
    def from_config(cls, value) -> "SpacingRange":
        """Build from ``[[low, high], ...]`` per axis, ``{"low": ..., "high": ...}`` or a range."""
        if isinstance(value, SpacingRange):
            return value
        if isinstance(value, dict):
            return cls(tuple(value["low"]), tuple(value["high"]))
        pairs = [tuple(p) for p in value]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"spacing range {value!r} must be one [low, high] pair (mm) per axis.")
        return cls(tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))

    @classmethod
    def from_string(cls, text: str, spatial_dims: int = 3) -> "SpacingRange":
        """Parse ``"0.5,3.5"`` (every axis) or ``"1,5; 0.2,1.5; 0.2,1.5"`` (one ``low,high`` per axis), mm.

        The form a range takes in a text field, e.g. an option in 3D Slicer. Inverse of :meth:`to_string`.
        """
        expected = f"'low,high' for every axis or {spatial_dims} such pairs separated by ';', e.g. '0.5,3.5' (mm)"
        pairs = [p for p in str(text).split(";") if p.strip()]
        try:
            values = [[float(v) for v in p.replace(" ", ",").split(",") if v] for p in pairs]
        except ValueError:
            raise ValueError(f"spacing range {text!r} is not numeric; expected {expected}.") from None
        if len(values) == 1:
            values = values * spatial_dims
        if len(values) != spatial_dims or any(len(v) != 2 for v in values):
            raise ValueError(f"spacing range {text!r} is malformed; expected {expected}.")
        return cls(tuple(v[0] for v in values), tuple(v[1] for v in values))

    def to_string(self) -> str:
        """``"0.5,3.5"`` when all axes share one range, else ``"1,5; 0.2,1.5; 0.2,1.5"``."""
        pairs = [f"{lo:g},{hi:g}" for lo, hi in zip(self.low, self.high)]
        return pairs[0] if len(set(pairs)) == 1 else "; ".join(pairs)

    @property
    def spatial_dims(self) -> int:
        return len(self.low)

    def contains(self, spacing: Sequence[float]) -> bool:
        return all(lo <= s <= hi for s, lo, hi in zip(spacing, self.low, self.high))

    def clamp(self, spacing: Sequence[float]) -> tuple[float, ...]:
        """Move each axis outside the range to the range's nearest edge; other axes are kept."""
        return tuple(min(max(float(s), lo), hi) for s, lo, hi in zip(spacing, self.low, self.high))

    def sample(self, rng: np.random.RandomState) -> tuple[float, ...]:
        """One spacing drawn uniformly and independently per axis."""
        return tuple(float(rng.uniform(lo, hi)) if hi > lo else lo for lo, hi in zip(self.low, self.high))


def working_spacing(native, policy: str = "native", target=None, trained_range=None) -> tuple[float, ...]:
    """The spacing (mm) at which to run a network on an image whose own spacing is ``native``.

    Args:
        native: the image's spacing (mm, tensor axis order).
        policy: ``"native"`` keeps the image's spacing; ``"target"`` uses ``target``;
            ``"clamp"`` keeps the native spacing on axes inside ``trained_range`` and moves the
            others to its nearest edge (the HyperSpace paper's out-of-range fallback).
        target: the spacing for ``"target"`` (number, sequence or ``"1.5,1.5,3"``).
        trained_range: :class:`SpacingRange` (or its config form) for ``"clamp"``.
    """
    native = np.asarray(native.detach().cpu() if isinstance(native, torch.Tensor) else native, dtype=float).reshape(-1)
    native = _check_values(native, f"native spacing {native.tolist()}", "one per axis")
    dims = len(native)
    if policy == "native":
        return native
    if policy == "target":
        if target is None or (isinstance(target, str) and not target.strip()):
            raise ValueError("spacing policy 'target' needs a target spacing in mm, e.g. '1.5,1.5,3'.")
        return parse_spacing(target, dims, what="target spacing")
    if policy == "clamp":
        if trained_range is None:
            raise ValueError("spacing policy 'clamp' needs the model's trained spacing range.")
        trained_range = SpacingRange.from_config(trained_range)
        if trained_range.spatial_dims != dims:
            raise ValueError(f"trained spacing range has {trained_range.spatial_dims} axes, the image {dims}.")
        return trained_range.clamp(native)
    if policy == "auto":
        raise ValueError("spacing policy 'auto' is decided from a time / memory budget: pass a "
                         "custom_networks.pipeline.cost.BudgetSpacing as the policy instead of the string.")
    raise ValueError(f"unknown spacing policy {policy!r}; expected one of {SPACING_POLICIES}.")
