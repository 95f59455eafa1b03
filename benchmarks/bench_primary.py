"""Cost of the primary networks: the U-Net and the SDN U-Net, plain and under the hypernetwork.

    python benchmarks/bench_primary.py                      # CUDA if available, else CPU
    python benchmarks/bench_primary.py --device cpu --patches "[64,96,128]" --repeats 2

For the BraTS layout (16/32/64/128 channels, 3 convolutions per level; the SDN U-Net's ResSDN
blocks at levels 2 and 3, state 16, 6 directions, checkpointed per direction) prints, per network
and cubic patch (batch 1, 1 mm spacing): the time of one forward + backward pass (cross-entropy,
gradients into every parameter) and its peak memory, the parameter count, and the ratio of the
hypernetwork version to the plain one, all measured in the same run. Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA and the peak rise of the process RSS on CPU.
"""

from __future__ import annotations

import platform

import fire
import torch

from custom_networks import build_network
from custom_networks.pipeline.profiling import best_of

CHANNELS = (16, 32, 64, 128)  # the BraTS and MM-WHS bundles' layout


def main(device: str | None = None, patches=(64, 96, 128), repeats: int = 2, primaries=("unet", "sdn_unet"), channels=CHANNELS):
    """Print the table; see the module docstring."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; float32; batch 1; forward + backward")
    patches = [int(p) for p in (patches if isinstance(patches, (list, tuple)) else [patches])]
    print("| network | hypernetwork | parameters | " + " | ".join(f"{p}^3 time | {p}^3 peak" for p in patches) + " |")
    print("|---|---|---|" + "---|---|" * len(patches))
    times: dict[tuple[str, bool], list[float]] = {}
    for primary in primaries:
        for hyper in (False, True):
            torch.manual_seed(0)
            net = build_network(primary, hyper, 3, 1, 2, tuple(channels)).to(device).train()
            params = sum(p.numel() for p in net.parameters())
            cells = []
            for p in patches:
                x = torch.randn(1, 1, p, p, p, device=device)
                y = torch.randint(0, 2, (1, p, p, p), device=device)
                spacing = torch.ones(1, 3, device=device)

                def step():
                    net.zero_grad(set_to_none=True)
                    torch.nn.functional.cross_entropy(net(x, spacing), y).backward()

                t, m = best_of(step, device, repeats)
                times.setdefault((primary, hyper), []).append(t)
                cells.append(f"{t:.2f} s | {m / 2**30:.2f} GiB")
                del x, y
            print(f"| {primary} | {'yes' if hyper else 'no'} | {params / 1e6:.2f} M | " + " | ".join(cells) + " |")
            del net
    for primary in primaries:
        ratios = ", ".join(f"{p}^3 {h / b:.2f}" for p, h, b in zip(patches, times[(primary, True)], times[(primary, False)]))
        print(f"hypernetwork / plain time, {primary}: {ratios}")
    if "unet" in primaries:
        for primary in primaries:
            if primary != "unet":
                ratios = ", ".join(f"{p}^3 {s / u:.2f}" for p, s, u in zip(patches, times[(primary, False)], times[("unet", False)]))
                print(f"{primary} / unet time (plain): {ratios}")


if __name__ == "__main__":
    fire.Fire(main)
