"""Predict label maps at a chosen working spacing and write them in the input's native geometry."""

from __future__ import annotations

import os
import time
from typing import Sequence

import torch
from monai.data import DataLoader, Dataset, decollate_batch
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    Invertd,
    LoadImaged,
    NormalizeIntensityd,
    SaveImaged,
)

from .engine import SpacingSlidingWindowInferer
from .transforms import SpacingPolicyd

__all__ = ["inference_pre_transforms", "inference_post_transforms", "predict"]


def inference_pre_transforms(policy: str = "native", target_spacing=None, trained_range=None, nonzero: bool = False) -> Compose:
    """Load, resample to the working spacing (anti-aliased), z-score at that spacing."""
    return Compose(
        [
            LoadImaged(keys="image", image_only=False),
            EnsureChannelFirstd(keys="image"),
            EnsureTyped(keys="image", dtype=torch.float32),
            SpacingPolicyd(keys="image", policy=policy, target_spacing=target_spacing, trained_range=trained_range),
            NormalizeIntensityd(keys="image", nonzero=nonzero, channel_wise=True),
        ]
    )


def inference_post_transforms(pre: Compose, output_dir: str, output_postfix: str = "seg") -> Compose:
    """Softmax, back to the native geometry (``Invertd``, linear on probabilities), argmax, save."""
    return Compose(
        [
            Activationsd(keys="pred", softmax=True),
            Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
            AsDiscreted(keys="pred", argmax=True),
            SaveImaged(
                keys="pred",
                output_dir=output_dir,
                output_postfix=output_postfix,
                output_dtype="uint8",
                resample=False,
                separate_folder=False,
                print_log=False,
                savepath_in_metadict=True,
            ),
        ]
    )


def predict(
    network: torch.nn.Module,
    images: Sequence[str],
    output_dir: str,
    policy: str = "native",
    target_spacing=None,
    trained_range=None,
    roi_size: Sequence[int] = (96, 96, 96),
    output_postfix: str = "seg",
    device: str | torch.device = "cpu",
) -> list[dict]:
    """Segment ``images`` (NIfTI/NRRD/MHA paths) and write ``<name>_<postfix>.nii.gz`` to ``output_dir``.

    The network runs at the working spacing chosen by ``policy`` (see
    :func:`custom_networks.spacing.working_spacing`); every label is written on the input's own
    grid (shape, spacing, origin, direction).

    Returns:
        one ``{"image", "output", "working_spacing_mm", "seconds"}`` record per image.
    """
    missing = [p for p in images if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"image file(s) not found: {missing}")
    os.makedirs(output_dir, exist_ok=True)
    pre = inference_pre_transforms(policy, target_spacing, trained_range)
    post = inference_post_transforms(pre, output_dir, output_postfix)
    inferer = SpacingSlidingWindowInferer(roi_size=roi_size, sw_batch_size=1, overlap=0.25, mode="gaussian")
    loader = DataLoader(Dataset([{"image": p} for p in images], transform=pre), batch_size=1, num_workers=0)
    network = network.to(device).eval()
    records = []
    with torch.no_grad():
        for batch in loader:
            start = time.perf_counter()
            image = batch["image"].to(device)
            batch["pred"] = inferer(image, network, spacing=batch["spacing"].to(device))
            for item in decollate_batch(batch):
                out = post(item)
                records.append(
                    {
                        "image": item["image"].meta["filename_or_obj"],
                        "output": out["pred"].meta["saved_to"],
                        "working_spacing_mm": [round(float(v), 4) for v in item["spacing"]],
                        "seconds": round(time.perf_counter() - start, 3),
                    }
                )
    return records
