"""Spacing-adaptive segmentation for 3D Slicer: one HyperSpace model, a working spacing per request.

Options in Slicer's options panel (``config``):

- ``spacing_policy``: ``clamp`` (default: the image's own spacing, axes outside the trained range
  moved to its nearest edge), ``native`` (the image's own spacing, even outside the trained range),
  ``target`` (``target_spacing``), ``auto`` (the finest spacing whose predicted cost fits
  ``memory_budget_gb`` on a GPU and ``time_budget_s``; see :mod:`custom_networks.pipeline.cost`).
- ``target_spacing``: ``"1.5"`` or ``"1.5,1.5,3"`` (mm, image axes after the bundle's
  orientation step, RAS for all bundles here).
- ``window``: how the working grid is covered: ``patch`` (the bundle's sliding window),
  ``whole`` (one window over the whole grid: no overlapping windows, more memory) or ``auto``
  (default: ``whole`` when its predicted peak memory fits ``memory_budget_gb``).
- ``memory_budget_gb``, ``time_budget_s``: the budgets of ``auto`` (``<= 0``: no limit). Memory
  is GPU memory on CUDA and the process's RAM on the CPU.
- ``spacing_ensemble``: ``true`` runs the model at the working spacing and at 1.25x and 1.5x of
  it (in the trained range; a look its coarse edge merges into another is taken at 1/1.25x or
  1/1.5x instead) and returns the label of the mean probability; ``params`` then hold
  ``spacing_ensemble``: the spacings, the seconds per look and the image's disagreement score
  (mean mutual information over the foreground, nats; see :mod:`custom_networks.pipeline.ensemble`).

The label comes back on the input's own grid (shape, spacing, origin, direction): the bundle's
preprocessing is inverted with MONAI's ``Invertd``. The result's JSON ``params`` say what happened:
``spacing_policy``, ``native_spacing_mm``, ``working_spacing_mm``, ``working_shape``, ``seconds``,
``peak_memory_gb`` (``memory_kind``: CUDA allocator or CPU resident set), and for ``auto`` the
prediction it planned with.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from fastapi import HTTPException
from monai.transforms import SqueezeDimd
from monai.utils import str2bool
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.utils.others.generic import name_to_device

from custom_networks.pipeline.cost import BudgetSpacing, InferenceCost
from custom_networks.pipeline.ensemble import DEFAULT_FACTORS, SpacingEnsembleInferer
from custom_networks.pipeline.compiled import UNetEngine
from custom_networks.data.fileio import write_label
from custom_networks.pipeline.interactive import ClickError
from custom_networks.pipeline.profiling import measure
from custom_networks.spacing import SPACING_POLICIES, parse_spacing
from custom_networks.pipeline.transforms import NativeLabelsd

if TYPE_CHECKING:
    from ..configs.hyperspace import HyperSpaceConfig

WINDOW_MODES = ("auto", "patch", "whole")
logger = logging.getLogger(__name__)
_PRE = "hyperspace_preprocessing"
_WINDOW = "hyperspace_window"
_ENSEMBLE = "hyperspace_spacing_ensemble"
# where SpacingPolicyd finds the request's start (time.perf_counter()), so that auto's budget
# covers reading the image too
_START = "request_start"


def _root_cause(error: BaseException) -> BaseException:
    """The innermost cause of a (MONAI-wrapped) exception."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _failed_reading(error: BaseException) -> bool:
    """Whether ``error`` (or what it wraps) was raised while MONAI's image readers read a file."""
    while error is not None:
        tb = error.__traceback__
        while tb is not None:
            name = tb.tb_frame.f_code.co_filename.replace(os.sep, "/")
            if "monai/data/image_reader" in name or "monai/transforms/io/" in name:
                return True
            tb = tb.tb_next
        error = error.__cause__
    return False


def _root_message(error: BaseException) -> str:
    cause = _root_cause(error)
    return f"{type(cause).__name__}: {cause}"


def _option(data: dict, key: str, default: Any) -> Any:
    # a dropdown's default travels as the whole list; the client sends only the chosen item
    value = data.get(key, default)
    return value[0] if isinstance(value, (list, tuple)) and value else value


def _budget(data: dict, key: str, default: float) -> float:
    value = _option(data, key, default)
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise HTTPException(400, f"{key} {data.get(key)!r} is not a number; expected a finite number (<= 0 for no limit).")
    return value


