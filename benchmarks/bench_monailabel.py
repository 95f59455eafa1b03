"""End-to-end time of the MONAI Label app per spacing mode: request sent to label returned.

    python benchmarks/bench_monailabel.py                                   # BraTS-sized image, all modes
    python benchmarks/bench_monailabel.py --modes "target:3,target:1.5" --repeats 3

Starts the real server (``python -m monailabel.main start_server --app monailabel_app ...``) on a
studies folder holding one generated BraTS-sized image (240 x 240 x 155 voxels at 1 mm), serving
the BraTS bundle's full-size network with freshly initialised weights (the time does not depend on
the weights), and sends the request the 3D Slicer plugin sends (``.nrrd``, ``uint8``) with
MONAI Label's client. For each mode it prints the working spacing, the time of the first request
(weights generated for a new spacing, and for ``auto`` the one-off calibration) and the fastest
repeat, the time the server measured, and the server's peak memory (CUDA allocator, or process
RSS on the CPU).

Modes: ``native``, ``clamp``, ``target:<mm>`` (e.g. ``target:1.5`` or ``target:1,1,3``), ``auto:<s>``
(time budget in seconds).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time

import fire
import nibabel as nib
import numpy as np
import requests
import torch
from monailabel.client import MONAILabelClient

from custom_networks.bundle_tools import bundle_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = "brats_mri_tumour_segmentation"
SLICER = {"result_extension": ".nrrd", "result_dtype": "uint8"}


def _image(path: str, size, spacing: float, seed: int = 0) -> None:
    """A skull-stripped-looking head: a noisy ellipsoid of tissue, zero outside."""
    rng = np.random.RandomState(seed)
    grid = np.meshgrid(*[(np.arange(n) - n / 2) / (n / 2) for n in size], indexing="ij", sparse=True)
    brain = sum(g**2 / 0.8**2 for g in grid) <= 1.0
    image = np.where(brain, 100.0 + 10.0 * rng.standard_normal(size), 0.0).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.diag([spacing, spacing, spacing, 1.0])), path)


def _checkpoint(path: str, overrides: dict) -> None:
    parser = bundle_parser(os.path.join(ROOT, "bundles", BUNDLE), "inference.json", overrides)
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)


def _start(studies: str, model_dir: str, overrides: dict, log_path: str):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", "monailabel_app", "--studies", studies,
           "--conf", "models", BUNDLE, "--conf", "model_dir", model_dir, "--conf", "bundle_overrides", json.dumps(overrides),
           "--host", "127.0.0.1", "--port", str(port)]
    log = open(log_path, "w")
    # no background scoring (MONAI Label would score the studies at start-up, beside the timed requests)
    env = {**os.environ, "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError(f"the server did not start; its log: {log_path}")


def _params(mode: str) -> dict:
    name, _, value = mode.partition(":")
    if name in ("native", "clamp") and not value:
        return {"spacing_policy": name}
    if name == "target" and value:
        return {"spacing_policy": "target", "target_spacing": value}
    if name == "auto" and value:
        return {"spacing_policy": "auto", "time_budget_s": float(value), "memory_budget_gb": 0}
    raise ValueError(f"mode {mode!r}: expected native, clamp, target:<mm> or auto:<seconds>.")


def main(
    modes="target:3,target:2,target:1.5,auto:5,auto:15,clamp",
    repeats: int = 2,
    size=(240, 240, 155),
    spacing: float = 1.0,
    window: str = "auto",
    overrides: str = "{}",
    workdir: str | None = None,
):
    """Print a Markdown table of end-to-end request times per mode.

    Args:
        modes: comma-separated modes (see the module docstring).
        repeats: requests per mode; the first is reported apart from the fastest of the others.
        size: image grid (voxels); ``spacing``: its isotropic spacing (mm).
        window: the app's ``window`` option for every request: ``auto``, ``patch`` or ``whole``.
        overrides: JSON config overrides for the bundle (e.g. a smaller network for a quick check).
        workdir: where to put the studies folder, checkpoint and server log (default: a temporary folder).
    """
    modes = [m.strip() for m in (modes.split(",") if isinstance(modes, str) else modes) if m.strip()]
    requests_params = {m: _params(m) for m in modes}
    overrides = json.loads(overrides) if isinstance(overrides, str) else dict(overrides)
    work = workdir or tempfile.mkdtemp(prefix="bench_monailabel_")
    studies, model_dir = os.path.join(work, "studies"), os.path.join(work, "models")
    os.makedirs(studies, exist_ok=True)
    os.makedirs(model_dir, exist_ok=True)
    _image(os.path.join(studies, "head.nii.gz"), tuple(int(s) for s in size), float(spacing))
    _checkpoint(os.path.join(model_dir, f"{BUNDLE}.pt"), overrides)
    proc, url = _start(studies, model_dir, overrides, os.path.join(work, "server.log"))
    rows = []
    try:
        client = MONAILabelClient(url, tmpdir=os.path.join(work, "results"))
        os.makedirs(os.path.join(work, "results"), exist_ok=True)
        for mode in modes:
            times, out = [], {}
            for _ in range(max(1, int(repeats))):
                start = time.perf_counter()
                result, out = client.infer(BUNDLE, "head", {**requests_params[mode], "window": window, **SLICER})
                times.append(time.perf_counter() - start)
                os.remove(result)
            rest = min(times[1:]) if len(times) > 1 else float("nan")
            working = "x".join(f"{s:g}" for s in out["working_spacing_mm"])
            predicted = f"{out['auto']['predicted_seconds']:.2f} s" if out.get("auto") else "-"
            rows.append(f"| {mode} | {working} | {'x'.join(map(str, out['working_shape']))} | {out['window']} | {times[0]:.2f} s | {rest:.2f} s "
                        f"| {out['seconds']:.2f} s | {predicted} | {out['peak_memory_gb']:.2f} GB ({out['memory_kind']}) |")
            print(rows[-1], flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    cpu = platform.processor() or platform.machine()
    print(f"\nimage {'x'.join(map(str, size))} at {spacing:g} mm; {os.cpu_count()} CPU cores ({cpu}); torch {torch.__version__}; "
          f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")
    print("| mode | working spacing (mm) | working grid | window | first request | fastest repeat | server-side | planned (auto) | server peak memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    fire.Fire(main)
