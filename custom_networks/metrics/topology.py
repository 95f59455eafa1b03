"""Topology metrics for tubular structures, as MONAI ``CumulativeIterationMetric`` subclasses.

Dice counts voxels, so a vessel tree cut into pieces by a few missing voxels scores almost as well
as a whole one. Two metrics that see the cut:

- :class:`ClDiceMetric`: centerline Dice (Shit et al., *clDice - a Novel Topology-Preserving Loss
  Function for Tubular Structure Segmentation*, CVPR 2021). The skeleton of each mask is
  compared with the other mask, so every vessel counts by its length, whatever its radius.
- :class:`ConnectedComponentsMetric`: the number of connected pieces of the prediction per image
  (optionally minus the label's): a continuous tree is one piece, a broken one several.

Both take what MONAI's ``DiceMetric`` takes: binarised one-hot ``y_pred`` and ``y`` of shape
``(B, C, *spatial)`` (``AsDiscreted(argmax=True, to_onehot=C)`` in a bundle's postprocessing),
and return ``(B, C)`` per image and class (``C - 1`` without the background), which
``aggregate()`` reduces like ``DiceMetric`` does. They run on the voxel grid they are given (the
working grid in the bundles' evaluation) with full connectivity (26 neighbours in 3D).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

__all__ = ["ClDiceMetric", "ConnectedComponentsMetric", "count_components", "skeleton"]


def skeleton(mask: np.ndarray) -> np.ndarray:
    """The skeleton (centerlines) of a 2D or 3D binary mask: ``skimage.morphology.skeletonize``
    (Lee's thinning in 3D), one voxel thick, topology kept.

    Thinning erases some small blobs entirely (a 2 x 2 x 2 cube has an empty skeleton); such a
    component keeps its voxel nearest to its centre, so that every piece of the mask has a
    skeleton and counts in clDice.
    """
    try:
        from skimage.morphology import skeletonize
    except ImportError as e:  # pinned in requirements.txt; only the topology metrics need it
        raise ImportError("ClDiceMetric needs scikit-image: pip install scikit-image (see requirements.txt)") from e
    from scipy import ndimage

    mask = np.ascontiguousarray(mask, dtype=bool)
    skel = skeletonize(mask).astype(bool)
    labels, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, mask.ndim))
    kept = set(np.unique(labels[skel]).tolist())
    for component, window in enumerate(ndimage.find_objects(labels), start=1):
        if component in kept or window is None:
            continue
        voxels = np.argwhere(labels[window] == component)
        nearest = voxels[np.argmin(((voxels - voxels.mean(0)) ** 2).sum(1))]
        skel[tuple(int(v) + w.start for v, w in zip(nearest, window))] = True
    return skel


def count_components(mask: np.ndarray) -> int:
    """The number of connected components of a binary mask, full connectivity (26 neighbours in 3D)."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    return int(ndimage.label(np.asarray(mask, dtype=bool), structure=structure)[1])


def _checked(y_pred: torch.Tensor, y: torch.Tensor, include_background: bool, name: str) -> tuple[np.ndarray, np.ndarray]:
    if y_pred.shape != y.shape:
        raise ValueError(f"{name}: y_pred of shape {tuple(y_pred.shape)} and y of shape {tuple(y.shape)} must match.")
    if y_pred.dim() not in (4, 5):
        raise ValueError(f"{name}: expected one-hot (B, C, *spatial) with 2 or 3 spatial axes; got shape {tuple(y_pred.shape)}.")
    pred = y_pred.detach().cpu().numpy() > 0.5
    label = y.detach().cpu().numpy() > 0.5
    if not include_background and pred.shape[1] > 1:
        pred, label = pred[:, 1:], label[:, 1:]
    return pred, label


class _Reduced(CumulativeIterationMetric):
    def __init__(self, include_background: bool = False, reduction: MetricReduction | str = MetricReduction.MEAN, get_not_nans: bool = False):
        super().__init__()
        self.include_background = include_background
        self.reduction = reduction
        self.get_not_nans = get_not_nans

    def aggregate(self, reduction: MetricReduction | str | None = None):
        """The buffered ``(N, C)`` values reduced as ``reduction`` says (default: the instance's)."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"the data to aggregate must be a PyTorch tensor, got {type(data)}.")
        f, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (f, not_nans) if self.get_not_nans else f


class ClDiceMetric(_Reduced):
    """Centerline Dice per image and class: ``2 Tprec Tsens / (Tprec + Tsens)``.

    ``Tprec = |S(P) & L| / |S(P)|`` (how much of the predicted centerline lies in the label) and
    ``Tsens = |S(L) & P| / |S(L)|`` (how much of the label's centerline is covered by the
    prediction), ``S`` the skeleton (:func:`skeleton`), ``P`` and ``L`` the predicted and label masks.
    1 for a perfect prediction; a gap in a thin vessel costs its length, not its few voxels.

    Args:
        include_background: also score channel 0 (off, as for ``DiceMetric(include_background=False)``).
        reduction, get_not_nans: as MONAI's ``DiceMetric``.
        ignore_empty: an image whose label has no skeleton in a class scores NaN there (left out
            of the mean), as ``DiceMetric(ignore_empty=True)``; ``False`` scores it 1 if the
            prediction is empty too, else 0.

    Example::

        >>> metric = ClDiceMetric()
        >>> tube = torch.zeros(1, 2, 16, 16, 16); tube[:, 1, 6:9, 6:9, :] = 1; tube[:, 0] = 1 - tube[:, 1]
        >>> float(metric(tube, tube))
        1.0
    """

    def __init__(self, include_background: bool = False, reduction: MetricReduction | str = MetricReduction.MEAN,
                 get_not_nans: bool = False, ignore_empty: bool = True):
        super().__init__(include_background, reduction, get_not_nans)
        self.ignore_empty = ignore_empty

    def _score(self, pred: np.ndarray, label: np.ndarray) -> float:
        skel_pred, skel_label = skeleton(pred), skeleton(label)
        if not skel_label.any():
            if self.ignore_empty:
                return float("nan")
            return 1.0 if not skel_pred.any() else 0.0
        if not skel_pred.any():
            return 0.0
        precision = float((skel_pred & label).sum()) / float(skel_pred.sum())
        sensitivity = float((skel_label & pred).sum()) / float(skel_label.sum())
        return 0.0 if precision + sensitivity == 0 else 2.0 * precision * sensitivity / (precision + sensitivity)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        pred, label = _checked(y_pred, y, self.include_background, type(self).__name__)
        scores = [[self._score(p, l) for p, l in zip(pb, lb)] for pb, lb in zip(pred, label)]
        return torch.tensor(scores, dtype=torch.float32, device=y_pred.device)


class ConnectedComponentsMetric(_Reduced):
    """The number of connected components of the prediction per image and class (26-connected in 3D).

    Args:
        include_background: also count channel 0 (off).
        subtract_label: report the prediction's count minus the label's: ``0`` the same number
            of pieces as the reference, ``> 0`` fragments, ``< 0`` pieces merged or missed.
        reduction, get_not_nans: as MONAI's ``DiceMetric`` (the default mean: the mean count per image).

    Example::

        >>> metric = ConnectedComponentsMetric()
        >>> seg = torch.zeros(1, 2, 16, 16, 16); seg[:, 1, 2:4, 2:4, 2:4] = 1; seg[:, 1, 9:12, 9:12, 9:12] = 1
        >>> float(metric(seg, seg))
        2.0
    """

    def __init__(self, include_background: bool = False, subtract_label: bool = False,
                 reduction: MetricReduction | str = MetricReduction.MEAN, get_not_nans: bool = False):
        super().__init__(include_background, reduction, get_not_nans)
        self.subtract_label = subtract_label

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        pred, label = _checked(y_pred, y, self.include_background, type(self).__name__)
        counts = [
            [count_components(p) - (count_components(l) if self.subtract_label else 0) for p, l in zip(pb, lb)]
            for pb, lb in zip(pred, label)
        ]
        return torch.tensor(counts, dtype=torch.float32, device=y_pred.device)
