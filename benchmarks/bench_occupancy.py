"""Labels on a native 0.5 mm grid from a coarse encoder: occupancy decoding vs upsampled UNet logits.

    python benchmarks/bench_occupancy.py                                    # CUDA if available, else CPU
    python benchmarks/bench_occupancy.py --device cpu --extent_mm "[240,240,155]" --working 2.0

The field is ``extent_mm`` at ``native`` mm (default 240 x 240 x 155 mm at 0.5 mm: 480 x 480 x 310
voxels, a BraTS field at twice its resolution), a generated image of a few balls and thin tubes.
Both networks have the BraTS layout (channels 16/32/64/128), run at ``working`` mm, and are first
trained for ``train_steps`` steps on a small crop of the same kind of image at the same spacings,
so that their labels have the structure of a real prediction (how many voxels the coarse-to-fine
stages query depends on it). Then, each in a fresh process, one inference of the whole field:

- ``unet_upsampled``: the UNet at the working spacing, its logits interpolated (trilinear) to the
  native grid, argmax: what a fixed-spacing model does to give a native-resolution label;
- ``unet_fused``: the same UNet with this project's fused way back (``labels_to_native``: only
  cells on a label boundary are interpolated);
- ``occupancy``: the HyperSpace UNet encoder at the working spacing and the occupancy decoder
  queried coarse to fine (strides 4, 2, 1) on the native grid.

Prints time, peak memory (``torch.cuda.max_memory_allocated`` on CUDA; the peak rise of the
process RSS on CPU, from just before the inference, networks and input already built) and, for the
occupancy decoder, the share of native voxels it queried.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import fire
import numpy as np
import torch
import torch.nn.functional as F

from custom_networks import build_network
from custom_networks.data.synthetic_datasets import vessel_tree
from custom_networks.nets.occupancy import OccupancyNetwork
from custom_networks.pipeline.occupancy import OccupancyTrainStep, occupancy_labels
from custom_networks.pipeline.profiling import measure
from custom_networks.pipeline.resample import labels_to_native, resample_to_spacing

CHANNELS = (16, 32, 64, 128)  # the BraTS bundle's layout


def field(shape, spacing, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A z-scored image ``(1, *shape)`` of three balls (radius 12-30 mm) and a vessel tree, and its label."""
    rng = np.random.RandomState(seed)
    image, label = vessel_tree(shape, spacing, rng, radius_mm=(0.5, 2.0), levels=4)
    grid = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij", sparse=True)
    extent = np.asarray(shape) * np.asarray(spacing)
    for _ in range(3):
        centre, radius = rng.uniform(0.3, 0.7, 3) * extent, rng.uniform(0.05, 0.12) * extent.min()
        ball = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2
        label[ball] = 1
        image[ball] += 150.0
    image = (image - image.mean()) / image.std()
    return torch.from_numpy(image)[None], torch.from_numpy(label.astype(np.int64))[None]


def build(kind: str, features: int = 16):
    torch.manual_seed(0)
    if kind == "occupancy":
        return OccupancyNetwork(channels=CHANNELS, features=features, patch_step_mm=0.5)
    return build_network("unet", False, 3, 1, 2, CHANNELS)


def train(net, kind: str, native: float, working: float, steps: int, seed: int):
    """``steps`` Adam steps on 48^3 crops at the native spacing (the occupancy step) or at the working one."""
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    image, label = field((48, 48, 48), (native,) * 3, seed + 1)
    affine = torch.diag(torch.tensor([native] * 3 + [1.0], dtype=torch.float64))[None]
    step = OccupancyTrainStep([[working, working]] * 3, num_points=4096, band_mm=2.0, seed=seed)
    x, _ = resample_to_spacing(image, (native,) * 3, (working,) * 3)
    y, _ = resample_to_spacing(label, (native,) * 3, (working,) * 3, "nearest")
    net.train()
    for _ in range(steps):
        opt.zero_grad()
        if kind == "occupancy":
            loss = step.loss(net, loss_fn, image[None], label[None], affine)[0]
        else:
            loss = loss_fn(net(x[None]), y[None].float())
        loss.backward()
        opt.step()
    net.eval()


def one(kind: str, extent_mm, native: float, working: float, train_steps: int, device: str, seed: int) -> None:
    """Measure one path and print one JSON line (run by :func:`main` in a fresh process)."""
    dev = torch.device(device)
    net = build(kind)
    train(net, kind, native, working, train_steps, seed)
    net = net.to(dev)
    shape = tuple(int(round(e / native)) for e in extent_mm)
    image, label = field(shape, (native,) * 3, seed)
    image, label = image.to(dev), label.to(dev)
    affine = torch.diag(torch.tensor([native] * 3 + [1.0], dtype=torch.float64))
    info = {}
    with torch.inference_mode(), measure(dev) as m:
        if kind == "occupancy":
            pred, info = occupancy_labels(net, image, affine, (working,) * 3)
            pred = pred.as_tensor()[0]
        else:
            x, factor = resample_to_spacing(image, (native,) * 3, (working,) * 3)
            logits = net(x[None])[0]
            if kind == "unet_upsampled":
                pred = F.interpolate(logits[None], size=shape, mode="trilinear", align_corners=True)[0].argmax(0)
            else:
                pred = labels_to_native(logits, factor, shape)[0]
            del logits
    a, b = pred.bool(), label[0].bool()
    dice = float(2 * (a & b).sum() / (a.sum() + b.sum()))
    out = {"seconds": m.seconds, "peak_bytes": m.added_bytes, "voxels": int(np.prod(shape)), "dice": dice}
    out["queries"] = info.get("queries")
    print(json.dumps(out))


def main(device: str | None = None, extent_mm=(240, 240, 155), native: float = 0.5, working: float = 2.0, train_steps: int = 60, seed: int = 0):
    """Print the table; see the module docstring."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    extent = [float(e) for e in extent_mm]
    shape = "x".join(str(int(round(e / native))) for e in extent)
    print(f"device: {name}; torch {torch.__version__}; field {extent} mm at {native} mm ({shape}); working spacing {working} mm; seed {seed}")
    print("| path | time | peak memory | queried voxels | Dice (brief training) |")
    print("|---|---|---|---|---|")
    rows = {}
    for kind in ("unet_upsampled", "unet_fused", "occupancy"):
        cmd = [sys.executable, __file__, "one", kind, json.dumps(extent), str(native), str(working), str(train_steps), device, str(seed)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{kind} failed:\n{done.stderr[-2000:]}")
        r = rows[kind] = json.loads(done.stdout.strip().splitlines()[-1])
        queried = f"{r['queries'] / r['voxels']:.1%}" if r["queries"] is not None else "-"
        print(f"| {kind} | {r['seconds']:.2f} s | {r['peak_bytes'] / 2**30:.3f} GiB | {queried} | {r['dice']:.3f} |", flush=True)
    for base in ("unet_upsampled", "unet_fused"):
        ratio = rows["occupancy"]["peak_bytes"] / max(rows[base]["peak_bytes"], 1)
        print(f"occupancy / {base} peak memory: {ratio:.2f}; time: {rows['occupancy']['seconds'] / rows[base]['seconds']:.2f}")


if __name__ == "__main__":
    fire.Fire({"main": main, "one": one} if len(sys.argv) > 1 and sys.argv[1] == "one" else main)
