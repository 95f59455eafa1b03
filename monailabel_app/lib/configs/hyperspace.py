"""One bundle of ``bundles/`` as a MONAI Label model: its configs, its checkpoint, its tasks.

The bundle's own configs stay the one source of truth: the infer task takes its preprocessing,
sliding-window inferer and network from ``configs/inference.json``, the train task runs
``configs/train.json``. Nothing is copied out of the bundle. A bundle's variants are the same with
their overrides on top: the click-guided one (DeepEdit-style, ``inference_interactive.json`` and
``train_interactive.json``) and the occupancy decoder (``*_occupancy.json``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from monai.bundle import ConfigParser
from monailabel.interfaces.config import TaskConfig

from custom_networks.nets.build import primary_network_of
from custom_networks.pipeline.compiled import compile_flag

from ..infers import HyperSpaceInteractive, HyperSpaceSegmentation
from ..infers.occupancy import HyperSpaceOccupancy
from ..trainers import HyperSpaceTrain

REQUIRED_CONFIGS = ("metadata.json", "inference.json", "train.json")
# the overrides of a bundle's variants, per base config: the click-guided one (DeepEdit-style) and
# the occupancy decoder; each is served as the model "<bundle>_<variant>"
VARIANT_CONFIGS = {
    "interactive": {"inference.json": "inference_interactive.json", "train.json": "train_interactive.json"},
    "occupancy": {"inference.json": "inference_occupancy.json", "train.json": "train_occupancy.json"},
}
INTERACTIVE_CONFIGS = VARIANT_CONFIGS["interactive"]
INTERACTIVE_SUFFIX = "_interactive"


def bundle_variants(bundle_path: str) -> list[str]:
    """The variants (keys of :data:`VARIANT_CONFIGS`) whose overrides the bundle has."""
    return [v for v, files in VARIANT_CONFIGS.items() if all(os.path.isfile(os.path.join(bundle_path, "configs", c)) for c in files.values())]


def has_interactive_variant(bundle_path: str) -> bool:
    return "interactive" in bundle_variants(bundle_path)


def discover_bundles(bundles_dir: str, models: str = "all") -> dict[str, str]:
    """Bundle name -> folder for the bundles in ``bundles_dir`` that ``models`` asks for.

    Args:
        bundles_dir: a folder of MONAI bundles (each with ``configs/`` holding
            :data:`REQUIRED_CONFIGS`).
        models: ``"all"`` or a comma-separated list of bundle folder names.

    Raises:
        ValueError: naming the folder or the unknown names and the available ones.
    """
    if not os.path.isdir(bundles_dir):
        raise ValueError(f"bundles folder {bundles_dir!r} does not exist; expected the repository's bundles/ folder.")
    available = {
        name: os.path.join(bundles_dir, name)
        for name in sorted(os.listdir(bundles_dir))
        if all(os.path.isfile(os.path.join(bundles_dir, name, "configs", c)) for c in REQUIRED_CONFIGS)
    }
    if not available:
        raise ValueError(f"no bundles (folders with configs/{', configs/'.join(REQUIRED_CONFIGS)}) in {bundles_dir!r}.")
    wanted = [m.strip() for m in str(models or "all").split(",") if m.strip()]
    if wanted in ([], ["all"]):
        return available
    unknown = [m for m in wanted if m not in available]
    if unknown:
        raise ValueError(f"--conf models: unknown bundle(s) {unknown}; available: {', '.join(available)} (or 'all').")
    return {m: available[m] for m in wanted}


class HyperSpaceConfig(TaskConfig):
    """A HyperSpace bundle served by the app.

    After :meth:`init`:

    - ``spec``: the bundle's :class:`~custom_networks.DatasetSpec` (classes, trained spacing range).
    - ``labels``: structure name -> class index, background left out (MONAI Label's convention).
    - ``path``: the checkpoint the infer task reads and the train task writes: the bundle's own
      ``models/<model_file>`` (what ``python -m monai.bundle run training`` writes), or
      ``<model_dir>/<bundle name>.pt`` when the app is started with ``--conf model_dir``.
    """

    def init(
        self,
        name: str,
        model_dir: str | None,
        conf: dict,
        planner: Any,
        bundle_path: str = "",
        overrides: dict | None = None,
        interactive: bool = False,
        variant: str = "",
        **kwargs,
    ):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.bundle_path = os.path.abspath(bundle_path)
        self.overrides = dict(overrides or {})
        self.variant = "interactive" if interactive else str(variant or "")
        if self.variant and self.variant not in VARIANT_CONFIGS:
            raise ValueError(f"bundle variant {variant!r} is not one of {', '.join(VARIANT_CONFIGS)}.")
        self.interactive = self.variant == "interactive"
        try:
            self.compile = compile_flag((conf or {}).get("compile", "auto"))
        except ValueError as e:
            raise ValueError(f"--conf {e}") from None
        with open(os.path.join(self.bundle_path, "configs", "metadata.json")) as f:
            self.metadata = json.load(f)
        parser = self.parser("inference.json")
        self.spec = parser.get_parsed_content("spec")
        self.labels = {n: i for n, i in self.spec.label_names.items() if i > 0}
        model_file = parser.get_parsed_content("model_file")
        self.path = os.path.join(model_dir, f"{name}.pt") if model_dir else os.path.join(self.bundle_path, "models", model_file)

    def config_file(self, name: str) -> str:
        return os.path.join(self.bundle_path, "configs", name)

    def config_files(self, name: str) -> list[str]:
        """``name`` (``inference.json`` or ``train.json``) and, for a variant, its override."""
        extra = VARIANT_CONFIGS.get(self.variant, {})
        names = [name] + ([extra[name]] if name in extra else [])
        return [self.config_file(n) for n in names]

    def parser(self, config: str, **overrides: Any) -> ConfigParser:
        """A fresh parser of one of the bundle's configs, with the app-wide and the given overrides."""
        parser = ConfigParser()
        parser.read_config(self.config_files(config))
        parser.read_meta(self.config_file("metadata.json"))
        parser.update({"bundle_root": self.bundle_path, **self.overrides, **overrides})
        return parser

    def build_network(self, device: str | torch.device, **overrides: Any) -> torch.nn.Module:
        """A new, untrained instance of the bundle's network (``network_def``) on ``device``."""
        return self.parser("inference.json", **overrides).get_parsed_content("network_def").to(device)

    def network_overrides(self, state: dict) -> dict:
        """The config overrides under which ``network_def`` is the network ``state`` was trained as.

        A bundle trained with ``--primary_network sdn_unet`` leaves a checkpoint of that network
        while the bundle's config still says ``unet``: the app serves (and fine-tunes) whichever
        primary network the checkpoint holds. ``{}`` when the configured network matches, and
        also when none does (loading then fails with the mismatch named).
        """
        configured = self.parser("inference.json").get("primary_network")
        build = lambda key: self.parser("inference.json", primary_network=key).get_parsed_content("network_def")  # noqa: E731
        found = primary_network_of(state, build)
        return {"primary_network": found} if found is not None and found != configured else {}

    def checkpoint_overrides(self) -> dict:
        """:meth:`network_overrides` of the checkpoint at :attr:`path` (``{}`` without one)."""
        if not os.path.isfile(self.path):
            return {}
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # an unreadable file is reported where it is loaded for serving
            return {}
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        return self.network_overrides(state) if isinstance(state, dict) else {}

    @property
    def description(self) -> str:
        return self.metadata.get("description", self.name)

    def infer(self) -> HyperSpaceSegmentation:
        task = {"interactive": HyperSpaceInteractive, "occupancy": HyperSpaceOccupancy}.get(self.variant, HyperSpaceSegmentation)
        return task(self)

    def trainer(self) -> HyperSpaceTrain:
        return HyperSpaceTrain(self)
