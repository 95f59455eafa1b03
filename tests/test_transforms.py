"""Unit tests of the spacing transforms: RandSpacingPatchd (training) and SpacingPolicyd (inference)."""

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

from custom_networks.pipeline.transforms import RandSpacingPatchd, SpacingPolicyd, antialias_sigma, image_spacing

BALL_RADIUS = 20.0
BALL_VOLUME = 4.0 / 3.0 * math.pi * BALL_RADIUS**3
ORIGIN = (-30.0, 12.5, 7.0)


def meta(array, affine):
    return MetaTensor(torch.as_tensor(array), affine=torch.as_tensor(affine, dtype=torch.float64))


@pytest.fixture(scope="module")
def ball():
    """A 1 mm 64^3 volume with a ball of radius 20 mm at its centre and a non-zero origin."""
    n = 64
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32)] * 3, indexing="ij")
    dist = np.sqrt(sum((g - (n - 1) / 2) ** 2 for g in grid))
    inside = dist < BALL_RADIUS
    rng = np.random.RandomState(0)
    image = (100.0 * inside + rng.normal(0, 1, inside.shape)).astype(np.float32)[None]
    label = inside.astype(np.uint8)[None]
    affine = np.eye(4)
    affine[:3, 3] = ORIGIN
    return {"image": meta(image, affine), "label": meta(label, affine)}


@pytest.mark.parametrize(
    "spacing, patch",
    [
        ((0.8, 0.8, 0.8), (96, 96, 96)),
        ((3.0, 3.0, 3.0), (32, 32, 32)),
        ((0.7, 0.7, 4.0), (96, 96, 18)),
    ],
)
def test_patch_keeps_physical_extent(ball, spacing, patch):
    t = RandSpacingPatchd(["image", "label"], [[s, s] for s in spacing], patch, pos_fraction=0.0)
    t.set_random_state(0)
    out = t(ball)
    image, label = out["image"], out["label"]
    assert image.shape == (1, *patch) and label.shape == (1, *patch)
    torch.testing.assert_close(out["spacing"], torch.tensor(spacing, dtype=torch.float32))
    volume = float((label > 0).sum()) * float(np.prod(spacing))
    assert abs(volume - BALL_VOLUME) < 0.1 * BALL_VOLUME, (volume, BALL_VOLUME)
    # the patch is centred on the volume (it is smaller than the patch), hence on the ball
    centre_vox = torch.tensor([(p - 1) / 2 for p in patch] + [1.0], dtype=torch.float64)
    centre_world = (image.affine @ centre_vox)[:3]
    ball_world = torch.tensor(ORIGIN, dtype=torch.float64) + 31.5
    torch.testing.assert_close(centre_world, ball_world, atol=1e-6, rtol=0)
    # the image is bright where the label is set (both describe the same ball)
    fg = image[label > 0].mean()
    bg = image[(label == 0) & (image != 0)].mean()
    assert fg > bg + 1.0


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_labels_stay_in_label_set(seed, dtype):
    rng = np.random.RandomState(seed)
    values = np.array([0, 1, 2, 5])
    # blocky labels so that every value survives the patch
    label = values[rng.randint(0, 4, (1, 8, 8, 4))].repeat(4, 1).repeat(4, 2).repeat(4, 3)
    image = rng.normal(0, 1, label.shape).astype(np.float32) + label
    affine = np.diag([1.0, 1.2, 2.0, 1.0])
    data = {"image": meta(image, affine), "label": meta(torch.as_tensor(label).to(dtype), affine)}
    t = RandSpacingPatchd(["image", "label"], [[0.5, 3.0], [0.6, 2.5], [1.0, 5.0]], (20, 20, 8), pos_fraction=0.5)
    t.set_random_state(seed)
    out = t(data)
    assert out["label"].dtype == dtype
    assert out["image"].dtype == torch.float32
    unique = set(torch.unique(out["label"]).tolist())
    assert unique <= {0, 1, 2, 5}, unique
    assert len(unique - {0}) >= 1  # some labelled voxels are in the patch


