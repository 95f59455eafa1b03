"""Learning test: HyperSpace learns a task where the label depends on size in millimetres.

Balls of radius 5 mm are foreground, balls of 2.5 mm background (custom_networks.synthetic). At 1 mm
a background ball is 2.5 voxels in radius; at 2 mm a foreground ball is too. A UNet that ignores the
spacing (the AS baseline) cannot get both right; HyperUNet, told the spacing, can.
"""

import itertools

import numpy as np
import pytest
import torch
from monai.engines import SupervisedTrainer
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from torch.utils.data import IterableDataset

from custom_networks import HyperUNet, PlainUNet, PrepareBatchSpacing
from custom_networks.synthetic import ball_patch

PATCH = (16, 16, 16)
LAYOUT = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32), convs_per_level=1)
BATCH = 4
# about 30 s of CPU training each on 2 cores; Adam at 3e-4 (at 1e-3 the hypernetwork sometimes
# collapses to all-background within so few iterations)
ITERATIONS = 400
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
            image, label = ball_patch((s, s, s), PATCH, large=bool(rng.rand() < 0.5), rng=rng)
            yield {"image": torch.from_numpy(image), "label": torch.from_numpy(label), "spacing": torch.full((3,), s)}


def train(net, iterations=ITERATIONS, seed=0):
    """Train with MONAI's SupervisedTrainer, DiceCELoss and the spacing-passing prepare_batch."""
    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(BallPatches(seed), batch_size=BATCH)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        epoch_length=iterations,
        train_data_loader=loader,
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), LR),
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
        prepare_batch=PrepareBatchSpacing(),
    )
    trainer.run()
    return trainer.state.iteration


def evaluate(net, spacing, n=24, seed=123):
    rng = np.random.RandomState(seed)
    metric = DiceMetric(include_background=False, ignore_empty=False)
    net.eval()
    with torch.no_grad():
        for i in range(n):
            image, label = ball_patch((spacing,) * 3, PATCH, large=i % 2 == 0, rng=rng)
            logits = net(torch.from_numpy(image)[None], torch.full((1, 3), spacing))
            pred = one_hot(logits.argmax(1, keepdim=True), 2)
            metric(pred, one_hot(torch.from_numpy(label)[None].long(), 2))
    return float(metric.aggregate())


@pytest.fixture(scope="module")
def trained():
    results = {}
    for name, cls in (("hyperspace", HyperUNet), ("as", PlainUNet)):
        torch.manual_seed(0)
        net = cls(**LAYOUT)
        iterations = train(net)
        results[name] = {s: evaluate(net, s) for s in TEST_SPACINGS}
        print(name, iterations, "iterations", results[name])
    return results


def test_hyperspace_learns_size_in_mm(trained):
    for s in TEST_SPACINGS:
        assert trained["hyperspace"][s] >= 0.8, trained


def test_spacing_blind_unet_is_worse(trained):
    hs, as_ = np.mean(list(trained["hyperspace"].values())), np.mean(list(trained["as"].values()))
    assert as_ <= hs - 0.1, trained
