"""Click-guided (DeepEdit-style) HyperSpace: guidance channels placed in physical space.

As in MONAI's DeepEdit, the network reads the image plus one guidance channel per label
(background included); a click is a Gaussian blob in its label's channel. Training simulates clicks
with MONAI's own ``monai.apps.deepedit`` transforms and its ``Interaction`` handler. What they lack
for a spacing-adaptive model, and what this module adds:

- the Gaussian's width is given in millimetres (:class:`AddGuidanceSignalMMd`): at 3 mm a click is
  a blob of 1 voxel sigma where at 1 mm it spans 3, so a click means the same thing at every
  working spacing;
- clicks from 3D Slicer (voxel indices ``[i, j, k]`` of the image as stored) are mapped onto the
  working grid through the affines (:class:`ClickGuidanced`), exactly also for anisotropic images
  and after reorientation; DeepEdit's ``AddGuidanceFromPointsDeepEditd`` and
  ``ResizeGuidanceMultipleLabelDeepEditd`` scale indices by the shape ratio, which ignores where
  the resampled grid's first voxel lies;
- image patches of random spacings keep per-sample guidance whatever labels a patch holds
  (:class:`InitialClickGuidanced`): DeepEdit's seed transform fails on a label absent from a
  patch, which is the rule for multi-structure data cut into patches.

Spacings are mm per axis in tensor axis order; images are channel-first ``(C, X, Y, Z)``.
"""

from __future__ import annotations

import copy

import json
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.apps.deepedit.interaction import Interaction
from monai.apps.deepedit.transforms import (
    AddGuidanceSignalDeepEditd,
    AddInitialSeedPointDeepEditd,
    AddRandomGuidanceDeepEditd,
    FindAllValidSlicesDeepEditd,
    FindDiscrepancyRegionsDeepEditd,
)
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import Activationsd, AsDiscreted, Compose, MapTransform, Randomizable, ToNumpyd, ToTensord

__all__ = [
    "AddGuidanceSignalMMd",
    "ClickError",
    "ClickGuidanced",
    "InitialClickGuidanced",
    "click_simulation",
    "interaction",
    "clicks_to_grid",
]


def _checked_label_names(label_names: Mapping[str, int] | None) -> dict[str, int]:
    names = dict(label_names or {})
    if list(names)[:1] != ["background"]:
        raise ValueError(f"label_names must map names to class indices, background first; got {label_names!r}.")
    return names


class ClickError(ValueError):
    """A click that is not ``D`` voxel indices of the image, or lies outside it."""


def _spacing_of(d: Mapping, image_key: str, spacing_key: str) -> tuple[float, ...]:
    image = d[image_key]
    dims = len(image.shape) - 1
    if spacing_key in d and d[spacing_key] is not None:
        return tuple(float(s) for s in torch.as_tensor(d[spacing_key]).reshape(-1)[:dims])
    if isinstance(image, MetaTensor):
        return tuple(float(s) for s in affine_to_spacing(image.affine, r=dims))
    raise ValueError(f"'{image_key}' has no spacing: expected a '{spacing_key}' entry (mm) or a MetaTensor with an affine.")


def _points(x, dims: int = 3) -> list[list[float]]:
    """The clicks in DeepEdit guidance of any nesting (its seed transform returns ``(1, N, 4)``,
    a debug value before the indices), without DeepEdit's ``-1`` placeholders."""
    x = json.loads(x) if isinstance(x, str) else x
    x = x.tolist() if isinstance(x, (np.ndarray, torch.Tensor)) else x
    if x is None or len(x) == 0:
        return []
    if all(not isinstance(v, (list, tuple)) for v in x):
        return [] if any(float(v) < 0 for v in x[-dims:]) else [[float(v) for v in x]]
    return [p for v in x for p in _points(v, dims)]


def _encode(guidance: Mapping[str, Any], label_names: Sequence[str]) -> dict[str, str]:
    """Guidance as flat JSON lists of ``[i, j, k]`` clicks in label order: collates into batches of
    any size (lists of clicks differ in length between samples), and DeepEdit's transforms read it
    back. DeepEdit's debug value before the indices (a distance, -1 on a slice without
    background) would make its signal transform skip the click."""
    return {name: json.dumps([[int(round(v)) for v in p[-3:]] for p in _points(guidance.get(name, []))]) for name in label_names}


