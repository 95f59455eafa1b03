"""End-to-end inference per case, eager vs compiled, FS and two peers; training steps/s by input path.

    python benchmarks/bench_inference.py                       # CUDA if available, else CPU
    python benchmarks/bench_inference.py --device cpu --spacings "[3,2]" --peers false

One random image covering a BraTS field of view (240 x 240 x 155 mm) is acquired at each native
spacing and segmented by the whole pipeline: z-score, resampling (FS only), weight generation (a
fresh weight cache per case), forward over one whole-image window, and inversion to the native
grid. Rows:

- HyperSpace at the native spacing through :class:`custom_networks.pipeline.compiled.UNetEngine`, eager and
  compiled (``torch.compile``, bf16 on CUDA, shape buckets);
- FS: resample to 1 mm, the same UNet, resample back (eager and compiled);
- peers at 1 mm, timing only, on the same random input: an nnU-Net v2 3d_fullres-like UNet (MONAI's
  ``DynUNet`` in nnU-Net's plan for BraTS: 6 stages, 32-320 features, conv-InstanceNorm-LeakyReLU)
  through 128^3 sliding windows (overlap 0.5, Gaussian), with and without mirroring (8 flips), and
  MONAI's ``SegResNet`` as in the model-zoo ``brats_mri_segmentation`` bundle (4 input channels,
  one 240 x 240 x 160 window).

Then training steps/s of the HyperUNet with the real input path (``CacheDataset`` of decoded
volumes, random-spacing patches in ``DataLoader`` workers, copy to the device) against the same
steps on a batch already on the device. All figures of one table come from one run; the
compiled rows include no compilation (a warm-up call per shape comes first).
"""

from __future__ import annotations

import math
import platform
import time

import fire
import torch
from monai.data import CacheDataset, DataLoader, MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import DynUNet, SegResNet
from monai.transforms import Compose, Invertd, NormalizeIntensityd

from custom_networks import HyperUNet, PrepareBatchSpacing, RandSpacingPatchd, SpacingPolicyd, SpacingSlidingWindowInferer
from custom_networks.pipeline.compiled import UNetEngine
from custom_networks.pipeline.profiling import best_of

FIELD_MM = (240.0, 240.0, 155.0)


def _image(spacing: float, device, field_mm=FIELD_MM) -> MetaTensor:
    shape = [max(8, int(round(f / spacing))) for f in field_mm]
    return MetaTensor(torch.randn(1, *shape), affine=torch.diag(torch.tensor([spacing] * 3 + [1.0], dtype=torch.float64)))


