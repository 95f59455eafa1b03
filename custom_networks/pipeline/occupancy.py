"""Training and inference of the occupancy network: labels on the native grid from a coarse encoder.

- :func:`boundary_band` and :func:`sample_training_points`: OSS-Net's point sampling, in mm: half of
  the points in a band of ``band_mm`` around the label's boundaries, half uniform, at native voxel
  centres, returned as world coordinates with their labels.
- :class:`PrepareBatchOccupancy` and :class:`OccupancyTrainStep`: one MONAI
  ``SupervisedTrainer`` iteration (``iteration_update``). Each volume of the batch is resampled on
  the device to its working spacing, encoded there, and queried at its points; the loss is the
  engine's ``loss_function`` on the points plus ``aux_weight`` times the same loss on the encoder's
  coarse prediction against the label on the working grid.
- :class:`OccupancyInferer`: that inference as a MONAI inferer for the bundles' evaluators, the
  encoder spacing chosen per image by a spacing policy (``clamp``, ``native``, ``target``).
- :func:`occupancy_labels`: coarse-to-fine inference (OSS-Net's fast inference) on the native grid:
  every ``strides[0]``-th voxel is queried, then at each finer stride only the voxels of cells
  next to a label change, in chunks. The output is a ``uint8`` label map of the native grid.

A query needs the native image (its local patch), so the batch carries native-resolution crops:
the working-spacing image is made from them inside the step, with the project's one resampler.
"""

from __future__ import annotations

import time
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer
from monai.utils import CommonKeys

from ..nets.occupancy import OccupancyNetwork, index_to_world
from ..spacing import SpacingRange, working_spacing
from .resample import resample_to_spacing

__all__ = [
    "OccupancyInferer",
    "OccupancyTrainStep",
    "PrepareBatchOccupancy",
    "boundary_band",
    "encode_volume",
    "occupancy_labels",
    "sample_training_points",
]


def _plain(x) -> torch.Tensor:
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


def _spacing_of(affine: torch.Tensor, dims: int) -> tuple[float, ...]:
    return tuple(float(s) for s in affine_to_spacing(torch.as_tensor(affine, dtype=torch.float64), r=dims))


