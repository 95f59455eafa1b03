"""clDice and connected components (custom_networks.metrics) against hand-made masks, and their
handlers as an evaluator's additional metrics."""

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric

from custom_networks.metrics import METRICS, ClDiceMetric, ConnectedComponentsMetric, count_components, metric_handlers, skeleton


def onehot(*masks: np.ndarray) -> torch.Tensor:
    """``(B, 2, *spatial)`` background / foreground from binary masks, one per image."""
    fg = torch.tensor(np.stack(masks), dtype=torch.float32)[:, None]
    return torch.cat([1 - fg, fg], 1)


def line_with_gap(gap: int) -> tuple[np.ndarray, np.ndarray]:
    """A one-voxel line of 10 voxels along axis 2 of a 7 x 7 x 14 volume, and the same with ``gap`` voxels missing."""
    label = np.zeros((7, 7, 14), bool)
    label[3, 3, 2:12] = True
    pred = label.copy()
    pred[3, 3, 6 : 6 + gap] = False
    return pred, label


def test_cldice_of_a_line_with_a_gap():
    """A one-voxel line is its own skeleton: the prediction's skeleton (8 voxels) lies in the label
    (precision 1), 8 of the label's 10 centreline voxels are covered (sensitivity 0.8)."""
    pred, label = line_with_gap(2)
    assert skeleton(label).sum() == 10
    value = float(ClDiceMetric()(onehot(pred), onehot(label)))
    assert value == pytest.approx(2 * 1.0 * 0.8 / 1.8, abs=1e-6)
    assert float(ClDiceMetric()(onehot(label), onehot(label))) == 1.0


def test_cldice_sees_a_missing_thin_branch_that_dice_hardly_sees():
    """A 5 x 5 trunk with a one-voxel branch of the same length: predicting the trunk alone keeps
    a Dice of 0.98 but loses about half of the centreline."""
    label = np.zeros((16, 16, 48), bool)
    label[4:9, 4:9, 2:24] = True
    label[6, 6, 24:46] = True  # the thin branch continues the trunk
    pred = label.copy()
    pred[6, 6, 24:46] = False
    dice = float(DiceMetric(include_background=False)(onehot(pred), onehot(label)))
    cl = float(ClDiceMetric()(onehot(pred), onehot(label)))
    assert dice > 0.97 and cl < 0.7
    # the label's centreline runs through trunk and branch: clDice sensitivity is the trunk's share of it
    skel = skeleton(label)
    sensitivity = (skel & pred).sum() / skel.sum()
    assert cl == pytest.approx(2 * sensitivity / (1 + sensitivity), abs=1e-6)


def test_a_blob_that_thinning_erases_keeps_one_skeleton_voxel():
    mask = np.zeros((8, 8, 10), bool)
    mask[2:4, 2:4, 2:6] = True  # skimage's 3D thinning leaves nothing of a 2 x 2 x 4 block
    mask[5:8, 5:8, 5:8] = True
    skel = skeleton(mask)
    assert count_components(skel) == 2 and (skel & ~mask).sum() == 0
    assert skel[2:4, 2:4, 2:6].sum() == 1


def test_cldice_of_empty_masks_and_the_background_channel():
    empty = np.zeros((6, 6, 6), bool)
    blob = empty.copy()
    blob[2:4, 2:4, 1:5] = True
    values = ClDiceMetric()(onehot(empty, blob), onehot(empty, empty))  # nothing to find: NaN, left out of the mean
    assert values.shape == (2, 1) and torch.isnan(values).all()
    strict = ClDiceMetric(ignore_empty=False)(onehot(empty, blob), onehot(empty, empty))
    assert strict.flatten().tolist() == [1.0, 0.0]
    assert float(ClDiceMetric()(onehot(empty), onehot(blob))) == 0.0  # a missed structure
    assert ClDiceMetric(include_background=True)(onehot(blob), onehot(blob)).shape == (1, 2)


def test_connected_components_count_26_connected_pieces():
    mask = np.zeros((7, 7, 14), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True  # touching at a corner: one piece
    mask[4:6, 4:6, 4:6] = True
    mask[6, 0, 13] = True
    assert count_components(mask) == 3
    pred, label = line_with_gap(2)
    metric = ConnectedComponentsMetric()
    assert metric(onehot(pred, label), onehot(label, label)).flatten().tolist() == [2.0, 1.0]
    assert float(metric.aggregate()) == 1.5  # the mean over the images
    extra = ConnectedComponentsMetric(subtract_label=True)(onehot(pred, mask), onehot(label, label))
    assert extra.flatten().tolist() == [1.0, 2.0]  # one fragment too many; two extra pieces


def test_metrics_refuse_mismatched_or_flat_inputs():
    with pytest.raises(ValueError, match=r"y_pred of shape \(1, 2, 4, 4, 4\) and y of shape \(1, 2, 4, 4, 5\)"):
        ClDiceMetric()(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 2, 4, 4, 5))
    with pytest.raises(ValueError, match="2 or 3 spatial axes"):
        ConnectedComponentsMetric()(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))


def test_metric_handlers_by_name():
    assert metric_handlers(()) == {}
    handlers = metric_handlers(["cldice", "components", "extra_components"])
    assert list(handlers) == ["val_cldice", "val_components", "val_extra_components"]
    assert isinstance(handlers["val_cldice"].metric_fn, ClDiceMetric) and handlers["val_extra_components"].metric_fn.subtract_label
    assert all(h.save_details for h in handlers.values())
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['betti'\]; expected names among \['cldice'"):
        metric_handlers(["betti"])
    assert set(METRICS) == {"cldice", "components", "extra_components"}