def test_spacing_affine_and_reproducibility():
    # a source image whose intensity is a linear function of the world position, with a
    # non-trivial direction (permutation and flip), anisotropic spacing and a non-zero origin
    affine = torch.tensor(
        [[0.0, -1.0, 0.0, 10.0], [1.2, 0.0, 0.0, -5.0], [0.0, 0.0, 2.0, 3.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64
    )
    shape = (40, 44, 20)
    vox = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"))
    world = torch.einsum("ij,j...->i...", affine[:3, :3], vox) + affine[:3, 3, None, None, None]
    coef = torch.tensor([0.5, 0.3, -0.2], dtype=torch.float64)

    def field(w):
        return (coef[:, None] * w).sum(0) + 7.0

    image = meta(field(world.reshape(3, -1)).reshape(1, *shape).float(), affine)
    assert image_spacing(image) == pytest.approx((1.2, 1.0, 2.0))
    # every drawn spacing is finer than the source: no anti-aliasing, interpolation is exact for a linear field
    rng_cfg = [[0.6, 1.2], [0.5, 1.0], [1.0, 2.0]]
    patch = (16, 12, 10)
    spacings = []
    for seed in range(4):
        t = RandSpacingPatchd("image", rng_cfg, patch, mode="bilinear", label_key=None, normalize=False)
        t.set_random_state(seed)
        out = t({"image": image})
        s = out["spacing"]
        assert s.shape == (3,) and s.dtype == torch.float32
        assert all(lo <= float(v) <= hi for v, (lo, hi) in zip(s, rng_cfg))
        torch.testing.assert_close(out["image"].pixdim.float(), s, atol=1e-5, rtol=0)
        spacings.append(tuple(s.tolist()))

        # the world position of every patch voxel, from the output affine
        pvox = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in patch], indexing="ij"))
        paff = out["image"].affine.to(torch.float64)
        pworld = torch.einsum("ij,j...->i...", paff[:3, :3], pvox) + paff[:3, 3, None, None, None]
        # the centre voxel lies inside the source volume
        centre = paff @ torch.tensor([(p - 1) / 2 for p in patch] + [1.0], dtype=torch.float64)
        src_vox = torch.linalg.solve(affine, centre)[:3]
        assert all(-0.5 <= float(v) <= n - 0.5 for v, n in zip(src_vox, shape)), src_vox
        # and the patch holds the source's intensity at those world positions
        values = out["image"][0].as_tensor().to(torch.float64)
        expected = field(pworld.reshape(3, -1)).reshape(patch)
        inside = values != 0
        assert inside.float().mean() > 0.5
        torch.testing.assert_close(values[inside], expected[inside], atol=1e-3, rtol=1e-4)
    assert len(set(spacings)) == len(spacings)  # different seeds, different draws

    # the same seed gives the same spacing and patch
    outs = []
    for _ in range(2):
        t = RandSpacingPatchd("image", rng_cfg, patch, mode="bilinear", label_key=None)
        t.set_random_state(seed=7)
        outs.append(t({"image": image}))
    torch.testing.assert_close(outs[0]["spacing"], outs[1]["spacing"], atol=0, rtol=0)
    torch.testing.assert_close(outs[0]["image"].as_tensor(), outs[1]["image"].as_tensor(), atol=0, rtol=0)
    torch.testing.assert_close(outs[0]["image"].affine, outs[1]["image"].affine, atol=0, rtol=0)


