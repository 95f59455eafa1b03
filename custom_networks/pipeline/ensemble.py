"""Spacing ensembles: one HyperSpace model looks at an image at several working spacings.

Each look resamples the z-scored native image to its working spacing with the pipeline's own
:class:`~custom_networks.pipeline.transforms.SpacingPolicyd`, runs the network there (weights made
for that spacing), and brings its class probabilities back to the native grid with
:func:`~custom_networks.pipeline.resample.resample_to_native` (linear, as ``Invertd`` does). The
looks are then combined per native voxel:

* the **label** is the arg-max of the mean probability (a test-time augmentation over spacings);
* the **disagreement** is the mutual information between the prediction and the look,
  ``H(mean_k p_k) - mean_k H(p_k)`` in nats (entropy of the mean minus the mean entropy), the
  "BALD" measure of Houlsby et al. (2011) with looks in place of dropout samples: 0 where all looks
  give the same probabilities, at most ``ln(K)`` for ``K`` looks;
* the **score** of the image is the mean disagreement over the voxels that the mean label or any
  look calls foreground (0 when there are none), so that a small unsure structure in a large
  image is not averaged away by its background.

Memory: two float32 volumes of ``classes x native voxels`` (the running sum and one look) plus
two of ``native voxels``; for a 2-class model on a 0.5 mm brain (57 M voxels) about 1.4 GB.
"""

from __future__ import annotations

import json
import math
import time
from typing import Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import MapTransform
from monai.utils import TraceKeys, str2bool

from ..spacing import SpacingRange, parse_spacing
from .chain import run_network
from .resample import resample_to_native
from .transforms import SpacingPolicyd

__all__ = [
    "DEFAULT_FACTORS",
    "SpacingEnsembleInferer",
    "SplitDisagreementd",
    "ensemble_inferer",
    "ensemble_spacings",
    "mutual_information",
    "spacing_ensemble",
]

#: Working spacings of the default ensemble, as multiples of the clamped native spacing: a 1.25x
#: and a 1.5x coarser look cost about 0.51x and 0.30x the voxels of the first.
DEFAULT_FACTORS = (1.0, 1.25, 1.5)


def ensemble_spacings(
    native: Sequence[float], trained_range: SpacingRange | dict | None = None, factors: Sequence[float] = DEFAULT_FACTORS
) -> list[tuple[float, ...]]:
    """The working spacings (mm, tensor axis order) of an ensemble for an image of spacing ``native``.

    Each is ``factor x`` the native spacing clamped to ``trained_range``, clamped again. A look that
    this clamping makes coincide (within 0.1 um) with an earlier one is taken at ``1 / factor``
    instead, finer: an image at or beyond the coarse end of the range would otherwise get a single
    look, and no disagreement, exactly where the model knows least (its finer looks see an
    interpolated image, blurrier than the model learnt for that spacing). A look that still
    coincides is left out. Spacings come in the order of ``factors``.

    Raises:
        ValueError: for an empty ``factors`` or a factor that is not a finite number > 0.
    """
    native = parse_spacing(list(native), len(native), what="image spacing")
    if isinstance(factors, (int, float)) or not len(factors):
        raise ValueError(f"factors must be a non-empty list of spacing multiples, e.g. [1, 1.25, 1.5]; got {factors!r}.")
    for f in factors:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f <= 0:
            raise ValueError(f"ensemble factor {f!r} must be a finite number > 0 (a multiple of the native spacing).")
    rng = None if trained_range is None else SpacingRange.from_config(trained_range)
    base = native if rng is None else rng.clamp(native)
    out: list[tuple[float, ...]] = []
    for f in factors:
        for multiple in (float(f), 1.0 / float(f)):
            s = tuple(round(float(b) * multiple, 4) for b in base)
            s = s if rng is None else tuple(float(v) for v in rng.clamp(s))
            if not any(np.allclose(s, o, rtol=0, atol=1e-4) for o in out):
                out.append(s)
                break
    return out


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Per-voxel entropy (nats) of probabilities ``(C, *spatial)``."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(0)


def mutual_information(mean_probs: torch.Tensor, mean_entropy: torch.Tensor) -> torch.Tensor:
    """``H(mean_probs) - mean_entropy`` per voxel (nats, >= 0).

    Args:
        mean_probs: ``(C, *spatial)``, the looks' mean class probabilities.
        mean_entropy: ``(*spatial)``, the mean of the looks' own entropies.
    """
    return (_entropy(mean_probs) - mean_entropy).clamp_min(0.0)


def _like(image: MetaTensor, x: torch.Tensor) -> MetaTensor:
    """``x`` ``(C', *spatial)`` with ``image``'s affine, metadata and applied operations."""
    out = MetaTensor(x, affine=image.affine.clone(), meta={k: v for k, v in image.meta.items() if k != "affine"})
    out.applied_operations = list(image.applied_operations)
    return out


