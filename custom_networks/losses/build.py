"""The training loss a bundle declares: a voxel loss, and optionally SPOCKMIP's MIP loss beside it.

``bundles/common/configs/train.json`` builds the loss of every bundle from its data set's
:class:`~custom_networks.DatasetSpec` fields (``loss``, ``mip_weight``, ``mip_axes``, ``mip_slab_mm``,
``mip_temperature``) through :func:`build_loss`, so that the shared config stays one file and each
option can be overridden on the command line (``--loss#mip_weight 0.3 --loss#mip_axes coarsest``).
"""

from __future__ import annotations

import math

from monai.losses import DiceCELoss, DiceLoss
from torch.nn.modules.loss import _Loss

from .mip import MIPLoss, VoxelMIPLoss
from .tversky import FocalTverskyLoss

__all__ = ["VOXEL_LOSSES", "build_loss"]

# the voxel losses by name: "dice_ce" (MONAI's DiceCELoss, the paper's loss, background included)
# and "focal_tversky" (SPOCKMIP's: foreground only, TP/FP/FN over the whole batch)
VOXEL_LOSSES = ("dice_ce", "focal_tversky")


def build_loss(
    voxel_loss: str = "dice_ce",
    mip_weight: float = 0.0,
    mip_axes="all",
    mip_slab_mm: float | None = None,
    mip_temperature: float | None = None,
) -> _Loss:
    """The loss ``(1 - mip_weight) * voxel + mip_weight * MIP`` for logits ``(B, C, *spatial)`` and
    class-index labels ``(B, 1, *spatial)``.

    Args:
        voxel_loss: ``"dice_ce"``: ``DiceCELoss(to_onehot_y=True, softmax=True, batch=True)``;
            ``"focal_tversky"``: :class:`FocalTverskyLoss` with SPOCKMIP's settings (alpha 0.3 on
            false positives, beta 0.7 on false negatives, gamma 0.75, smoothing 1), foreground
            classes only, pooled over the batch.
        mip_weight: weight of the MIP loss in [0, 1]; 0 returns the voxel loss itself (the
            bundles' default), SPOCKMIP uses 0.3 (and 0.7 for the voxel loss).
        mip_axes, mip_slab_mm, mip_temperature: ``axes``, ``slab_mm`` and ``temperature`` of
            :class:`MIPLoss`. Its base loss is the voxel loss's kind per projection image:
            :class:`FocalTverskyLoss` for ``"focal_tversky"`` (as SPOCKMIP), soft Dice for
            ``"dice_ce"`` (a cross-entropy of projected probabilities is not defined on logits).

    Raises:
        ValueError: naming the value, for an unknown voxel loss or a weight outside [0, 1], and
            for the MIP options :class:`MIPLoss` refuses.
    """
    if voxel_loss == "dice_ce":
        voxel, base = DiceCELoss(to_onehot_y=True, softmax=True, batch=True), DiceLoss()
    elif voxel_loss == "focal_tversky":
        voxel = FocalTverskyLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
        base = FocalTverskyLoss()
    else:
        raise ValueError(f"voxel_loss {voxel_loss!r} is not known; expected one of {VOXEL_LOSSES}.")
    if isinstance(mip_weight, bool) or not isinstance(mip_weight, (int, float)) or not (math.isfinite(mip_weight) and 0 <= mip_weight <= 1):
        raise ValueError(f"mip_weight {mip_weight!r} must be a number in [0, 1] (0: no MIP loss; SPOCKMIP: 0.3).")
    # the MIP options are checked even when unused, so that a typo fails where it is written
    mip = MIPLoss(base, axes=mip_axes, slab_mm=mip_slab_mm, temperature=mip_temperature)
    if mip_weight == 0:
        return voxel
    return VoxelMIPLoss(voxel, mip, voxel_weight=1.0 - float(mip_weight), mip_weight=float(mip_weight))
