"""Unit tests of the engine pieces (PrepareBatchSpacing, SpacingSlidingWindowInferer) and of
custom_networks.spacing."""

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, list_data_collate
from torch import nn

from custom_networks import HyperUNet, PrepareBatchSpacing, SpacingSlidingWindowInferer, batch_spacing
from custom_networks.spacing import SpacingRange, as_spacing_tensor, parse_spacing, working_spacing


def meta(array, spacing, origin=(0.0, 0.0, 0.0)):
    affine = torch.diag(torch.tensor(list(spacing) + [1.0], dtype=torch.float64))
    affine[: len(origin), -1] = torch.tensor(origin, dtype=torch.float64)
    return MetaTensor(torch.as_tensor(array), affine=affine)


# --------------------------------------------------------------------------- PrepareBatchSpacing


def test_prepare_batch_uses_spacing_entry():
    image = torch.randn(2, 1, 8, 8, 8)
    label = torch.randint(0, 2, (2, 1, 8, 8, 8))
    spacing = torch.tensor([[1.0, 1.5, 3.0], [0.7, 0.7, 2.0]])
    out = PrepareBatchSpacing()({"image": image, "label": label, "spacing": spacing}, device=torch.device("cpu"))
    assert len(out) == 4
    x, y, args, kwargs = out
    assert torch.equal(x, image) and torch.equal(y, label)
    assert args == ()
    assert set(kwargs) == {"spacing"}
    assert kwargs["spacing"].shape == (2, 3) and kwargs["spacing"].dtype == torch.float32
    torch.testing.assert_close(kwargs["spacing"], spacing)
    # a (D,) spacing is broadcast to the batch
    _, _, _, kwargs = PrepareBatchSpacing()({"image": image, "label": label, "spacing": torch.tensor([2.0, 2.0, 2.0])})
    torch.testing.assert_close(kwargs["spacing"], torch.full((2, 3), 2.0))
    # custom keys
    batch = {"img": image, "label": label, "sp": spacing}
    x, _, _, kwargs = PrepareBatchSpacing(spacing_key="sp", image_key="img")(batch)
    assert torch.equal(x, image)
    torch.testing.assert_close(kwargs["spacing"], spacing)


def test_prepare_batch_derives_spacing_from_affines():
    items = [
        {"image": meta(torch.zeros(1, 8, 8, 8), (0.8, 0.8, 2.0), (10.0, -3.0, 5.0)), "label": torch.zeros(1, 8, 8, 8)},
        {"image": meta(torch.ones(1, 8, 8, 8), (1.0, 1.5, 3.0), (0.0, 2.0, -7.0)), "label": torch.ones(1, 8, 8, 8)},
    ]
    batch = list_data_collate(items)
    assert isinstance(batch["image"], MetaTensor) and "spacing" not in batch
    x, y, args, kwargs = PrepareBatchSpacing()(batch)
    assert x.shape == (2, 1, 8, 8, 8) and y.shape == (2, 1, 8, 8, 8)
    torch.testing.assert_close(kwargs["spacing"], torch.tensor([[0.8, 0.8, 2.0], [1.0, 1.5, 3.0]]))
    # a batched MetaTensor with one (unbatched) affine applies it to every sample
    single = MetaTensor(torch.zeros(3, 1, 8, 8, 8), affine=torch.diag(torch.tensor([0.5, 2.0, 4.0, 1.0], dtype=torch.float64)))
    torch.testing.assert_close(batch_spacing(single), torch.tensor([[0.5, 2.0, 4.0]] * 3))
    # an explicit spacing entry wins over the affines
    batch["spacing"] = torch.tensor([[3.0, 3.0, 3.0], [4.0, 4.0, 4.0]])
    _, _, _, kwargs = PrepareBatchSpacing()(batch)
    torch.testing.assert_close(kwargs["spacing"], batch["spacing"])


def test_prepare_batch_without_spacing_raises():
    batch = {"image": torch.zeros(2, 1, 8, 8, 8), "label": torch.zeros(2, 1, 8, 8, 8)}
    with pytest.raises(ValueError, match=r"spacing.*\(B, 3\)"):
        PrepareBatchSpacing()(batch)
    batch["spacing"] = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="positive"):
        PrepareBatchSpacing()(batch)
    batch["spacing"] = torch.ones(2, 2)
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        PrepareBatchSpacing()(batch)


# --------------------------------------------------------------------------- sliding window