def _pool(x: torch.Tensor, kernel: Sequence[int]) -> torch.Tensor:
    """Max over a ``kernel`` box (stride 1, same size) of ``x`` ``(*spatial)``: one axis at a time
    (a box maximum is separable), ``sum(kernel)`` instead of ``prod(kernel)`` reads per voxel."""
    dims = x.dim()
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[dims]
    y = x[None, None]
    for a, k in enumerate(kernel):
        if k > 1:
            size = tuple(k if b == a else 1 for b in range(dims))
            y = pool(y, size, stride=1, padding=tuple(s // 2 for s in size))
    return y[0, 0]


def _non_constant(label: torch.Tensor, kernel: Sequence[int]) -> torch.Tensor:
    """Voxels of ``label`` ``(*spatial)`` whose ``kernel`` box holds more than one value (bool)."""
    x = label.to(torch.float16 if label.is_cuda else torch.float32)
    return _pool(x, kernel) != -_pool(-x, kernel)


def boundary_band(label: torch.Tensor, spacing: Sequence[float], band_mm: float) -> torch.Tensor:
    """Voxels within ``band_mm`` (per axis, a box) of a label change: ``label`` ``(*spatial)`` or
    ``(1, *spatial)`` at ``spacing`` mm -> bool ``(*spatial)``. A band at least one voxel wide."""
    label = label[0] if label.dim() == len(spacing) + 1 else label
    radius = [max(1, int(round(band_mm / float(s)))) for s in spacing]
    return _non_constant(label, [2 * r + 1 for r in radius])


def sample_training_points(
    label: torch.Tensor,
    affine: torch.Tensor,
    num_points: int = 2**14,
    boundary_fraction: float = 0.5,
    band_mm: float = 3.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """OSS-Net's training points for one volume, in world coordinates.

    Args:
        label: ``(1, *spatial)`` class indices on the native grid.
        affine: ``(D + 1, D + 1)`` the label's index -> world (mm) affine.
        num_points: points per volume (OSS-Net: ``2**14``).
        boundary_fraction: share drawn without replacement from :func:`boundary_band`; when the band
            has fewer voxels, all of them are taken and the rest is uniform (as OSS-Net does).
        band_mm: half-width of the band (mm).
        generator: a CPU generator for reproducible draws.

    Returns:
        ``points`` ``(num_points, D)`` float64 world coordinates (native voxel centres) and
        ``target`` ``(num_points,)`` long class indices.
    """
    dims = label.dim() - 1
    shape = label.shape[1:]
    total = int(np.prod(shape))
    band = boundary_band(label[0], _spacing_of(affine, dims), band_mm).reshape(-1).nonzero().squeeze(1).cpu()
    n_band = min(int(round(num_points * boundary_fraction)), band.numel())
    picked = band[torch.randperm(band.numel(), generator=generator)[:n_band]]
    uniform = torch.randint(total, (num_points - n_band,), generator=generator)
    flat = torch.cat([picked, uniform]).to(label.device)
    points = index_to_world(torch.stack(torch.unravel_index(flat, tuple(shape)), dim=1), affine)
    return points, label.reshape(-1)[flat].long()


def encode_volume(network: OccupancyNetwork, image: torch.Tensor, affine: torch.Tensor, spacing: Sequence[float]):
    """Resample one native volume ``(C, *native)`` to ``spacing`` mm and encode it.

    Returns ``(coarse, features, latent, working_affine, factor)``; see
    :meth:`OccupancyNetwork.encode`.
    """
    affine = torch.as_tensor(affine, dtype=torch.float64, device=image.device)
    native = _spacing_of(affine, image.dim() - 1)
    working, factor = resample_to_spacing(image.float(), native, spacing)
    working_affine = affine @ torch.diag(torch.tensor([*factor, 1.0], dtype=torch.float64, device=image.device))
    coarse, features, latent = network.encode(working, torch.as_tensor(spacing, dtype=torch.float32))
    return coarse, features, latent, working_affine, factor


class PrepareBatchOccupancy:
    """``prepare_batch`` of the occupancy step: native crops, their affines, working spacings.

    Returns ``(images, labels, (), {"affine": (B, D + 1, D + 1), "working_spacing": (B, D) | None})``
    (MONAI's four-part form; ``labels`` is None for a batch without them, as at inference). ``working_spacing`` is the batch's ``spacing_key`` entry when a
    transform stored one, else None (the step draws it).
    """

    def __init__(self, image_key: str = CommonKeys.IMAGE, label_key: str = CommonKeys.LABEL, spacing_key: str = "working_spacing"):
        self.image_key, self.label_key, self.spacing_key = image_key, label_key, spacing_key

    def __call__(self, batchdata: Mapping[Hashable, Any], device=None, non_blocking: bool = False, **kwargs):
        images, labels = batchdata[self.image_key], batchdata.get(self.label_key) if self.label_key else None
        if not isinstance(images, MetaTensor):
            raise ValueError(
                f"'{self.image_key}' carries no affine; the occupancy step needs the native images as "
                "MetaTensors (e.g. from LoadImaged), since its queries are world coordinates."
            )
        dims = images.dim() - 2
        affine = images.affine
        affine = affine if affine.dim() == 3 else affine[None].expand(images.shape[0], -1, -1)
        spacing = batchdata.get(self.spacing_key)
        if spacing is not None:
            spacing = torch.as_tensor(spacing, dtype=torch.float32).reshape(images.shape[0], dims)
        # the images stay MetaTensors (an inferer's output takes their metadata, for Invertd and
        # saving); the step and the inferer compute on plain tensors, since MetaTensor's
        # bookkeeping on every query-level operation costs more than the operations
        images = images.to(device=device, non_blocking=non_blocking)
        if labels is not None:
            labels = _plain(labels).to(device=device, non_blocking=non_blocking)
        return images, labels, (), {"affine": _plain(affine).to(torch.float64), "working_spacing": spacing}


class OccupancyTrainStep:
    """One training iteration of an :class:`OccupancyNetwork` inside MONAI's ``SupervisedTrainer``.

    Pass as ``iteration_update`` with ``prepare_batch=PrepareBatchOccupancy()``; the engine's
    ``loss_function`` (e.g. MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)``: for two classes
    its cross-entropy is OSS-Net's BCE) scores the points ``(B, C, N)`` and, weighted by
    ``aux_weight``, the encoder's coarse prediction on the working grid.

    Args:
        spacing_range: working spacings (mm) drawn per volume and axis when the batch has none;
            never finer than the volume's native spacing.
        num_points, boundary_fraction, band_mm: see :func:`sample_training_points`.
        aux_weight: OSS-Net: 0.1.
        seed: seeds the step's draws (working spacings, points).

    The engine output holds ``image``, ``label`` ``(B, 1, N)`` (the points' classes), ``pred``
    ``(B, C, N)`` logits, ``loss`` and ``spacing`` (the working spacings, ``(B, D)`` mm).
    """

    def __init__(
        self,
        spacing_range: SpacingRange | Sequence,
        num_points: int = 2**14,
        boundary_fraction: float = 0.5,
        band_mm: float = 3.0,
        aux_weight: float = 0.1,
        seed: int = 0,
    ):
        self.spacing_range = spacing_range if isinstance(spacing_range, SpacingRange) else SpacingRange.from_config(spacing_range)
        if num_points < 1 or not 0.0 <= boundary_fraction <= 1.0 or band_mm <= 0 or aux_weight < 0:
            raise ValueError(
                f"num_points must be >= 1, boundary_fraction in [0, 1], band_mm > 0 (mm) and aux_weight >= 0; got "
                f"{num_points}, {boundary_fraction}, {band_mm}, {aux_weight}."
            )
        self.num_points, self.boundary_fraction, self.band_mm, self.aux_weight = int(num_points), float(boundary_fraction), float(band_mm), float(aux_weight)
        # the draws' random state, like a MONAI Randomizable's ``R``: it changes per call by design
        self.generator = torch.Generator().manual_seed(int(seed))

    def draw_spacing(self, native: Sequence[float]) -> tuple[float, ...]:
        """A working spacing (mm) per axis, uniform over the range above ``native``."""
        lo, hi = np.asarray(self.spacing_range.low, float), np.asarray(self.spacing_range.high, float)
        lo = np.maximum(lo, native)
        hi = np.maximum(hi, lo)
        u = torch.rand(len(native), generator=self.generator, dtype=torch.float64).numpy()
        return tuple(float(v) for v in lo + u * (hi - lo))

    def loss(self, network: OccupancyNetwork, loss_function, images, labels, affine, spacing=None):
        """``(loss, logits (B, C, N), targets (B, 1, N), spacing (B, D))`` of one batch."""
        images, labels, dims = _plain(images), _plain(labels), images.dim() - 2
        queries, latents, targets, used, aux = [], [], [], [], 0.0
        for b in range(images.shape[0]):
            native = _spacing_of(affine[b], dims)
            ws = tuple(float(v) for v in spacing[b]) if spacing is not None else self.draw_spacing(native)
            coarse, feats, latent, working_affine, factor = encode_volume(network, images[b], affine[b], ws)
            points, target = sample_training_points(
                labels[b], affine[b], self.num_points, self.boundary_fraction, self.band_mm, self.generator
            )
            queries.append(network.query_features(points, feats, working_affine, images[b], affine[b]))
            latents.append(latent)
            targets.append(target)
            used.append(ws)
            if self.aux_weight:
                coarse_label, _ = resample_to_spacing(labels[b], native, ws, mode="nearest")
                aux = aux + loss_function(coarse[None], coarse_label[None].float())
        logits = network.decode(torch.stack(queries), torch.stack(latents))
        target = torch.stack(targets)[:, None].float()
        loss = loss_function(logits, target) + self.aux_weight * aux / images.shape[0]
        return loss, logits, target, torch.tensor(used, dtype=torch.float32)

    def __call__(self, engine, batchdata: Mapping[Hashable, Any]) -> dict:
        images, labels, _, kwargs = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        engine.state.output = output = {CommonKeys.IMAGE: images}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with torch.autocast(images.device.type, enabled=bool(engine.amp)):
            loss, logits, target, spacing = self.loss(engine.network, engine.loss_function, images, labels, kwargs["affine"], kwargs["working_spacing"])
        output.update({CommonKeys.PRED: logits, CommonKeys.LABEL: target, CommonKeys.LOSS: loss, "spacing": spacing})
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if engine.amp and engine.scaler is not None:
            engine.scaler.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        # MODEL_COMPLETED decollated the output (MONAI's engines do so when decollate=True): return
        # that, as ignite stores what the iteration returns
        return engine.state.output


def _check_strides(strides: Sequence[int]) -> tuple[int, ...]:
    strides = tuple(int(s) for s in strides)
    ok = len(strides) > 0 and strides[-1] == 1 and all(s >= 1 for s in strides)
    ok = ok and all(a > b and a % b == 0 for a, b in zip(strides, strides[1:]))
    if not ok:
        raise ValueError(
            f"strides {strides} must decrease, each dividing the one before, and end at 1 (the native grid), e.g. (4, 2, 1)."
        )
    return strides


@torch.no_grad()
def occupancy_labels(
    network: OccupancyNetwork,
    image: torch.Tensor,
    affine: torch.Tensor | None = None,
    spacing: Sequence[float] | None = None,
    strides: Sequence[int] = (4, 2, 1),
    chunk: int = 2**14,
) -> tuple[torch.Tensor, dict]:
    """Labels of a native volume from its encoding at ``spacing`` mm, queried coarse to fine.

    Args:
        network: a trained :class:`OccupancyNetwork` (put in eval mode here).
        image: ``(C, *native)`` the z-scored native image; a MetaTensor carries its affine.
        affine: ``(D + 1, D + 1)`` index -> world (mm), when ``image`` carries none.
        spacing: the encoder's working spacing (mm, per axis); default: the native spacing.
        strides: native-voxel strides of the stages (OSS-Net: 4, 2, 1). ``(1,)`` queries every
            voxel. Structures thinner than ``strides[0]`` voxels can be missed between the first
            stage's samples, as in OSS-Net.
        chunk: queries decoded at once (memory: about ``chunk * (patch_size**3 + 8 * width) * 4``
            bytes).

    Returns:
        ``labels`` ``(1, *native)`` uint8 on the native grid (a MetaTensor with the native affine),
        and ``info``: ``encoder_spacing``, ``output_grid`` (shape and spacing), ``queries`` (the
        number decoded, against ``voxels``) and ``seconds``.
    """
    strides = _check_strides(strides)
    start = time.perf_counter()
    network.eval()
    dims = image.dim() - 1
    if affine is None:
        if not isinstance(image, MetaTensor):
            raise ValueError("occupancy_labels: the image carries no affine; pass affine=(D + 1, D + 1) index -> world (mm).")
        affine = image.affine
    affine = _plain(affine).to(dtype=torch.float64, device=image.device)
    native = _spacing_of(affine, dims)
    spacing = tuple(float(s) for s in (spacing if spacing is not None else native))
    if len(spacing) != dims or min(spacing) <= 0:
        raise ValueError(f"encoder spacing {spacing} must be {dims} positive values (mm).")
    src = _plain(image)
    _, feats, latent, working_affine, _ = encode_volume(network, src, affine, spacing)
    shape = tuple(int(n) for n in src.shape[1:])
    queries = 0

    def classify(index: torch.Tensor) -> torch.Tensor:
        """Classes (uint8) of native voxel indices ``(M, D)``."""
        nonlocal queries
        out = torch.empty(index.shape[0], dtype=torch.uint8, device=src.device)
        for s in range(0, index.shape[0], chunk):
            points = index_to_world(index[s : s + chunk], affine)
            q = network.query_features(points, feats, working_affine, src, affine)
            out[s : s + chunk] = network.decode(q[None], latent[None])[0].argmax(0).to(torch.uint8)
        queries += index.shape[0]
        return out

    # stage 0: every strides[0]-th voxel
    s0 = strides[0]
    grid = tuple(len(range(0, n, s0)) for n in shape)
    axes = [torch.arange(0, n, s0, device=src.device) for n in shape]
    index = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, dims)
    labels = classify(index).reshape(grid)
    prev = s0
    for s in strides[1:]:
        r = prev // s
        fine = tuple(len(range(0, n, s)) for n in shape)
        # every voxel of the finer grid first takes the value of its coarser cell (floor)
        up = labels
        for a, m in enumerate(fine):
            up = up.index_select(a, torch.div(torch.arange(m, device=src.device), r, rounding_mode="floor"))
        # cells next to a label change: query all their finer voxels but the one already known,
        # a bounded number of cells at a time (the candidates of a thin shell can be millions)
        flagged = _non_constant(labels, (3,) * dims).nonzero()
        offsets = torch.stack(torch.meshgrid(*[torch.arange(r, device=src.device)] * dims, indexing="ij"), dim=-1).reshape(-1, dims)[1:]
        limit = torch.tensor(fine, device=src.device)
        per_chunk = max(1, chunk // offsets.shape[0])
        for c in range(0, flagged.shape[0], per_chunk):
            cand = (flagged[c : c + per_chunk, None, :] * r + offsets[None]).reshape(-1, dims)
            cand = cand[(cand < limit).all(1)]
            if cand.numel():
                up[tuple(cand.T)] = classify(cand * s)
        labels, prev = up, s
    info = {
        "encoder_spacing": list(spacing),
        "output_grid": {"shape": list(shape), "spacing": list(native)},
        "queries": int(queries),
        "voxels": int(np.prod(shape)),
        "strides": list(strides),
        "seconds": time.perf_counter() - start,
    }
    return MetaTensor(labels[None], affine=affine.cpu()), info


class OccupancyInferer(Inferer):
    """:func:`occupancy_labels` for each image of a batch, as a MONAI inferer.

    With :class:`PrepareBatchOccupancy`, MONAI's ``SupervisedEvaluator`` calls it as
    ``inferer(images, network, affine=..., working_spacing=...)``; the encoder spacing is the
    batch's ``working_spacing`` or, per image, ``working_spacing(native, policy, target_spacing,
    trained_range)`` (the spacing policies of :class:`~custom_networks.pipeline.transforms.SpacingPolicyd`).

    Args:
        policy, target_spacing, trained_range: the spacing policy of the encoder.
        strides, chunk: see :func:`occupancy_labels`.
        one_hot: return ``(B, num_classes, *native)`` one-hot float32 (for MONAI's metrics after
            ``AsDiscreted(argmax=True)``) instead of ``(B, 1, *native)`` uint8 labels.

    The last call's ``info`` of each image (encoder spacing, output grid, queries) is not kept on
    the instance, which evaluators share between threads; ask :func:`occupancy_labels` for it.
    """

    def __init__(self, policy: str = "clamp", target_spacing=None, trained_range=None, strides: Sequence[int] = (4, 2, 1), chunk: int = 2**14, one_hot: bool = False):
        super().__init__()
        self.policy, self.target_spacing, self.trained_range = policy, target_spacing, trained_range
        self.strides, self.chunk, self.one_hot = _check_strides(strides), int(chunk), bool(one_hot)

    def encoder_spacing(self, native: Sequence[float]) -> tuple[float, ...]:
        return tuple(float(v) for v in working_spacing(native, self.policy, self.target_spacing, self.trained_range))

    def __call__(self, inputs: torch.Tensor, network: OccupancyNetwork, *args, affine=None, working_spacing=None, **kwargs) -> torch.Tensor:
        if affine is None:
            if not isinstance(inputs, MetaTensor):
                raise ValueError("OccupancyInferer needs the images' affines: a MetaTensor batch or affine=(B, D + 1, D + 1).")
            affine = inputs.affine
        affine = _plain(affine).to(torch.float64)
        affine = affine if affine.dim() == 3 else affine[None].expand(inputs.shape[0], -1, -1)
        dims = inputs.dim() - 2
        out = []
        for b in range(inputs.shape[0]):
            native = _spacing_of(affine[b], dims)
            spacing = tuple(float(v) for v in working_spacing[b]) if working_spacing is not None else self.encoder_spacing(native)
            labels, _ = occupancy_labels(network, _plain(inputs[b]), affine[b], spacing, self.strides, self.chunk)
            labels = labels.as_tensor()
            if self.one_hot:
                labels = F.one_hot(labels[0].long(), network.out_channels).movedim(-1, 0).float()
            out.append(labels)
        out = torch.stack(out)
        if isinstance(inputs, MetaTensor):  # the native grid: the input's geometry and transform record
            out = MetaTensor(out)
            out.copy_meta_from(inputs)
        return out
