"""Unit tests of the budget-driven working spacing and what feeds it.

Covers ``custom_networks.pipeline.cost`` (window counts, working shapes, candidate spacings, the cost model
and the ``BudgetSpacing`` policy), ``custom_networks.pipeline.profiling.measure``, ``SpacingRange``'s text
form, ``MapLabelsd``'s per-item label map and ``SpacingPolicyd`` with a callable policy.
"""

import math
import time

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Compose, Invertd

from custom_networks import HyperUNet
from custom_networks.pipeline.cost import BudgetSpacing, InferenceCost, candidate_spacings, window_count, working_shape
from custom_networks.data.datasets import MapLabelsd
from custom_networks.pipeline.profiling import measure
from custom_networks.spacing import SpacingRange
from custom_networks.pipeline.transforms import SpacingPolicyd

RANGE = SpacingRange((0.5, 0.5, 0.5), (3.5, 3.5, 3.5))


def cost_model(seconds_per_window=0.01, seconds_per_voxel=0.0, window_bytes=1e6, roi=(16, 16, 16), overlap=0.5):
    """A hand-made cost model (no calibration): 1 input channel, 2 classes."""
    return InferenceCost(tuple(roi), overlap, 1, 2, seconds_per_window, seconds_per_voxel, window_bytes)


# --------------------------------------------------------------------------- window_count


def monai_windows(shape, roi, overlap):
    """How many windows MONAI's sliding_window_inference runs (sw_batch_size=1)."""
    calls = []

    def predictor(x):
        calls.append(tuple(x.shape))
        return x

    sliding_window_inference(torch.zeros(1, 1, *shape), roi, sw_batch_size=1, predictor=predictor, overlap=overlap)
    assert all(c == (1, 1, *roi) for c in calls)  # one window per call
    return len(calls)


@pytest.mark.parametrize("overlap", [0.25, 0.5])
@pytest.mark.parametrize(
    "shape, roi",
    [
        ((10, 10, 10), (16, 16, 16)),  # smaller than the window: padded to one window
        ((3, 20, 5), (16, 16, 16)),  # much smaller on two axes
        ((16, 16, 16), (16, 16, 16)),  # equal
        ((17, 16, 15), (16, 16, 16)),  # one voxel larger / equal / smaller
        ((40, 33, 17), (16, 16, 16)),  # larger, odd sizes
        ((64, 20, 7), (32, 32, 8)),  # anisotropic image and window
        ((50, 23, 31), (15, 10, 15)),  # odd windows: int(15 * 0.75) = 11, int(15 * 0.5) = 7
        ((100, 37), (32, 32)),  # 2-D
    ],
)
def test_window_count_matches_monai(shape, roi, overlap):
    """The cost model counts exactly the windows MONAI's sliding window inference runs."""
    assert window_count(shape, roi, overlap) == monai_windows(shape, roi, overlap)


def test_window_count_hand_computed():
    """A few counts worked out by hand (interval = int(roi * (1 - overlap)))."""
    assert window_count((10, 10, 10), (16, 16, 16), 0.5) == 1
    assert window_count((16, 16, 16), (16, 16, 16), 0.5) == 1
    assert window_count((32, 32, 32), (16, 16, 16), 0.5) == 27  # 3 per axis: 0, 8, 16
    assert window_count((40, 36, 8), (16, 16, 16), 0.5) == 16  # 4 x 4 x 1
    assert window_count((40, 36, 8), (16, 16, 16), 0.25) == 9  # interval 12: 3 x 3 x 1


# --------------------------------------------------------------------------- working_shape


