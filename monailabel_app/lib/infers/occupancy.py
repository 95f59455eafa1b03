"""Labels on the image's own grid from a coarse encoder: a bundle's occupancy decoder in 3D Slicer.

The model ``<bundle>_occupancy`` (a bundle with ``configs/inference_occupancy.json``) encodes the
image with the HyperSpace UNet at an *encoder spacing* chosen by the usual options
(``spacing_policy`` ``clamp`` / ``native`` / ``target`` with ``target_spacing``), and decodes the
label directly at the image's native voxel centres, coarse to fine (see
:mod:`custom_networks.pipeline.occupancy`). The result's ``params`` state ``encoder_spacing_mm``,
``output_grid`` (shape and spacing of the label: the input's own) and ``queried_voxels`` (the
share of native voxels the decoder was asked about).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from fastapi import HTTPException
from monai.transforms import Invertd, SqueezeDimd

from custom_networks.pipeline.occupancy import occupancy_labels
from custom_networks.spacing import parse_spacing

from .hyperspace import _PRE, HyperSpaceSegmentation, _option

_INFO = "hyperspace_occupancy"
POLICIES = ("clamp", "native", "target")


class HyperSpaceOccupancy(HyperSpaceSegmentation):
    """Segmentation through the bundle's occupancy decoder (``"decoder": "occupancy"``).

    The same spacing options as :class:`HyperSpaceSegmentation`, for the encoder, except ``auto``
    (its cost model is the UNet's), ``window`` and ``spacing_ensemble``; a request that sets them
    gets a 400 naming the option.
    """

    def __init__(self, bundle, default_target_spacing: float = 2.0):
        super().__init__(bundle, default_target_spacing)
        for key in ("window", "memory_budget_gb", "time_budget_s", "spacing_ensemble"):
            self._config.pop(key, None)
        self._config["spacing_policy"] = list(POLICIES)

    def describe(self) -> str:
        return (
            f"Occupancy decoder: {self.bundle.description} Encodes at a coarse spacing, writes the label "
            "at the image's own resolution."
        )

    def spacing_options(self, data: dict) -> dict[str, Any]:
        mode = str(_option(data, "spacing_policy", POLICIES[0])).strip().lower()
        if mode not in POLICIES:
            raise HTTPException(400, f"spacing_policy {data.get('spacing_policy')!r} is not one of {', '.join(POLICIES)} for the occupancy decoder.")
        for key in ("window", "spacing_ensemble"):
            value = _option(data, key, None)
            if value not in (None, "", False, "false", "auto"):
                raise HTTPException(400, f"{key} {data.get(key)!r} is not an option of the occupancy decoder.")
        options: dict[str, Any] = {"mode": mode, "target": None, "window": "none", "spacing_ensemble": False}
        if mode == "target":
            try:
                options["target"] = parse_spacing(_option(data, "target_spacing", None), 3, what="target_spacing")
            except ValueError as e:
                raise HTTPException(400, str(e)) from None
        return options

    def run_inferer(self, data: dict, convert_to_batch: bool = True, device: str = "cuda") -> dict:
        network = self._get_network(device, data).network  # the OccupancyNetwork itself
        image = data[self.input_key]
        options = self.spacing_options(data)
        inferer = self.bundle.parser("inference.json").get_parsed_content("occupancy_inferer")
        # this request's own parsed inferer: the policy of the bundle's inferer, set per request
        inferer.policy, inferer.target_spacing = options["mode"], options["target"]
        spacing = inferer.encoder_spacing(tuple(float(s) for s in image.pixdim))
        labels, info = occupancy_labels(network, image.to(device), spacing=spacing, strides=inferer.strides, chunk=inferer.chunk)
        labels = labels.cpu()
        labels.copy_meta_from(image)
        data[self.output_label_key] = labels
        data["spacing"] = torch.tensor(spacing, dtype=torch.float32)
        data[_INFO] = info
        return data

    def post_transforms(self, data=None) -> Sequence[Callable]:
        # the label is already on the native grid: only the orientation step is undone
        return [Invertd(keys="pred", transform=data[_PRE], orig_keys="image", nearest_interp=True), SqueezeDimd(keys="pred", dim=0)]

    def writer(self, data: dict, extension=None, dtype=None):
        data.setdefault("hyperspace_window", "none")
        label, result = super().writer(data, extension, dtype)
        info = data[_INFO]
        result.pop("window", None)
        result.pop("working_shape", None)
        result["encoder_spacing_mm"] = [round(float(s), 4) for s in info["encoder_spacing"]]
        result["output_grid"] = {"shape": list(data["pred"].shape[-3:]), "spacing_mm": [round(float(s), 4) for s in data["pred"].pixdim]}
        result["queried_voxels"] = round(info["queries"] / max(info["voxels"], 1), 4)
        return label, result

    def warmup(self, device) -> bool:
        return False  # no compiled forward to prepare

    def cost(self, device):
        raise HTTPException(400, "spacing_policy 'auto' is not available for the occupancy decoder.")
