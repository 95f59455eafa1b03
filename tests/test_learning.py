"""Learning test: HyperSpace learns a task where the label depends on size in millimetres.

Balls of radius 5 mm are foreground, balls of 2.5 mm background (custom_networks.data.synthetic). At 1 mm
a background ball is 2.5 voxels in radius; at 2 mm a foreground ball is too. A UNet that ignores the
spacing (the AS baseline) cannot get both right; HyperUNet, told the spacing, can.

Both networks are trained as a bundle trains them: MONAI's SupervisedTrainer with DiceCELoss and the
spacing-passing prepare_batch, validated periodically by a SupervisedEvaluator that keeps the best
checkpoint (short hypernetwork runs fluctuate between validations), then tested on fresh patches.
"""

import itertools

import numpy as np
import pytest
import torch
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import CheckpointSaver, IgniteMetricHandler, ValidationHandler, from_engine
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from monai.transforms import AsDiscreted, Compose
from torch.utils.data import IterableDataset

from custom_networks import PlainUNet, PrepareBatchSpacing
from custom_networks.data.synthetic import ball_patch

PATCH = (16, 16, 16)
LAYOUT = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32), convs_per_level=1)
BATCH = 4
# about 30 s of CPU training each on 2 cores
ITERATIONS = 400
VAL_INTERVAL = 50
LR = 3e-4
TEST_SPACINGS = (1.0, 2.0)


class BallPatches(IterableDataset):
    """Endless stream of single-ball patches at an isotropic spacing drawn from U(1, 2.5) mm.

    The spacing is drawn once per batch of ``BATCH`` patches, so each batch runs one generated UNet.
    """

    def __init__(self, seed):
        self.seed = seed

    def __iter__(self):
        rng = np.random.RandomState(self.seed)
        for i in itertools.count():
            if i % BATCH == 0:
                s = rng.uniform(1.0, 2.5)
            yield patch(s, large=bool(rng.rand() < 0.5), rng=rng)


def patch(spacing, large, rng):
    image, label = ball_patch((spacing,) * 3, PATCH, large=large, rng=rng)
    return {"image": torch.from_numpy(image), "label": torch.from_numpy(label), "spacing": torch.full((3,), spacing)}


def fixed_patches(n, seed):
    """``n`` patches per test spacing, half with a foreground ball."""
    rng = np.random.RandomState(seed)
    return [patch(s, large=i % 2 == 0, rng=rng) for s in TEST_SPACINGS for i in range(n)]


def train(net, save_dir, seed=0):
    """Train, validate every VAL_INTERVAL iterations, and load the best checkpoint into ``net``."""
    torch.manual_seed(seed)
    device = torch.device("cpu")
    dice = DiceMetric(include_background=False, ignore_empty=False)  # a ball-free patch counts: 1 if left empty
    evaluator = SupervisedEvaluator(
        device=device,
        val_data_loader=DataLoader(fixed_patches(12, seed=100 + seed), batch_size=BATCH),
        network=net,
        prepare_batch=PrepareBatchSpacing(),
        postprocessing=Compose([AsDiscreted(keys="pred", argmax=True, to_onehot=2), AsDiscreted(keys="label", to_onehot=2)]),
        key_val_metric={"val_dice": IgniteMetricHandler(metric_fn=dice, output_transform=from_engine(["pred", "label"]))},
        val_handlers=[CheckpointSaver(save_dir=str(save_dir), save_dict={"network": net}, save_key_metric=True, key_metric_filename="best.pt")],
    )
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=1,
        epoch_length=ITERATIONS,
        train_data_loader=torch.utils.data.DataLoader(BallPatches(seed), batch_size=BATCH),
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), LR),
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True, batch=True),
        prepare_batch=PrepareBatchSpacing(),
        train_handlers=[ValidationHandler(validator=evaluator, interval=VAL_INTERVAL, epoch_level=False)],
    )
    trainer.run()
    net.load_state_dict(torch.load(save_dir / "best.pt"))
    return evaluator.state.best_metric


def evaluate(net, spacing, n=24, seed=123):
    """Mean Dice of the foreground over ``n`` fresh patches at ``spacing`` mm."""
    rng = np.random.RandomState(seed)
    metric = DiceMetric(include_background=False, ignore_empty=False)
    net.eval()
    with torch.no_grad():
        for i in range(n):
            item = patch(spacing, large=i % 2 == 0, rng=rng)
            logits = net(item["image"][None], item["spacing"][None])
            metric(one_hot(logits.argmax(1, keepdim=True), 2), one_hot(item["label"][None].long(), 2))
    return float(metric.aggregate())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, size_task_hyperunet):
    """Test Dice per spacing of HyperSpace (the session's ``size_task_hyperunet``, trained by
    :func:`train`) and of the spacing-blind plain UNet trained the same way."""
    torch.manual_seed(0)
    plain = PlainUNet(**LAYOUT)
    networks = {"hyperspace": size_task_hyperunet, "as": (plain, train(plain, tmp_path_factory.mktemp("as")))}
    results = {}
    for name, (net, best_val) in networks.items():
        results[name] = {s: evaluate(net, s) for s in TEST_SPACINGS}
        print(name, "best validation Dice", round(best_val, 3), "test Dice per spacing", results[name])
    return results


def test_hyperspace_learns_size_in_mm(trained):
    for s in TEST_SPACINGS:
        assert trained["hyperspace"][s] >= 0.85, trained


def test_spacing_blind_unet_is_worse(trained):
    hs, as_ = np.mean(list(trained["hyperspace"].values())), np.mean(list(trained["as"].values()))
    assert as_ <= hs - 0.15, trained