def test_working_shape_hand_computed():
    """Resampling keeps the field of view: n * native / working, rounded, at least 1."""
    assert working_shape((1.0, 1.0, 1.0), (64, 64, 64), (2.0, 2.0, 2.0)) == (32, 32, 32)
    assert working_shape((0.8, 0.8, 5.0), (40, 36, 8), (2.0, 2.0, 2.0)) == (16, 14, 20)  # 14.4 -> 14
    assert working_shape((1.0, 1.0, 2.0), (64, 64, 32), (2.0, 2.0, 2.0)) == (32, 32, 32)
    assert working_shape((0.5, 0.5), (7, 9), (1.0, 1.0)) == (4, 4)  # 3.5 -> 4 (banker's), 4.5 -> 4
    assert working_shape((1.0, 1.0, 1.0), (3, 3, 3), (100.0, 100.0, 100.0)) == (1, 1, 1)  # never 0
    assert working_shape((1.0, 1.0, 1.0), (10, 10, 10), (0.5, 1.0, 4.0)) == (20, 10, 2)  # finer grows


# --------------------------------------------------------------------------- candidate_spacings


@pytest.mark.parametrize("native", [(1.0, 1.0, 1.0), (0.8, 0.8, 5.0), (0.3, 0.6, 0.45), (2.0, 0.4, 4.0), (5.0, 5.0, 5.0)])
@pytest.mark.parametrize("trained_range", [None, RANGE, SpacingRange((1.0, 0.2, 0.2), (5.0, 1.5, 1.5))])
def test_candidates_are_ordered_and_bounded(native, trained_range):
    """Candidates go from the clamp policy's spacing (or native) to the coarsest one, never backwards."""
    cands = candidate_spacings(native, trained_range)
    expected_first = trained_range.clamp(native) if trained_range is not None else native
    assert cands[0] == pytest.approx(expected_first, abs=0)
    for prev, nxt in zip(cands, cands[1:]):
        assert all(b >= a for a, b in zip(prev, nxt)), (prev, nxt)
    assert len(set(cands)) == len(cands)  # no duplicates
    if trained_range is None:
        assert all(s >= n for c in cands for s, n in zip(c, native))  # never finer than the image
        assert cands[-1] == (max(native),) * 3
    else:
        assert all(trained_range.contains(c) for c in cands)
        assert cands[-1] == trained_range.high  # the range's top on every axis


def test_candidates_without_range_hand_computed():
    """An isotropic 1 mm image with no range has only itself to offer; 0.5 mm coarsens to 1 mm.

    Steps are 0.5 * 1.15^k rounded to 0.1 um (0.5 * 1.15^2 = 0.66124999... in floating point).
    """
    assert candidate_spacings((1.0, 1.0, 1.0)) == [(1.0, 1.0, 1.0)]
    assert candidate_spacings((0.5, 0.5, 1.0)) == [(0.5, 0.5, 1.0), (0.575, 0.575, 1.0), (0.6612, 0.6612, 1.0),
                                                   (0.7604, 0.7604, 1.0), (0.8745, 0.8745, 1.0), (1.0, 1.0, 1.0)]


def test_candidates_within_range_reach_the_top():
    """A native spacing inside the range ends at the range's high edge on every axis."""
    cands = candidate_spacings((1.0, 1.0, 1.0), RANGE)
    assert cands[0] == (1.0, 1.0, 1.0)
    assert cands[1] == (1.15, 1.15, 1.15)
    assert cands[-1] == (3.5, 3.5, 3.5)
    assert len(cands) == 10


def test_candidates_anisotropic_coarsen_fine_axes_first():
    """0.8 x 0.8 x 5 mm: the in-plane axes are given up first, the 5 mm axis is left alone."""
    cands = candidate_spacings((0.8, 0.8, 5.0))
    assert cands[0] == (0.8, 0.8, 5.0)
    assert cands[1] == (0.92, 0.92, 5.0)
    assert cands[2] == (1.058, 1.058, 5.0)
    assert all(c[2] == 5.0 for c in cands)
    assert all(c[0] == c[1] < 5.0 for c in cands[:-1])
    assert cands[-1] == (5.0, 5.0, 5.0)
    # with the range, the 5 mm axis is clamped to 3.5 from the first candidate on and stays there
    ranged = candidate_spacings((0.8, 0.8, 5.0), RANGE)
    assert ranged[0] == (0.8, 0.8, 3.5) and ranged[1] == (0.92, 0.92, 3.5)
    assert all(c[2] == 3.5 for c in ranged) and ranged[-1] == (3.5, 3.5, 3.5)


