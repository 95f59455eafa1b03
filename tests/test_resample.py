"""The one resampler against MONAI's own transforms, on CPU.

- ``SpacingPolicyd`` (per-axis block operators) equals ``GaussianSmooth`` + ``Spacing`` (3D filter,
  then ``grid_sample``) within 1e-4 on a unit-range image;
- ``NativeLabelsd`` (fused way back) equals ``Activationsd(softmax)`` + ``Invertd`` (linear) +
  ``AsDiscreted(argmax)``: every voxel, except where the two top classes are within 1e-5 of each
  other (float rounding decides such ties), on flipped, permuted and oblique images;
- its inverse (``Invertd``) returns the exact native shape and affine.
"""

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Activationsd, AsDiscreted, Compose, GaussianSmooth, Invertd, Orientationd, Spacing

from custom_networks.pipeline.resample import antialias_sigma, labels_to_native, resample_axes, resample_to_native, working_grid
from custom_networks.pipeline.transforms import NativeLabelsd, SpacingPolicyd


def _affine(kind: str, spacing) -> np.ndarray:
    s = np.diag(list(spacing) + [1.0])
    if kind == "ras":
        rot = np.eye(4)
    elif kind == "lps":
        rot = np.diag([-1.0, -1.0, 1.0, 1.0])
    elif kind == "permuted":  # file axes: superior-inferior, left-right, anterior-posterior
        rot = np.array([[0, -1.0, 0, 0], [0, 0, 1.0, 0], [-1.0, 0, 0, 0], [0, 0, 0, 1]])
    else:  # oblique: 20 degrees about the second axis
        a = math.radians(20)
        rot = np.array([[math.cos(a), 0, math.sin(a), 0], [0, 1, 0, 0], [-math.sin(a), 0, math.cos(a), 0], [0, 0, 0, 1]])
    out = rot @ s
    out[:3, 3] = [12.5, -30.0, 7.0]
    return out


def _image(shape=(30, 26, 18), kind="ras", spacing=(0.9, 1.1, 2.5), seed=0) -> MetaTensor:
    rng = np.random.default_rng(seed)
    data = torch.as_tensor(rng.random((1, *shape)), dtype=torch.float32)
    return MetaTensor(data, affine=torch.as_tensor(_affine(kind, spacing)))


@pytest.mark.parametrize("target", [(2.0, 1.7, 2.5), (1.3, 2.9, 4.0), (0.6, 1.1, 1.2)])
def test_resampling_equals_gaussian_smooth_then_spacing(target):
    image = _image(kind="oblique")
    ours = SpacingPolicyd("image", policy="target", target_spacing=list(target))({"image": image})["image"]
    sigma = antialias_sigma(image.pixdim.tolist(), target)
    smoothed = GaussianSmooth(sigma=[max(s, 1e-6) for s in sigma])(image) if any(s > 0 for s in sigma) else image
    ref = Spacing(pixdim=target, mode="bilinear", padding_mode="border", align_corners=True)(smoothed)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours.affine.numpy(), ref.affine.numpy(), atol=1e-6)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), atol=1e-4)


def test_resampling_big_axes_in_blocks_equals_one_dense_operator():
    """Axes longer than a block go block by block; the result is the dense operator's."""
    from custom_networks.pipeline.resample import axis_operator

    x = torch.rand(2, 150, 9, 140)
    shape, factor = working_grid(x.shape[1:], (0.5, 1.0, 0.7), (1.2, 1.0, 2.0))
    coords = [np.arange(m) * f for m, f in zip(shape, factor)]
    sigma = antialias_sigma((0.5, 1.0, 0.7), (1.2, 1.0, 2.0))
    ops = [axis_operator(c, n, s) for c, n, s in zip(coords, x.shape[1:], sigma)]
    dense = torch.einsum("cijk,ai,bj,dk->cabd", x, *ops)
    torch.testing.assert_close(resample_axes(x, coords, sigma), dense, atol=1e-5, rtol=1e-5)