class SpacingRecorder(nn.Module):
    """Returns its input twice along the channels and records (window image id, spacing)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, spacing):
        self.calls.append((x.detach().clone(), spacing.detach().clone()))
        return torch.cat([x, x], dim=1)


def test_sliding_window_hands_each_window_its_spacing():
    # image b is filled with the value b + 1, so a window tells which image it came from
    x = torch.stack([torch.full((1, 24, 20, 28), float(b + 1)) for b in range(2)])
    spacing = torch.tensor([[1.0, 1.0, 2.0], [0.5, 3.0, 1.5]])
    net = SpacingRecorder()
    inferer = SpacingSlidingWindowInferer(roi_size=(16, 16, 16), sw_batch_size=2)
    out = inferer(x, net, spacing=spacing)
    assert out.shape == (2, 2, 24, 20, 28)
    torch.testing.assert_close(out.as_tensor() if isinstance(out, MetaTensor) else out, torch.cat([x, x], 1))
    assert len(net.calls) >= 4
    seen = set()
    for window, s in net.calls:
        ids = torch.unique(window).tolist()
        assert len(ids) == 1, "a window batch mixes images"
        b = int(ids[0]) - 1
        seen.add(b)
        assert s.shape in ((1, 3), (3,))
        torch.testing.assert_close(s.reshape(-1, 3).expand(window.shape[0], 3), spacing[b].expand(window.shape[0], 3))
    assert seen == {0, 1}
    assert net.calls[0][0].shape[2:] == (16, 16, 16)


def test_sliding_window_spacing_from_affines():
    x = MetaTensor(torch.ones(2, 1, 20, 20, 20))
    x.affine = torch.stack(
        [torch.diag(torch.tensor([0.8, 0.8, 4.0, 1.0], dtype=torch.float64)), torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))]
    )
    net = SpacingRecorder()
    out = SpacingSlidingWindowInferer(roi_size=(16, 16, 16), sw_batch_size=4)(x, net)
    assert out.shape == (2, 2, 20, 20, 20)
    spacings = {tuple(round(v, 4) for v in s.reshape(-1).tolist()) for _, s in net.calls}
    assert spacings == {(0.8, 0.8, 4.0), (2.0, 2.0, 2.0)}
    with pytest.raises(ValueError, match="spacing"):
        SpacingSlidingWindowInferer(roi_size=(16, 16, 16))(torch.ones(1, 1, 20, 20, 20), net)


def test_sliding_window_with_hyper_unet_matches_forward():
    torch.manual_seed(0)
    net = HyperUNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), convs_per_level=1).eval()
    x = torch.randn(2, 1, 24, 24, 24)
    spacing = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 3.0]])
    with torch.no_grad():
        direct = net(x, spacing)
        # a single window covering the image: exactly the direct forward, per image's spacing
        whole = SpacingSlidingWindowInferer(roi_size=(24, 24, 24), sw_batch_size=2)(x, net, spacing=spacing)
        swapped = SpacingSlidingWindowInferer(roi_size=(24, 24, 24), sw_batch_size=2)(x, net, spacing=spacing.flip(0))
        windows = SpacingSlidingWindowInferer(roi_size=(16, 16, 16), sw_batch_size=2, overlap=0.5)(x, net, spacing=spacing)
    torch.testing.assert_close(whole, direct, atol=1e-5, rtol=0)
    assert (swapped - direct).abs().max() > 1e-3
    # with smaller windows the output has the image's shape; the windows' instance norms see
    # less context, so values are only comparable in the segmentation sense
    assert windows.shape == direct.shape and torch.isfinite(windows).all()


# --------------------------------------------------------------------------- custom_networks.spacing


def test_parse_spacing_valid():
    assert parse_spacing("1.5,1.5,3") == (1.5, 1.5, 3.0)
    assert parse_spacing(2) == (2.0, 2.0, 2.0)
    assert parse_spacing(0.5, spatial_dims=2) == (0.5, 0.5)
    assert parse_spacing("1.5x1.5x3") == (1.5, 1.5, 3.0)
    assert parse_spacing("1.5 1.5 3") == (1.5, 1.5, 3.0)
    assert parse_spacing("2") == (2.0, 2.0, 2.0)
    assert parse_spacing([1, 2, 3]) == (1.0, 2.0, 3.0)
    assert parse_spacing(torch.tensor([1.0, 2.0, 3.0])) == (1.0, 2.0, 3.0)
    assert parse_spacing(np.array([0.5, 0.25]), spatial_dims=2) == (0.5, 0.25)
    assert all(isinstance(v, float) for v in parse_spacing("1,2,3"))


@pytest.mark.parametrize(
    "value, dims, match",
    [
        ("", 3, r"''"),
        ("0", 3, r"'0'.*positive"),
        ("-1", 3, r"'-1'.*positive"),
        ("nan", 3, r"'nan'.*positive"),
        ("inf", 3, r"'inf'.*positive"),
        ("a,b,c", 3, r"'a,b,c'.*not numeric"),
        ("1,2", 3, r"'1,2'.*2 values"),
        ("1,2,3", 2, r"'1,2,3'.*3 values"),
        ((1.0, 0.0, 1.0), 3, r"\(1\.0, 0\.0, 1\.0\)"),
        (None, 3, r"None"),
    ],
)
def test_parse_spacing_errors(value, dims, match):
    with pytest.raises(ValueError, match=match):
        parse_spacing(value, dims)


def test_as_spacing_tensor():
    s = as_spacing_tensor([1.0, 2.0, 3.0], 4, 3)
    assert s.shape == (4, 3) and s.dtype == torch.float32
    torch.testing.assert_close(s[3], torch.tensor([1.0, 2.0, 3.0]))
    s = as_spacing_tensor(torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64), 2, 2)
    assert s.dtype == torch.float32 and s.tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_working_spacing_policies():
    native = (0.8, 0.8, 5.0)
    assert working_spacing(native) == native
    assert working_spacing(torch.tensor(native, dtype=torch.float64), "native") == pytest.approx(native)
    assert working_spacing(native, "target", "2,2,2") == (2.0, 2.0, 2.0)
    assert working_spacing(native, "target", 1.5) == (1.5, 1.5, 1.5)
    assert working_spacing(native, "clamp", trained_range=[[1, 3]] * 3) == (1.0, 1.0, 3.0)
    assert working_spacing((1.5, 2.0, 2.5), "clamp", trained_range=[[1, 3]] * 3) == (1.5, 2.0, 2.5)
    # 2D
    assert working_spacing((0.5, 4.0), "native") == (0.5, 4.0)
    assert working_spacing((0.5, 4.0), "target", "1x2") == (1.0, 2.0)
    assert working_spacing((0.5, 4.0), "clamp", trained_range=[[1, 2], [1, 2]]) == (1.0, 2.0)
    with pytest.raises(ValueError, match="3 values"):
        working_spacing((0.5, 4.0), "target", "1,2,3")
    with pytest.raises(ValueError, match="axes"):
        working_spacing((0.5, 4.0), "clamp", trained_range=[[1, 2]] * 3)
    with pytest.raises(ValueError, match="'foo'"):
        working_spacing(native, "foo")
    with pytest.raises(ValueError, match="target spacing"):
        working_spacing(native, "target")
    with pytest.raises(ValueError, match="trained spacing range"):
        working_spacing(native, "clamp")
    with pytest.raises(ValueError, match="native spacing"):
        working_spacing((0.0, 1.0, 1.0))


def test_spacing_range():
    r = SpacingRange.from_config([[1, 5], [0.2, 1.5], [0.2, 1.5]])
    assert r.low == (1.0, 0.2, 0.2) and r.high == (5.0, 1.5, 1.5) and r.spatial_dims == 3
    assert r.clamp((0.5, 1.0, 2.0)) == (1.0, 1.0, 1.5)
    assert r.contains((1.0, 1.0, 1.5)) and not r.contains((0.5, 1.0, 1.0))
    assert SpacingRange.from_config({"low": [1, 0.2, 0.2], "high": [5, 1.5, 1.5]}) == r
    assert SpacingRange.from_config(r) is r
    draws = [r.sample(np.random.RandomState(42)) for _ in range(2)]
    assert draws[0] == draws[1]
    rng = np.random.RandomState(0)
    samples = np.array([r.sample(rng) for _ in range(200)])
    assert all(r.contains(s) for s in samples)
    assert (samples.min(0) < np.array(r.low) + 0.2).all() and (samples.max(0) > np.array(r.high) - 0.2).all()
    assert len({tuple(s) for s in samples}) == 200
    fixed = SpacingRange((2.0, 1.0), (2.0, 3.0))
    assert {fixed.sample(rng)[0] for _ in range(10)} == {2.0}
    for bad in ([[2, 1], [1, 1], [1, 1]], [[0, 1]] * 3, [[1, math.inf]] * 3, [[1, 2, 3]]):
        with pytest.raises(ValueError):
            SpacingRange.from_config(bad)


class _ShapeRecorder(torch.nn.Module):
    """A stand-in network with a UNet layout's divisor that records the window shapes it sees."""

    def __init__(self, divisor):
        super().__init__()
        self.layout = type("Layout", (), {"divisor": divisor})()
        self.shapes = []

    def forward(self, x, spacing):
        self.shapes.append(tuple(x.shape[2:]))
        return x.repeat(1, 2, 1, 1, 1)


def test_windows_shrink_to_small_images_rounded_to_the_network_divisor():
    """At a coarse working spacing the window is the image (rounded up to the divisor), not a padded 64^3."""
    net = _ShapeRecorder(divisor=8)
    inferer = SpacingSlidingWindowInferer(roi_size=(64, 64, 64), sw_batch_size=1, overlap=0.5)
    x = torch.rand(1, 1, 40, 70, 21)
    out = inferer(x, net, spacing=torch.tensor([[3.0, 3.0, 3.0]]))
    assert out.shape == (1, 2, 40, 70, 21)
    assert set(net.shapes) == {(40, 64, 24)}  # 40 stays, 70 > 64 slides, 21 -> 24
    assert len(net.shapes) == 2
    torch.testing.assert_close(out[:, :1], x)  # padding and stitching are exact for an identity network
    assert inferer.roi_size == (64, 64, 64)  # the configured window is unchanged for the next image