def test_candidates_below_range_start_at_low_edge():
    """An image finer than the range starts at the range's low edge (the clamp policy)."""
    cands = candidate_spacings((0.3, 0.3, 0.3), RANGE)
    assert cands[0] == (0.5, 0.5, 0.5)
    assert cands[1] == (0.5247, 0.5247, 0.5247)  # 0.3 * 1.15^4
    assert cands[-1] == (3.5, 3.5, 3.5)


# --------------------------------------------------------------------------- InferenceCost.predict


def test_predict_hand_computed():
    """seconds = windows * s/window + native voxels * s/voxel; memory = window + 4 B * voxels * (in + out + 1)."""
    cost = cost_model(seconds_per_window=0.1, seconds_per_voxel=1e-7, window_bytes=1e6)
    p = cost.predict((1.0, 1.0, 2.0), (64, 64, 32), (2.0, 2.0, 2.0))
    assert p["shape"] == (32, 32, 32)
    assert p["windows"] == 27 == window_count((32, 32, 32), (16, 16, 16), 0.5)
    assert p["seconds"] == pytest.approx(27 * 0.1 + 64 * 64 * 32 * 1e-7)  # 2.7131072
    assert p["memory_bytes"] == pytest.approx(1e6 + 4 * 32**3 * 4)  # 1524288
    # at the native spacing: 64 x 64 x 32 -> 7 x 7 x 3 windows, and 4x the voxels
    p = cost.predict((1.0, 1.0, 2.0), (64, 64, 32), (1.0, 1.0, 2.0))
    assert p["shape"] == (64, 64, 32) and p["windows"] == 147
    assert p["seconds"] == pytest.approx(14.7 + 0.0131072)
    assert p["memory_bytes"] == pytest.approx(1e6 + 4 * 64 * 64 * 32 * 4)


# --------------------------------------------------------------------------- BudgetSpacing

NATIVE, SHAPE = (1.0, 1.0, 1.0), (64, 64, 64)
# candidates (RANGE): 1, 1.15, 1.3225, 1.5209, 1.749, 2.0114, 2.3131, 2.66, 3.059, 3.5 mm
# working sizes:      64, 56,   48,     42,     37,    32,     28,     24,   21,    18
# windows (16^3, 0.5): 343, 216, 125,   125,    64,    27,     27,     8,    8,     8


def test_budget_generous_picks_finest():
    """With room to spare the finest candidate (the clamp policy's spacing) is used."""
    policy = BudgetSpacing(cost_model(), RANGE, time_budget_s=100.0, memory_budget_gb=10.0)
    assert policy(NATIVE, SHAPE) == (1.0, 1.0, 1.0)
    assert policy.decide(NATIVE, SHAPE) == {
        "spacing": [1.0, 1.0, 1.0],
        "predicted_seconds": 3.43,
        "predicted_memory_gb": 0.0052,
        "fits": True,
        "window": "patch",
        "candidates": 10,
    }


def test_budget_time_picks_finest_that_fits():
    """A 1 s budget skips 3.43, 2.16, 1.25, 1.25 s and takes 1.749 mm (0.64 s)."""
    cost = cost_model()
    policy = BudgetSpacing(cost, RANGE, time_budget_s=1.0)
    chosen = policy(NATIVE, SHAPE)
    decision = policy.decide(NATIVE, SHAPE)
    assert chosen == (1.749, 1.749, 1.749)
    assert decision["fits"] is True and decision["predicted_seconds"] == 0.64
    cands = candidate_spacings(NATIVE, RANGE)
    i = cands.index(chosen)
    assert cost.predict(NATIVE, SHAPE, cands[i])["seconds"] <= 1.0
    assert cost.predict(NATIVE, SHAPE, cands[i - 1])["seconds"] > 1.0


