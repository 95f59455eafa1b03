"""SPOCKMIP's MIP loss (custom_networks.losses): where its gradient goes, slabs in mm, axes by name,
the spacing taken from MONAI's batches inside a SupervisedTrainer, the loss each data set trains
with, and a short learning test on generated vessel trees: the MIP loss gives more continuous
vessels than the voxel loss alone."""

import math

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedTrainer
from monai.losses import DiceCELoss, DiceLoss, TverskyLoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from custom_networks import DATASETS, PlainUNet, PrepareBatchSpacing, RandSpacingPatchd, get_dataset
from custom_networks.data.datasets import DatasetSpec
from custom_networks.data.synthetic_datasets import vessel_tree
from custom_networks.losses import FocalTverskyLoss, MIPLoss, VoxelMIPLoss, build_loss, project
from custom_networks.metrics import ClDiceMetric, count_components


class Weighted:
    """A base loss linear in the projections, ``sum(w * mips)``: the gradient that reaches a voxel
    is exactly the weight of its ray's pixel times the projection's derivative."""

    def __init__(self, weights: torch.Tensor):
        self.weights = weights

    def __call__(self, pred, label):
        return (pred * self.weights).sum()


class Recording:
    """A base loss that records the projections it is handed (and returns 0)."""

    def __init__(self):
        self.shapes = []

    def __call__(self, pred, label):
        self.shapes.append(tuple(pred.shape))
        return pred.sum() * 0


def probabilities(shape, seed=0):
    torch.manual_seed(seed)
    return torch.rand(shape, dtype=torch.float64, requires_grad=True)


def raw(**kw):
    """MIPLoss on a one-channel probability map, no softmax / one-hot / background removal."""
    return dict(softmax=False, to_onehot_y=False, include_background=True, **kw)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_hard_max_gradient_reaches_only_the_arg_max_voxel_of_each_ray(axis):
    p = probabilities((1, 1, 4, 5, 6))
    plane = [n for a, n in enumerate((4, 5, 6)) if a != axis]
    torch.manual_seed(1)
    w = torch.rand(1, 1, *plane, dtype=torch.float64) + 0.5
    MIPLoss(Weighted(w), axes=axis, **raw())(p, torch.zeros_like(p)).backward()
    grad = p.grad[0, 0]
    arg_max = p.detach()[0, 0].argmax(axis, keepdim=True)
    expected = torch.zeros_like(grad).scatter_(axis, arg_max, 1.0)
    assert torch.equal(grad != 0, expected.bool())  # one voxel per ray, the brightest
    assert torch.allclose(grad.sum(axis), w[0, 0])  # carrying the whole weight of its pixel


def test_smooth_max_spreads_the_gradient_over_every_voxel_of_the_ray():
    p = probabilities((1, 1, 4, 5, 6))
    w = torch.ones(1, 1, 4, 5, dtype=torch.float64)
    MIPLoss(Weighted(w), axes=2, temperature=0.1, **raw())(p, torch.zeros_like(p)).backward()
    smooth = p.grad[0, 0]
    hard = probabilities((1, 1, 4, 5, 6))
    MIPLoss(Weighted(w), axes=2, **raw())(hard, torch.zeros_like(hard)).backward()
    assert int((hard.grad != 0).sum()) == 4 * 5
    assert int((smooth != 0).sum()) == 4 * 5 * 6  # all 6 voxels of every ray
    assert torch.allclose(smooth.sum(2), w[0, 0])  # softmax weights: one per ray in all
    # the brightest voxel of a ray gets the largest share, by softmax(p / t)
    expected = torch.softmax(p.detach()[0, 0] / 0.1, dim=2)
    assert torch.allclose(smooth, expected)


def test_smooth_max_lies_between_the_mean_and_the_max_and_tends_to_the_max():
    x = probabilities((2, 7, 3)).detach()
    hard = project(x, 0)
    for t, bound in ((0.5, None), (0.05, None), (0.001, 0.001 * math.log(7))):
        smooth = project(x, 0, temperature=t)
        assert (smooth <= hard + 1e-12).all() and (smooth >= x.mean(1, keepdim=True).movedim(1, 0) - 1e-12).all()
        if bound is not None:
            assert (hard - smooth).max() <= bound + 1e-12


# --------------------------------------------------------------------------- slabs, axes