class AddGuidanceSignalMMd(AddGuidanceSignalDeepEditd):
    """DeepEdit's guidance channels with the Gaussian's width in millimetres.

    The image keeps its first ``number_intensity_ch`` channels and gets one channel per label of
    ``d[guidance]`` (in that dict's order): a Gaussian of ``sigma_mm`` around each click, scaled to
    a peak of 1; zeros for a label without clicks. Per axis the width in voxels is
    ``sigma_mm / spacing``, the spacing taken from ``d[spacing_key]`` or the image's affine.

    Args:
        keys: the image key (``"image"``).
        guidance: key of ``{label name: clicks}``; clicks are ``[..., i, j, k]`` voxel indices of
            the current grid (DeepEdit's format, a JSON string or a list).
        sigma_mm: the Gaussian's standard deviation in mm.
        label_names: if given, the guidance is rewritten in this order with a (possibly empty)
            entry per label, as JSON strings, so that the channel count never varies.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        guidance: str = "guidance",
        sigma_mm: float = 3.0,
        spacing_key: str = "spacing",
        number_intensity_ch: int = 1,
        label_names: Mapping[str, int] | None = None,
        allow_missing_keys: bool = False,
    ):
        if not float(sigma_mm) > 0:
            raise ValueError(f"sigma_mm must be a positive width in mm, got {sigma_mm!r}.")
        super().__init__(keys, guidance=guidance, sigma=1, number_intensity_ch=number_intensity_ch, allow_missing_keys=allow_missing_keys)
        self.sigma_mm = float(sigma_mm)
        self.spacing_key = spacing_key
        self.label_names = dict(label_names) if label_names is not None else None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.label_names is not None:
            d[self.guidance] = _encode(d.get(self.guidance) or {}, list(self.label_names))
        for key in self.key_iterator(d):
            # the parent reads its Gaussian width from self.sigma: set it on a copy for this
            # sample's spacing, so that threads sharing this instance never see another's width
            worker = copy.copy(self)
            worker.sigma = tuple(self.sigma_mm / s for s in _spacing_of(d, key, self.spacing_key))
            was_tensor = isinstance(d[key], torch.Tensor)
            d = super(AddGuidanceSignalMMd, worker).__call__(d)
            if was_tensor and not isinstance(d[key], torch.Tensor):  # the parent concatenates in numpy
                d[key] = torch.as_tensor(d[key])
        return d


class InitialClickGuidanced(Randomizable, MapTransform):
    """First simulated clicks of a training sample and their guidance channels.

    MONAI DeepEdit's ``FindAllValidSlicesDeepEditd`` and ``AddInitialSeedPointDeepEditd``: clicks
    inside each label present in the sample (connected regions of a random slice along the last
    axis); a label absent from the patch gets no click (DeepEdit's seed transform would fail on
    it). Then :class:`AddGuidanceSignalMMd`. Stores ``label_names`` for the click simulation.

    Args:
        keys: ``"label"`` (the label map of class indices, ``(1, X, Y, Z)``).
        label_names: ``{name: class index}``, background first (``DatasetSpec.label_names``).
        sigma_mm: width of a click's Gaussian (mm).
        image_key: the image that receives the guidance channels.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        label_names: Mapping[str, int] | None = None,
        sigma_mm: float = 3.0,
        image_key: str = "image",
        guidance: str = "guidance",
        spacing_key: str = "spacing",
        number_intensity_ch: int = 1,
    ):
        super().__init__(keys)
        self.label_names = _checked_label_names(label_names)
        self.guidance = guidance
        self.find_slices = FindAllValidSlicesDeepEditd(keys="label", sids="sids")
        self.seed = AddInitialSeedPointDeepEditd(keys="label", guidance=guidance, sids="sids")
        self.signal = AddGuidanceSignalMMd(
            image_key, guidance, sigma_mm, spacing_key, number_intensity_ch, label_names=self.label_names
        )

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.seed.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            # DeepEdit's transforms read the label under "label" and as a numpy array
            work = {"label": np.asarray(d[key]), "label_names": self.label_names}
            work = self.find_slices(work)
            work["sids"] = {k: v for k, v in work["sids"].items() if len(v)}
            work = self.seed(work) if work["sids"] else {**work, self.guidance: {}}
            d[self.guidance] = work[self.guidance]
            d["label_names"] = self.label_names
            d = self.signal(d)
        return d


def click_simulation(label_names: Mapping[str, int], sigma_mm: float = 3.0, number_intensity_ch: int = 1) -> Compose:
    """The transforms MONAI's DeepEdit ``Interaction`` runs per sample between click rounds.

    The prediction becomes a label map, DeepEdit finds the false-negative and false-positive
    regions per label and clicks in them (``FindDiscrepancyRegionsDeepEditd``,
    ``AddRandomGuidanceDeepEditd``), and the guidance channels are redrawn in mm
    (:class:`AddGuidanceSignalMMd`).
    """
    return Compose(
        [
            Activationsd(keys="pred", softmax=True),
            AsDiscreted(keys="pred", argmax=True),
            ToNumpyd(keys=("image", "label", "pred")),
            FindDiscrepancyRegionsDeepEditd(keys="label", pred="pred", discrepancy="discrepancy"),
            AddRandomGuidanceDeepEditd(keys="NA", guidance="guidance", discrepancy="discrepancy", probability="probability"),
            AddGuidanceSignalMMd(
                "image", "guidance", sigma_mm, number_intensity_ch=number_intensity_ch, label_names=dict(label_names)
            ),
            ToTensord(keys=("image", "label")),
        ]
    )


