"""Active learning without dropout: how much one HyperSpace model disagrees with itself across spacings.

The scoring method runs the served segmentation model's spacing ensemble (the infer option
``spacing_ensemble``: looks at the working spacing and at 1.25x and 1.5x of it, see
:mod:`custom_networks.pipeline.ensemble`) on each unlabelled image and stores the image score,
the looks' mean mutual information over the foreground in nats, in the datastore as the image's
info ``spacing_disagreement``. The strategy of the same name (MONAI Label's ``Epistemic`` on that
key) then offers the unlabelled image with the highest score as the next sample.

MONAI Label's own ``EpistemicScoring`` needs a dropout network and many forward passes at full
resolution; here three looks of one deterministic model, two of them coarser (about 0.8x the
voxels of the first together), give the uncertainty.

Stored per image (``datastore.update_image_info``):

- ``spacing_disagreement``: the score (float, >= 0; ``-1`` when the image could not be segmented,
  so that it is offered last);
- ``spacing_disagreement_meta``: ``{"model", "checkpoint", "mtime_ns"}`` of the checkpoint that
  scored it, plus ``"spacings"`` and ``"seconds_per_look"`` of its looks, or ``"error"``.

An image already scored by the same model's same checkpoint file (path and modification time) is
skipped, so repeated runs (MONAI Label starts one after every training and every ``next_sample``
while ``MONAI_LABEL_AUTO_UPDATE_SCORING`` is on) only score what is new. Images never scored come
before images scored by an older checkpoint; ``max_samples`` bounds one run.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from fastapi import HTTPException
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

if TYPE_CHECKING:
    from ..infers import HyperSpaceSegmentation

logger = logging.getLogger(__name__)

SCORE_KEY = "spacing_disagreement"
META_KEY = SCORE_KEY + "_meta"
UNSCORABLE = -1.0  # below every mutual information: an image the model cannot segment is offered last


def _max_samples(value) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if isinstance(value, bool) or number < 0 or number != int(number):
        raise ValueError(f"max_samples {value!r} must be a whole number >= 0 (0: every unlabelled image).")
    return int(number)


class SpacingDisagreementScoring(ScoringMethod):
    """Score the unlabelled images by the spacing ensemble's disagreement (see the module docstring).

    Args:
        infers: segmentation model name -> its infer task (a
            :class:`~lib.infers.hyperspace.HyperSpaceSegmentation`).
        model: the model that scores by default; a request may name another with ``"model"``.
        max_samples: images scored per run by default (``0``: all); a request may set ``"max_samples"``.

    Request options (the JSON body of ``POST /scoring/spacing_disagreement``): ``model``,
    ``max_samples``, ``device``. Returns a summary ``{"model", "checkpoint", "total", "skipped",
    "executed", "failed", "seconds"}``.
    """

    def __init__(self, infers: dict[str, "HyperSpaceSegmentation"], model: str, max_samples: int = 0):
        if model not in infers:
            raise ValueError(f"model {model!r} is not a served segmentation model; available: {', '.join(infers) or 'none'}.")
        super().__init__(
            f"Spacing disagreement of {model} (mutual information between looks at 1x, 1.25x and 1.5x the working spacing); "
            "request options: model, max_samples, device"
        )
        self.infers = dict(infers)
        self.model = model
        self.max_samples = _max_samples(max_samples)

    def info(self):
        return {**super().info(), "model": self.model, "models": list(self.infers), "max_samples": self.max_samples}

    def __call__(self, request, datastore: Datastore):
        model = request.get("model") or self.model
        if model not in self.infers:
            raise ValueError(f"spacing_disagreement: no segmentation model {model!r}; available: {', '.join(self.infers)}.")
        max_samples = _max_samples(request.get("max_samples", self.max_samples))
        task = self.infers[model]
        started = time.perf_counter()
        images = datastore.get_unlabeled_images()
        summary = {"model": model, "checkpoint": task.bundle.path, "total": len(images), "skipped": 0, "executed": 0, "failed": 0}
        if not task.trained:
            logger.info(f"spacing_disagreement: {model} has no checkpoint at {task.bundle.path} yet; nothing scored.")
            return {**summary, "skipped": len(images), "seconds": 0.0}

        current = _checkpoint_key(model, task.bundle.path)
        never, stale = [], []
        for image_id in images:
            meta = datastore.get_image_info(image_id).get(META_KEY)
            if not isinstance(meta, dict):
                never.append(image_id)
            elif {k: meta.get(k) for k in current} == current:
                summary["skipped"] += 1
            else:
                stale.append(image_id)
        todo = never + stale
        todo = todo[:max_samples] if max_samples else todo
        logger.info(f"spacing_disagreement: {len(todo)} of {len(images)} unlabelled images to score with {model} "
                    f"({summary['skipped']} already scored by this checkpoint)")
        for i, image_id in enumerate(todo):
            # the checkpoint this image is scored with: a training may have replaced it meanwhile
            key = _checkpoint_key(model, task.bundle.path)
            info = self.score(task, datastore.get_image_uri(image_id), request.get("device"))
            score = info.pop("score")
            datastore.update_image_info(image_id, {SCORE_KEY: score, META_KEY: {**key, **info}})
            summary["failed" if "error" in info else "executed"] += 1
            logger.info(f"spacing_disagreement: {i + 1}/{len(todo)} {image_id}: {info.get('error') or f'score {score:.4f}'}")
        summary["seconds"] = round(time.perf_counter() - started, 3)
        logger.info(f"spacing_disagreement: {summary}")
        return summary

    @staticmethod
    def score(task: "HyperSpaceSegmentation", image: str, device: str | None = None) -> dict:
        """``{"score", "spacings", "seconds_per_look"}`` of the ensemble infer request on ``image``,
        or ``{"score": -1, "error"}`` when the request fails (unreadable file, NaN voxels, ...)."""
        request = {"image": image, "spacing_ensemble": True, "result_extension": ".nrrd", "result_write_to_file": False}
        if device:
            request["device"] = device
        try:
            _, result = task(request)
        except HTTPException as e:
            return {"score": UNSCORABLE, "error": f"{e.status_code}: {e.detail}"}
        looks = result["spacing_ensemble"]
        return {"score": float(looks["score"]), "spacings": looks["spacings"], "seconds_per_look": looks["seconds_per_look"]}


def _checkpoint_key(model: str, path: str) -> dict:
    return {"model": model, "checkpoint": os.path.abspath(path), "mtime_ns": os.stat(path).st_mtime_ns}