def _run_looks(image: MetaTensor, spacings: Sequence[Sequence[float]], run) -> tuple[torch.Tensor, torch.Tensor, float, list]:
    """The looks of ``image`` ``(C_in, *shape)`` (a MetaTensor whose affine gives its spacing) and
    their combination on its own grid.

    Each look resamples ``image`` to spacing ``s`` with :meth:`SpacingPolicyd.resample` (the
    pipeline's one resampler), calls ``run(x, s)`` for the class scores ``(C, *look)`` there and
    brings their softmax back to ``image``'s grid. Returns the mean probabilities ``(C, *shape)``,
    the disagreement ``(*shape)`` (nats), the score (mean disagreement over the voxels that the
    mean or any look calls foreground; 0 without any) and the seconds per look.
    """
    shape = tuple(int(v) for v in image.shape[1:])
    resampler = SpacingPolicyd("image")  # resample() records on its output only; one per call anyway
    total = entropy = foreground = None
    seconds = []
    for s in spacings:
        start = time.perf_counter()
        x = resampler.resample(image, s)
        factor = x.applied_operations[-1][TraceKeys.EXTRA_INFO]["factor"]
        probs = torch.softmax(run(x, s).float(), 0)
        if not (all(float(f) == 1.0 for f in factor) and tuple(probs.shape[1:]) == shape):
            probs = resample_to_native(probs, factor, shape)
        if total is None:
            total, entropy, foreground = probs.clone(), _entropy(probs), probs.argmax(0) != 0
        else:
            total += probs
            entropy += _entropy(probs)
            foreground |= probs.argmax(0) != 0
        del probs, x
        seconds.append(round(time.perf_counter() - start, 3))
    mean = total / float(len(spacings))
    disagreement = mutual_information(mean, entropy / float(len(spacings)))
    foreground |= mean.argmax(0) != 0
    score = float(disagreement[foreground].mean()) if bool(foreground.any()) else 0.0
    return mean, disagreement, score, seconds


def spacing_ensemble(
    network: torch.nn.Module,
    image: MetaTensor,
    spacings: Sequence[Sequence[float]],
    window,
    device: str | torch.device = "cpu",
) -> dict:
    """Run ``network`` at each working spacing of ``spacings`` and combine the looks on the native grid.

    Args:
        network: called as ``network(x, spacing)`` through ``window`` (a HyperSpace network; a
            plain one gives the same weights at every spacing). Its weights per spacing are
            generated once and reused where the network caches them (eval mode, ``UNetEngine``).
        image: the z-scored native image ``(C_in, *native)``, a MetaTensor with its affine (mm), as
            the load and normalise steps of :func:`~custom_networks.pipeline.chain.spacing_steps`
            give it; its applied operations (e.g. reorientation) are kept on the outputs, so that
            the caller's load ``Compose`` can invert them.
        spacings: working spacings (mm, tensor axis order), e.g. from :func:`ensemble_spacings`.
        window: the sliding-window inferer (:func:`~custom_networks.pipeline.chain.inferer`).
        device: where the network runs; the combination runs on the CPU.

    Returns:
        ``{"label"``: ``(1, *native)`` uint8 MetaTensor, ``"disagreement"``: ``(1, *native)``
        float32 MetaTensor (nats), ``"score"``: float, ``"spacings"``: the spacings used,
        ``"seconds_per_look"``: resample + network + way back per look``}``.
    """
    if not isinstance(image, MetaTensor) or image.dim() < 2:
        raise ValueError(f"image must be a (C, *spatial) MetaTensor with its affine, got {type(image).__name__}.")
    spacings = [parse_spacing(list(s), image.dim() - 1, what="ensemble spacing") for s in spacings]
    if not spacings:
        raise ValueError("spacings is empty: give at least one working spacing (mm).")
    mean, disagreement, score, seconds = _run_looks(
        image, spacings, lambda x, s: run_network(network, window, {"image": x, "spacing": s}, device)
    )
    return {
        "label": _like(image, mean.argmax(0).to(torch.uint8)[None]),
        "disagreement": _like(image, disagreement.float()[None]),
        "score": score,
        "spacings": [list(s) for s in spacings],
        "seconds_per_look": seconds,
    }


