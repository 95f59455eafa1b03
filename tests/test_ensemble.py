"""Spacing ensembles (custom_networks.pipeline.ensemble).

Shown: the default looks are the clamped native spacing and 1.25x / 1.5x of it, clamped to the
trained range and kept once each, and bad factors raise; the disagreement is the mutual
information (0 for equal looks, ln 2 for two certain looks that disagree); with an oracle network
(a threshold of the input) one look at the native spacing gives back the thresholded input voxel
for voxel, and three looks give a label on the native grid with Dice >= 0.95, no disagreement away
from the boundary and some on it; a network whose answer depends on the spacing scores higher
than one whose answer does not; an image without foreground scores 0; the outputs keep the
image's affine and applied operations; and a HyperUNet generates one weight set per spacing for
two images, not one per look.
"""

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Orientationd

from custom_networks import HyperUNet
from custom_networks.pipeline import chain
from custom_networks.pipeline.ensemble import (
    DEFAULT_FACTORS,
    SpacingEnsembleInferer,
    SplitDisagreementd,
    ensemble_inferer,
    ensemble_spacings,
    mutual_information,
    spacing_ensemble,
)
from custom_networks.spacing import SpacingRange

RANGE = SpacingRange.from_config({"low": [1.0, 1.0, 1.0], "high": [3.0, 3.0, 3.0]})


class Threshold(torch.nn.Module):
    """Oracle: class 1 where the input exceeds ``level`` (mm-dependent with ``per_mm``)."""

    def __init__(self, level=0.5, per_mm=0.0, sharpness=20.0):
        super().__init__()
        self.level, self.per_mm, self.sharpness = level, per_mm, sharpness

    def forward(self, x, spacing=None):
        level = self.level + self.per_mm * (spacing.mean() - 1.0 if spacing is not None else 0.0)
        fg = self.sharpness * (x[:, :1] - level)
        return torch.cat([torch.zeros_like(fg), fg], 1)


def ball_image(shape=(40, 36, 32), spacing=(1.0, 1.1, 0.9), radius_mm=9.0, oblique=True):
    """A smooth ball (1 inside, 0 outside, a 2 mm ramp) on an anisotropic, optionally oblique grid."""
    grids = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)], indexing="ij")
    r = np.sqrt(sum(g**2 for g in grids))
    values = np.clip((radius_mm + 1 - r) / 2, 0, 1).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    if oblique:
        c, s = math.cos(0.3), math.sin(0.3)
        affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag(spacing)
    affine[:3, 3] = [-10.0, 5.0, 2.0]
    return MetaTensor(torch.from_numpy(values)[None], affine=torch.as_tensor(affine, dtype=torch.float64)), r


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2 * (a & b).sum() / (a.sum() + b.sum())


WINDOW = chain.inferer((32, 32, 32), overlap=0.25)


def test_default_spacings_are_clamped_multiples_kept_once():
    assert DEFAULT_FACTORS == (1.0, 1.25, 1.5)
    assert ensemble_spacings((1.0, 1.0, 1.0), RANGE) == [(1.0, 1.0, 1.0), (1.25, 1.25, 1.25), (1.5, 1.5, 1.5)]
    # a 0.5 mm image starts at the range's 1 mm, and a 0.8 x 0.8 x 5 mm one at 1 x 1 x 3
    assert ensemble_spacings((0.5, 0.5, 0.5), RANGE)[0] == (1.0, 1.0, 1.0)
    assert ensemble_spacings((0.8, 0.8, 5.0), RANGE) == [(1.0, 1.0, 3.0), (1.25, 1.25, 3.0), (1.5, 1.5, 3.0)]
    # near the top of the range the coarser looks coincide and are kept once
    assert ensemble_spacings((2.8, 2.8, 2.8), RANGE) == [(2.8, 2.8, 2.8), (3.0, 3.0, 3.0)]
    assert ensemble_spacings((1.0, 2.0, 1.0), None, [1, 2]) == [(1.0, 2.0, 1.0), (2.0, 4.0, 2.0)]