def test_image_is_z_scored():
    rng = np.random.RandomState(1)
    # volume size == patch size: the centre is fixed and the 1 mm -> 1 mm draw is the identity
    # (a random sub-voxel centre would interpolate, i.e. smooth the noise)
    source = rng.normal(50.0, 10.0, (1, 32, 32, 32)).astype(np.float32)
    image = meta(source, np.eye(4))
    t = RandSpacingPatchd("image", [[1.0, 1.0]] * 3, (32, 32, 32), mode="bilinear", label_key=None)
    t.set_random_state(0)
    patch = t({"image": image})["image"]
    assert abs(float(patch.mean())) < 0.2
    assert 0.8 < float(patch.std()) < 1.2
    expected = (source - source.mean()) / source.std()
    torch.testing.assert_close(patch.as_tensor(), torch.from_numpy(expected), atol=1e-3, rtol=0)
    raw = RandSpacingPatchd("image", [[1.0, 1.0]] * 3, (32, 32, 32), mode="bilinear", label_key=None, normalize=False)
    raw.set_random_state(0)
    unnormalised = raw({"image": image})["image"]
    assert abs(float(unnormalised.mean()) - 50.0) < 1.0  # the normalisation is what moved the mean
    assert 8.0 < float(unnormalised.std()) < 12.0

    # a patch of a larger volume is normalised with the whole volume's statistics
    big = rng.normal(50.0, 10.0, (1, 48, 48, 48)).astype(np.float32)
    big[:, :24] += 20.0  # one half is brighter
    t = RandSpacingPatchd("image", [[1.0, 1.0]] * 3, (16, 16, 16), mode="bilinear", label_key=None)
    for seed in (4, 5):  # patches in the dark (4) and the bright (5) half
        t.set_random_state(seed)
        out = t({"image": meta(big, np.eye(4))})["image"]
        start = out.affine[:3, 3].round().long().tolist()  # source voxel of the patch's first voxel
        patch_mean = float(out.mean()) * big.std() + big.mean()
        region = big[0, start[0] : start[0] + 16, start[1] : start[1] + 16, start[2] : start[2] + 16]
        assert abs(patch_mean - float(region.mean())) < 1.0
        assert abs(float(region.mean()) - big.mean()) > 8.0  # a per-patch z-score would fail here


def test_antialias_sigma():
    assert antialias_sigma((1, 1, 1), (3, 3, 3)) == (1.0, 1.0, 1.0)
    assert antialias_sigma((1, 1, 1), (0.5, 1, 2)) == (0.0, 0.0, 0.5)
    assert antialias_sigma((0.5, 2.0), (1.5, 1.0)) == (1.0, 0.0)


def test_downsampling_is_anti_aliased():
    # 46 = 3 * (16 - 1) + 1 voxels: a 16-voxel patch at 3 mm covers the volume exactly, so the
    # patch samples the source voxels 0, 3, ..., 45 of every axis
    n = 46
    grid = np.meshgrid(*[np.arange(n)] * 3, indexing="ij")
    checker = ((sum(grid) % 2) * 2 - 1).astype(np.float32)[None]
    image = meta(checker, np.eye(4))
    t = RandSpacingPatchd("image", [[3.0, 3.0]] * 3, (16, 16, 16), mode="bilinear", label_key=None, normalize=False)
    t.set_random_state(0)
    patch = t({"image": image})["image"]
    torch.testing.assert_close(patch.affine, torch.diag(torch.tensor([3.0, 3.0, 3.0, 1.0], dtype=torch.float64)))
    naive = checker[0, ::3, ::3, ::3]  # what sampling without a low-pass filter would give
    assert naive.std() > 0.99
    assert float(patch.std()) < 0.05 * naive.std()
    # downsampling by 1 (no filtering) keeps the pattern
    same = RandSpacingPatchd("image", [[1.0, 1.0]] * 3, (46, 46, 46), mode="bilinear", label_key=None, normalize=False)
    same.set_random_state(0)
    torch.testing.assert_close(same({"image": image})["image"].as_tensor(), torch.as_tensor(checker), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(patch_size=(16, 16)), "patch_size"),
        (dict(patch_size=(16, 0, 16)), "patch_size"),
        (dict(mode=("cubic", "nearest")), "cubic"),
        (dict(pos_fraction=1.5), "pos_fraction"),
        (dict(spacing_range=[[2.0, 1.0], [1.0, 1.0], [1.0, 1.0]]), "low"),
        (dict(spacing_range=[[0.0, 1.0], [1.0, 1.0], [1.0, 1.0]]), "positive"),
        (dict(spacing_range=[[1.0, 2.0, 3.0]] * 3), r"\[low, high\]"),
    ],
)
def test_rand_spacing_patch_bad_options(kwargs, match):
    args = dict(keys=["image", "label"], spacing_range=[[1.0, 2.0]] * 3, patch_size=(16, 16, 16))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        RandSpacingPatchd(**args)


def test_rand_spacing_patch_bad_input():
    t = RandSpacingPatchd(["image", "label"], [[1.0, 2.0]] * 3, (8, 8, 8))
    with pytest.raises(ValueError, match="MetaTensor"):
        t({"image": torch.zeros(1, 16, 16, 16), "label": torch.zeros(1, 16, 16, 16)})
    with pytest.raises(ValueError, match=r"channel-first"):
        t({"image": meta(torch.zeros(16, 16, 16), np.eye(4)), "label": meta(torch.zeros(16, 16, 16), np.eye(4))})