class SpacingEnsembleInferer(Inferer):
    """A MONAI ``Inferer`` that runs a window inferer at several working spacings and averages them.

    The bundles' ``inference.json`` uses it with ``"spacing_ensemble"`` on: its input is the image
    on the working grid the spacing policy chose (spacing ``w``). Each look resamples that input to
    ``w * factor`` (clamped to ``trained_range``; the anti-aliased resampler of
    :class:`~custom_networks.pipeline.transforms.SpacingPolicyd`), runs ``window`` there and brings
    the probabilities back to the input's grid, where the looks are combined as in
    :func:`spacing_ensemble`. The output is ``log(mean probability)`` per class, so that the
    softmax of the way back (:class:`~custom_networks.pipeline.transforms.NativeLabelsd`) gives
    the mean probability itself, and with ``disagreement=True`` one more channel, the mutual
    information (nats), for :class:`SplitDisagreementd`.

    Args:
        window: the inferer of one look (e.g. :class:`~custom_networks.SpacingSlidingWindowInferer`),
            called as ``window(x, network, spacing=...)``.
        factors: multiples of the working spacing, e.g. :data:`DEFAULT_FACTORS`.
        trained_range: the model's :class:`~custom_networks.spacing.SpacingRange` (``None``: no clamping).
        disagreement: append the disagreement channel.

    Shapes: ``inputs`` ``(1, C_in, *working)``, ``spacing`` ``(1, D)`` or ``(D,)`` mm; output
    ``(1, classes (+1), *working)``. One image per call (the bundles' batch size).
    """

    def __init__(self, window, factors: Sequence[float] = DEFAULT_FACTORS, trained_range=None, disagreement: bool = True):
        super().__init__()
        ensemble_spacings((1.0,), None, factors)  # checks the factors now, before any image
        self.window = window
        self.factors = tuple(float(f) for f in factors)
        self.trained_range = None if trained_range is None else SpacingRange.from_config(trained_range)
        self.disagreement = bool(disagreement)

    def __call__(self, inputs: torch.Tensor, network, *args, spacing=None, report: dict | None = None, **kwargs) -> torch.Tensor:
        """``report``: a dict of the caller's, filled with ``"spacings"``, ``"seconds_per_look"``
        and the image ``"score"`` (nothing is kept on the inferer)."""
        if inputs.dim() < 3 or inputs.shape[0] != 1:
            raise ValueError(f"SpacingEnsembleInferer takes one image (1, C, *spatial), got shape {tuple(inputs.shape)}.")
        dims = inputs.dim() - 2
        if spacing is None:
            raise ValueError("SpacingEnsembleInferer needs the working spacing: call it with spacing=(1, D) mm.")
        working = tuple(float(v) for v in torch.as_tensor(spacing, dtype=torch.float64).reshape(-1, dims)[0])
        src = inputs[0].as_tensor() if isinstance(inputs, MetaTensor) else inputs[0]
        image = MetaTensor(src, affine=torch.diag(torch.tensor([*working, 1.0], dtype=torch.float64)))
        spacings = ensemble_spacings(working, self.trained_range, self.factors)

        def run(x: MetaTensor, s) -> torch.Tensor:
            s_tensor = torch.tensor([s], dtype=torch.float32, device=src.device)
            return self.window(x.as_tensor()[None].to(src.dtype), network, *args, spacing=s_tensor, **kwargs)[0]

        mean, disagreement, score, seconds = _run_looks(image, spacings, run)
        if report is not None:
            report.update(spacings=[list(v) for v in spacings], seconds_per_look=seconds, score=round(score, 6))
        out = torch.log(mean.clamp_min(1e-12))
        if self.disagreement:
            out = torch.cat([out, disagreement[None]], 0)
        return out[None]


class SplitDisagreementd(MapTransform):
    """Move the last channel of ``keys`` (the :class:`SpacingEnsembleInferer`'s disagreement) to
    ``disagreement_key``, as a MetaTensor with the geometry, metadata (file name) and applied
    operations of ``orig_keys``, so that MONAI's ``Invertd`` can bring it to the native grid and
    ``SaveImaged`` names it after the input."""

    def __init__(
        self,
        keys: KeysCollection = "pred",
        disagreement_key: str = "disagreement",
        orig_keys: str = "image",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.disagreement_key = disagreement_key
        self.orig_keys = orig_keys

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            pred, image = d[key], d[self.orig_keys]
            if pred.shape[0] < 3:
                raise ValueError(f"{key} has {pred.shape[0]} channels; expected classes + 1 disagreement channel.")
            values = pred.as_tensor() if isinstance(pred, MetaTensor) else torch.as_tensor(pred)
            d[key], d[self.disagreement_key] = pred[:-1], _like(image, values[-1:].float())
        return d


def ensemble_inferer(window, spacing_ensemble, trained_range=None):
    """``window`` itself (``spacing_ensemble`` false or null), or a :class:`SpacingEnsembleInferer`
    over it: ``true`` for :data:`DEFAULT_FACTORS`, or a list of factors (what a bundle's
    ``"spacing_ensemble"`` holds; from a command line also the strings ``"true"``, ``"false"``,
    ``"[1, 1.5]"``)."""
    if isinstance(spacing_ensemble, str):  # from a command line: "true", "no", "[1, 1.5]"
        text = spacing_ensemble.strip()
        try:
            spacing_ensemble = json.loads(text) if text.startswith("[") else str2bool(text)
        except ValueError:
            raise ValueError(
                f"spacing_ensemble must be false, true or a list of factors such as [1, 1.25, 1.5]; got {text!r}."
            ) from None
    if spacing_ensemble is None or spacing_ensemble is False:
        return window
    factors = DEFAULT_FACTORS if spacing_ensemble is True else spacing_ensemble
    if isinstance(factors, str) or not isinstance(factors, (list, tuple)):
        raise ValueError(f"spacing_ensemble must be false, true or a list of factors such as [1, 1.25, 1.5]; got {spacing_ensemble!r}.")
    return SpacingEnsembleInferer(window, factors, trained_range)