def test_slab_thickness_in_mm_picks_the_voxels_at_anisotropic_spacing():
    """Spacing 0.5 x 1.0 x 0.3 mm, slabs of 1.2 mm: 2.4 -> 2 voxels on axis 0 (4 slabs of 8),
    1.2 -> 1 voxel on axis 1 (6 slabs: the slices themselves), 4 voxels on axis 2 (10 = 4 + 4 + 2)."""
    recording = Recording()
    p = probabilities((1, 1, 8, 6, 10))
    MIPLoss(recording, axes="all", slab_mm=1.2, **raw())(p, torch.zeros_like(p), spacing=torch.tensor([0.5, 1.0, 0.3]))
    assert recording.shapes == [(4, 1, 6, 10), (6, 1, 8, 10), (3, 1, 8, 6)]
    x = p.detach()[0]
    slabs = project(x, 2, slab=4)
    assert torch.equal(slabs[0], x[:, :, :, 0:4].amax(3)) and torch.equal(slabs[2], x[:, :, :, 8:10].amax(3))
    assert torch.equal(project(x, 1, slab=1), x.movedim(2, 0))  # one-voxel slabs: the slices
    # halves round up: 1.25 mm / 0.5 mm = 2.5 -> 3 voxels (3 slabs of 8); at least one voxel
    recording.shapes.clear()
    MIPLoss(recording, axes=0, slab_mm=1.25, **raw())(p, torch.zeros_like(p), spacing=torch.tensor([0.5, 1.0, 0.3]))
    MIPLoss(recording, axes=0, slab_mm=0.1, **raw())(p, torch.zeros_like(p), spacing=torch.tensor([0.5, 1.0, 0.3]))
    assert recording.shapes == [(3, 1, 6, 10), (8, 1, 6, 10)]


def test_slab_in_voxels_needs_no_spacing_and_slabs_average_the_base_loss():
    logits, label = torch.randn(2, 2, 8, 8, 8), torch.randint(0, 2, (2, 1, 8, 8, 8))
    by_voxels = MIPLoss(DiceLoss(), axes=1, slab_voxels=4)(logits, label)
    by_mm = MIPLoss(DiceLoss(), axes=1, slab_mm=2.0)(logits, label, spacing=torch.tensor([1.0, 0.5, 1.0]))
    assert torch.allclose(by_voxels, by_mm)
    # the mean of the base loss over the slabs and samples, by hand
    probs, labels = torch.softmax(logits, 1)[:, 1:], one_hot(label, 2)[:, 1:]
    by_hand = []
    for b in range(2):
        slabs = [(probs[b, :, :, k : k + 4].amax(2), labels[b, :, :, k : k + 4].amax(2)) for k in (0, 4)]
        by_hand.append(torch.stack([DiceLoss()(pm[None], lm[None]) for pm, lm in slabs]).mean())
    assert torch.allclose(by_voxels, torch.stack(by_hand).mean())


def test_multi_axis_loss_is_the_sum_of_the_single_axes():
    torch.manual_seed(0)
    logits, label = torch.randn(3, 2, 8, 10, 12), torch.randint(0, 2, (3, 1, 8, 10, 12))
    for base in (DiceLoss(), FocalTverskyLoss()):
        total = MIPLoss(base, axes="all")(logits, label)
        single = [MIPLoss(base, axes=a)(logits, label) for a in (0, 1, 2)]
        assert torch.allclose(total, sum(single)) and min(single) > 0
        assert torch.allclose(MIPLoss(base, axes=[0, 2])(logits, label), single[0] + single[2])
        assert torch.allclose(MIPLoss(base, axes=-1)(logits, label), single[2])


def test_coarsest_axis_is_chosen_per_sample_from_the_spacing_or_the_label_affine():
    spacing = torch.tensor([[0.5, 0.5, 2.0], [3.0, 1.0, 1.0], [0.8, 0.8, 0.8], [0.9, 1.2, 1.1], [0.7, 1.5, 1.5]])
    # axes 2, 0, 2 (a tie of all three: the last), 1, 2 (a tie of axes 1 and 2)
    expected = [(1, 1, 4, 5), (1, 1, 5, 6), (1, 1, 4, 5), (1, 1, 4, 6), (1, 1, 4, 5)]
    recording = Recording()
    loss = MIPLoss(recording, axes="coarsest", **raw())
    p = probabilities((5, 1, 4, 5, 6))
    loss(p, torch.zeros_like(p), spacing=spacing)
    assert recording.shapes == expected
    # no spacing given: the label's affine (a collated batch of MetaTensors) holds it, in any orientation
    recording.shapes.clear()
    affines = torch.diag_embed(torch.cat([spacing, torch.ones(5, 1)], 1)).to(torch.float64)
    # a rotated voxel grid: the spacing is the length of each affine column
    affines[1, :3, :3] = torch.tensor([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]], dtype=torch.float64) @ affines[1, :3, :3]
    label = MetaTensor(torch.zeros(5, 1, 4, 5, 6), affine=affines)
    label.is_batch = True
    loss(p, label)
    assert recording.shapes == expected
    with pytest.raises(ValueError, match="needs the voxel spacing"):
        loss(p, torch.zeros_like(p))