# --------------------------------------------------------------------------- SpacingPolicyd


def anisotropic_image():
    """0.8 x 0.8 x 5 mm, axes 0/1 permuted with a flip, non-zero origin; intensity = world x."""
    affine = torch.tensor(
        [[0.0, -0.8, 0.0, 10.0], [0.8, 0.0, 0.0, -20.0], [0.0, 0.0, 5.0, 30.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64
    )
    shape = (40, 36, 8)
    vox = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"))
    world_x = affine[0, 0] * vox[0] + affine[0, 1] * vox[1] + affine[0, 2] * vox[2] + affine[0, 3]
    return MetaTensor(world_x[None].float(), affine=affine), affine


def test_policy_target_round_trip_with_invertd():
    image, affine = anisotropic_image()
    pre = Compose([SpacingPolicyd("image", policy="target", target_spacing="2,2,2")])
    d = pre({"image": image})
    resampled = d["image"]
    torch.testing.assert_close(d["spacing"], torch.tensor([2.0, 2.0, 2.0]))
    torch.testing.assert_close(resampled.pixdim.float(), torch.tensor([2.0, 2.0, 2.0]))
    assert resampled.shape != image.shape
    # the physical extent is kept: 40 x 0.8 = 32 mm -> ~16 voxels, 8 x 5 = 40 mm -> ~20 voxels
    assert abs(resampled.shape[1] - 16) <= 1 and abs(resampled.shape[3] - 20) <= 2
    threshold = -5.0
    d["pred"] = (resampled > threshold).float()  # keeps the image's meta and applied_operations
    inverted = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True)(d)
    pred = inverted["pred"]
    assert isinstance(pred, MetaTensor)
    assert pred.shape == image.shape
    assert torch.allclose(pred.affine.to(torch.float64), affine)
    # the prediction lands where the image is above the threshold
    agreement = (pred == (image > threshold).float()).float().mean()
    assert agreement > 0.97, agreement
    assert 0.1 < float(pred.mean()) < 0.9


def test_policy_native_and_clamp():
    image, affine = anisotropic_image()
    d = SpacingPolicyd("image", policy="native")({"image": image})
    assert d["image"].shape == image.shape
    torch.testing.assert_close(d["spacing"], torch.tensor([0.8, 0.8, 5.0]))
    torch.testing.assert_close(d["image"].pixdim.float(), torch.tensor([0.8, 0.8, 5.0]))
    torch.testing.assert_close(d["image"].as_tensor(), image.as_tensor(), atol=1e-3, rtol=0)

    d = SpacingPolicyd("image", policy="clamp", trained_range=[[1, 3]] * 3)({"image": image})
    torch.testing.assert_close(d["spacing"], torch.tensor([1.0, 1.0, 3.0]))
    torch.testing.assert_close(d["image"].pixdim.float(), torch.tensor([1.0, 1.0, 3.0]))
    assert abs(d["image"].shape[1] - 32) <= 1 and abs(d["image"].shape[3] - 13) <= 1


def test_policy_keeps_labels_with_nearest():
    image, affine = anisotropic_image()
    label = MetaTensor((image > 0).to(torch.uint8) * 3, affine=affine)
    d = SpacingPolicyd(["image", "label"], policy="target", target_spacing=2.0, mode=("bilinear", "nearest"))(
        {"image": image, "label": label}
    )
    assert set(torch.unique(d["label"]).tolist()) == {0, 3}
    assert d["label"].shape == d["image"].shape


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(policy="foo"), "'foo'"),
        (dict(policy="target", target_spacing=""), "target spacing"),
        (dict(policy="target", target_spacing="0"), "'0'"),
        (dict(policy="target", target_spacing="-1"), "'-1'"),
        (dict(policy="target", target_spacing="nan"), "'nan'"),
        (dict(policy="target", target_spacing="a,b,c"), "'a,b,c'"),
        (dict(policy="target", target_spacing=None), "target spacing"),
        (dict(policy="clamp"), "trained spacing range"),
    ],
)
def test_policy_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpacingPolicyd("image", **kwargs)


