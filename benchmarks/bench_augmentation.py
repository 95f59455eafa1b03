"""Cost of the random-spacing augmentation per training sample, on the CPU and on the device.

    python benchmarks/bench_augmentation.py [--device cuda] [--samples 10]

A BraTS-sized volume (240 x 240 x 155 at 1 mm) and its label; each sample draws a spacing from
U(1, 3) mm per axis and a 128^3 patch (RandSpacingPatchd: crop, anti-alias and resample in one
pass over the region the patch needs). For comparison: MONAI's Spacingd on the whole volume
followed by a crop, i.e. resampling whole volumes per sample as the original implementation does.
"""

from __future__ import annotations

import time

import fire
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import RandSpatialCropd, Spacingd

from custom_networks import RandSpacingPatchd


def main(device: str = "cpu", samples: int = 10, patch: int = 128):
    device = torch.device(device)
    rng = np.random.RandomState(0)
    shape = (240, 240, 155)
    image = MetaTensor(torch.randn(1, *shape, device=device) * 10 + 50, affine=torch.eye(4, dtype=torch.float64))
    label = MetaTensor((torch.rand(1, *shape, device=device) > 0.99).to(torch.uint8), affine=torch.eye(4, dtype=torch.float64))
    data = {"image": image, "label": label}
    aug = RandSpacingPatchd(["image", "label"], [[1.0, 3.0]] * 3, (patch,) * 3, pos_fraction=0.5)
    aug.set_random_state(0)
    aug(data)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(samples):
        aug(data)
    if device.type == "cuda":
        torch.cuda.synchronize()
    ours = (time.perf_counter() - start) / samples
    print(f"device {device}, {torch.get_num_threads()} CPU threads; volume {shape} at 1 mm, patch {patch}^3, spacing U(1, 3) mm")
    print(f"RandSpacingPatchd: {ours * 1e3:.0f} ms per sample")

    if device.type == "cpu":
        crop = RandSpatialCropd(["image", "label"], (patch,) * 3, random_size=False)
        total = 0.0
        n = max(2, samples // 3)
        for _ in range(n):
            s = tuple(rng.uniform(1.0, 3.0, 3))
            start = time.perf_counter()
            out = Spacingd(["image", "label"], pixdim=s, mode=("bilinear", "nearest"))(data)
            crop(out)
            total += time.perf_counter() - start
        print(f"whole-volume Spacingd + crop: {total / n * 1e3:.0f} ms per sample "
              f"({total / n / ours:.1f}x RandSpacingPatchd)")


if __name__ == "__main__":
    fire.Fire(main)