@pytest.mark.parametrize("factors", [[], [0], [-1.5], [float("nan")], [True], 1.25])
def test_bad_factors_raise(factors):
    with pytest.raises(ValueError, match="factor"):
        ensemble_spacings((1.0, 1.0, 1.0), RANGE, factors)


def test_mutual_information():
    p = torch.tensor([0.3, 0.7])[:, None]
    assert float(mutual_information(p, -(p * p.log()).sum(0))) == pytest.approx(0.0, abs=1e-7)
    # two certain looks that disagree: the mean is 50/50 (ln 2), each look's entropy is 0
    mean = torch.tensor([0.5, 0.5])[:, None]
    assert float(mutual_information(mean, torch.zeros(1))) == pytest.approx(math.log(2), rel=1e-6)


def test_one_native_look_is_the_thresholded_input():
    image, _ = ball_image()
    out = spacing_ensemble(Threshold(), image, [(1.0, 1.1, 0.9)], WINDOW)
    np.testing.assert_array_equal(out["label"][0].numpy(), (image[0].numpy() > 0.5).astype(np.uint8))
    assert float(out["disagreement"].abs().max()) == 0.0
    assert len(out["seconds_per_look"]) == 1


def test_three_looks_agree_inside_and_outside_and_disagree_on_the_boundary():
    image, r = ball_image()
    out = spacing_ensemble(Threshold(), image, ensemble_spacings((1.0, 1.1, 0.9), RANGE), WINDOW)
    assert out["spacings"] == [[1.0, 1.1, 1.0], [1.25, 1.375, 1.25], [1.5, 1.65, 1.5]]
    label, disagreement = out["label"][0].numpy(), out["disagreement"][0].numpy()
    assert label.shape == tuple(image.shape[1:]) and out["label"].dtype == torch.uint8
    assert dice(label, r < 9.0) >= 0.95  # the ramp crosses 0.5 at 9 mm
    far = (r < 6.0) | (r > 12.0)
    assert float(disagreement[far].max()) < 1e-3
    assert float(disagreement[~far].max()) > 0.01
    assert out["score"] > 0.0
    # the outputs carry the image's geometry
    torch.testing.assert_close(out["label"].affine, image.affine)
    torch.testing.assert_close(out["disagreement"].affine, image.affine)


def test_a_spacing_dependent_answer_scores_higher():
    image, _ = ball_image(oblique=False)
    spacings = ensemble_spacings((1.0, 1.1, 0.9), RANGE)
    steady = spacing_ensemble(Threshold(), image, spacings, WINDOW)["score"]
    drifting = spacing_ensemble(Threshold(per_mm=0.6), image, spacings, WINDOW)["score"]
    assert drifting > 2 * steady, (drifting, steady)


def test_no_foreground_scores_zero():
    image, _ = ball_image()
    empty = MetaTensor(torch.zeros_like(image.as_tensor()), affine=image.affine)
    out = spacing_ensemble(Threshold(), empty, ensemble_spacings((1.0, 1.1, 0.9), RANGE), WINDOW)
    assert out["score"] == 0.0 and int(out["label"].max()) == 0


def test_outputs_keep_the_applied_operations_for_the_inverse():
    image, _ = ball_image(oblique=False)
    orient = Orientationd(keys="image", axcodes="LPS")
    loaded = orient({"image": image})["image"]
    out = spacing_ensemble(Threshold(), loaded, [(1.0, 1.1, 0.9)], WINDOW)
    back = orient.inverse({"image": out["label"]})["image"]
    np.testing.assert_array_equal(back[0].numpy(), (image[0].numpy() > 0.5).astype(np.uint8))


def test_bad_inputs_raise():
    image, _ = ball_image()
    with pytest.raises(ValueError, match="spacings is empty"):
        spacing_ensemble(Threshold(), image, [], WINDOW)
    with pytest.raises(ValueError, match="MetaTensor"):
        spacing_ensemble(Threshold(), image.as_tensor(), [(1.0, 1.0, 1.0)], WINDOW)
    with pytest.raises(ValueError, match="ensemble spacing"):
        spacing_ensemble(Threshold(), image, [(1.0, -1.0, 1.0)], WINDOW)