def interaction(
    label_names: Mapping[str, int],
    sigma_mm: float = 3.0,
    deepgrow_probability: float = 0.5,
    max_interactions: int = 1,
    train: bool = True,
) -> Interaction:
    """MONAI's DeepEdit ``Interaction`` (the engines' ``iteration_update``) with :func:`click_simulation`.

    With probability ``deepgrow_probability`` an iteration simulates ``max_interactions`` rounds
    of clicks on the current prediction's errors; otherwise the guidance channels are zeroed, so
    the model also learns to segment without clicks. Use it with
    :class:`~custom_networks.pipeline.batching.PrepareBatchSpacingAffine` and
    :class:`~custom_networks.pipeline.batching.SpacingInferer`: the handler unpacks ``prepare_batch`` into two
    values and calls ``inferer(inputs, network)``.
    """
    return Interaction(
        deepgrow_probability=deepgrow_probability,
        transforms=click_simulation(label_names, sigma_mm),
        train=train,
        label_names=dict(label_names),
        max_interactions=max_interactions,
    )


def clicks_to_grid(points: Sequence[Sequence[float]], source_affine, target_affine, target_shape: Sequence[int]) -> list[list[int]]:
    """Voxel indices on one grid -> nearest voxel indices on another, through world coordinates.

    Args:
        points: ``[[i, j, k], ...]`` on the source grid (the image as stored).
        source_affine, target_affine: ``(D+1, D+1)`` voxel-to-world matrices (mm).
        target_shape: spatial shape of the target grid; points are clipped into it.

    Returns:
        ``[[i, j, k], ...]`` on the target grid (rounded to the nearest voxel).
    """
    src = np.asarray(source_affine, dtype=np.float64)
    tgt = np.asarray(target_affine, dtype=np.float64)
    dims = src.shape[0] - 1
    pts = np.asarray(points, dtype=np.float64).reshape(-1, dims)
    world = src @ np.concatenate([pts, np.ones((len(pts), 1))], axis=1).T
    index = (np.linalg.inv(tgt) @ world)[:dims].T
    index = np.clip(np.round(index), 0, np.asarray(target_shape) - 1)
    return index.astype(int).tolist()


class ClickGuidanced(MapTransform):
    """Clicks from 3D Slicer (DeepEdit's request format) -> guidance channels on the working grid.

    The request holds, per label name, a list of ``[i, j, k]`` voxel indices of the image as
    stored (``d[name]``, e.g. ``{"tumour_core": [[120, 98, 77]], "background": []}``). Each click is
    mapped exactly through world coordinates from the image as loaded (``meta["original_affine"]``)
    to the current grid (``image.affine``, after reorientation and resampling to the working
    spacing), then drawn by :class:`AddGuidanceSignalMMd`. Without clicks every guidance channel is
    zero: the model segments on its own.

    Args:
        keys: the image key.
        label_names: ``{name: class index}``, background first; one guidance channel each.
        sigma_mm: width of a click's Gaussian (mm).

    Raises:
        ClickError: (a ``ValueError``) naming the label and click, for a click that is not ``D``
            numbers or lies outside the image as stored.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        label_names: Mapping[str, int] | None = None,
        sigma_mm: float = 3.0,
        guidance: str = "guidance",
        spacing_key: str = "spacing",
        number_intensity_ch: int = 1,
    ):
        super().__init__(keys)
        self.label_names = _checked_label_names(label_names)
        self.guidance = guidance
        self.signal = AddGuidanceSignalMMd(keys, guidance, sigma_mm, spacing_key, number_intensity_ch, label_names=self.label_names)

    def clicks(self, d: Mapping, key: Hashable) -> dict[str, list[list[int]]]:
        """The request's clicks per label, on the current grid of ``d[key]``."""
        image = d[key]
        dims = len(image.shape) - 1
        original = image.meta.get("original_affine", image.affine) if isinstance(image, MetaTensor) else None
        current = image.affine if isinstance(image, MetaTensor) else None
        stored_shape = [int(s) for s in np.asarray(image.meta.get("spatial_shape", image.shape[1:])).reshape(-1)[:dims]] if isinstance(image, MetaTensor) else list(image.shape[1:])
        out: dict[str, list[list[int]]] = {}
        for name in self.label_names:
            points = d.get(name) or []
            try:
                points = json.loads(points) if isinstance(points, str) else points
            except json.JSONDecodeError:
                points = None
            if not isinstance(points, (list, tuple)):
                raise ClickError(f"clicks for label '{name}' must be a list of [i, j, k] voxel indices, got {d.get(name)!r}.")
            checked = []
            for p in points:
                try:
                    q = [float(v) for v in p]
                except (TypeError, ValueError):
                    q = []
                if len(q) != dims or not all(np.isfinite(q)):
                    raise ClickError(f"click {p!r} for label '{name}' must be {dims} voxel indices [i, j, k] of the image.")
                if any(v < -0.5 or v > s - 0.5 for v, s in zip(q, stored_shape)):
                    raise ClickError(f"click {p!r} for label '{name}' lies outside the image of {stored_shape} voxels.")
                checked.append(q)
            if checked and original is not None:
                checked = clicks_to_grid(checked, original, current, image.shape[1:])
            out[name] = [[int(round(v)) for v in q] for q in checked]
        return out

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.guidance] = self.clicks(d, key)
            d = self.signal(d)
        return d