def test_budget_time_margin_plans_below_the_budget():
    """With half the budget kept free, a 2 s budget takes what a 1 s budget without margin takes."""
    cost = cost_model()
    assert BudgetSpacing(cost, RANGE, time_budget_s=2.0, time_margin=0.5)(NATIVE, SHAPE) == (
        BudgetSpacing(cost, RANGE, time_budget_s=1.0, time_margin=0.0)(NATIVE, SHAPE)
    )
    # the default margin is 10 %: a budget just above a candidate's prediction does not take it
    finest = candidate_spacings(NATIVE, RANGE)[0]
    seconds = cost.predict(NATIVE, SHAPE, finest)["seconds"]
    assert BudgetSpacing(cost, RANGE, time_budget_s=seconds * 1.05)(NATIVE, SHAPE) != finest
    assert BudgetSpacing(cost, RANGE, time_budget_s=seconds * 1.12)(NATIVE, SHAPE) == finest
    for bad in (-0.1, 1.0, True, "0.1"):
        with pytest.raises(ValueError, match=r"time_margin must be a share of the budget in \[0, 1\); got"):
            BudgetSpacing(cost, RANGE, time_budget_s=1.0, time_margin=bad)


def test_budget_memory_picks_finest_that_fits():
    """3 MB: 64^3 (5.19 MB) and 56^3 (3.81 MB) do not fit, 48^3 (2.77 MB) does."""
    cost = cost_model()
    policy = BudgetSpacing(cost, RANGE, memory_budget_gb=0.003)
    chosen = policy(NATIVE, SHAPE)
    decision = policy.decide(NATIVE, SHAPE)
    assert chosen == (1.3225, 1.3225, 1.3225)
    assert decision["fits"] is True and decision["predicted_memory_gb"] == 0.0028
    cands = candidate_spacings(NATIVE, RANGE)
    i = cands.index(chosen)
    assert cost.predict(NATIVE, SHAPE, cands[i])["memory_bytes"] <= 3e6
    assert cost.predict(NATIVE, SHAPE, cands[i - 1])["memory_bytes"] > 3e6


@pytest.mark.parametrize("kwargs", [dict(time_budget_s=0.01), dict(memory_budget_gb=0.0005)])
def test_budget_impossible_uses_coarsest_and_says_so(kwargs):
    """When nothing fits, the coarsest candidate is used and ``fits`` is False."""
    policy = BudgetSpacing(cost_model(), RANGE, **kwargs)
    assert policy(NATIVE, SHAPE) == (3.5, 3.5, 3.5)
    decision = policy.decide(NATIVE, SHAPE)
    assert decision["fits"] is False
    assert decision["spacing"] == [3.5, 3.5, 3.5]
    assert decision["predicted_seconds"] == 0.08  # 2 x 2 x 2 windows


def test_budget_both_limits_must_hold():
    """Time alone would allow 1.749 mm; the memory budget pushes it to 2.0114 mm (32^3)."""
    policy = BudgetSpacing(cost_model(), RANGE, time_budget_s=1.0, memory_budget_gb=0.0015)
    # memory: 37^3 -> 1e6 + 16 * 50653 = 1.81 MB > 1.5 MB; 32^3 -> 1.52 MB > 1.5 MB; 28^3 -> 1.35 MB
    assert policy(NATIVE, SHAPE) == (2.3131, 2.3131, 2.3131)
    assert policy.decide(NATIVE, SHAPE)["fits"] is True


@pytest.mark.parametrize("off", [None, 0, 0.0, -1.0])
def test_budget_zero_or_none_means_no_limit(off):
    """``None`` or ``<= 0`` turns a limit off, even for a huge image."""
    policy = BudgetSpacing(cost_model(), RANGE, time_budget_s=off, memory_budget_gb=off)
    assert policy(NATIVE, (512, 512, 512)) == (1.0, 1.0, 1.0)
    assert policy.decide(NATIVE, (512, 512, 512))["fits"] is True