def test_perfect_prediction_gives_zero_and_a_wrong_one_does_not():
    rng = np.random.RandomState(0)
    label = torch.tensor(np.stack([vessel_tree((24, 24, 16), (0.5, 0.5, 0.8), rng)[1][None] for _ in range(2)])).long()
    perfect = 20.0 * (2 * one_hot(label, 2) - 1)
    wrong = 20.0 * (2 * one_hot(1 - label, 2) - 1)
    for loss in (
        build_loss("focal_tversky", 0.3),
        build_loss("dice_ce", 0.3, mip_axes="coarsest", mip_slab_mm=3.0),
        MIPLoss(TverskyLoss(alpha=0.3, beta=0.7), axes="all", slab_voxels=5),
    ):
        assert float(loss(perfect, label, spacing=torch.tensor([0.5, 0.5, 0.8]))) < 1e-4
        assert float(loss(wrong, label, spacing=torch.tensor([0.5, 0.5, 0.8]))) > 0.5


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"axes": "z"}, "axes 'z' is not known"),
        ({"axes": 3}, "axes 3 is not valid"),
        ({"axes": [0, -3]}, r"axes \[0, -3\] names an axis twice"),
        ({"axes": []}, r"axes \[\] is not valid"),
        ({"axes": 1.0}, "axes 1.0 is not valid"),
        ({"slab_mm": -1.0}, "slab_mm -1.0 must be a positive"),
        ({"slab_mm": float("nan")}, "slab_mm nan"),
        ({"slab_voxels": 0}, "slab_voxels 0 must be"),
        ({"slab_voxels": 2.5}, "slab_voxels 2.5 must be"),
        ({"slab_mm": 2.0, "slab_voxels": 3}, r"slab_mm \(2.0\) or slab_voxels \(3\)"),
        ({"temperature": 0}, "temperature 0 must be a positive"),
        ({"base": DiceLoss(softmax=True)}, "DiceLoss has softmax=True"),
        ({"base": FocalTverskyLoss(include_background=False)}, "FocalTverskyLoss has include_background=False"),
        ({"base": "dice"}, "base 'dice' must be a loss module"),
    ],
)
def test_bad_mip_options_raise_naming_the_value(kwargs, words):
    with pytest.raises(ValueError, match=words):
        MIPLoss(**kwargs)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"voxel_loss": "bce"}, r"voxel_loss 'bce' is not known; expected one of \('dice_ce', 'focal_tversky'\)"),
        ({"mip_weight": 1.5}, r"mip_weight 1.5 must be a number in \[0, 1\]"),
        ({"mip_weight": 0.3, "mip_axes": "sideways"}, "axes 'sideways'"),
        ({"mip_weight": 0.0, "mip_temperature": -1}, "temperature -1"),  # checked also when unused
    ],
)
def test_bad_loss_choices_raise_naming_the_value(kwargs, words):
    with pytest.raises(ValueError, match=words):
        build_loss(**kwargs)


def test_bad_inputs_raise_naming_the_shapes():
    loss = MIPLoss()
    with pytest.raises(ValueError, match=r"input of shape \(2, 2, 8, 8\)"):
        loss(torch.randn(2, 2, 8, 8), torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="softmax=True over a single channel"):
        loss(torch.randn(2, 1, 8, 8, 8), torch.zeros(2, 1, 8, 8, 8))
    with pytest.raises(ValueError, match=r"target of shape \(2, 1, 8, 8, 4\) does not match"):
        MIPLoss(to_onehot_y=False, include_background=True)(torch.randn(2, 2, 8, 8, 8), torch.zeros(2, 2, 8, 8, 4)[:, :1])
    with pytest.raises(ValueError, match="voxel_weight -0.1 must be a non-negative"):
        VoxelMIPLoss(DiceLoss(), MIPLoss(), voxel_weight=-0.1)


