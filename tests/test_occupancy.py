"""The occupancy decoder: queries in world coordinates, patches in mm, training points, coarse-to-fine labels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from custom_networks.nets.occupancy import OccupancyNetwork, PadeActivation, grid_points, sample_at_points, world_to_index
from custom_networks.pipeline.occupancy import OccupancyTrainStep, boundary_band, occupancy_labels, sample_training_points

SPACING = (0.7, 1.3, 2.1)


def oblique_affine(spacing=SPACING, angle=0.4, origin=(-12.0, 30.5, 7.25)) -> torch.Tensor:
    """Index -> world (mm): a rotation about two axes, anisotropic spacing, a translation."""
    c, s = math.cos(angle), math.sin(angle)
    rz = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    rx = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]], dtype=torch.float64)
    affine = torch.eye(4, dtype=torch.float64)
    affine[:3, :3] = rz @ rx @ torch.diag(torch.tensor(spacing, dtype=torch.float64))
    affine[:3, 3] = torch.tensor(origin, dtype=torch.float64)
    return affine


def small_network(**kwargs) -> OccupancyNetwork:
    torch.manual_seed(0)
    args = dict(channels=(4, 8), features=4, width=16, blocks=2, patch_size=3, hidden_features=(4, 4, 4))
    return OccupancyNetwork(**{**args, **kwargs})


class OracleOccupancy(OccupancyNetwork):
    """Decodes the class as the image value at the query (the centre of its patch), rounded: a
    network whose answer is known, so the query geometry and the coarse-to-fine stages are
    tested exactly."""

    def decode(self, query, latent):
        centre = self.features + self.spatial_dims + self.patch_size**self.spatial_dims // 2
        value = query[..., centre]  # (B, N)
        classes = torch.arange(self.out_channels, dtype=value.dtype)
        return -(value[:, None, :] - classes[None, :, None]).abs()


def balls_label(shape, affine, rng, count=4, classes=2) -> torch.Tensor:
    """Balls of radius 4-7 mm (world coordinates) with classes 1..classes, on the grid of ``affine``."""
    points = grid_points(shape, affine).reshape(*shape, 3)
    label = torch.zeros(shape, dtype=torch.uint8)
    lo = points.reshape(-1, 3).min(0).values.numpy()
    hi = points.reshape(-1, 3).max(0).values.numpy()
    for k in range(count):
        centre = torch.tensor(rng.uniform(lo + 0.3 * (hi - lo), hi - 0.3 * (hi - lo)))
        radius = rng.uniform(4.0, 7.0)
        label[((points - centre) ** 2).sum(-1) <= radius**2] = 1 + k % classes
    return label


def test_queries_at_voxel_centres_land_where_the_affine_says():
    affine = oblique_affine()
    shape = (9, 7, 5)
    points = grid_points(shape, affine)
    index = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    expected = index @ affine[:3, :3].T + affine[:3, 3]
    assert torch.allclose(points, expected, atol=1e-12)
    assert torch.allclose(world_to_index(points, affine), index, atol=1e-9)
    # the image value at each query is the value of that voxel, in tensor axis order
    image = torch.randn(2, *shape)
    values = sample_at_points(image, world_to_index(points, affine))
    assert torch.allclose(values, image.reshape(2, -1).T, atol=1e-5)
    # a point a third of the way from voxel (4, 3, 2) to (4, 3, 3) reads the linear mix
    p = (affine[:3, :3] @ torch.tensor([4.0, 3.0, 2.0 + 1 / 3], dtype=torch.float64) + affine[:3, 3])[None]
    mix = sample_at_points(image, world_to_index(p, affine))[0]
    assert torch.allclose(mix, image[:, 4, 3, 2] * 2 / 3 + image[:, 4, 3, 3] / 3, atol=1e-5)


def test_the_local_patch_has_a_fixed_physical_extent_along_the_image_axes():
    affine = oblique_affine()
    shape = (9, 7, 5)
    net = small_network(patch_size=3, patch_step_mm=2.1)
    image = torch.randn(1, *shape)
    features = torch.zeros(net.features, 3, 3, 3)
    centre = torch.tensor([4, 3, 2], dtype=torch.float64)
    point = (affine[:3, :3] @ centre + affine[:3, 3])[None]
    query = net.query_features(point, features, affine, image, affine)[0]
    patch = query[net.features + 3 :].reshape(3, 3, 3)
    # 2.1 mm steps: 3 voxels along axis 0 (0.7 mm), 21/13 of a voxel along axis 1, 1 voxel along axis 2
    assert torch.allclose(patch[1, 1, 1], image[0, 4, 3, 2])
    assert torch.allclose(patch[0, 1, 1], image[0, 1, 3, 2], atol=1e-5)
    assert torch.allclose(patch[2, 1, 1], image[0, 7, 3, 2], atol=1e-5)
    assert torch.allclose(patch[1, 1, 2], image[0, 4, 3, 3], atol=1e-5)
    f = 2.1 / 1.3 - 1  # one voxel and a fraction f along axis 1
    assert torch.allclose(patch[1, 2, 1], (1 - f) * image[0, 4, 4, 2] + f * image[0, 4, 5, 2], atol=1e-5)


@pytest.mark.parametrize("strides", [(4, 2, 1), (1,)])
def test_an_oracle_decoder_gives_back_the_exact_label_on_an_oblique_anisotropic_grid(strides):
    affine = oblique_affine()
    shape = (48, 30, 19)
    label = balls_label(shape, affine, np.random.RandomState(3))
    assert set(label.unique().tolist()) == {0, 1, 2}
    oracle = OracleOccupancy(out_channels=3, channels=(4, 8), features=4, width=8, blocks=1, patch_size=3, hidden_features=(4, 4, 4))
    image = MetaTensor(label[None].float(), affine=affine)
    out, info = occupancy_labels(oracle, image, spacing=(2.8, 2.6, 4.2), strides=strides)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (1, *shape)
    assert torch.equal(out[0], label)
    assert torch.allclose(out.affine.to(torch.float64), affine)
    assert info["encoder_spacing"] == [2.8, 2.6, 4.2]
    assert info["output_grid"]["shape"] == list(shape)
    assert np.allclose(info["output_grid"]["spacing"], SPACING)
    if strides == (1,):
        assert info["queries"] == info["voxels"]
    else:  # coarse to fine queries the boundaries only
        assert info["queries"] < 0.5 * info["voxels"]


def test_coarse_to_fine_inference_matches_dense_inference_of_a_trained_like_network():
    net = small_network(out_channels=2)
    affine = oblique_affine((1.0, 1.0, 1.5))
    shape = (24, 20, 16)
    image = torch.zeros(1, *shape)
    image[0, 6:18, 5:15, 4:12] = 3.0  # a box: the random network's labels are smooth in space
    dense, _ = occupancy_labels(net, image, affine, (2.0, 2.0, 3.0), strides=(1,))
    fast, info = occupancy_labels(net, image, affine, (2.0, 2.0, 3.0), strides=(2, 1))
    assert info["queries"] < info["voxels"]
    assert (fast != dense).float().mean() < 0.01


def test_bad_strides_spacing_and_images_are_named():
    net = small_network()
    image = torch.zeros(1, 8, 8, 8)
    eye = torch.eye(4, dtype=torch.float64)
    for strides in [(3, 2, 1), (4, 2), (), (2, 2, 1)]:
        with pytest.raises(ValueError, match="strides"):
            occupancy_labels(net, image, eye, strides=strides)
    with pytest.raises(ValueError, match="affine"):
        occupancy_labels(net, image)
    with pytest.raises(ValueError, match="encoder spacing"):
        occupancy_labels(net, image, eye, spacing=(1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="patch_size"):
        OccupancyNetwork(patch_size=4)
    with pytest.raises(ValueError, match="boundary_fraction"):
        OccupancyTrainStep([[1, 2]] * 3, boundary_fraction=1.5)


def test_boundary_band_is_measured_in_mm_per_axis():
    label = torch.zeros(1, 21, 21, 21, dtype=torch.uint8)
    label[0, 10, 10, 10] = 1
    band = boundary_band(label, (0.5, 1.0, 2.0), band_mm=2.0)
    # radius 4, 2 and 1 voxels around the single voxel
    extent = [int(band.any(dim=tuple(d for d in range(3) if d != a)).sum()) for a in range(3)]
    assert extent == [9, 5, 3]
    assert int(band.sum()) == 9 * 5 * 3


def test_training_points_are_voxel_centres_half_in_the_band_and_reproducible():
    affine = oblique_affine()
    shape = (30, 20, 12)
    label = balls_label(shape, affine, np.random.RandomState(0), count=2, classes=1)[None]
    band = boundary_band(label, SPACING, 3.0).reshape(-1)
    points, target = sample_training_points(label, affine, 4000, 0.5, 3.0, torch.Generator().manual_seed(1))
    index = world_to_index(points, affine)
    assert torch.allclose(index, index.round(), atol=1e-8)
    flat = (index.round().long() * torch.tensor([shape[1] * shape[2], shape[2], 1])).sum(1)
    assert torch.equal(target, label.reshape(-1)[flat].long())
    in_band = band[flat].float().mean()
    # 2000 drawn from the band, the uniform half adds its share of band voxels
    expected = 0.5 + 0.5 * band.float().mean()
    assert abs(float(in_band) - float(expected)) < 0.03
    again, _ = sample_training_points(label, affine, 4000, 0.5, 3.0, torch.Generator().manual_seed(1))
    assert torch.equal(points, again)
    # a band smaller than its share: all of it is taken, the rest is uniform
    tiny = torch.zeros_like(label)
    tiny[0, 5, 5, 5] = 1
    p, t = sample_training_points(tiny, affine, 1000, 0.5, 1.0, torch.Generator().manual_seed(0))
    assert p.shape == (1000, 3) and int(t.sum()) == 1


def test_pade_activation_starts_as_a_leaky_relu_and_learns():
    act = PadeActivation()
    x = torch.linspace(-3, 3, 601)
    assert (act(x) - torch.nn.functional.leaky_relu(x, 0.01)).abs().max() < 0.035
    assert sum(p.numel() for p in act.parameters()) == 10
    act(x).sum().backward()
    assert act.numerator.grad.abs().sum() > 0 and act.denominator.grad.abs().sum() > 0


# --- learning: native-resolution boundaries from a 2 mm encoder ---------------------------------

NATIVE, WORKING, SHAPE = 0.5, 2.0, (32, 32, 16)


def _vessels(count: int, seed: int) -> list[dict]:
    """Vessel trees (radius 0.5-1.2 mm) on a 0.5 mm grid, z-scored, as MONAI data dicts."""
    from custom_networks.data.synthetic_datasets import vessel_tree

    rng = np.random.RandomState(seed)
    affine = torch.diag(torch.tensor([NATIVE] * 3 + [1.0], dtype=torch.float64))
    items = []
    for _ in range(count):
        image, label = vessel_tree(SHAPE, (NATIVE,) * 3, rng, radius_mm=(0.5, 1.2), levels=4)
        image = (image - image.mean()) / image.std()
        items.append({"image": MetaTensor(torch.from_numpy(image)[None], affine=affine), "label": MetaTensor(torch.from_numpy(label.astype(np.int64))[None], affine=affine)})
    return items


def _dice(pred: torch.Tensor, label: torch.Tensor) -> float:
    a, b = pred.bool(), label.bool()
    return float(2 * (a & b).sum() / (a.sum() + b.sum()).clamp(min=1))


def _train_unet(items, spacing: float, steps: int):
    """The baseline: a UNet trained at ``spacing`` mm on the resampled images (nearest labels)."""
    from monai.losses import DiceCELoss

    from custom_networks.nets import PlainUNet
    from custom_networks.pipeline.resample import resample_to_spacing

    torch.manual_seed(0)
    net = PlainUNet(channels=(4, 8), convs_per_level=1)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    data = [
        (resample_to_spacing(d["image"].as_tensor(), (NATIVE,) * 3, (spacing,) * 3)[0], resample_to_spacing(d["label"].as_tensor(), (NATIVE,) * 3, (spacing,) * 3, "nearest")[0])
        for d in items
    ]
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        pick = torch.randperm(len(data), generator=g)[:2]
        opt.zero_grad()
        loss_fn(net(torch.stack([data[k][0] for k in pick])), torch.stack([data[k][1] for k in pick]).float()).backward()
        opt.step()
    return net.eval()


def _unet_dice(net, items, spacing: float) -> float:
    from custom_networks.pipeline.resample import resample_to_native, resample_to_spacing

    scores = []
    with torch.no_grad():
        for d in items:
            x, factor = resample_to_spacing(d["image"].as_tensor(), (NATIVE,) * 3, (spacing,) * 3)
            logits = net(x[None])[0]
            if spacing != NATIVE:  # logits upsampled (linear) to the native grid
                logits = resample_to_native(logits, factor, SHAPE)
            scores.append(_dice(logits.argmax(0), d["label"][0]))
    return float(np.mean(scores))


def test_occupancy_from_a_2mm_encoder_matches_a_05mm_unet_and_beats_upsampled_2mm_logits():
    """Thin vessels at 0.5 mm. The occupancy network encodes at 2 mm (HyperSpace UNet encoder) and
    is trained by the MONAI engine step on 2 x 2048 points per iteration; the UNets are trained at
    0.5 mm and at 2 mm on the resampled volumes, the same number of iterations."""
    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedTrainer
    from monai.losses import DiceCELoss

    from custom_networks.pipeline.occupancy import PrepareBatchOccupancy

    steps = 120
    train, test = _vessels(6, 0), _vessels(3, 100)
    torch.manual_seed(0)
    net = OccupancyNetwork(channels=(4, 8), convs_per_level=1, features=8, width=64, blocks=3, patch_size=5, patch_step_mm=0.5, hidden_features=(10, 10, 8))
    loader = DataLoader(Dataset(train * (2 * steps // len(train) + 1)), batch_size=2, shuffle=False, num_workers=2)
    step = OccupancyTrainStep([[WORKING, WORKING]] * 3, num_points=2048, band_mm=1.5, seed=0)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=loader, network=net,
        optimizer=torch.optim.Adam(net.parameters(), 3e-3), loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
        prepare_batch=PrepareBatchOccupancy(), iteration_update=step, epoch_length=steps,
    )
    trainer.run()
    out = trainer.state.output  # decollated, as MONAI's own iterations leave it
    assert len(out) == 2 and tuple(out[0]["pred"].shape) == (2, 2048) and float(out[0]["loss"]) < 0.5
    assert torch.allclose(out[1]["spacing"], torch.full((3,), WORKING))
    occupancy, queried = [], []
    for d in test:
        labels, info = occupancy_labels(net, d["image"], spacing=(WORKING,) * 3)
        assert tuple(labels.shape) == (1, *SHAPE) and info["output_grid"]["shape"] == list(SHAPE)
        occupancy.append(_dice(labels[0], d["label"][0]))
        queried.append(info["queries"] / info["voxels"])
    occupancy = float(np.mean(occupancy))
    native = _unet_dice(_train_unet(train, NATIVE, steps), test, NATIVE)
    coarse = _unet_dice(_train_unet(train, WORKING, steps), test, WORKING)
    # measured: occupancy 0.95, UNet at 0.5 mm 0.93, UNet at 2 mm upsampled 0.51; 12-22 % of voxels queried
    assert occupancy >= native - 0.03, (occupancy, native, coarse)
    assert occupancy >= coarse + 0.2, (occupancy, native, coarse)
    assert max(queried) < 0.5