def test_budget_without_range_starts_at_native():
    """No trained range: the first candidate is the native spacing itself."""
    policy = BudgetSpacing(cost_model(), None, time_budget_s=100.0)
    assert policy((0.8, 0.8, 5.0), (40, 36, 8)) == (0.8, 0.8, 5.0)
    assert policy.decide((0.8, 0.8, 5.0), (40, 36, 8))["candidates"] == 15


@pytest.mark.parametrize("name", ["time_budget_s", "memory_budget_gb"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), "abc"])
def test_budget_non_finite_raises(name, value):
    """A budget that is not a finite number is refused up front, naming the option."""
    with pytest.raises(ValueError, match=name):
        BudgetSpacing(cost_model(), RANGE, **{name: value})


# --------------------------------------------------------------------------- InferenceCost.calibrate


def test_calibrate_tiny_network_on_cpu():
    """Calibration on the CPU gives positive, finite constants and remembers the setup."""
    torch.manual_seed(0)
    net = HyperUNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), convs_per_level=1).eval()
    cost = InferenceCost.calibrate(net, (16, 16, 16), 0.25, in_channels=1, out_channels=2, device="cpu")
    assert cost.device == "cpu"
    assert cost.roi_size == (16, 16, 16) and cost.overlap == 0.25
    assert (cost.in_channels, cost.out_channels) == (1, 2)
    for value in (cost.seconds_per_window, cost.seconds_per_voxel, cost.window_bytes):
        assert math.isfinite(value) and value > 0
    assert cost.divisor == 2  # read from the network's layout
    assert cost.seconds_per_window < 10.0 and cost.seconds_per_voxel < 1e-3
    # the calibrated model is usable as is
    p = cost.predict((1.0, 1.0, 1.0), (32, 32, 32), (1.0, 1.0, 1.0))
    assert p["windows"] == 27 and p["seconds"] > 0  # interval int(16 * 0.75) = 12: 3 per axis


# --------------------------------------------------------------------------- SpacingPolicyd with a callable


