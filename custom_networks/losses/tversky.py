"""Focal Tversky loss: MONAI's ``TverskyLoss`` raised to a power (MONAI has no focal exponent)."""

from __future__ import annotations

import torch
from monai.losses import TverskyLoss
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

__all__ = ["FocalTverskyLoss"]

# below this the loss is taken as 0: the gradient of t ** gamma (gamma < 1) is infinite at t = 0
_EPS = 1e-7


class FocalTverskyLoss(_Loss):
    """``(1 - TI) ** gamma`` per sample and class, TI the Tversky index of MONAI's ``TverskyLoss``.

    SPOCKMIP's loss (``pipeline.py`` of ``soumickmj/SPOCKMIP``) with its defaults:
    ``TI = (TP + 1) / (TP + 0.7 FN + 0.3 FP + 1)``, ``gamma = 0.75``. A ``gamma`` below 1 weighs
    the poorly segmented samples and classes more than a plain Tversky (or Dice) loss would.

    Args:
        gamma: focal exponent (> 0); 1 gives MONAI's ``TverskyLoss``.
        alpha: weight of the false positives (MONAI's convention), 0.3 in SPOCKMIP.
        beta: weight of the false negatives, 0.7 in SPOCKMIP.
        smooth_nr, smooth_dr: added to the numerator and denominator (1 in SPOCKMIP).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` over the per-sample, per-class values
            (``"none"``: ``(B, C)``, or ``(C,)`` with ``batch=True``).
        kwargs: the other arguments of ``TverskyLoss``: ``include_background``, ``to_onehot_y``,
            ``softmax``, ``sigmoid``, ``other_act``, ``batch`` (True: TP/FP/FN summed over the batch,
            as SPOCKMIP flattens the whole batch).

    Shapes:
        ``input (B, C, *spatial)`` (logits with ``softmax``/``sigmoid``, else probabilities),
        ``target (B, 1, *spatial)`` class indices with ``to_onehot_y``, else ``(B, C, *spatial)``.

    Example::

        >>> loss = FocalTverskyLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
        >>> loss(torch.randn(2, 2, 8, 8, 8), torch.randint(0, 2, (2, 1, 8, 8, 8))).shape
        torch.Size([])
    """

    def __init__(
        self,
        gamma: float = 0.75,
        alpha: float = 0.3,
        beta: float = 0.7,
        smooth_nr: float = 1.0,
        smooth_dr: float = 1.0,
        reduction: LossReduction | str = LossReduction.MEAN,
        **kwargs,
    ):
        super().__init__(reduction=LossReduction(reduction).value)
        if not float(gamma) > 0:
            raise ValueError(f"gamma {gamma!r} must be a positive number (SPOCKMIP: 0.75).")
        self.gamma = float(gamma)
        self.tversky = TverskyLoss(alpha=alpha, beta=beta, smooth_nr=smooth_nr, smooth_dr=smooth_dr, reduction="none", **kwargs)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        score = self.tversky(input, target)
        # clamp_min: a perfect sample contributes 0 with a zero (not infinite) gradient
        focal = torch.where(score > _EPS, score.clamp_min(_EPS) ** self.gamma, torch.zeros_like(score))
        if self.reduction == LossReduction.SUM.value:
            return focal.sum()
        if self.reduction == LossReduction.NONE.value:
            return focal
        return focal.mean()