def test_policy_plain_tensor_raises():
    with pytest.raises(ValueError, match="MetaTensor"):
        SpacingPolicyd("image", policy="target", target_spacing=2.0)({"image": torch.zeros(1, 8, 8, 8)})


def test_samples_per_spacing_draws_one_spacing_per_batch(ball):
    t = RandSpacingPatchd(["image", "label"], [[1.0, 3.0]] * 3, (8, 8, 8), samples_per_spacing=3)
    t.set_random_state(7)
    drawn = [tuple(t(ball)["spacing"].tolist()) for _ in range(6)]
    assert drawn[0] == drawn[1] == drawn[2] and drawn[3] == drawn[4] == drawn[5]
    assert drawn[0] != drawn[3]
    t.set_random_state(7)
    assert [tuple(t(ball)["spacing"].tolist()) for _ in range(6)] == drawn
    with pytest.raises(ValueError, match="samples_per_spacing must be >= 1, got 0"):
        RandSpacingPatchd(["image", "label"], [[1.0, 3.0]] * 3, (8, 8, 8), samples_per_spacing=0)


def test_output_spacing_simulates_coarse_acquisition_at_fixed_spacing(ball):
    """FS training: acquired at the drawn spacing, delivered at the fixed spacing."""
    fixed = (1.0, 1.0, 1.0)
    t = RandSpacingPatchd(["image", "label"], [[3.0, 3.0]] * 3, (64, 64, 64), pos_fraction=0.0, target_spacing=fixed)
    t.set_random_state(0)
    out = t(ball)
    assert out["image"].shape == (1, 64, 64, 64)
    torch.testing.assert_close(out["spacing"], torch.tensor(fixed))
    torch.testing.assert_close(out["image"].pixdim.float(), torch.tensor(fixed))
    volume = float((out["label"] > 0).sum())
    assert abs(volume - BALL_VOLUME) < 0.1 * BALL_VOLUME, volume
    assert set(torch.unique(out["label"]).tolist()) <= {0, 1}

    # white noise acquired at 3 mm and brought back to 1 mm keeps little of its 1 mm detail
    rng = np.random.RandomState(1)
    noise = {"image": meta(rng.normal(0, 1, (1, 64, 64, 64)).astype(np.float32), np.eye(4))}
    sharp = RandSpacingPatchd("image", [[1.0, 1.0]] * 3, (32, 32, 32), mode="bilinear", label_key=None, normalize=False, target_spacing=fixed)
    blurred = RandSpacingPatchd("image", [[3.0, 3.0]] * 3, (32, 32, 32), mode="bilinear", label_key=None, normalize=False, target_spacing=fixed)
    assert float(sharp(noise)["image"].std()) > 0.9
    assert float(blurred(noise)["image"].std()) < 0.3


def test_separable_resampling_equals_gaussian_filter_then_grid_sample():
    """The per-axis operators reproduce MONAI's GaussianFilter followed by trilinear grid_sample."""
    import torch.nn.functional as F
    from monai.networks.layers import GaussianFilter

    from custom_networks.pipeline.resample import resample_axes as _resample

    torch.manual_seed(0)
    src = torch.randn(2, 30, 26, 22)
    coords = [np.arange(9) * 2.5 + 3.3, np.arange(8) * 1.7 + 4.1, np.arange(10) * 0.6 + 7.2]
    sigma = (0.75, 0.35, 0.0)
    ours = _resample(src, coords, sigma, "bilinear")

    blurred = GaussianFilter(3, sigma=[0.75, 0.35, 1e-6], truncated=4.0)(src[None])[0]
    axes = [torch.as_tensor(2 * c / (n - 1) - 1, dtype=torch.float32) for c, n in zip(coords, src.shape[1:])]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], dim=-1)[None]
    reference = F.grid_sample(blurred[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)

    labels = torch.randint(0, 4, (1, 30, 26, 22))
    picked = _resample(labels, [np.array([-1.0, 0.4, 28.6, 29.6]), np.array([3.0]), np.array([21.0, 22.0])], (0, 0, 0), "nearest")
    expected = torch.zeros(1, 4, 1, 2, dtype=labels.dtype)
    expected[0, 1:3, 0, 0] = labels[0, [0, 29], 3, 21]
    torch.testing.assert_close(picked, expected)