def anisotropic_image():
    """0.8 x 0.8 x 5 mm, axes 0/1 permuted with a flip, non-zero origin; intensity = world x."""
    affine = torch.tensor(
        [[0.0, -0.8, 0.0, 10.0], [0.8, 0.0, 0.0, -20.0], [0.0, 0.0, 5.0, 30.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64
    )
    shape = (40, 36, 8)
    vox = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"))
    world_x = affine[0, 0] * vox[0] + affine[0, 1] * vox[1] + affine[0, 2] * vox[2] + affine[0, 3]
    return MetaTensor(world_x[None].float(), affine=affine), affine


def check_round_trip(pre, d, image, affine):
    d["pred"] = (d["image"] > -5.0).float()  # keeps the image's meta and applied_operations
    pred = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True)(d)["pred"]
    assert isinstance(pred, MetaTensor)
    assert pred.shape == image.shape
    torch.testing.assert_close(pred.affine.to(torch.float64), affine, atol=1e-4, rtol=0)
    agreement = (pred == (image > -5.0).float()).float().mean()
    assert agreement > 0.97, agreement


def test_policy_callable_gets_native_geometry_and_is_followed():
    """A callable policy sees the image's spacing and shape; its answer is the working spacing."""
    image, affine = anisotropic_image()
    seen = []

    def policy(native, shape):
        seen.append((tuple(native), tuple(shape)))
        return (2.0, 1.6, 4.0)

    pre = Compose([SpacingPolicyd("image", policy=policy)])
    d = pre({"image": image})
    assert len(seen) == 1
    assert seen[0][0] == pytest.approx((0.8, 0.8, 5.0)) and seen[0][1] == (40, 36, 8)
    torch.testing.assert_close(d["spacing"], torch.tensor([2.0, 1.6, 4.0]))
    torch.testing.assert_close(d["image"].pixdim.float(), torch.tensor([2.0, 1.6, 4.0]))
    assert abs(d["image"].shape[1] - 16) <= 1 and abs(d["image"].shape[2] - 18) <= 1 and abs(d["image"].shape[3] - 10) <= 1
    check_round_trip(pre, d, image, affine)


def test_policy_budget_spacing_round_trip():
    """BudgetSpacing inside SpacingPolicyd: 0.05 s allows 1.058 mm in-plane (9 windows of 16 x 16 x 8), and Invertd undoes it."""
    image, affine = anisotropic_image()
    budget = BudgetSpacing(cost_model(), None, time_budget_s=0.05)
    pre = Compose([SpacingPolicyd("image", policy=budget)])
    d = pre({"image": image})
    # the decision travels in the data dict; the policy object keeps nothing of this image
    assert d["spacing_decision"]["spacing"] == [1.058, 1.058, 5.0]
    assert d["spacing_decision"]["fits"] is True and d["spacing_decision"]["predicted_seconds"] == 0.045
    assert d["spacing_decision"]["policy"] == "BudgetSpacing" and not hasattr(budget, "decision")
    torch.testing.assert_close(d["spacing"], torch.tensor([1.058, 1.058, 5.0]))
    torch.testing.assert_close(d["image"].pixdim.float(), torch.tensor([1.058, 1.058, 5.0]))
    # 40 x 0.8 / 1.058 = 30.2, 36 x 0.8 / 1.058 = 27.2, 8 x 5 / 5 = 8
    assert abs(d["image"].shape[1] - 30) <= 1 and abs(d["image"].shape[2] - 27) <= 1 and d["image"].shape[3] == 8
    check_round_trip(pre, d, image, affine)


# --------------------------------------------------------------------------- SpacingRange text form


@pytest.mark.parametrize(
    "text, low, high",
    [
        ("0.5,3.5", (0.5,) * 3, (3.5,) * 3),
        (" 0.5, 3.5 ", (0.5,) * 3, (3.5,) * 3),
        ("1,5; 0.2,1.5; 0.2,1.5", (1.0, 0.2, 0.2), (5.0, 1.5, 1.5)),
        ("1,5;0.2,1.5;0.3,2", (1.0, 0.2, 0.3), (5.0, 1.5, 2.0)),
    ],
)
def test_range_from_string(text, low, high):
    """The text-field form of a trained range: one pair for all axes, or one pair per axis."""
    r = SpacingRange.from_string(text)
    assert r.low == low and r.high == high
    assert SpacingRange.from_string(r.to_string()) == r


def test_range_to_string():
    """``to_string`` writes the shortest form that ``from_string`` reads back."""
    assert RANGE.to_string() == "0.5,3.5"
    assert SpacingRange((1.0, 0.2, 0.2), (5.0, 1.5, 1.5)).to_string() == "1,5; 0.2,1.5; 0.2,1.5"
    assert SpacingRange.from_string("0.5,3.5", spatial_dims=2) == SpacingRange((0.5, 0.5), (3.5, 3.5))


@pytest.mark.parametrize("text", ["", "a,b", "1", "1,2,3", "3,1", "0,1", "-1,2", "nan,1", "1,2;3,4", "1,2;3,4;5,6;7,8"])
def test_range_from_string_errors(text):
    """Malformed, non-numeric, reversed, non-positive or wrong-length ranges are refused."""
    with pytest.raises(ValueError):
        SpacingRange.from_string(text)


# --------------------------------------------------------------------------- measure


def test_measure_cpu_time_and_memory():
    """On the CPU, ``measure`` reports wall time and a peak RSS that sees a 200 MB allocation.

    Run in a fresh process: after other tests, freed memory stays resident in this one and a new
    allocation may reuse it without raising the RSS."""
    import json
    import subprocess
    import sys

    script = """
import json, time, numpy as np, psutil
from custom_networks.pipeline.profiling import measure
baseline = psutil.Process().memory_info().rss
with measure("cpu") as m:
    time.sleep(0.05)
    block = np.ones(25_000_000, dtype=np.float64)  # 200 MB, every page written
    block[::512] += 1.0
    time.sleep(0.05)
print(json.dumps({"baseline": baseline, "first": float(block[0]), "kind": m.kind, "seconds": m.seconds,
                  "peak": m.peak_bytes, "added": m.added_bytes, "keys": sorted(m.as_dict())}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    r = json.loads(result.stdout.strip().splitlines()[-1])
    assert r["first"] == 2.0 and r["kind"] == "cpu_rss"
    assert 0.1 <= r["seconds"] < 10.0
    assert r["peak"] >= r["baseline"] + 150e6, r
    assert r["added"] >= 150e6, r
    assert r["keys"] == ["memory_kind", "peak_memory_gb", "seconds"]


def test_measure_fills_in_when_block_raises():
    """The numbers are filled in even if the measured block fails."""
    with pytest.raises(RuntimeError):
        with measure("cpu") as m:
            time.sleep(0.02)
            raise RuntimeError("boom")
    assert m.seconds >= 0.02 and m.peak_bytes > 0


# --------------------------------------------------------------------------- MapLabelsd per-item map


def labelled(values, filename="/data/case_seg.nii.gz"):
    return MetaTensor(torch.tensor(values, dtype=torch.float32).reshape(1, -1, 1, 1), meta={"filename_or_obj": filename})


def test_map_labels_item_map_replaces_transform_map():
    """An item's own ``label_map`` decides its classes and is dropped from the output."""
    t = MapLabelsd("label", {0: 0, 1: 1, 2: 2})
    out = t({"label": labelled([0, 3, 3, 0]), "label_map": {0: 0, 3: 1}})
    assert "label_map" not in out
    assert out["label"].reshape(-1).tolist() == [0, 1, 1, 0]
    assert isinstance(out["label"], MetaTensor) and out["label"].meta["filename_or_obj"] == "/data/case_seg.nii.gz"


def test_map_labels_item_without_map_uses_own_map():
    """Items without a map of their own still use the transform's map."""
    t = MapLabelsd("label", {0: 0, 1: 2, 2: 1})
    out = t({"label": labelled([0, 1, 2])})
    assert out["label"].reshape(-1).tolist() == [0, 2, 1]
    assert "label_map" not in out


def test_map_labels_item_map_is_checked_and_names_file():
    """A value the item's map lacks is refused, naming the file, even if the transform's map knows it."""
    t = MapLabelsd("label", {0: 0, 1: 1, 2: 2})
    with pytest.raises(ValueError) as e:
        t({"label": labelled([0, 1, 3], filename="/data/slicer_seg.nrrd"), "label_map": {0: 0, 3: 1}})
    assert "/data/slicer_seg.nrrd" in str(e.value)
    assert "values 1 " in str(e.value)


def test_first_candidate_keeps_the_native_spacing_exactly():
    """A 512^2 CT at 0.9765625 mm is not moved to 0.9766 mm by the finest candidate."""
    assert candidate_spacings((0.9765625, 0.9765625, 2.5))[0] == (0.9765625, 0.9765625, 2.5)


def test_budget_accepts_numpy_numbers_and_refuses_booleans():
    cost = InferenceCost((16, 16, 16), 0.5, 1, 2, 0.1, 1e-8, 1e6)
    assert BudgetSpacing(cost, time_budget_s=np.float32(5.0)).time_budget_s == 5.0
    with pytest.raises(ValueError, match="time_budget_s"):
        BudgetSpacing(cost, time_budget_s=True)


def test_map_labels_empty_item_map_is_an_error():
    label = MetaTensor(torch.zeros(1, 4, 4, 4), meta={"filename_or_obj": "empty_map.nii.gz"})
    with pytest.raises(ValueError, match="label_map is empty"):
        MapLabelsd("label", {0: 0, 1: 1})({"label": label, "label_map": {}})


def test_whole_window_covers_the_grid_once_and_scales_with_its_voxels():
    """'whole' is one window of the padded grid; 'auto' picks it when its memory fits the budget."""
    cost = InferenceCost((16, 16, 16), 0.5, 1, 2, 0.01, 0.0, 1e6, divisor=4)
    whole = cost.predict((1.0,) * 3, (30, 30, 30), (1.0,) * 3, window="whole")
    patch = cost.predict((1.0,) * 3, (30, 30, 30), (1.0,) * 3, window="patch")
    assert whole["windows"] == 1 and patch["windows"] == 27
    ratio = 32**3 / 16**3  # 30 padded to 32 per axis
    assert whole["seconds"] == pytest.approx(0.01 * ratio)
    assert patch["seconds"] == pytest.approx(0.27)
    assert whole["memory_bytes"] - patch["memory_bytes"] == pytest.approx(1e6 * (ratio - 1))
    assert cost.choose_window((30, 30, 30), memory_budget_bytes=None) == "whole"
    assert cost.choose_window((30, 30, 30), memory_budget_bytes=1e6 * ratio) == "whole"
    assert cost.choose_window((30, 30, 30), memory_budget_bytes=1e6 * ratio - 1) == "patch"
    assert cost.choose_window((10, 12, 16), memory_budget_bytes=None) == "patch"  # one patch covers it
    with pytest.raises(ValueError, match="window"):
        cost.predict((1.0,) * 3, (30, 30, 30), (1.0,) * 3, window="tiles")


def test_budget_with_auto_window_reports_the_window_it_planned_with():
    cost = InferenceCost((16, 16, 16), 0.5, 1, 2, 0.01, 0.0, 1e6, divisor=4)
    policy = BudgetSpacing(cost, None, time_budget_s=100, memory_budget_gb=100, window="auto")
    decision = policy.decide((1.0,) * 3, (30, 30, 30))
    assert decision["window"] == "whole" and decision["spacing"] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="window"):
        BudgetSpacing(cost, window="tiles")


