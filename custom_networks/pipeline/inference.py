"""Predict label maps at a chosen working spacing and write them in the input's native geometry."""

from __future__ import annotations

import os
import time
from typing import Sequence

import torch
from monai.data import DataLoader, Dataset, decollate_batch
from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged

from . import chain

__all__ = ["predict"]


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
    nonzero: bool = False,
    output_ext: str = ".nii.gz",
    compresslevel: int | None = None,
) -> list[dict]:
    """Segment ``images`` (NIfTI/NRRD/MHA paths) and write ``<name>_<postfix><output_ext>`` to ``output_dir``.

    The chain is :mod:`custom_networks.pipeline.chain`'s: z-score (``nonzero``: over non-zero voxels),
    resample to the working spacing chosen by ``policy`` (see
    :func:`custom_networks.spacing.working_spacing`), sliding window, labels back on the input's
    own grid (shape, spacing, origin, direction), atomic save. Images are used in their stored
    axis order (no reorientation; bundles reorient through their data set's load transforms).

    Returns:
        one ``{"image", "output", "working_spacing_mm", "seconds"}`` record per image.
    """
    missing = [p for p in images if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"image file(s) not found: {missing}")
    os.makedirs(output_dir, exist_ok=True)
    load = [LoadImaged(keys="image", image_only=True), EnsureChannelFirstd(keys="image"), EnsureTyped(keys="image", dtype=torch.float32)]
    pre = Compose(load + chain.spacing_steps(nonzero, policy, target_spacing, trained_range))
    post = chain.postprocessing(pre, output_dir, output_postfix, output_ext, compresslevel)
    window = chain.inferer(roi_size, overlap=0.25)
    loader = DataLoader(Dataset([{"image": p} for p in images], transform=pre), batch_size=1, num_workers=0)
    network = network.to(device).eval()
    records = []
    for batch in loader:
        start = time.perf_counter()
        for item in decollate_batch(batch):
            item["pred"] = chain.run_network(network, window, item, device)
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