def test_a_hyperunet_generates_one_weight_set_per_spacing_for_two_images():
    torch.manual_seed(0)
    net = HyperUNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), hidden_features=(8, 8)).eval()
    image, _ = ball_image(shape=(24, 24, 24))
    spacings = ensemble_spacings((1.0, 1.1, 0.9), RANGE)
    for _ in range(2):
        spacing_ensemble(net, image, spacings, chain.inferer((16, 16, 16), overlap=0.25))
    assert net.generation_count == len(spacings)


# --------------------------------------------------------------------------- the bundles' inferer


def test_ensemble_inferer_option_values():
    window = chain.inferer((32, 32, 32))
    for off in (False, None, "false", "no"):
        assert ensemble_inferer(window, off) is window
    assert ensemble_inferer(window, True, RANGE).factors == DEFAULT_FACTORS
    assert ensemble_inferer(window, "true").factors == DEFAULT_FACTORS
    assert ensemble_inferer(window, "[1, 1.5]").factors == (1.0, 1.5)
    assert ensemble_inferer(window, [1, 2]).factors == (1.0, 2.0)
    for bad in ("sometimes", 1.5, "[1, -2]", []):
        with pytest.raises(ValueError, match="spacing_ensemble must be|factor"):
            ensemble_inferer(window, bad)


def test_inferer_output_is_the_log_mean_and_the_disagreement_of_the_looks():
    """On the working grid: softmax of the output = the looks' mean probability, the last channel
    the mutual information; the label matches the oracle's, as spacing_ensemble's does."""
    image, r = ball_image(oblique=False)
    working = (1.0, 1.1, 1.0)
    ensemble = SpacingEnsembleInferer(WINDOW, DEFAULT_FACTORS, RANGE)
    out = ensemble(image.as_tensor()[None], Threshold(), spacing=torch.tensor([working]))
    assert out.shape == (1, 3, *image.shape[1:])
    mean = torch.softmax(out[0, :2], 0)
    torch.testing.assert_close(mean.sum(0), torch.ones(image.shape[1:]))
    reference = spacing_ensemble(Threshold(), MetaTensor(image.as_tensor(), affine=torch.diag(torch.tensor([*working, 1.0], dtype=torch.float64))),
                                 ensemble_spacings(working, RANGE), WINDOW)
    np.testing.assert_array_equal(mean.argmax(0).numpy(), reference["label"][0].numpy())
    torch.testing.assert_close(out[0, 2], reference["disagreement"][0].as_tensor(), atol=1e-5, rtol=0)
    # the split for saving keeps the input's geometry and name
    d = SplitDisagreementd()({"pred": out[0], "image": image})
    assert d["pred"].shape[0] == 2 and d["disagreement"].shape == (1, *image.shape[1:])
    torch.testing.assert_close(d["disagreement"].affine, image.affine)
    with pytest.raises(ValueError, match="needs the working spacing"):
        ensemble(image.as_tensor()[None], Threshold())
    with pytest.raises(ValueError, match="one image"):
        ensemble(torch.zeros(2, 1, 8, 8, 8), Threshold(), spacing=torch.ones(2, 3))


def test_inferer_report_is_filled_for_the_caller():
    image, _ = ball_image(oblique=False)
    report = {}
    SpacingEnsembleInferer(WINDOW, DEFAULT_FACTORS, RANGE, disagreement=False)(
        image.as_tensor()[None], Threshold(), spacing=torch.tensor([[1.0, 1.1, 1.0]]), report=report
    )
    assert report["spacings"] == [[1.0, 1.1, 1.0], [1.25, 1.375, 1.25], [1.5, 1.65, 1.5]]
    assert len(report["seconds_per_look"]) == 3 and report["score"] > 0.0
