"""HyperSpace for 3D Slicer: the bundles of ``bundles/`` served by MONAI Label.

Start (from the repository root, with the project's environment active)::

    python -m monailabel.main start_server --app monailabel_app --studies /path/to/images --conf models all

``--conf`` options (all optional):

- ``models``: ``all`` or comma-separated bundle folder names, e.g. ``brats_mri_tumour_segmentation``.
- ``bundles_dir``: folder of bundles; default the repository's ``bundles/``.
- ``model_dir``: where checkpoints are read and (by training) written, as ``<model_dir>/<bundle>.pt``;
  default each bundle's own ``models/model.pt``, the file ``python -m monai.bundle run training`` writes.
- ``bundle_overrides``: a JSON object of config overrides applied to every bundle's configs, as on
  the bundle command line, e.g. ``'{"patch_size": [64, 64, 64], "num_workers": 0}'``.
- ``compile``: ``auto`` (default: ``torch.compile`` the generated UNets on CUDA), ``true``, ``false``.
- ``warmup``: ``true`` loads every trained model at start-up and runs one window on the first
  device, so that loading and compilation are paid before the first request (default ``false``).
- ``scoring_model``: the segmentation model whose spacing disagreement ranks the unlabelled images
  (default: the first served bundle).
- ``scoring_max_samples``: images one scoring run scores at most (default ``0``: all).

Each bundle is one model (its folder name) with a segmentation infer task and a train task, and,
where the bundle has ``configs/*_interactive.json``, a click-guided model ``<bundle>_interactive``
(MONAI Label's ``deepedit`` type) with its own infer and train tasks and checkpoint, and where it
has ``configs/*_occupancy.json`` (BraTS), ``<bundle>_occupancy``: the occupancy decoder, which
encodes at a coarse spacing and writes the label at the image's own resolution. The
active-learning strategies are ``random``, ``first`` (first unlabelled image by id) and
``spacing_disagreement`` (highest score of the scoring method of that name, which MONAI Label runs
in the background after every training and ``next_sample`` while
``MONAI_LABEL_AUTO_UPDATE_SCORING`` is on, its default; see :mod:`lib.scoring`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.activelearning.epistemic import Epistemic
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.utils.others.generic import device_list, name_to_device

import custom_networks
from lib.configs import HyperSpaceConfig, bundle_variants, discover_bundles
from lib.scoring import SCORE_KEY, SpacingDisagreementScoring

logger = logging.getLogger(__name__)


class HyperSpaceApp(MONAILabelApp):
    """The MONAI Label app: every requested bundle as a model with spacing-adaptive inference and training."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        conf = conf or {}
        bundles_dir = conf.get("bundles_dir") or os.path.join(os.path.dirname(os.path.abspath(app_dir)), "bundles")
        try:
            overrides = json.loads(conf.get("bundle_overrides") or "{}")
        except json.JSONDecodeError as e:
            raise ValueError(f"--conf bundle_overrides {conf.get('bundle_overrides')!r} is not JSON: {e}") from None
        if not isinstance(overrides, dict):
            raise ValueError(f"--conf bundle_overrides must be a JSON object such as '{{\"num_workers\": 0}}'; got {overrides!r}.")
        model_dir = conf.get("model_dir") or None
        if model_dir:
            os.makedirs(model_dir, exist_ok=True)
        self.models: dict[str, HyperSpaceConfig] = {}
        for name, path in discover_bundles(bundles_dir, conf.get("models", "all")).items():
            for variant in ["", *bundle_variants(path)]:
                model = f"{name}_{variant}" if variant else name
                config = HyperSpaceConfig()
                config.init(model, model_dir, conf, None, bundle_path=path, overrides=overrides, variant=variant)
                self.models[model] = config
        logger.info(f"Serving bundles {list(self.models)} from {bundles_dir}; checkpoints {[c.path for c in self.models.values()]}")
        _check_train_requests()
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="HyperSpace",
            description="Spacing-adaptive segmentation: one model per structure set, run at any voxel spacing.",
            version=custom_networks.__version__,
        )

    def init_infers(self):
        infers = {name: config.infer() for name, config in self.models.items()}
        # MONAI Label runs each training in a subprocess that builds the app again
        # (``python -m monailabel.interfaces.utils.app``): warm up in the server only
        in_server = not any("monailabel/interfaces/utils/app" in a.replace(os.sep, "/") for a in sys.argv[:1])
        if in_server and str(self.conf.get("warmup", "false")).strip().lower() in ("true", "1", "yes"):
            device = name_to_device(device_list()[0])
            for name, task in infers.items():
                started = time.time()
                if task.warmup(device):
                    logger.info(f"Warmed up {name} on {device} in {time.time() - started:.1f} s")
        return infers

    def init_trainers(self):
        return {name: config.trainer() for name, config in self.models.items()}

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        # MONAI Label lists NIfTI and NRRD; SPIDER (and many exports) are MetaImage
        extensions = list(dict.fromkeys([*settings.MONAI_LABEL_DATASTORE_FILE_EXT, "*.mha", "*.mhd"]))
        return LocalDatastore(
            self.studies,
            extensions=extensions,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_strategies(self):
        # MONAI Label's Epistemic strategy is "unlabelled image with the highest stored score, the
        # least recently served first among equals"; here on the spacing-disagreement score
        disagreement = Epistemic(key=SCORE_KEY, desc="Unlabelled image on which the model's looks at several spacings disagree most")
        return {"random": Random(), "first": First(), "spacing_disagreement": disagreement}

    def init_scoring_methods(self):
        segmentation = {name: task for name, task in self._infers.items() if not self.models[name].variant}
        model = self.conf.get("scoring_model") or next(iter(segmentation), None)
        if model is None:
            return {}
        try:
            scoring = SpacingDisagreementScoring(segmentation, model, self.conf.get("scoring_max_samples") or 0)
        except ValueError as e:
            raise ValueError(f"--conf scoring_model / scoring_max_samples: {e}") from None
        return {"spacing_disagreement": scoring}

    # MONAI Label turns its own exceptions into a bare "500 Internal Server Error"; the checks below
    # answer a wrong request with its status and a message that says what was wrong.
    def _check_model(self, model, tasks: dict, what: str) -> None:
        if model not in tasks:
            raise HTTPException(404, f"{what}: no model {model!r}; available: {', '.join(tasks) or 'none'}.")

    def infer(self, request, datastore: Datastore | None = None):
        self._check_model(request.get("model"), self._infers, "infer")
        image = request.get("image")
        if isinstance(image, str) and not os.path.exists(image):
            if not (datastore or self.datastore()).get_image_uri(image):
                raise HTTPException(404, f"infer: image {image!r} is not in the datastore ({self.studies}).")
        return super().infer(request, datastore)

    def train(self, request):
        self._check_model(request.get("model"), self._trainers, "train")
        return super().train(request)

    def next_sample(self, request):
        strategy = request.get("strategy") or "random"
        if strategy not in self._strategies:
            raise HTTPException(404, f"activelearning: no strategy {strategy!r}; available: {', '.join(self._strategies)}.")
        return super().next_sample(request)

    def check_train_request(self, model, params: dict, enqueue: bool = False) -> None:
        """Refuse a train request that cannot succeed: unknown model, a training already running
        (unless ``enqueue``), bad option, nothing labelled."""
        self._check_model(model, self._trainers, "train")
        task = running_training()
        if task is not None and not enqueue:
            running = task.get("request", {}).get("model") or "a model"
            state = "running (started" if task.get("status") == "RUNNING" else "starting or queued (submitted"
            raise HTTPException(
                409,
                f"train {model}: training of {running} is already {state} {task.get('start_ts')}, task {task.get('id')}); "
                "wait for it to end (GET /train/) or stop it with DELETE /train/, or send this request with ?enqueue=true "
                "to run it after that one.",
            )
        try:
            self._trainers[model].options({**self._trainers[model].config(), **(params or {})})
        except ValueError as e:
            raise HTTPException(400, f"train {model}: {e}") from None
        if not self.datastore().get_labeled_images():
            raise HTTPException(409, f"train {model}: no labelled images in the datastore ({self.studies}); save at least one label first.")


def running_training(stale_after_s: float = 60.0) -> dict | None:
    """MONAI Label's train task (its task dict) that is running or waiting to start; None if none.

    MONAI Label runs train tasks one at a time, in the server's one train thread: a task is
    ``SUBMITTED`` from the request until its subprocess starts, then ``RUNNING`` while the
    subprocess (``monailabel.utils.async_tasks.utils.processes("train")``) is alive. Its own check
    looks at the subprocesses only, so a second request in the first one's ``SUBMITTED`` moment
    was queued silently behind it. A ``SUBMITTED`` task counts here while another one runs (it is
    queued) or for ``stale_after_s`` after its submission (it is starting); after that, with
    nothing running, its start failed in MONAI Label's thread and it never will start.
    """
    from monailabel.utils.async_tasks.utils import processes, tasks

    running, submitted = processes("train"), tasks("train")
    for task in submitted:
        if task.get("id") in running:
            return task
    for task in submitted:
        if task.get("status") == "SUBMITTED":
            try:
                age = time.time() - time.mktime(time.strptime(task.get("start_ts", ""), "%Y-%m-%d %H:%M:%S"))
            except ValueError:
                age = 0.0
            if running or age < stale_after_s:
                return task
    return None


def _check_train_requests() -> None:
    """Answer a train request that cannot succeed with a 4xx before MONAI Label starts it.

    MONAI Label starts training in a subprocess and answers 200 at once, so a request with nothing
    labelled or a bad option would only show up later as a failed task, and a second request while
    a training starts was queued silently (once it runs, MONAI Label answers 429 "Train Task is
    Already Running", without saying which). Its endpoint has no hook,
    so its ``run_model`` is wrapped, once per server process, to call
    :meth:`HyperSpaceApp.check_train_request` first.
    """
    import monailabel.endpoints.train as endpoint
    from monailabel.interfaces.utils.app import app_instance

    if getattr(endpoint.run_model, "checks_request", False):
        return
    run_model = endpoint.run_model

    def checked_run_model(model, params=None, run_sync=False, enqueue=False):
        check = getattr(app_instance(), "check_train_request", None)
        if check is not None:
            # run_sync trains in the server process itself: never beside another training
            check(model, params, enqueue=bool(enqueue) and not run_sync)
        return run_model(model, params, run_sync, enqueue)

    checked_run_model.checks_request = True
    endpoint.run_model = checked_run_model