def test_window_time_grows_with_the_fitted_exponent_and_new_weights_cost_their_generation():
    """A window of ``r`` times the calibrated voxels takes ``r ** voxel_exponent`` times as long;
    'whole' is chosen only where that is faster than the patches; generation is added once."""
    linear = InferenceCost((16, 16, 16), 0.5, 1, 2, 0.01, 0.0, 1e6, divisor=4)
    steep = InferenceCost((16, 16, 16), 0.5, 1, 2, 0.01, 0.0, 1e6, divisor=4, voxel_exponent=1.5, generation_seconds=0.2)
    ratio = 32**3 / 16**3  # 30 padded to 32 per axis
    whole = steep.predict((1.0,) * 3, (30, 30, 30), (1.0,) * 3, window="whole")
    assert whole["seconds"] == pytest.approx(0.2 + 0.01 * ratio**1.5)
    patch = steep.predict((1.0,) * 3, (30, 30, 30), (1.0,) * 3, window="patch")
    assert patch["seconds"] == pytest.approx(0.2 + 27 * 0.01)  # full windows: the exponent does not change them
    # 30^3: whole 8^1.5 = 22.6 window-times < 27 patches; 60^3: 52.7 (linear) or 382 (steep) vs 343 patches
    assert steep.choose_window((30, 30, 30), None) == "whole"
    assert window_count((60, 60, 60), (16, 16, 16), 0.5) == 343
    assert linear.choose_window((60, 60, 60), None) == "whole"
    assert steep.choose_window((60, 60, 60), None) == "patch"


def test_calibrate_fits_the_exponent_and_times_weight_generation():
    from custom_networks import PlainUNet

    torch.manual_seed(0)
    layout = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), convs_per_level=1)
    hyper = InferenceCost.calibrate(HyperUNet(**layout).eval(), (32, 32, 32), 0.25, 1, 2, device="cpu")
    plain = InferenceCost.calibrate(PlainUNet(**layout).eval(), (32, 32, 32), 0.25, 1, 2, device="cpu")
    for cost in (hyper, plain):
        assert 1.0 <= cost.voxel_exponent <= 1.5
    assert hyper.generation_seconds > 0 and plain.generation_seconds == 0.0