def _top2_gap(probs: torch.Tensor) -> torch.Tensor:
    top = probs.topk(2, dim=0).values
    return top[0] - top[1]


@pytest.mark.parametrize("kind", ["ras", "lps", "permuted", "oblique"])
@pytest.mark.parametrize("classes", [2, 8])
def test_fused_way_back_equals_invertd_then_argmax(kind, classes):
    image = _image(kind=kind)
    pre = Compose([Orientationd("image", axcodes="RAS", labels=None), SpacingPolicyd("image", policy="target", target_spacing="2.1,1.6,3.3")])
    d = pre({"image": image})
    torch.manual_seed(classes)
    # smooth scores with boundaries, as a network gives
    scores = torch.nn.functional.avg_pool3d(torch.randn(1, classes, *d["image"].shape[1:]) * 6, 3, 1, 1)[0]
    d["pred"] = MetaTensor(scores)
    ours = NativeLabelsd("pred", transform=pre)(dict(d))["pred"]
    ref_chain = Compose([
        Activationsd("pred", softmax=True),
        Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
    ])
    probs = ref_chain(dict(d))["pred"]
    ref = AsDiscreted("pred", argmax=True)({"pred": probs})["pred"]
    assert ours.shape == ref.shape == image.shape
    assert ours.dtype == torch.uint8
    np.testing.assert_allclose(ours.affine.numpy(), image.affine.numpy(), atol=1e-6)
    differ = ours.long() != ref.long()
    assert bool((_top2_gap(probs.as_tensor())[None][differ] < 1e-5).all()), f"{int(differ.sum())} voxels differ beyond ties"
    assert differ.float().mean() < 1e-3


def test_way_back_with_a_single_working_voxel_on_an_axis():
    scores = torch.zeros(3, 5, 1, 4)
    scores[2, :, :, 2:] = 5.0
    labels = labels_to_native(scores, (2.0, 10.0, 2.0), (9, 6, 7))
    assert labels.shape == (1, 9, 6, 7)
    ref = resample_to_native(scores, (2.0, 10.0, 2.0), (9, 6, 7)).argmax(0)
    assert torch.equal(labels[0].long(), ref)


def test_way_back_ties_go_to_the_lower_class_as_argmax():
    scores = torch.ones(4, 6, 6, 6)
    assert int(labels_to_native(scores, (1.5, 1.5, 1.5), (8, 8, 8)).max()) == 0


def test_invertd_returns_the_exact_native_geometry():
    image = _image(kind="permuted")
    pre = Compose([Orientationd("image", axcodes="RAS", labels=None), SpacingPolicyd("image", policy="target", target_spacing=2.0)])
    d = pre({"image": image})
    d["pred"] = d["image"].clone()
    back = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)(d)["pred"]
    assert back.shape == image.shape
    np.testing.assert_allclose(back.affine.numpy(), image.affine.numpy(), atol=1e-6)
    # a smooth image survives the round trip closely away from the borders (the anti-aliasing
    # filter pads with zeros there, as MONAI's GaussianSmooth does)
    smooth = MetaTensor(torch.linspace(0, 1, 30)[None, :, None, None].expand(1, 30, 26, 18).clone(), affine=image.affine)
    d = pre({"image": smooth})
    d["pred"] = d["image"].clone()
    back = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)(d)["pred"]
    assert float((back - smooth).abs()[:, 3:-3, 3:-3, 3:-3].max()) < 0.02


def test_labels_resample_by_nearest_and_keep_their_dtype():
    label = MetaTensor(torch.randint(0, 4, (1, 20, 20, 10), dtype=torch.uint8), affine=torch.diag(torch.tensor([1.0, 1.0, 2.0, 1.0])))
    out = SpacingPolicyd("label", policy="target", target_spacing=2.0, mode="nearest")({"label": label})["label"]
    assert out.dtype == torch.uint8 and set(out.unique().tolist()) <= set(label.unique().tolist())
    assert torch.equal(out[0, :, :, 0], label[0, ::2, ::2, 0])
