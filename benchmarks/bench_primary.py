"""Cost of the primary networks: the U-Net and the SDN U-Net, plain and under the hypernetwork.

    python benchmarks/bench_primary.py                      # CUDA if available, else CPU
    python benchmarks/bench_primary.py --device cpu --patches "[64,96,128]" --repeats 2

For the BraTS layout (16/32/64/128 channels, 3 convolutions per level; the SDN U-Net's ResSDN
blocks at levels 2 and 3, state 16, 6 directions, checkpointed per direction) prints, per network
and cubic patch (batch 1, 1 mm spacing): the time of one forward + backward pass (cross-entropy,
gradients into every parameter; the fastest of ``repeats`` after a warm-up) and its peak memory,
the parameter count, and the ratio of the hypernetwork version to the plain one. Each (network,
patch) runs in a fresh process, one after another, so that memory one configuration freed cannot
hide the next one's (a CPU process keeps what it freed). Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA and the peak rise of the process RSS on CPU, from just
before the warm-up, network and input already built.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import fire
import torch

from custom_networks import build_network
from custom_networks.pipeline.profiling import best_of

CHANNELS = (16, 32, 64, 128)  # the BraTS and MM-WHS bundles' layout


def one(primary: str, hyper: bool, patch: int, device: str, repeats: int, channels) -> None:
    """Measure one configuration and print it as one JSON line (run by :func:`main`)."""
    dev = torch.device(device)
    torch.manual_seed(0)
    net = build_network(primary, bool(hyper), 3, 1, 2, tuple(channels)).to(dev).train()
    x = torch.randn(1, 1, patch, patch, patch, device=dev)
    y = torch.randint(0, 2, (1, patch, patch, patch), device=dev)
    spacing = torch.ones(1, 3, device=dev)

    def step():
        net.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x, spacing), y).backward()

    seconds, peak = best_of(step, dev, repeats)
    params = sum(p.numel() for p in net.parameters())
    print(json.dumps({"seconds": seconds, "peak_bytes": peak, "parameters": params}))


def main(device: str | None = None, patches=(64, 96, 128), repeats: int = 2, primaries=("unet", "sdn_unet"), channels=CHANNELS):
    """Print the table; see the module docstring."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; float32; batch 1; forward + backward")
    patches = [int(p) for p in (patches if isinstance(patches, (list, tuple)) else [patches])]
    primaries = [primaries] if isinstance(primaries, str) else list(primaries)
    print("| network | hypernetwork | parameters | " + " | ".join(f"{p}^3 time | {p}^3 peak" for p in patches) + " |")
    print("|---|---|---|" + "---|---|" * len(patches))
    times: dict[tuple[str, bool], list[float]] = {}
    for primary in primaries:
        for hyper in (False, True):
            cells = []
            for p in patches:
                cmd = [sys.executable, __file__, "one", primary, str(hyper), str(p), device, str(repeats), json.dumps(list(channels))]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"{primary} (hypernetwork {hyper}) at {p}^3 failed:\n{done.stderr[-2000:]}")
                r = json.loads(done.stdout.strip().splitlines()[-1])
                times.setdefault((primary, hyper), []).append(r["seconds"])
                cells.append(f"{r['seconds']:.2f} s | {r['peak_bytes'] / 2**30:.2f} GiB")
            print(f"| {primary} | {'yes' if hyper else 'no'} | {r['parameters'] / 1e6:.2f} M | " + " | ".join(cells) + " |", flush=True)
    for primary in primaries:
        ratios = ", ".join(f"{p}^3 {h / b:.2f}" for p, h, b in zip(patches, times[(primary, True)], times[(primary, False)]))
        print(f"hypernetwork / plain time, {primary}: {ratios}")
    if "unet" in primaries:
        for primary in primaries:
            if primary != "unet":
                ratios = ", ".join(f"{p}^3 {s / u:.2f}" for p, s, u in zip(patches, times[(primary, False)], times[("unet", False)]))
                print(f"{primary} / unet time (plain): {ratios}")


if __name__ == "__main__":
    fire.Fire({"main": main, "one": one} if len(sys.argv) > 1 and sys.argv[1] == "one" else main)