class HyperSpaceSegmentation(BasicInferTask):
    """Segmentation with a bundle's HyperSpace model at a working spacing the request chooses.

    Args:
        bundle: the :class:`~lib.configs.hyperspace.HyperSpaceConfig` to serve.
        default_target_spacing: the ``target_spacing`` shown by default.
        memory_budget_gb, time_budget_s: the default budgets of ``auto``.
    """

    infer_type = InferType.SEGMENTATION

    def __init__(self, bundle: "HyperSpaceConfig", default_target_spacing: float = 1.5, memory_budget_gb: float = 8.0, time_budget_s: float = 20.0):
        self.bundle = bundle
        self.trained_range = bundle.spec.spacing_range
        parser = bundle.parser("inference.json")
        inferer = parser.get_parsed_content("inferer")
        self.in_channels = int(parser.get_parsed_content("network_def#in_channels"))
        target = self.trained_range.clamp([default_target_spacing] * self.trained_range.spatial_dims)
        super().__init__(
            path=bundle.path,
            network=None,
            type=self.infer_type,
            labels=self.task_labels(),
            dimension=3,
            description=f"{self.describe()} Trained on spacings {self.trained_range.to_string()} mm.",
            roi_size=tuple(inferer.roi_size),
            config={
                "spacing_policy": list(SPACING_POLICIES),
                "target_spacing": ",".join(f"{s:g}" for s in target),
                "window": list(WINDOW_MODES),
                "memory_budget_gb": float(memory_budget_gb),
                "time_budget_s": float(time_budget_s),
                "spacing_ensemble": False,
            },
        )
        self.overlap = float(inferer.overlap)
        self._lock = threading.Lock()
        self._costs: dict[str, tuple[float, InferenceCost]] = {}

    # --- what /info shows ---------------------------------------------------------------------
    def task_labels(self) -> dict[str, int]:
        """Structure name -> class index, background left out (MONAI Label's convention)."""
        return self.bundle.labels

    def describe(self) -> str:
        return self.bundle.description

    def is_valid(self) -> bool:
        # always listed: an untrained model is still trainable from Slicer, and /info says so
        return True

    @property
    def trained(self) -> bool:
        return os.path.isfile(self.bundle.path)

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["trained"] = self.trained
        info["checkpoint"] = self.bundle.path
        info["trained_spacing_range_mm"] = self.trained_range.to_string()
        if not self.trained:
            info["description"] += " Not trained yet: run its train task (Slicer: Train) or put a checkpoint at " + self.bundle.path
        return info

    # --- request options ----------------------------------------------------------------------
    def spacing_options(self, data: dict) -> dict[str, Any]:
        """The validated spacing options of a request; a bad value is an HTTP 400 naming it."""
        mode = str(_option(data, "spacing_policy", SPACING_POLICIES[0])).strip().lower()
        if mode not in SPACING_POLICIES:
            raise HTTPException(400, f"spacing_policy {data.get('spacing_policy')!r} is not one of {', '.join(SPACING_POLICIES)}.")
        options: dict[str, Any] = {"mode": mode, "target": None}
        if mode == "target":
            try:
                options["target"] = parse_spacing(_option(data, "target_spacing", None), 3, what="target_spacing")
            except ValueError as e:
                raise HTTPException(400, str(e)) from None
        window = str(_option(data, "window", WINDOW_MODES[0])).strip().lower()
        if window not in WINDOW_MODES:
            raise HTTPException(400, f"window {data.get('window')!r} is not one of {', '.join(WINDOW_MODES)}.")
        options["window"] = window
        options["memory_budget_gb"] = _budget(data, "memory_budget_gb", self._config["memory_budget_gb"])
        options["time_budget_s"] = _budget(data, "time_budget_s", self._config["time_budget_s"])
        ensemble = _option(data, "spacing_ensemble", False)
        try:
            options["spacing_ensemble"] = ensemble if isinstance(ensemble, bool) else str2bool(str(ensemble).strip())
        except ValueError:
            raise HTTPException(400, f"spacing_ensemble {data.get('spacing_ensemble')!r} is not true or false.") from None
        return options

    # --- the pipeline ---------------------------------------------------------------------------
    def pre_transforms(self, data=None) -> Sequence[Callable]:
        """The bundle's ``preprocessing`` (load, orient, resample to the working spacing, z-score)."""
        options = self.spacing_options(data)
        policy = "native" if options["mode"] == "auto" else options["mode"]
        target = list(options["target"]) if options["target"] else None
        parser = self.bundle.parser("inference.json", spacing_policy=policy, target_spacing=target)
        preprocessing = parser.get_parsed_content("preprocessing")
        if options["mode"] == "auto":
            budget = BudgetSpacing(
                self.cost(data["device"]),
                self.trained_range,
                time_budget_s=options["time_budget_s"],
                memory_budget_gb=options["memory_budget_gb"],
                window=options["window"],
            )
            # this request's own parsed transform: no other request sees the policy
            parser.get_parsed_content("resample").policy = budget
        data[_PRE] = preprocessing
        return preprocessing.transforms

    def run_pre_transforms(self, data: dict, transforms):
        try:
            return super().run_pre_transforms(data, transforms)
        except HTTPException:
            raise
        except Exception as e:
            if isinstance(_root_cause(e), ClickError):
                raise HTTPException(400, str(_root_cause(e))) from None
            image = data.get("image_path") or data.get("image")
            if _failed_reading(e):
                raise HTTPException(
                    415,
                    f"{image!r} is not an image this server can read (NIfTI .nii/.nii.gz, NRRD .nrrd, MetaImage .mha/.mhd): "
                    f"{_root_message(e)}",
                ) from e
            # bad content (NaN voxels, a broken spacing, too few voxels) names the file and the value
            raise HTTPException(422, f"image {image!r} could not be read or prepared: {_root_message(e)}") from e

    def inferer(self, data=None):
        return self.bundle.parser("inference.json").get_parsed_content("inferer")

    def run_inferer(self, data: dict, convert_to_batch: bool = True, device: str = "cuda") -> dict:
        """The bundle's sliding-window inferer, told the working spacing explicitly."""
        network = self._get_network(device, data)
        inputs = data[self.input_key][None].to(device)
        spacing = torch.as_tensor(data["spacing"], dtype=torch.float32)[None].to(device)
        options = self.spacing_options(data)
        shape = tuple(inputs.shape[2:])
        window = options["window"]
        if window == "auto":
            budget = options["memory_budget_gb"] * 1e9 if options["memory_budget_gb"] > 0 else None
            window = self.cost(device).choose_window(shape, budget)
        inferer = self.inferer(data)
        if window == "whole":
            divisor = int(getattr(network.layout, "divisor", 1) or 1)
            inferer.roi_size = tuple(-(-s // divisor) * divisor for s in shape)
        data[_WINDOW] = window
        extra = {}
        if options["spacing_ensemble"]:
            # looks at the working spacing and 1.25x / 1.5x of it, in the trained range; the
            # output is log(mean probability), which the way back's softmax turns into the mean
            inferer = SpacingEnsembleInferer(inferer, DEFAULT_FACTORS, self.trained_range, disagreement=False)
            extra["report"] = data[_ENSEMBLE] = {}
        # bf16, as UNetEngine's compiled path: one autocast dtype for the whole forward
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=str(device).startswith("cuda")):
            outputs = inferer(inputs, network, spacing=spacing, **extra)
        # probabilities go back to the CPU: the inversion to the native grid needs no GPU memory
        data[self.output_label_key] = outputs[0].float().cpu()
        return data

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return [
            # softmax, linear back to the native grid and orientation, argmax: fused, so that the
            # class probabilities are never held on the native grid
            NativeLabelsd(keys="pred", transform=data[_PRE], orig_keys="image"),
            SqueezeDimd(keys="pred", dim=0),
        ]

    def writer(self, data: dict, extension=None, dtype=None):
        extension = extension or data.get("result_extension") or ".nii.gz"
        if str(extension).lower() in (".nii", ".nii.gz") and data.get("result_write_to_file", True):
            # MONAI Label writes NIfTI through ITK at its own gzip level; ours is atomic and fast
            level = _budget(data, "result_compress_level", 1)
            if level not in range(10):
                raise HTTPException(400, f"result_compress_level {data.get('result_compress_level')!r} must be a gzip level from 0 to 9.")
            label = tempfile.NamedTemporaryFile(suffix=str(extension), delete=False).name
            write_label(data["pred"], label, compresslevel=int(level), dtype=dtype or data.get("result_dtype") or "uint8")
            result = dict(data.get(self.output_json_key) or {})
        else:
            label, result = super().writer(data, extension, dtype)
        image = data[self.input_key]
        decision = data.get("spacing_decision", {})
        result["spacing_policy"] = self.spacing_options(data)["mode"]
        result["native_spacing_mm"] = [round(float(s), 4) for s in data["pred"].pixdim]
        result["working_spacing_mm"] = [round(float(s), 4) for s in data["spacing"]]
        result["working_shape"] = list(image.shape[1:])
        result["window"] = data[_WINDOW]
        # outside the trained range (possible in native and target modes) the generated weights
        # extrapolate: say so, with the range
        result["extrapolated"] = not self.trained_range.contains(result["working_spacing_mm"])
        result["trained_spacing_range_mm"] = self.trained_range.to_string()
        if _ENSEMBLE in data:
            result["spacing_ensemble"] = data[_ENSEMBLE]
        if "predicted_seconds" in decision:
            result["auto"] = {k: v for k, v in decision.items() if k not in ("policy", "native_spacing")}
        return label, result

    def __call__(self, request, callbacks=None):
        device = name_to_device(request.get("device") or self._config["device"])
        request = {**request, _START: time.perf_counter()}
        try:
            with measure(device) as m:
                label, result = super().__call__(request, callbacks)
        except HTTPException:
            raise
        except Exception as e:
            raise HTTPException(500, f"{self.bundle.name} failed on image {request.get('image')!r}: {_root_message(e)}") from e
        result.update(m.as_dict())
        return label, result

    # --- the network and its cost ------------------------------------------------------------
    def _get_network(self, device, data):
        """The bundle's network with the newest checkpoint; reloaded when the file changes."""
        path = self.bundle.path
        if not os.path.isfile(path):
            raise HTTPException(
                409,
                f"model '{self.bundle.name}' has no trained weights yet (expected {path}). Train it first "
                f"(Slicer: Train; REST: POST /train/{self.bundle.name}) or copy a checkpoint there.",
            )
        mtime = os.stat(path).st_mtime
        with self._lock:
            cached = self._networks.get(device)
            if cached and cached[1] == mtime:
                return cached[0]
            try:
                state = torch.load(path, map_location=device, weights_only=True)
                if isinstance(state, dict) and isinstance(state.get("model"), dict):
                    state = state["model"]
                # the primary network the checkpoint was trained with (unet, sdn_unet)
                overrides = self.bundle.network_overrides(state) if isinstance(state, dict) else {}
                network = self.bundle.build_network(device, **overrides)
                network.load_state_dict(state)
            except Exception as e:  # a truncated or foreign file: unpickling and loading raise many types
                problem = f"checkpoint {path} of '{self.bundle.name}' cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                if cached:
                    # keep answering with the model that loaded last; a fixed file is picked up by its new mtime
                    logger.error(f"{problem}; still serving the checkpoint loaded before.")
                    self._networks[device] = (cached[0], mtime)
                    return cached[0]
                raise HTTPException(409, f"{problem}. Train the model again or copy a valid checkpoint there.") from None
            network.eval()
            # cached weights per spacing, and on CUDA a compiled bf16 forward (--conf compile)
            network = UNetEngine(network, compile=self.bundle.compile)
            logger.info(
                f"Loaded checkpoint {path} for {self.bundle.name} on {device} "
                f"({type(network.network).__name__}{', ' + str(overrides) if overrides else ''}; compile: {self.bundle.compile})"
            )
            self._networks[device] = (network, mtime)
            self._costs.pop(device, None)
            return network

    def warmup(self, device: str | torch.device) -> bool:
        """Load the checkpoint and run one sliding window, paying a compilation at start-up.

        Returns False (and does nothing) when the model has no checkpoint yet.
        """
        if not self.trained:
            return False
        network = self._get_network(device, None)
        spacing = self.trained_range.clamp([1.5] * self.trained_range.spatial_dims)
        with torch.no_grad():
            network(torch.zeros(1, self.in_channels, *self.roi_size, device=device), torch.tensor([spacing], device=device))
        return True

    def cost(self, device: str) -> InferenceCost:
        """The cost model of this network on ``device``, calibrated once per checkpoint."""
        network = self._get_network(device, None)
        mtime = self._networks[device][1]
        with self._lock:
            cached = self._costs.get(device)
            if cached and cached[0] == mtime:
                return cached[1]
            spacing = self.trained_range.clamp([1.5] * self.trained_range.spatial_dims)
            cost = InferenceCost.calibrate(network, self.roi_size, self.overlap, self.in_channels, self.bundle.spec.num_classes, spacing, device)
            self._costs[device] = (mtime, cost)
            return cost


class HyperSpaceInteractive(HyperSpaceSegmentation):
    """Click-guided segmentation (MONAI Label's ``deepedit`` type) with the same spacing options.

    Without clicks the model segments on its own; with clicks it refines. Clicks arrive as in
    MONAI's DeepEdit: one request entry per label name (background included) holding ``[[i, j, k],
    ...]``, voxel indices of the image as stored, e.g. ``{"tumour_core": [[120, 98, 77]],
    "background": [[40, 60, 70]]}``. They are mapped exactly onto the working grid and drawn as
    Gaussians of a fixed width in mm (:class:`custom_networks.pipeline.interactive.ClickGuidanced`), so a
    click means the same at every working spacing. A click that is not three numbers or lies
    outside the image is an HTTP 400 naming it. The result's JSON adds ``clicks`` (number per label).
    """

    infer_type = InferType.DEEPEDIT

    def task_labels(self) -> dict[str, int]:
        # DeepEdit's convention: background is a label too, it takes clicks
        return dict(self.bundle.spec.label_names)

    def describe(self) -> str:
        return f"Click-guided (DeepEdit-style): {self.bundle.description} No clicks: automatic segmentation; clicks refine it."

    def writer(self, data: dict, extension=None, dtype=None):
        label, result = super().writer(data, extension, dtype)
        guidance = data.get("guidance") or {}
        result["clicks"] = {name: len(json.loads(g) if isinstance(g, str) else g) for name, g in guidance.items()}
        return label, result
