"""Checks of a training run's data lists, run once before the trainer is built.

A bad case otherwise shows up late or not at all: a training list shorter than the batch size
gives empty epochs (the loader drops the incomplete batch) and a run that "succeeds" without a
step; a label on another voxel grid than its image trains on misaligned voxels without any
error; a bad file read only at epoch 37 (``cache_rate`` < 1) stops a run that has already written
checkpoints. :func:`check_training_data` reads file headers only (and, where asked, the labels),
and reports every bad case at once, naming its files and values.

The layout and the data list file themselves are checked where they are read
(:func:`custom_networks.data.datalist.load_split`); label values and image headers again as every case
is loaded (:class:`~custom_networks.MapLabelsd`, :class:`~custom_networks.CheckImaged`).
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .datasets import DatasetSpec, MapLabelsd, format_values, get_dataset

__all__ = ["TrainingDataError", "check_training_data", "grid_mismatch", "read_geometry"]

NIFTI_EXTENSIONS = (".nii", ".nii.gz")
# image and label grids may differ by float rounding in their headers, not by more than this share of a voxel
GRID_TOLERANCE_VOXELS = 0.1
_SHOWN = 10


class TrainingDataError(ValueError):
    """A training or validation list that cannot train; the message lists the cases and values."""


def read_geometry(path: str) -> tuple[tuple[int, ...], np.ndarray]:
    """Voxel shape and voxel-to-RAS affine (mm) of an image file, from its header only.

    Read as MONAI's ``LoadImage`` reads the file: NIfTI through nibabel (``img.affine``), other
    formats (``.mha``, ``.nrrd``, ...) through ITK, whose LPS geometry is turned into RAS.
    """
    if str(path).lower().endswith(NIFTI_EXTENSIONS):
        import nibabel as nib

        img = nib.load(str(path))  # lazy: reads the header, not the voxels
        return tuple(int(n) for n in img.shape), np.asarray(img.affine, dtype=np.float64)
    import itk

    io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
    if io is None:
        raise ValueError(f"{path}: no reader for this file format.")
    io.SetFileName(str(path))
    io.ReadImageInformation()
    n = io.GetNumberOfDimensions()
    affine = np.eye(n + 1)
    for i in range(n):
        affine[:n, i] = np.asarray(io.GetDirection(i), dtype=np.float64) * io.GetSpacing(i)
        affine[i, n] = io.GetOrigin(i)
    flip = np.diag([-1.0, -1.0] + [1.0] * (n - 1))  # LPS -> RAS
    return tuple(int(io.GetDimensions(i)) for i in range(n)), flip @ affine


def grid_mismatch(image: tuple, label: tuple, spatial_dims: int = 3) -> str | None:
    """Why two ``(shape, affine)`` grids (:func:`read_geometry`) are not the same voxel grid, or ``None``.

    Same spatial shape, and every corner voxel at the same place in millimetres within
    :data:`GRID_TOLERANCE_VOXELS` of the smaller voxel size (header rounding, not another grid).
    """
    (shape_a, affine_a), (shape_b, affine_b) = image, label
    if tuple(shape_a[:spatial_dims]) != tuple(shape_b[:spatial_dims]):
        return f"spatial shape {tuple(shape_b[:spatial_dims])}, but the image has {tuple(shape_a[:spatial_dims])}"
    d = spatial_dims
    corners = np.array(list(itertools.product(*[(0, n - 1) for n in shape_a[:d]])), dtype=np.float64)
    a = corners @ affine_a[:d, :d].T + affine_a[:d, d]
    b = corners @ affine_b[:d, :d].T + affine_b[:d, d]
    apart = float(np.linalg.norm(a - b, axis=1).max())
    voxel = float(min(np.linalg.norm(affine_a[:d, :d], axis=0).min(), np.linalg.norm(affine_b[:d, :d], axis=0).min()))
    if not math.isfinite(apart) or apart > GRID_TOLERANCE_VOXELS * voxel:
        return (
            f"affine {np.round(affine_b, 4).tolist()}, but the image has {np.round(affine_a, 4).tolist()} "
            f"(corner voxels {apart:.3g} mm apart; expected the same grid within {GRID_TOLERANCE_VOXELS} voxel)"
        )
    return None


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _listing(problems: Sequence[str]) -> str:
    shown = "\n  ".join(problems[:_SHOWN])
    more = f"\n  ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
    return f"\n  {shown}{more}"


def _case_problems(item: Any, split: str, index: int, spec: DatasetSpec, keys: Sequence[str], label_values: bool) -> list[str]:
    if not isinstance(item, Mapping) or any(k not in item for k in keys):
        return [f"{split} case {index} is {item!r}; expected a dict with the keys {list(keys)} (file paths)."]
    paths = [str(item[k]) for k in keys]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        return [f"{p}: no such file ({split} case {index})." for p in missing]
    image, label = paths[0], paths[-1]
    try:
        grids = [read_geometry(p) for p in paths]
    except Exception as e:  # an unreadable header: say which file
        return [f"{split} case {index} ({image}): cannot read the header: {e}"]
    problems = [f"{p}: {why}; it must lie on the voxel grid of its image {image}." for p, g in zip(paths[1:], grids[1:])
                if (why := grid_mismatch(grids[0], g, spec.spatial_dims))]
    if label_values and not problems:
        from monai.transforms import LoadImage

        mapping = item.get("label_map") or spec.label_map  # a label drawn in 3D Slicer carries its own map
        unexpected = MapLabelsd(keys[-1], mapping).unexpected_values(LoadImage(image_only=True)(label))
        if unexpected:
            problems.append(
                f"{label}: label has values {format_values(unexpected)} that the {spec.name} label map does not know; "
                f"expected only {format_values(mapping)}."
            )
    return problems


def check_training_data(
    train: Sequence[Mapping],
    validation: Sequence[Mapping],
    dataset: str | DatasetSpec,
    batch_size: int,
    label_values: bool = False,
    world_size: int | None = None,
    keys: Sequence[str] = ("image", "label"),
) -> None:
    """Check a training run's data lists before the trainer is built; raise naming every bad case.

    Checks, for both lists: each is non-empty; every case is a dict with ``keys`` whose files
    exist; every label (the last key) lies on its image's voxel grid: same shape, same affine
    within a tenth of a voxel (:func:`grid_mismatch`, from the headers only). And: every process
    gets at least ``batch_size`` training cases (the loader drops an incomplete batch: fewer cases
    mean epochs without a step); every process gets a validation case. With ``label_values``,
    every label is also read and its values checked against the data set's label map (or the
    case's own ``"label_map"``): the bundles ask for it when ``cache_rate < 1``, since otherwise
    MONAI's ``CacheDataset`` loads, and :class:`~custom_networks.MapLabelsd` checks, every case
    before the first step anyway.

    Args:
        train, validation: MONAI data lists, ``[{"image": path, "label": path}, ...]``.
        dataset: the data set name or spec (label map, spatial dimensions).
        batch_size: training batch size per process.
        label_values: read every label and check its values.
        world_size: processes sharing the lists (``DistributedSampler``); default: the
            ``torch.distributed`` world size if it is initialised, else 1.
        keys: the file keys of a case; the first is the image, the last the label.

    Raises:
        TrainingDataError: a ``ValueError`` listing the bad cases (files and values) or counts.
    """
    spec = get_dataset(dataset)
    world = _world_size() if world_size is None else int(world_size)
    batch = int(batch_size)
    if batch < 1:
        raise TrainingDataError(f"batch_size {batch_size!r} must be a positive integer.")
    for split, items in (("training", train), ("validation", validation)):
        if not items:
            raise TrainingDataError(f"the {split} list is empty; expected at least one case ({list(keys)} file paths).")
    per_process = math.ceil(len(train) / world)  # DistributedSampler(even_divisible=True) pads to equal shares
    if per_process < batch:
        first = ", ".join(str(item.get(keys[0])) if isinstance(item, Mapping) else repr(item) for item in list(train)[:3])
        on = f" on each of {world} processes ({per_process} per process)" if world > 1 else ""
        raise TrainingDataError(
            f"{len(train)} training case(s) ({first}{', ...' if len(train) > 3 else ''}) for batch_size {batch}{on}: "
            "the loader drops an incomplete batch, so every epoch would have no training step. "
            f"Add cases or pass --batch_size {max(1, per_process)} or lower."
        )
    if len(validation) < world:
        raise TrainingDataError(f"{len(validation)} validation case(s) for {world} processes: each process needs at least one.")
    from tqdm import tqdm

    problems: list[str] = []
    cases = [(split, i, item) for split, items in (("training", train), ("validation", validation)) for i, item in enumerate(items)]
    # headers alone take milliseconds a case; reading every label is worth a progress bar
    for split, i, item in tqdm(cases, desc="Checking labels", disable=not label_values):
        problems += _case_problems(item, split, i, spec, keys, label_values)
    if problems:
        raise TrainingDataError(f"{len(problems)} problem(s) in the {spec.name} training data:{_listing(problems)}")