def test_focal_tversky_is_spockmips_formula():
    p = torch.tensor([0.8, 0.2, 0.6, 0.1]).view(1, 1, 4, 1, 1)
    y = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 1, 4, 1, 1)
    tp, fp, fn = 0.8 + 0.6, 0.2 + 0.1, 0.2 + 0.4
    expected = (1 - (tp + 1) / (tp + 0.7 * fn + 0.3 * fp + 1)) ** 0.75
    assert float(FocalTverskyLoss()(p, y)) == pytest.approx(expected, rel=1e-6)
    assert float(FocalTverskyLoss(gamma=1.0)(p, y)) == pytest.approx(float(TverskyLoss(alpha=0.3, beta=0.7, smooth_nr=1, smooth_dr=1)(p, y)))
    perfect = FocalTverskyLoss()(y.requires_grad_(), y.detach())
    perfect.backward()
    assert float(perfect.detach()) == 0.0 and torch.isfinite(y.grad).all()


# --------------------------------------------------------------------------- the data sets' losses


def test_every_data_set_but_vessels_keeps_dicece():
    for name, spec in DATASETS.items():
        loss = build_loss(spec.loss, spec.mip_weight, spec.mip_axes, spec.mip_slab_mm, spec.mip_temperature)
        if name == "vessel":
            assert isinstance(loss, VoxelMIPLoss) and (loss.voxel_weight, loss.mip_weight) == pytest.approx((0.7, 0.3))
            assert isinstance(loss.voxel_loss, FocalTverskyLoss) and isinstance(loss.mip_loss.base, FocalTverskyLoss)
            assert loss.mip_loss.axes == "all" and loss.mip_loss.slab_mm is None and loss.mip_loss.temperature is None
        else:
            # exactly the loss train.json declared before: DiceCELoss(to_onehot_y, softmax, batch)
            assert type(loss) is DiceCELoss
            torch.manual_seed(0)
            x, y = torch.randn(2, spec.num_classes, 8, 8, 8), torch.randint(0, spec.num_classes, (2, 1, 8, 8, 8))
            assert torch.equal(loss(x, y), DiceCELoss(to_onehot_y=True, softmax=True, batch=True)(x, y))


def test_a_spec_with_a_bad_loss_is_refused_naming_the_data_set():
    vessel = get_dataset("vessel")
    fields = {f: getattr(vessel, f) for f in vessel.__dataclass_fields__}
    with pytest.raises(ValueError, match="vessel: mip_weight 2 must be"):
        DatasetSpec(**{**fields, "mip_weight": 2})
    with pytest.raises(ValueError, match=r"vessel: extra_metrics \['hausdorff'\] are not known"):
        DatasetSpec(**{**fields, "extra_metrics": ("hausdorff",)})


def test_the_spacing_reaches_the_loss_through_monai_supervised_trainer():
    """``RandSpacingPatchd`` patches -> DataLoader -> PrepareBatchSpacing -> SupervisedTrainer, which
    calls ``loss(pred, label)``: the MIP loss picks each patch's coarsest axis and its slabs from the
    label's affine, i.e. from the spacing the patch was drawn at."""
    rng = np.random.RandomState(0)
    items = []
    for _ in range(4):
        image, label = vessel_tree((24, 24, 20), (0.5, 0.5, 0.8), rng)
        affine = np.diag([0.5, 0.5, 0.8, 1.0])
        items.append({"image": MetaTensor(image[None], affine=affine), "label": MetaTensor(label[None].astype(np.float32), affine=affine)})
    patches = RandSpacingPatchd(["image", "label"], spacing_range=[[0.3, 1.0]] * 3, patch_size=(16, 16, 16))
    patches.set_random_state(0)
    loader = DataLoader(Dataset(items, patches), batch_size=2)
    seen = []

    class Spy(Recording):
        def __call__(self, pred, label):
            seen.append(tuple(pred.shape))
            return super().__call__(pred, label)

    drawn = []
    loss = VoxelMIPLoss(DiceCELoss(to_onehot_y=True, softmax=True), MIPLoss(Spy(), axes="coarsest", slab_mm=3.0))
    net = PlainUNet(in_channels=1, out_channels=2, channels=(4, 8), convs_per_level=1)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=loader, network=net,
                                optimizer=torch.optim.SGD(net.parameters(), 1e-3), loss_function=loss, prepare_batch=PrepareBatchSpacing())

    @trainer.on(Events.ITERATION_STARTED)
    def keep(engine):
        drawn.extend(engine.state.batch["spacing"].tolist())

    trainer.run()
    assert len(drawn) == 4 and len(seen) == 4
    for spacing, shape in zip(drawn, seen):
        axis = max(a for a in range(3) if spacing[a] >= max(spacing) * (1 - 1e-4))
        slabs = math.ceil(16 / max(1, math.floor(3.0 / spacing[axis] + 0.5)))
        assert shape == (slabs, 1, 16, 16), (spacing, shape)


