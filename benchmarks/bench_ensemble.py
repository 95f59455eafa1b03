"""Cost of the spacing ensemble against one look at native spacing and against 8x mirroring of that look.

    python benchmarks/bench_ensemble.py                                    # CUDA if available, else CPU
    python benchmarks/bench_ensemble.py --device cpu --spacing 2 --repeats 1 --output_dir /tmp/bench_ensemble
    python benchmarks/bench_ensemble.py --field_mm "[48,48,32]" --channels "[4,8]" --repeats 1   # a quick smoke run

One random image covering a BraTS field of view (240 x 240 x 155 mm, or ``field_mm``) at an
isotropic native ``spacing`` (in BraTS's trained 1-3 mm) goes end to end through :func:`custom_networks.pipeline.ensemble.spacing_ensemble`,
from the native image to the label on its grid: z-score, each look's resampling, network (the
BraTS bundle's ``HyperUNet``, 16/32/64/128 channels, random weights: time does not depend on
them, eager, one whole-image window per look), probabilities back to the native grid, combination
and arg-max. Rows:

- ``one look``: the native spacing alone (an ensemble of one spacing is plain inference);
- ``ensemble``: the default looks (:data:`~custom_networks.pipeline.ensemble.DEFAULT_FACTORS`:
  1x, 1.25x and 1.5x the native spacing, clamped to BraTS's trained 1-3 mm), with the
  disagreement map and score;
- ``mirroring``: the native look with nnU-Net's test-time mirroring, the 8 flips of the three
  axes (MONAI has no mirroring inferer; its ``TestTimeAugmentation`` draws random transforms),
  probabilities averaged.

Each row runs in a fresh process, one after another, so that memory one configuration freed
cannot hide the next one's (a CPU process keeps what it freed): the fastest of ``repeats`` calls
after a warm-up call, which also generates and caches the weights of every spacing the row uses,
as a server that has seen those spacings holds them. Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA and the peak rise of the process RSS on the CPU, from
just before the warm-up, network and image already built (:func:`custom_networks.pipeline.profiling.best_of`).
With ``--output_dir`` the table is also written there as ``bench_ensemble.md`` and ``bench_ensemble.csv``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import sys

import fire
import torch
from monai.data import MetaTensor
from monai.transforms import NormalizeIntensity

from custom_networks import HyperUNet
from custom_networks.data.fileio import atomic_output
from custom_networks.data.datasets import get_dataset
from custom_networks.pipeline import chain
from custom_networks.pipeline.ensemble import ensemble_spacings, spacing_ensemble
from custom_networks.pipeline.profiling import best_of

FIELD_MM = (240.0, 240.0, 155.0)
CHANNELS = (16, 32, 64, 128)  # the BraTS bundle's layout
CONFIGS = ("one look", "ensemble", "mirroring")
# nnU-Net's test-time mirroring: every subset of the three spatial axes of a (B, C, X, Y, Z) batch
FLIPS = ((), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4))


class MirroredWindow:
    """``window`` run on the 8 flips of its input, each output flipped back; returns the log of the
    mean softmax, so that the softmax the caller applies gives the mean probability.

    MONAI has no mirroring inferer (its ``TestTimeAugmentation`` draws random transforms), so the
    flips are written out here, as nnU-Net does them.
    """

    def __init__(self, window):
        self.window = window

    def __call__(self, x, network, *args, **kwargs):
        total = 0.0
        for axes in FLIPS:
            xf = torch.flip(x, axes) if axes else x
            y = torch.softmax(self.window(xf, network, *args, **kwargs).float(), 1)
            total = total + (torch.flip(y, axes) if axes else y)
        return torch.log((total / len(FLIPS)).clamp_min(1e-12))


def one(config: str, spacing: float, device: str, repeats: int, channels, field_mm=FIELD_MM) -> None:
    """Measure one row and print it as one JSON line (run by :func:`main` in a fresh process)."""
    if config not in CONFIGS:
        raise ValueError(f"config {config!r} is not one of {CONFIGS}.")
    dev = torch.device(device)
    torch.manual_seed(0)
    net = HyperUNet(in_channels=1, out_channels=2, channels=tuple(channels)).to(dev).eval()
    shape = [max(8, int(round(f / float(spacing)))) for f in field_mm]
    image = MetaTensor(torch.randn(1, *shape) * 30.0 + 100.0, affine=torch.diag(torch.tensor([float(spacing)] * 3 + [1.0], dtype=torch.float64)))
    native = (float(spacing),) * 3
    spacings = ensemble_spacings(native, get_dataset("brats").spacing_range) if config == "ensemble" else [native]
    window = chain.inferer([max(shape)] * 3)  # larger than every look's grid: one whole-image window each
    window = MirroredWindow(window) if config == "mirroring" else window

    def run():
        normalised = MetaTensor(NormalizeIntensity(channel_wise=True)(image.as_tensor()), affine=image.affine)
        return spacing_ensemble(net, normalised, spacings, window, device=dev)

    seconds, peak = best_of(run, dev, repeats)
    looks = run()["seconds_per_look"]
    print(json.dumps({"seconds": seconds, "peak_bytes": peak, "spacings": [list(s) for s in spacings], "seconds_per_look": looks,
                      "grid": shape}))


def main(device: str | None = None, spacing: float = 1.0, repeats: int = 2, channels=CHANNELS, output_dir: str | None = None,
         field_mm=FIELD_MM):
    """Print the table (and write it to ``output_dir``); see the module docstring."""
    trained = get_dataset("brats").spacing_range
    if not trained.contains([float(spacing)] * 3):
        raise ValueError(f"spacing {spacing!r} must lie in BraTS's trained range {trained.to_string()} mm, where the looks are coarser.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    lines = [f"device: {name}; torch {torch.__version__}; float32; repeats {repeats} after a warm-up; each row in a fresh process"]
    results = {}
    for config in CONFIGS:
        cmd = [sys.executable, __file__, "one", config, str(float(spacing)), device, str(int(repeats)), json.dumps(list(channels)),
               json.dumps([float(f) for f in field_mm])]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{config} failed:\n{done.stderr[-2000:]}")
        results[config] = json.loads(done.stdout.strip().splitlines()[-1])
    grid = "x".join(map(str, results["one look"]["grid"]))
    lines.append(f"image: {' x '.join(f'{float(f):g}' for f in field_mm)} mm at {float(spacing):g} mm ({grid} voxels), BraTS HyperUNet {list(channels)}, "
                 "z-score to native-grid label, one whole-image window per look")
    lines.append("")
    lines.append("| configuration | working spacings (mm) | network runs | time | time / one look | peak memory added | memory / one look |")
    lines.append("|---|---|---|---|---|---|---|")
    base = results["one look"]
    rows = []
    for config, r in results.items():
        runs = len(FLIPS) if config == "mirroring" else len(r["spacings"])
        spacings = ", ".join(f"{s[0]:g}" for s in r["spacings"])
        time_ratio, memory_ratio = r["seconds"] / base["seconds"], r["peak_bytes"] / max(base["peak_bytes"], 1)
        lines.append(f"| {config} | {spacings} | {runs} | {r['seconds']:.3g} s | {time_ratio:.2f} | {r['peak_bytes'] / 2**30:.2f} GiB | {memory_ratio:.2f} |")
        rows.append({"configuration": config, "spacings_mm": spacings, "network_runs": runs, "seconds": round(r["seconds"], 4),
                     "time_ratio": round(time_ratio, 3), "peak_bytes": r["peak_bytes"], "memory_ratio": round(memory_ratio, 3),
                     "seconds_per_look": " ".join(map(str, r["seconds_per_look"]))})
    lines.append("")
    lines.append("seconds per look (last call, resample + network + way back): "
                 + "; ".join(f"{c}: {', '.join(f'{t:g}' for t in r['seconds_per_look'])}" for c, r in results.items() if c != "mirroring"))
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if output_dir:
        with atomic_output(os.path.join(output_dir, "bench_ensemble.md")) as tmp:
            tmp.write_text(text)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        with atomic_output(os.path.join(output_dir, "bench_ensemble.csv")) as tmp:
            tmp.write_text(buffer.getvalue())
        print(f"written: {os.path.join(output_dir, 'bench_ensemble.md')} and bench_ensemble.csv")


if __name__ == "__main__":
    fire.Fire({"main": main, "one": one} if len(sys.argv) > 1 and sys.argv[1] == "one" else main)
