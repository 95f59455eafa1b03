"""Annotate and retrain: fine-tune (or train) a bundle's HyperSpace model on the datastore's labels.

The task runs the bundle's own ``configs/train.json`` (random-spacing patches, DiceCE, validation
with the clamp policy, best-checkpoint saving) as a MONAI ``ConfigWorkflow``, with the data lists
replaced by the datastore's labelled images and the user's options applied. The best checkpoint is
written (atomically) to the path the infer task reads, so the next request uses it.

Options in Slicer's train panel (``config``), defaults from the bundle:

- ``max_epochs``, ``learning_rate``, ``train_batch_size``, ``val_interval`` (epochs between validations).
- ``spacing_range_mm``: spacings drawn for the training patches: ``"0.5,3.5"`` (all axes) or
  ``"1,5; 0.2,1.5; 0.2,1.5"`` (per axis, mm).
- ``val_split``: fraction of labelled images held out for validation; with too few images the
  training images are validated on instead.
- ``pretrained``: start from the current checkpoint (fine-tune) instead of from scratch.

Label files saved from 3D Slicer carry ``label_info`` (``[{"name", "idx"}]``): each file value is
mapped to the model's class of that name, so the segment order in Slicer does not matter.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import TYPE_CHECKING, Any

from monai.bundle import ConfigWorkflow
from monai.data import partition_dataset
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.train.handler import PublishStatsAndModel
from monailabel.utils.others.generic import device_list, name_to_device, strtobool

from custom_networks.spacing import SpacingRange

if TYPE_CHECKING:
    from ..configs.hyperspace import HyperSpaceConfig

logger = logging.getLogger(__name__)


def _normalise(name: str) -> str:
    return str(name).strip().lower().replace(" ", "_").replace("-", "_")


def _value(request: dict, key: str, default: Any) -> Any:
    value = request.get(key, default)
    return value[0] if isinstance(value, (list, tuple)) and value else value


class HyperSpaceTrain(TrainTask):
    """Train a bundle's HyperSpace model on the labelled images of the datastore."""

    def __init__(self, bundle: "HyperSpaceConfig"):
        clicks = ", with DeepEdit's simulated clicks" if bundle.interactive else ""
        super().__init__(f"Fine-tune {bundle.name} on the labelled images, with random-spacing patches{clicks}.")
        self.bundle = bundle
        parser = bundle.parser("train.json")
        self.defaults = {k: parser.get_parsed_content(k) for k in ("epochs", "learning_rate", "val_interval", "batch_size")}
        out = os.path.dirname(bundle.path)
        eval_dir = "eval_interactive" if bundle.interactive else "eval"
        self.output_dir = os.path.join(out, f"{bundle.name}_train") if bundle.model_dir else os.path.join(bundle.bundle_path, eval_dir)
        self.stats_path = os.path.join(self.output_dir, "train_stats.json")

    def config(self) -> dict[str, Any]:
        return {
            "max_epochs": int(self.defaults["epochs"]),
            "learning_rate": float(self.defaults["learning_rate"]),
            "spacing_range_mm": self.bundle.spec.spacing_range.to_string(),
            "train_batch_size": int(self.defaults["batch_size"]),
            "val_interval": int(self.defaults["val_interval"]),
            "val_split": 0.2,
            "pretrained": True,
            "device": device_list(),
        }

    def stats(self) -> dict[str, Any]:
        if not os.path.isfile(self.stats_path):
            return {}
        with open(self.stats_path) as f:
            return json.load(f)

    # --- data -----------------------------------------------------------------------------------
    def label_map(self, label_info, label_file: str) -> dict[int, int]:
        """File value -> class index for a label saved with ``label_info`` (``[{"name", "idx"}]``)."""
        classes = {_normalise(name): i for name, i in self.bundle.spec.label_names.items()}
        if not label_info:
            return {i: i for i in classes.values()}
        mapping, unknown = {0: 0}, []
        for entry in label_info:
            name, idx = entry.get("name"), entry.get("idx")
            if _normalise(name) not in classes:
                unknown.append(name)
            elif idx is not None:
                mapping[int(idx)] = classes[_normalise(name)]
        if unknown:
            raise ValueError(
                f"{label_file}: segments {unknown} are not structures of {self.bundle.name}; "
                f"expected names among {list(self.bundle.labels)}."
            )
        return mapping

    def training_items(self, datastore: Datastore) -> list[dict[str, Any]]:
        """``{"image", "label", "label_map"}`` for every image with a final label."""
        items = []
        for image_id in sorted(datastore.get_labeled_images()):
            label_id = datastore.get_label_by_image_id(image_id, DefaultLabelTag.FINAL)
            label = datastore.get_label_uri(label_id, DefaultLabelTag.FINAL)
            info = datastore.get_label_info(label_id, DefaultLabelTag.FINAL).get("label_info")
            items.append({"image": datastore.get_image_uri(image_id), "label": label, "label_map": self.label_map(info, label)})
        return items

    def options(self, request: dict) -> dict[str, Any]:
        """The validated train options; a bad value raises ``ValueError`` naming it."""
        d = self.config()

        def number(key, kind, low, high=math.inf):
            raw = _value(request, key, d[key])
            try:
                value = float(raw)
            except (TypeError, ValueError):
                value = math.nan
            if not (low <= value <= high) or (kind is int and not value.is_integer()):
                raise ValueError(f"{key} {raw!r} must be {'an integer' if kind is int else 'a number'} in [{low}, {high}].")
            return kind(value)

        return {
            "max_epochs": number("max_epochs", int, 1),
            "learning_rate": number("learning_rate", float, 1e-12, 10.0),
            "train_batch_size": number("train_batch_size", int, 1),
            "val_interval": number("val_interval", int, 1),
            "val_split": number("val_split", float, 0.0, 0.9),
            "spacing_range": SpacingRange.from_string(_value(request, "spacing_range_mm", d["spacing_range_mm"]), self.bundle.spec.spatial_dims),
            "pretrained": bool(strtobool(str(_value(request, "pretrained", True)))),
            "device": name_to_device(_value(request, "device", None)),
        }

    # --- the run ----------------------------------------------------------------------------------
    def __call__(self, request: dict, datastore: Datastore) -> dict[str, Any]:
        options = self.options(request)
        items = self.training_items(datastore)
        if not items:
            raise ValueError(f"no labelled images in the datastore; save at least one label before training {self.bundle.name}.")
        train, val = (items, [])
        if options["val_split"] > 0 and len(items) >= 2:
            train, val = partition_dataset(items, ratios=[1 - options["val_split"], options["val_split"]], shuffle=True, seed=0)
        if not train or not val:
            logger.info(f"{len(items)} labelled image(s): validating on the training images")
            train, val = items, items
        checkpoint = self.bundle.path
        handlers = self.bundle.parser("train.json").config["train"]["handlers"]
        network = {}
        if options["pretrained"] and os.path.isfile(checkpoint):
            # fine-tune the primary network the checkpoint holds (unet, sdn_unet)
            network = self.bundle.checkpoint_overrides()
            logger.info(f"Fine-tuning from {checkpoint}{' as ' + str(network) if network else ''}")
            handlers = [{"_target_": "CheckpointLoader", "load_path": checkpoint, "load_dict": {"model": "@network"}, "map_location": options["device"]}] + handlers
        os.makedirs(self.output_dir, exist_ok=True)
        overrides = {
            "bundle_root": self.bundle.bundle_path,
            **self.bundle.overrides,
            **network,
            "device": options["device"],
            "epochs": options["max_epochs"],
            "learning_rate": options["learning_rate"],
            "batch_size": options["train_batch_size"],
            "val_interval": min(options["val_interval"], options["max_epochs"]),
            "spacing_range": [[lo, hi] for lo, hi in zip(options["spacing_range"].low, options["spacing_range"].high)],
            "ckpt_dir": os.path.dirname(checkpoint),
            "model_file": os.path.basename(checkpoint),
            # a new run into the served checkpoint, on purpose (fine-tuned from it when pretrained):
            # train.json refuses to overwrite a previous run without this
            "overwrite": True,
            "output_dir": self.output_dir,
            "train#dataset#data": train,
            "validate#dataset#data": val,
            "train#handlers": handlers,
        }
        logger.info(f"Training {self.bundle.name} on {len(train)} image(s), validating on {len(val)}; options {options}")
        workflow = ConfigWorkflow(
            config_file=self.bundle.config_files("train.json"),
            meta_file=self.bundle.config_file("metadata.json"),
            logging_file=self.bundle.config_file("logging.conf"),
            run_id="training",
            workflow_type="train",
            **overrides,
        )
        workflow.initialize()
        trainer = workflow.parser.get_parsed_content("train#trainer")
        evaluator = workflow.parser.get_parsed_content("validate#evaluator")
        PublishStatsAndModel(self.stats_path, None, os.path.basename(checkpoint), time.time(), "hyperspace", self.output_dir, trainer, evaluator).attach(trainer)
        workflow.run()
        workflow.finalize()
        return {"checkpoint": checkpoint, "epochs": options["max_epochs"], "best_metric": evaluator.state.best_metric}
