"""Cost of HyperSpace vs a plain UNet: full-field forward per spacing, and one training step.

    python benchmarks/bench_network.py                      # CUDA if available, else CPU
    python benchmarks/bench_network.py --device cpu --spacings "[3,2,1.5]" --patch 96

For the paper-sized BraTS UNet (16/32/64/128 channels, 3.3 M parameters; hypernetwork 170 M),
prints forward time and peak memory of HyperUNet with cached weights and of the same UNet with
ordinary weights for a 240 x 240 x 155 mm field of view at each spacing, then the time of one
training step (batch 2, cubic patch) of both, with ratios measured in the same run. Peak memory
is ``torch.cuda.max_memory_allocated`` on CUDA and the peak rise of the process RSS on CPU.
"""

from __future__ import annotations

import math
import platform

import fire
import torch

from custom_networks import HyperUNet, PlainUNet
from custom_networks.pipeline.profiling import best_of

FIELD_MM = (240.0, 240.0, 155.0)


def main(device: str | None = None, spacings=(1.0, 1.5, 2.0, 3.0), repeats: int = 3, patch: int = 128, amp: bool | None = None):
    """Print the forward and training-step comparison; see the module docstring."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = device.type == "cuda" if amp is None else amp
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; bf16 autocast: {amp}")
    torch.manual_seed(0)
    hyper = HyperUNet(in_channels=1, out_channels=2).to(device)
    plain = PlainUNet(in_channels=1, out_channels=2).to(device)
    print(f"UNet parameters: {sum(p.numel() for p in plain.parameters()) / 1e6:.2f} M; "
          f"hypernetwork parameters: {sum(p.numel() for p in hyper.parameters()) / 1e6:.1f} M")
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)  # noqa: E731

    print("\nfull-field forward, 240 x 240 x 155 mm")
    print("| spacing (mm) | grid | plain UNet | HyperUNet (cached) | time ratio | plain peak | HyperUNet peak |")
    print("|---|---|---|---|---|---|---|")
    hyper.eval(), plain.eval()
    for s in spacings:
        shape = [int(math.ceil(f / s / 8) * 8) for f in FIELD_MM]
        x = torch.randn(1, 1, *shape, device=device)
        spacing = torch.full((1, 3), float(s), device=device)

        def run(net):
            def fn():
                with torch.inference_mode(), autocast():
                    net(x, spacing)
            return fn

        t_plain, m_plain = best_of(run(plain), device, repeats)
        t_hyper, m_hyper = best_of(run(hyper), device, repeats)
        print(f"| {s:g} | {'x'.join(map(str, shape))} | {t_plain * 1e3:.1f} ms | {t_hyper * 1e3:.1f} ms | "
              f"{t_hyper / t_plain:.3f} | {m_plain / 2**30:.2f} GiB | {m_hyper / 2**30:.2f} GiB |")
        del x

    print(f"\ntraining step, batch 2, patch {patch}^3, Adam, DiceCE-like loss (cross-entropy)")
    x = torch.randn(2, 1, patch, patch, patch, device=device)
    y = torch.randint(0, 2, (2, patch, patch, patch), device=device)
    spacing = torch.tensor([[1.7, 1.7, 1.7]] * 2, device=device)
    results = {}
    for label, net in (("plain UNet", plain), ("HyperUNet", hyper)):
        net.train()
        opt = torch.optim.Adam(net.parameters(), 1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = torch.nn.functional.cross_entropy(net(x, spacing).float(), y)
            loss.backward()
            opt.step()

        results[label] = best_of(step, device, repeats)
    (t_p, m_p), (t_h, m_h) = results["plain UNet"], results["HyperUNet"]
    print("| model | step time | peak memory |")
    print("|---|---|---|")
    print(f"| plain UNet | {t_p * 1e3:.0f} ms | {m_p / 2**30:.2f} GiB |")
    print(f"| HyperUNet | {t_h * 1e3:.0f} ms | {m_h / 2**30:.2f} GiB |")
    print(f"training-step time ratio HyperUNet / plain: {t_h / t_p:.3f}")

    hyper.eval()
    with torch.inference_mode():
        t_gen, _ = best_of(lambda: hyper.generate_params(torch.tensor([[1.3, 1.3, 1.3]], device=device)), device, repeats)
    print(f"weight generation for one spacing (uncached): {t_gen * 1e3:.2f} ms")


if __name__ == "__main__":
    fire.Fire(main)
