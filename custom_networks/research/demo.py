"""The built-in default job: train a small HyperSpace model on generated data, predict at two spacings.

    python -m custom_networks.research.demo --output_dir demo_output --iterations 40

Writes ``data/`` (generated NIfTI volumes at several native spacings), ``model.pt`` (checkpoint),
and ``predictions/native/`` and ``predictions/2mm/`` (labels on each input's own grid), and prints
the Dice of each prediction against its generated label.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import fire
import numpy as np
import torch
from ignite.engine import Events
from monai.data import CacheDataset, DataLoader
from monai.engines import SupervisedTrainer
from monai.handlers import StatsHandler
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged
from monai.utils import set_determinism

from ..pipeline.batching import PrepareBatchSpacing, PrepareBatchSpacingAffine, SpacingInferer
from ..nets.hyperspace import HyperUNet
from ..pipeline.inference import predict
from ..data.synthetic import write_size_task_dataset
from ..pipeline.transforms import RandSpacingPatchd

TRAINED_RANGE = [[1.0, 2.5]] * 3  # mm per axis; the demo volumes' native spacings lie in it
DEMO_LAYOUT = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32), convs_per_level=1)


def _dice(pred_path: str, label_path: str) -> float:
    import nibabel as nib

    pred = torch.as_tensor(np.asarray(nib.load(pred_path).dataobj))[None, None].long()
    label = torch.as_tensor(np.asarray(nib.load(label_path).dataobj))[None, None].long()
    if pred.shape != label.shape:
        raise RuntimeError(f"prediction {pred_path} has shape {tuple(pred.shape)}, label {tuple(label.shape)}.")
    metric = DiceMetric(include_background=False)
    return float(metric(one_hot(pred, 2), one_hot(label, 2)).mean())


def train_on_volumes(
    net: torch.nn.Module,
    items: list[dict],
    spacing_range,
    iterations: int,
    batch_size: int = 2,
    patch: int = 24,
    target_spacing=None,
    learning_rate: float = 3e-4,
    device: str | torch.device = "cpu",
    label_names: dict | None = None,
    sigma_mm: float = 3.0,
) -> torch.nn.Module:
    """Train ``net`` for ``iterations`` steps on random-spacing patches of NIfTI volumes.

    MONAI's ``SupervisedTrainer`` with ``DiceCELoss`` and Adam; patches from
    :class:`RandSpacingPatchd` (one spacing per batch, drawn from ``spacing_range``; with
    ``target_spacing`` the FS baseline's "random spacing, then back to the fixed one"). A
    :class:`PlainUNet` ignores the spacing (the AS and FS baselines).

    With ``label_names`` (``{name: class index}``, background first) the network is click-guided
    (``in_channels`` = 1 + number of labels): DeepEdit's simulated clicks, first on the label and
    then on the current prediction's errors through MONAI's ``Interaction`` handler, with
    Gaussians of ``sigma_mm`` (see :mod:`custom_networks.pipeline.interactive`).

    Args:
        items: ``[{"image": path, "label": path}, ...]``, labels holding class indices.
    """
    from ..pipeline.interactive import InitialClickGuidanced, interaction

    load = Compose([LoadImaged(keys=["image", "label"]), EnsureChannelFirstd(keys=["image", "label"]), EnsureTyped(keys="image")])
    augment = [RandSpacingPatchd(
        keys=["image", "label"], spacing_range=spacing_range, patch_size=(patch,) * 3, pos_fraction=0.7,
        samples_per_spacing=batch_size, target_spacing=target_spacing,
    )]
    # how the engine hands the spacing to the network; DeepEdit's click loop needs its own pair
    engine_parts: dict = {"prepare_batch": PrepareBatchSpacing()}
    if label_names:
        augment.append(InitialClickGuidanced("label", label_names, sigma_mm))
        engine_parts = {
            "iteration_update": interaction(label_names, sigma_mm),
            "prepare_batch": PrepareBatchSpacingAffine(),
            "inferer": SpacingInferer(),
        }
    dataset = CacheDataset(items, transform=Compose([load, *augment]), progress=False)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0)
    trainer = SupervisedTrainer(
        device=torch.device(device),
        max_epochs=-(-iterations // len(loader)),
        train_data_loader=loader,
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), learning_rate),
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
        train_handlers=[StatsHandler(tag_name="train_loss", output_transform=lambda out: out[0]["loss"])],
        **engine_parts,
    )

    @trainer.on(Events.ITERATION_COMPLETED(once=iterations))
    def _stop(engine):
        engine.terminate()

    trainer.run()
    return net.eval()


def run(output_dir: str = "demo_output", iterations: int = 40, batch_size: int = 2, patch: int = 24, seed: int = 0) -> None:
    """Generate data, train ``iterations`` steps on CPU, predict the held-out volumes at native and 2 mm.

    Args:
        output_dir: folder for data, checkpoint and predictions.
        iterations: training iterations (each a batch of random-spacing patches).
        batch_size: patches per iteration.
        patch: patch edge in voxels.
        seed: seed for data generation and training.

    Writes ``summary.json`` (files written, working spacing, time and Dice per prediction) to
    ``output_dir`` and prints it.
    """
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
    set_determinism(seed)
    items = write_size_task_dataset(os.path.join(output_dir, "data"), seed=seed)
    train_items, test_items = items[:-2], items[-2:]

    net = HyperUNet(**DEMO_LAYOUT)
    train_on_volumes(net, train_items, TRAINED_RANGE, iterations, batch_size=batch_size, patch=patch)
    checkpoint = os.path.join(output_dir, "model.pt")
    torch.save({"network": net.state_dict(), "layout": net.layout.as_kwargs(), "trained_range_mm": TRAINED_RANGE}, checkpoint)

    summary = {"checkpoint": checkpoint, "predictions": []}
    for name, policy, target in (("native", "native", None), ("2mm", "target", "2,2,2")):
        records = predict(
            net, [it["image"] for it in test_items], os.path.join(output_dir, "predictions", name), policy, target, roi_size=(64,) * 3
        )
        for record, item in zip(records, test_items):
            record["dice"] = round(_dice(record["output"], item["label"]), 3)
            summary["predictions"].append(record)
    text = json.dumps(summary, indent=2)
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    fire.Fire(run)
