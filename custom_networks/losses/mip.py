"""SPOCKMIP's continuity loss: compare maximum-intensity projections (MIPs) of prediction and label.

A thin vessel is a few voxels of a 3D volume, so a voxel-wise loss hardly notices a gap in it; in
a projection along an axis the same vessel is a line of the image, and a gap cuts that line. The
MIP loss (Radhakrishna et al., *SPOCKMIP: Segmentation of Vessels in MRAs with Enhanced Continuity
using Maximum Intensity Projection as Loss*, arXiv:2407.08655) adds a loss between the MIPs of the
predicted vessel probabilities and of the label to the voxel loss.

Spacings are millimetres, one value per spatial axis in the order of the tensor's spatial axes
(``MetaTensor.pixdim``), as everywhere in this package.

Where this implementation differs from the authors' code, on purpose:

- **The label MIP is the MIP of the label patch**, computed over the same voxels (and the same
  slabs) as the predicted MIP. The original projects the *whole* label volume and crops the
  patch's in-plane window from it, so its target also shows vessels lying in front of or behind
  the 64-voxel patch, which the network never saw and cannot predict.
- **Axes are tensor spatial axes**, checked per sample. The original reorders its batches with
  ``torch.movedim(x, -1, -3)`` and then reduces another axis than the one its label MIP used.
- **Spacing-aware options**, absent from the original: the projection axis can be the coarsest
  axis of each sample (``axes="coarsest"``), and the projection can be split into slabs of a
  thickness in mm, so that it covers the same depth of tissue at every spacing.
- **A smooth maximum** (``temperature``) as an alternative to the hard ``amax``, whose gradient
  reaches only the arg-max voxel of each ray.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from monai.data import MetaTensor
from monai.losses import DiceLoss
from monai.networks.utils import one_hot
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from ..spacing import as_spacing_tensor

__all__ = ["MIP_AXES", "MIPLoss", "VoxelMIPLoss", "project"]

# the projection axes that are chosen by name rather than by tensor axis index
MIP_AXES = ("all", "coarsest")
# spacings within this relative distance of the largest count as tied for "coarsest"
_TIE = 1e-4


def project(x: torch.Tensor, axis: int, slab: int | None = None, temperature: float | None = None) -> torch.Tensor:
    """Maximum-intensity projections of ``x`` along one spatial axis, one per slab.

    Args:
        x: ``(C, *spatial)``: one sample's class maps.
        axis: the spatial axis (0 = the first axis after the channels) to project along.
        slab: slab thickness in voxels; ``None``, or a thickness of at least the axis length,
            gives one projection of the whole axis. Where the axis length is not a multiple of
            ``slab``, the last slab is thinner.
        temperature: ``None``: the hard maximum. A positive ``t``: the smooth maximum
            ``t * log(mean(exp(x / t)))`` over each ray of ``n`` voxels. It lies between the
            ray's mean and its maximum, at most ``t * ln(n)`` below the maximum (so
            probabilities stay probabilities). Its gradient reaches every voxel with the weight
            ``softmax(x / t)``, instead of the arg-max voxel alone; ``t -> 0`` gives the hard maximum.

    Returns:
        ``(S, C, *plane)``: the ``S`` slab projections, ``plane`` the spatial axes other than ``axis``.
    """
    length = x.shape[1 + axis]
    n = length if slab is None else max(1, min(int(slab), length))
    rays = x.movedim(1 + axis, 1)  # (C, L, *plane)
    plane = rays.shape[2:]

    def reduce(v: torch.Tensor, dim: int) -> torch.Tensor:
        if temperature is None:
            return v.amax(dim)
        return temperature * (torch.logsumexp(v / temperature, dim) - math.log(v.shape[dim]))

    full = (length // n) * n
    parts = [reduce(rays[:, :full].reshape(rays.shape[0], length // n, n, *plane), 2)]
    if full < length:
        parts.append(reduce(rays[:, full:], 1).unsqueeze(1))
    return torch.cat(parts, 1).movedim(1, 0)


def _applies_activation_or_selection(loss: torch.nn.Module) -> str | None:
    """The first option of a MONAI loss (or a loss it wraps) that would transform the projections."""
    for module in loss.modules():
        for name in ("softmax", "sigmoid", "to_onehot_y"):
            if getattr(module, name, False) is True:
                return f"{name}=True"
        if getattr(module, "other_act", None) is not None:
            return "other_act"
        if getattr(module, "include_background", True) is False:
            return "include_background=False"
    return None


class MIPLoss(_Loss):
    """A loss between maximum-intensity projections of the predicted class probabilities and of the label.

    For every sample and every chosen axis, the foreground probabilities and the one-hot label are
    projected (see :func:`project`) into ``S`` slab images of shape ``(C', *plane)``, and ``base``
    compares them as a batch of ``S`` images: with a per-image base loss (``batch=False``, the
    default of MONAI's losses) the sample's value is the mean over its slabs and classes. With
    several axes the values of the axes are **summed** (SPOCKMIP's multi-axis "mMIP" sums its three
    MIPs); the reduction then runs over the samples.

    Args:
        base: the loss between projections, called ``base(pred_mips, label_mips)`` with ``(S, C',
            *plane)`` probabilities and binary labels: a MONAI loss built without activation,
            one-hot conversion or background removal (``DiceLoss()``, ``TverskyLoss()``,
            :class:`~custom_networks.losses.FocalTverskyLoss` for SPOCKMIP's loss); MIPLoss does
            those itself. Default ``DiceLoss()``.
        axes: which spatial axes to project along: a tensor spatial axis index (``0``, ``1``,
            ``2``; negative counts from the end), a sequence of them, ``"all"`` (every spatial axis,
            summed) or ``"coarsest"`` (per sample, the axis with the largest spacing, the slice
            axis of an anisotropic acquisition; ties go to the last tied axis, axis 2 for an
            isotropic image in RAS order: the slice axis of an axial ToF). ``"coarsest"`` needs the
            spacing.
        slab_mm: slab thickness in mm: along an axis of spacing ``s`` a slab is
            ``n = max(1, round(slab_mm / s))`` voxels (halves rounded up), so a projection covers
            the same depth of tissue at every spacing. Needs the spacing. ``None`` (and
            ``slab_voxels=None``): one projection through the whole patch, as in SPOCKMIP.
        slab_voxels: slab thickness in voxels, for use without a spacing. At most one of
            ``slab_mm`` and ``slab_voxels``.
        temperature: ``None``: hard maximum (SPOCKMIP). A positive number (e.g. 0.05): the smooth
            maximum of :func:`project`, for gradients on more voxels than the arg-max of each ray.
            The label is always projected with the hard maximum.
        softmax: apply a softmax over the channels to ``input`` (logits, as the bundles' networks
            give). ``False``: ``input`` already holds probabilities.
        to_onehot_y: ``target`` holds class indices ``(B, 1, *spatial)``; ``False``: it is one-hot.
        include_background: also project channel 0. Off by default: a maximum of the background
            probability along a ray says nothing about continuity.
        spatial_dims: the number of spatial axes of ``input`` (3 for volumes).
        reduction: ``"mean"`` (default) or ``"sum"`` over the samples, or ``"none"``: ``(B,)``.

    ``forward(input, target, spacing=None)``:
        ``input (B, C, *spatial)``, ``target (B, 1, *spatial)`` (or one-hot ``(B, C, *spatial)``),
        ``spacing`` ``(B, spatial_dims)`` mm in the order of the tensor's spatial axes (a ``(D,)``
        spacing is broadcast). Only ``axes="coarsest"`` and ``slab_mm`` need a spacing. When it is
        ``None`` it is read from the affine of ``target`` (or else ``input``) where that is a
        MetaTensor, as the labels of MONAI's collated batches are: MONAI's ``SupervisedTrainer``
        calls ``loss_function(pred, label)`` without a spacing, and the label patches of
        :class:`~custom_networks.RandSpacingPatchd` carry the affine of the drawn spacing. A plain
        tensor has no spacing: use index axes and ``slab_voxels`` with it, or pass ``spacing``.

    Raises:
        ValueError: naming the value, for an unknown axis, a non-positive slab or temperature, a
            base loss that applies its own activation, or a missing spacing.

    Example::

        >>> from custom_networks.losses import FocalTverskyLoss
        >>> loss = MIPLoss(FocalTverskyLoss(), axes="coarsest", slab_mm=8.0)
        >>> logits, label = torch.randn(2, 2, 32, 32, 32), torch.randint(0, 2, (2, 1, 32, 32, 32))
        >>> loss(logits, label, spacing=torch.tensor([[0.3, 0.3, 0.6], [1.0, 0.5, 0.5]])).shape
        torch.Size([])
    """

    def __init__(
        self,
        base: _Loss | None = None,
        axes: int | str | Sequence[int] = "all",
        slab_mm: float | None = None,
        slab_voxels: int | None = None,
        temperature: float | None = None,
        softmax: bool = True,
        to_onehot_y: bool = True,
        include_background: bool = False,
        spatial_dims: int = 3,
        reduction: LossReduction | str = LossReduction.MEAN,
    ):
        super().__init__(reduction=LossReduction(reduction).value)
        self.spatial_dims = int(spatial_dims)
        self.axes = self._checked_axes(axes, self.spatial_dims)
        if slab_mm is not None and slab_voxels is not None:
            raise ValueError(f"give slab_mm ({slab_mm!r}) or slab_voxels ({slab_voxels!r}), not both.")
        if slab_mm is not None and not (isinstance(slab_mm, (int, float)) and math.isfinite(slab_mm) and slab_mm > 0):
            raise ValueError(f"slab_mm {slab_mm!r} must be a positive thickness in mm, or None for the whole patch.")
        if slab_voxels is not None and not (isinstance(slab_voxels, int) and not isinstance(slab_voxels, bool) and slab_voxels >= 1):
            raise ValueError(f"slab_voxels {slab_voxels!r} must be a whole number of voxels >= 1, or None for the whole patch.")
        if temperature is not None and not (
            isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
        ):
            raise ValueError(f"temperature {temperature!r} must be a positive number, or None for the hard maximum.")
        base = DiceLoss() if base is None else base
        if not callable(base):
            raise ValueError(f"base {base!r} must be a loss module such as monai.losses.DiceLoss().")
        transforms = _applies_activation_or_selection(base) if isinstance(base, torch.nn.Module) else None
        if transforms:
            raise ValueError(
                f"base loss {type(base).__name__} has {transforms}: MIPLoss applies the softmax, the one-hot "
                "encoding and the channel selection before projecting; build the base loss without them."
            )
        self.base = base
        self.slab_mm = None if slab_mm is None else float(slab_mm)
        self.slab_voxels = slab_voxels
        self.temperature = None if temperature is None else float(temperature)
        self.softmax = bool(softmax)
        self.to_onehot_y = bool(to_onehot_y)
        self.include_background = bool(include_background)

    @staticmethod
    def _checked_axes(axes, spatial_dims: int) -> str | tuple[int, ...]:
        expected = f"a spatial axis index in [{-spatial_dims}, {spatial_dims - 1}], a list of them, or one of {MIP_AXES}"
        if isinstance(axes, str):
            if axes not in MIP_AXES:
                raise ValueError(f"axes {axes!r} is not known; expected {expected}.")
            return axes
        values = [axes] if isinstance(axes, int) else list(axes) if isinstance(axes, (list, tuple)) else None
        if not values or any(isinstance(a, bool) or not isinstance(a, int) or not -spatial_dims <= a < spatial_dims for a in values):
            raise ValueError(f"axes {axes!r} is not valid; expected {expected}.")
        normalised = tuple(a % spatial_dims for a in values)
        if len(set(normalised)) != len(normalised):
            raise ValueError(f"axes {axes!r} names an axis twice; expected distinct axes.")
        return normalised

    @property
    def needs_spacing(self) -> bool:
        return self.axes == "coarsest" or self.slab_mm is not None

    def _spacing(self, spacing, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        batch = input.shape[0]
        if spacing is None:
            for t in (target, input):
                if isinstance(t, MetaTensor):
                    affine = t.affine.to(torch.float64)
                    affine = affine if affine.dim() == 3 else affine[None].expand(batch, -1, -1)
                    # column norms of the affine's linear part: MONAI's affine_to_spacing, batched
                    spacing = torch.linalg.norm(affine[:, : self.spatial_dims, : self.spatial_dims], dim=1)
                    break
        if spacing is None:
            what = "axes='coarsest'" if self.axes == "coarsest" else f"slab_mm={self.slab_mm:g}"
            raise ValueError(
                f"MIPLoss with {what} needs the voxel spacing: pass spacing=(B, {self.spatial_dims}) mm, or a target "
                "MetaTensor whose affine holds it (MONAI's collated labels); with plain tensors use index axes and slab_voxels."
            )
        return as_spacing_tensor(spacing, batch, self.spatial_dims, device=torch.device("cpu")).to(torch.float64)

    def _sample_axes(self, spacing_mm: torch.Tensor | None) -> tuple[int, ...]:
        if self.axes == "all":
            return tuple(range(self.spatial_dims))
        if self.axes == "coarsest":
            largest = float(spacing_mm.max())
            return (max(a for a in range(self.spatial_dims) if float(spacing_mm[a]) >= largest * (1 - _TIE)),)
        return self.axes

    def _slab(self, axis: int, spacing_mm: torch.Tensor | None) -> int | None:
        if self.slab_mm is not None:
            return max(1, int(math.floor(self.slab_mm / float(spacing_mm[axis]) + 0.5)))
        return self.slab_voxels

    def forward(self, input: torch.Tensor, target: torch.Tensor, spacing=None) -> torch.Tensor:
        if input.dim() != self.spatial_dims + 2:
            raise ValueError(f"input of shape {tuple(input.shape)}; expected (B, C, {self.spatial_dims} spatial axes).")
        spacing_mm = self._spacing(spacing, input, target) if self.needs_spacing else None
        probs = input.as_tensor() if isinstance(input, MetaTensor) else input
        labels = target.as_tensor() if isinstance(target, MetaTensor) else target
        channels = probs.shape[1]
        if self.softmax:
            if channels == 1:
                raise ValueError("softmax=True over a single channel gives 1 everywhere; give class logits (B, C >= 2, ...) or softmax=False.")
            probs = torch.softmax(probs, 1)
        if self.to_onehot_y:
            labels = one_hot(labels, num_classes=channels)
        if not self.include_background and channels > 1:
            probs, labels = probs[:, 1:], labels[:, 1:]
        if labels.shape != probs.shape:
            raise ValueError(f"target of shape {tuple(labels.shape)} does not match the prediction's {tuple(probs.shape)}.")
        labels = labels.to(probs.dtype)
        per_sample = []
        for b in range(probs.shape[0]):
            sample_spacing = None if spacing_mm is None else spacing_mm[b]
            total = probs.new_zeros(())
            for axis in self._sample_axes(sample_spacing):
                slab = self._slab(axis, sample_spacing)
                pred_mips = project(probs[b], axis, slab, self.temperature)
                label_mips = project(labels[b], axis, slab)
                total = total + self.base(pred_mips, label_mips)
            per_sample.append(total)
        loss = torch.stack(per_sample)
        if self.reduction == LossReduction.SUM.value:
            return loss.sum()
        if self.reduction == LossReduction.NONE.value:
            return loss
        return loss.mean()


class VoxelMIPLoss(_Loss):
    """``voxel_weight * voxel_loss(input, target) + mip_weight * mip_loss(input, target, spacing)``.

    SPOCKMIP's total loss, 0.7 voxel + 0.3 MIP by default (its ``-floss_coeff 0.7 -mip_loss_coeff
    0.3``). Usable as the ``loss_function`` of MONAI's ``SupervisedTrainer``, which calls it as
    ``loss(pred, label)``: the MIP loss then reads the spacing it needs from the label's affine
    (see :class:`MIPLoss`).

    Args:
        voxel_loss: a MONAI loss on ``(input, target)``, e.g. ``DiceCELoss(to_onehot_y=True, softmax=True)``.
        mip_loss: a :class:`MIPLoss`.
        voxel_weight, mip_weight: non-negative weights.

    Example::

        >>> from monai.losses import DiceCELoss
        >>> loss = VoxelMIPLoss(DiceCELoss(to_onehot_y=True, softmax=True), MIPLoss(axes="all"))
        >>> loss(torch.randn(2, 2, 16, 16, 16), torch.randint(0, 2, (2, 1, 16, 16, 16))).shape
        torch.Size([])
    """

    def __init__(self, voxel_loss: _Loss, mip_loss: MIPLoss, voxel_weight: float = 0.7, mip_weight: float = 0.3):
        super().__init__()
        for name, w in (("voxel_weight", voxel_weight), ("mip_weight", mip_weight)):
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise ValueError(f"{name} {w!r} must be a non-negative number.")
        self.voxel_loss = voxel_loss
        self.mip_loss = mip_loss
        self.voxel_weight = float(voxel_weight)
        self.mip_weight = float(mip_weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor, spacing=None) -> torch.Tensor:
        return self.voxel_weight * self.voxel_loss(input, target) + self.mip_weight * self.mip_loss(input, target, spacing=spacing)