def _pipeline(engine: UNetEngine, image: MetaTensor, fixed_mm: float | None, device):
    """z-score (+ resampling for FS), one whole-image window, inversion to the native grid."""
    steps = ([SpacingPolicyd("image", policy="target", target_spacing=[fixed_mm] * 3)] if fixed_mm else []) + [
        NormalizeIntensityd("image")
    ]
    chain = Compose(steps)
    divisor = engine.layout.divisor

    def run():
        engine.network.clear_cache()  # a new case: its weights are generated (once)
        d = chain({"image": image})
        x = d["image"][None].to(device)
        roi = [-(-s // divisor) * divisor for s in x.shape[2:]]
        spacing = torch.tensor([[float(v) for v in d["image"].pixdim]], device=device)
        with torch.inference_mode():
            logits = SpacingSlidingWindowInferer(roi_size=roi, sw_batch_size=1)(x, engine, spacing=spacing)[0]
            if fixed_mm:
                d["pred"] = logits.float().cpu()
                logits = Invertd("pred", transform=chain, orig_keys="image", nearest_interp=False)(d)["pred"]
            return logits.argmax(0)

    return run


def _peer_runs(device, amp: bool, field_vox, shrink: int):
    """The two peers at 1 mm on one random image; nnU-Net with and without mirroring."""
    nnunet = DynUNet(3, 4, 4, kernel_size=[3] * 6, strides=[1, 2, 2, 2, 2, 2], upsample_kernel_size=[2] * 5,
                     filters=[max(4, f // shrink) for f in (32, 64, 128, 256, 320, 320)], norm_name="instance",
                     act_name=("leakyrelu", {"negative_slope": 0.01, "inplace": True})).to(device).eval()
    segresnet = SegResNet(blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1], init_filters=max(8, 16 // shrink), in_channels=4,
                          out_channels=3, dropout_prob=0.2).to(device).eval()
    x = torch.randn(1, 4, *field_vox, device=device)
    # DynUNet downsamples 5 times: windows are multiples of 32 voxels
    window = SlidingWindowInferer(roi_size=[min(128, -(-s // 32) * 32) for s in field_vox], sw_batch_size=1, overlap=0.5, mode="gaussian")
    whole = SlidingWindowInferer(roi_size=[-(-s // 8) * 8 for s in field_vox], sw_batch_size=1)
    flips = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]

    def nn_run(mirror: bool):
        def run():
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = 0
                for f in flips if mirror else [()]:
                    xf = torch.flip(x, f) if f else x
                    y = window(xf, nnunet)
                    out = out + (torch.flip(y, f) if f else y)
            return out
        return run

    def seg_run():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return whole(x, segresnet)

    return {"nnU-Net-like, 128^3 windows": nn_run(False), "nnU-Net-like, 128^3 windows + mirroring": nn_run(True),
            "SegResNet (BraTS bundle), one window": seg_run}


def _training(hyper: HyperUNet, device, patch: int, steps: int, workers: int, amp: bool, field_mm):
    """Steps/s with the real input path and with a batch already on the device."""
    volumes = []
    for s in (1.0, 1.2, 1.5, 2.0):
        image = _image(s, "cpu", field_mm)
        volumes.append({"image": image, "label": MetaTensor((torch.rand_like(image.as_tensor()) > 0.9).float(), affine=image.affine)})
    augment = RandSpacingPatchd(["image", "label"], spacing_range=[[1.0, 3.0]] * 3, patch_size=[patch] * 3, samples_per_spacing=2)
    loader = DataLoader(CacheDataset(volumes, transform=augment, progress=False), batch_size=2, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0, drop_last=True)
    optimizer = torch.optim.Adam(hyper.parameters(), 1e-4)
    prepare = PrepareBatchSpacing()
    hyper.train()

    def step(x, y, spacing):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(hyper(x, spacing).float(), y[:, 0].long())
        loss.backward()
        optimizer.step()

    def real(n):
        done = 0
        while done < n:
            for batch in loader:
                x, y, _, kwargs = prepare(batch, device, non_blocking=True)
                step(x.as_tensor() if hasattr(x, "as_tensor") else x, y, kwargs["spacing"])
                done += 1
                if done == n:
                    break

    batch = next(iter(loader))
    x, y, _, kwargs = prepare(batch, device)
    x = x.as_tensor() if hasattr(x, "as_tensor") else x

    def resident(n):
        for _ in range(n):
            step(x, y, kwargs["spacing"])

    rates = {}
    for name, fn in (("data already on the device", resident), ("real input path", real)):
        fn(2)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates[name] = steps / (time.perf_counter() - start)
    return rates


def main(device: str | None = None, spacings=(1.0, 1.5, 2.0, 3.0), repeats: int = 3, channels=(16, 32, 64, 128),
         peers: bool = True, shrink_peers: int = 1, train_steps: int = 20, patch: int = 128, workers: int = 4,
         backend: str = "inductor", field_mm=FIELD_MM):
    """Print the tables; see the module docstring. ``channels``, ``shrink_peers``, ``field_mm``: smaller runs."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    peers = peers if isinstance(peers, bool) else str(peers).strip().lower() in ("true", "1", "yes")  # "--peers false"
    amp = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; bf16 autocast: {amp}; compile backend: {backend}")
    torch.manual_seed(0)
    hyper = HyperUNet(in_channels=1, out_channels=2, channels=tuple(channels)).to(device).eval()
    engines = {"eager": UNetEngine(hyper, compile=False, amp=amp), "compiled": UNetEngine(hyper, compile=True, amp=amp, backend=backend)}

    print(f"\nend-to-end per case, {' x '.join(f'{f:g}' for f in field_mm)} mm, whole-image window (time, peak memory added)")
    print("| native spacing (mm) | grid | HS eager | HS compiled | FS eager | FS compiled | FS / HS compiled time | FS / HS compiled memory |")
    print("|---|---|---|---|---|---|---|---|")
    for s in spacings:
        image = _image(float(s), device, field_mm)
        cells, results = [], {}
        for method, fixed in (("HS", None), ("FS", 1.0)):
            for kind, engine in engines.items():
                results[method, kind] = best_of(_pipeline(engine, image, fixed, device), device, repeats)
                t, m = results[method, kind]
                cells.append(f"{t:.3g} s, {m / 2**30:.2f} GiB")
        (t_hs, m_hs), (t_fs, m_fs) = results["HS", "compiled"], results["FS", "compiled"]
        print(f"| {float(s):g} | {'x'.join(map(str, image.shape[1:]))} | " + " | ".join(cells)
              + f" | {t_fs / t_hs:.1f} | {m_fs / max(m_hs, 1):.1f} |")

    if peers:
        vox = [int(math.ceil(f)) for f in field_mm]
        print("\npeers at 1 mm, same random input (timing only), 4 input channels")
        print("| network | time | peak memory added |")
        print("|---|---|---|")
        for label, run in _peer_runs(device, amp, vox, int(shrink_peers)).items():
            t, m = best_of(run, device, repeats)
            print(f"| {label} | {t:.3g} s | {m / 2**30:.2f} GiB |")

    if train_steps > 0:
        rates = _training(hyper, device, int(patch), int(train_steps), int(workers), amp, field_mm)
        print(f"\ntraining, batch 2, patch {patch}^3: " + "; ".join(f"{k}: {v:.2f} steps/s" for k, v in rates.items()))
        print(f"real input path / data on the device: {rates['real input path'] / rates['data already on the device']:.2f}")


if __name__ == "__main__":
    fire.Fire(main)