# --------------------------------------------------------------------------- learning


def _vessel_volumes(seed: int, n: int, shape=(32, 32, 24), spacing=(0.5, 0.5, 0.6)):
    """``n`` generated vessel trees (radii 1.5 mm down to 0.25 mm, i.e. down to half a voxel) as
    z-scored images ``(n, 1, *shape)`` and labels ``(n, 1, *shape)``."""
    rng = np.random.RandomState(seed)
    images, labels = [], []
    for _ in range(n):
        image, label = vessel_tree(shape, spacing, rng, radius_mm=(0.25, 1.5), levels=4, noise=20.0)
        images.append((image - image.mean()) / image.std())
        labels.append(label)
    return torch.tensor(np.stack(images))[:, None].float(), torch.tensor(np.stack(labels))[:, None].long()


def _train(loss, images, labels, seed: int, iterations: int = 250) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = PlainUNet(in_channels=1, out_channels=2, channels=(8, 16), convs_per_level=1)
    optimizer = torch.optim.Adam(net.parameters(), 3e-3)
    draws = torch.Generator().manual_seed(seed)
    for _ in range(iterations):
        batch = torch.randint(0, len(images), (2,), generator=draws)
        optimizer.zero_grad()
        loss(net(images[batch]), labels[batch]).backward()
        optimizer.step()
    return net


def _scores(net, images, labels) -> tuple[float, float, float]:
    """Mean Dice, mean clDice and mean connected components of the prediction per label tree."""
    with torch.no_grad():
        pred = net(images).argmax(1, keepdim=True)
    p, y = one_hot(pred, 2), one_hot(labels, 2)
    dice = float(DiceMetric(include_background=False)(p, y).mean())
    cldice = float(ClDiceMetric()(p, y).nanmean())
    per_tree = np.mean([count_components(pred[i, 0].numpy()) / max(1, count_components(labels[i, 0].numpy())) for i in range(len(images))])
    return dice, cldice, float(per_tree)


def test_mip_loss_gives_more_continuous_vessels_than_the_voxel_loss_alone_at_the_same_dice():
    """Generated vessel trees (fixed seeds), the same small UNet, data, draws and 250 Adam steps,
    trained with DiceCE alone and with ``0.5 DiceCE + 0.5 MIP`` (soft Dice of the projections along
    the three axes, summed), then scored on 8 held-out trees.

    A thin branch holds few voxels, so the voxel loss hardly misses it, but it is a whole line of
    each projection: the MIP loss keeps more of the thin branches connected. Measured here with
    training seeds 0, 1, 2: Dice 0.908 / 0.900 / 0.901 (voxel) and 0.894 / 0.898 / 0.904 (MIP);
    clDice +0.023 / +0.037 / +0.029; components per tree 2.50 -> 1.62, 2.50 -> 1.62, 2.62 -> 1.88.
    (With SPOCKMIP's weight 0.3 the gains were smaller and less even: clDice +0.005 to +0.022.)"""
    images, labels = _vessel_volumes(seed=100, n=8)
    test_images, test_labels = _vessel_volumes(seed=200, n=8)
    voxel = _scores(_train(build_loss("dice_ce"), images, labels, seed=0), test_images, test_labels)
    with_mip = _scores(_train(build_loss("dice_ce", mip_weight=0.5), images, labels, seed=0), test_images, test_labels)
    (dice_v, cl_v, pieces_v), (dice_m, cl_m, pieces_m) = voxel, with_mip
    assert dice_v > 0.85, voxel  # both learned the task
    assert abs(dice_m - dice_v) <= 0.02, (voxel, with_mip)
    assert cl_m >= cl_v + 0.015, (voxel, with_mip)
    assert pieces_m <= pieces_v - 0.5, (voxel, with_mip)
