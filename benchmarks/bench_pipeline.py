"""The whole inference pipeline per stage, the old spacing pipeline against the new one, and ``auto``.

    python benchmarks/bench_pipeline.py                                  # CUDA if available, else CPU
    python benchmarks/bench_pipeline.py --device cpu --repeats 1 --output_dir /tmp/bench
    python benchmarks/bench_pipeline.py --scale 0.25 --old false         # a quick smoke run

Two requests as a user sent them to the MONAI Label server, generated here (a smooth skull-stripped
"head": an ellipsoid of tissue with a few Gaussian blobs and noise, zero outside, float32, RAS
affine), written as ``.nii.gz`` and read back with the BraTS bundle's load transforms:

- a 181 x 217 x 181 image at 1 mm, segmented at a working spacing of 3 mm;
- a 362 x 434 x 362 image at 0.5 mm, segmented at 1.2 mm.

The network is the BraTS bundle's at its paper size (``HyperUNet``, 16/32/64/128 channels, random
weights: time does not depend on them) through :class:`custom_networks.pipeline.compiled.UNetEngine` (eager),
as one whole-image window (``custom_networks.pipeline.chain.inferer`` with the working grid rounded up
to the network's divisor, as the app's ``window=whole``); its weights for the working spacing are
generated before timing, and both pipelines first run once on a tiny image (imports, ITK's lazy
loading and other one-off costs are paid, as on a server that has answered a request).

The way back (both pipelines) maps smooth class scores of the network output's shape (a ball of
tumour in background), not the random network's own output: a trained network's scores are
smooth, with label boundaries in a few per cent of the working cells at most, while a random
network's flip class almost everywhere, the fused way back's worst case (it interpolates only
the cells that straddle a boundary). That worst case is timed apart (``--worst_case``).

Each stage is timed on its own with ``time.perf_counter()``:

- **new** (what the bundles and the app run now, built with ``custom_networks.pipeline.chain``): read
  (``LoadImaged`` ... ``Orientationd``), z-score (``NormalizeIntensityd(nonzero=True,
  channel_wise=True)`` at the native resolution), resample (``SpacingPolicyd(policy="target")``),
  network, way back (``NativeLabelsd``: softmax, fused resampling to the native grid, argmax),
  write (``custom_networks.data.fileio.write_label``: ``.nrrd`` uncompressed, as 3D Slicer asks for
  it, counted in the total; ``.nii.gz`` at gzip level 1 shown beside it);
- **old** (the previous spacing pipeline, rebuilt here from MONAI pieces exactly as it ran):
  read, resample (``GaussianSmooth(sigma)`` then MONAI ``Spacing(mode="bilinear",
  padding_mode="border", align_corners=True)``), z-score after resampling, network, way back
  (``Activationsd(softmax=True)``, ``Invertd(nearest_interp=False)``, ``AsDiscreted(argmax=True)``),
  write (MONAI Label's ``write_itk`` to ``.nii.gz``, ``uint8``, as its ``Writer`` did).

Peak memory of the way back is the growth of this process's resident set size (RSS, sampled every
2 ms by :func:`custom_networks.pipeline.profiling.measure` on the CPU, where the way back runs on every
device) above its level when the stage starts: the temporaries and the returned label, not the
class scores already held. It is measured for the network's 2 classes and, for an 8-class model
such as MM-WHS, on smooth random logits of 8 classes on the 0.5 mm case's working grid (no
8-class network is run), against the target of 2 x the native image's float32 size.

``auto``: :meth:`InferenceCost.calibrate` on this machine, then for each time budget a whole
request on the 0.5 mm image (read -> ... -> write ``.nrrd``) with :class:`BudgetSpacing` inside
``SpacingPolicyd``, the request's start in the data dict (``"request_start"``) so that the read
counts. Its candidates are clamped to 0.5 - 3 mm rather than the BraTS range (1 - 3 mm), so
that a budget may choose a spacing finer than 1 mm. (``trained_range=None`` would leave one
candidate only, the image's own 0.5 mm: ``candidate_spacings`` never coarsens past the coarsest
native axis without a range.) The weights for the spacing the planner is expected to choose
(planned with the read time measured before) are generated before the request, as a server that
has served that spacing has them.

All figures of one table come from one run; with ``--repeats N`` each pipeline runs N times and
the run with the smallest total is reported. ``--scale`` shrinks both grids per axis (the same
spacings, a smaller field of view) for a quick run.
"""

from __future__ import annotations

import csv
import ctypes
import gc
import math
import os
import platform
import tempfile
import time
from typing import Hashable, Mapping, Sequence

import fire
import nibabel as nib
import numpy as np
import psutil
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    Compose,
    GaussianSmooth,
    Invertd,
    InvertibleTransform,
    MapTransform,
    NormalizeIntensityd,
    Spacing,
)
from monai.utils import ensure_tuple_rep

from custom_networks import HyperUNet, SpacingPolicyd, SpacingRange, get_dataset, pipeline
from custom_networks.pipeline.cost import BudgetSpacing, InferenceCost
from custom_networks.pipeline.compiled import UNetEngine
from custom_networks.data.fileio import write_label
from custom_networks.pipeline.profiling import measure
from custom_networks.spacing import working_spacing
from custom_networks.pipeline.transforms import antialias_sigma, image_spacing

# what a user measured with the old pipeline through the MONAI Label server (seconds)
CASES = (
    {"name": "1 mm", "shape": (181, 217, 181), "spacing": 1.0, "working": 3.0,
     "reported": {"network": 0.28, "resample": 0.58, "Invertd": 0.44, "AsDiscreted": 0.59, "write": 0.06, "total": 2.01}},
    {"name": "0.5 mm", "shape": (362, 434, 362), "spacing": 0.5, "working": 1.2,
     "reported": {"network": 2.33, "resample": 11.39, "Invertd": 2.47, "AsDiscreted": 4.70, "write": 0.46, "total": 21.9}},
)
AUTO_RANGE = SpacingRange((0.5, 0.5, 0.5), (3.0, 3.0, 3.0))
MEMORY_CLASSES = 8  # MM-WHS: 7 structures + background
STAGES_NEW = ("read", "z-score", "resample", "network", "way back", "write")
STAGES_OLD = ("read", "resample", "z-score", "network", "Activationsd", "Invertd", "AsDiscreted", "write")


# --- the old pipeline, as it ran before the one resampler (GaussianSmooth + Spacing, Invertd + AsDiscreted)
class OldSpacingPolicyd(MapTransform, InvertibleTransform):
    """The old ``SpacingPolicyd``: ``GaussianSmooth(sigma)`` on downsampled axes, then MONAI's
    ``Spacing`` (bilinear, border padding, ``align_corners=True``); inverted by ``Spacing.inverse``."""

    def __init__(self, keys: KeysCollection, policy: str = "native", target_spacing=None, trained_range=None,
                 mode: str | Sequence[str] = "bilinear", spacing_key: str = "spacing", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.policy, self.target_spacing, self.trained_range = policy, target_spacing, trained_range
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.spacing_key = spacing_key
        self.resampler = Spacing(pixdim=1.0, mode="bilinear", padding_mode="border", align_corners=True)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        native = image_spacing(d[keys[0]])
        target = working_spacing(native, self.policy, self.target_spacing, self.trained_range)
        self.resampler.pixdim = np.asarray(target, dtype=np.float64)
        for key, mode in zip(keys, self.mode):
            img = d[key]
            sigma = antialias_sigma(image_spacing(img), target)
            if mode != "nearest" and any(s > 0 for s in sigma):
                img = GaussianSmooth(sigma=[max(s, 1e-6) for s in sigma])(img)
            d[key] = self.resampler(img, mode=mode, padding_mode="border" if mode != "nearest" else "zeros")
        d[self.spacing_key] = torch.tensor(target, dtype=torch.float32)
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resampler.inverse(d[key])
        return d


def _old_preprocessing(spec, working: float) -> Compose:
    """The old bundle ``preprocessing``: load, resample, z-score (after resampling)."""
    return Compose(spec.load_transforms(["image"], None) + [
        OldSpacingPolicyd("image", policy="target", target_spacing=[working] * 3, trained_range=spec.spacing_range),
        NormalizeIntensityd("image", nonzero=spec.zscore_nonzero, channel_wise=True),
    ])


# --- inputs ---------------------------------------------------------------------------------------
def _head(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """A smooth skull-stripped head: an ellipsoid of tissue with Gaussian blobs and noise, 0 outside."""
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    image = rng.standard_normal(tuple(shape), dtype=np.float32)
    image *= 4.0
    image += 100.0
    for _ in range(5):
        c, w, a = rng.uniform(-0.5, 0.5, 3), rng.uniform(0.08, 0.25), rng.uniform(-40.0, 60.0)
        g = [np.exp(-((v - cv) ** 2) / (2 * w * w)).astype(np.float32) for v, cv in zip((x, y, z), c)]
        image += a * (g[0] * g[1]) * g[2]
    image *= ((x / 0.85) ** 2 + (y / 0.9) ** 2 + (z / 0.8) ** 2) <= 1.0
    return image


def _write_head(path: str, shape: Sequence[int], spacing: float, seed: int) -> None:
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = [-(n - 1) * spacing / 2 for n in shape]  # RAS, centred
    nib.save(nib.Nifti1Image(_head(shape, seed), affine), path)


def _smooth_logits(shape: Sequence[int], classes: int, seed: int = 0) -> torch.Tensor:
    """Smooth class scores ``(classes, *shape)``: background 0, each structure a ball of its own."""
    rng = np.random.default_rng(seed)
    grid = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
    out = torch.zeros((classes, *shape))
    for c in range(1, classes):
        centre, radius = rng.uniform(-0.45, 0.45, 3), rng.uniform(0.12, 0.3)
        dist = sum((g - float(v)) ** 2 for g, v in zip(grid, centre)).sqrt_()
        out[c] = (radius - dist) * 20.0
    return out


def _boundary_fraction(scores: torch.Tensor) -> float:
    """Fraction of working-grid cells whose corners do not share one arg-max class (what the fused
    way back interpolates)."""
    lab = scores.argmax(0)[None, None].float()
    mixed = torch.nn.functional.max_pool3d(lab, 2, stride=1) != -torch.nn.functional.max_pool3d(-lab, 2, stride=1)
    return float(mixed.float().mean())


def _release() -> None:
    """Free what can be freed, so that the next RSS growth is the next stage's own."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _roi(shape, divisor: int) -> list[int]:
    return [-(-int(s) // divisor) * divisor for s in shape]


def _warm(engine: UNetEngine, spacing, device) -> None:
    """Generate (and cache) the weights for ``spacing`` with a tiny forward."""
    divisor = engine.layout.divisor
    with torch.no_grad():
        engine(torch.zeros(1, 1, *[divisor * 2] * 3, device=device), torch.tensor([list(spacing)], dtype=torch.float32, device=device))


def _split(pre: Compose):
    """The preprocessing steps as (load, z-score, resample)."""
    steps = list(pre.flatten().transforms)
    load = [t for t in steps if not isinstance(t, (NormalizeIntensityd, SpacingPolicyd, OldSpacingPolicyd))]
    zscore = [t for t in steps if isinstance(t, NormalizeIntensityd)]
    resample = [t for t in steps if isinstance(t, (SpacingPolicyd, OldSpacingPolicyd))]
    return load, zscore, resample


def _timed(times: dict, name: str, fn):
    start = time.perf_counter()
    out = fn()
    times[name] = time.perf_counter() - start
    return out


def _apply(steps, d):
    for t in steps:
        d = t(d)
    return d


# --- one request through each pipeline ------------------------------------------------------------
def _scores_for_way_back(scores: torch.Tensor, seed: int) -> torch.Tensor:
    """Smooth scores of the network output's shape: what a trained network gives (see the module doc)."""
    return _smooth_logits(scores.shape[1:], scores.shape[0], seed)


def _new_request(path: str, pre: Compose, engine: UNetEngine, device, out_stem: str, start: float | None = None, seed: int = 0) -> dict:
    """The new pipeline, stage by stage: the times, the way back's memory, the preprocessed image
    and the network's raw scores."""
    load, zscore, resample = _split(pre)
    post = pipeline.postprocessing(pre)  # NativeLabelsd, as the bundles and the app
    times: dict = {}
    d = {"image": path} if start is None else {"image": path, "request_start": start}
    d = _timed(times, "read", lambda: _apply(load, d))
    d = _timed(times, "z-score", lambda: _apply(zscore, d))
    d = _timed(times, "resample", lambda: _apply(resample, d))
    window = pipeline.inferer(_roi(d["image"].shape[1:], engine.layout.divisor))
    scores = _timed(times, "network", lambda: pipeline.run_network(engine, window, d, device))
    preprocessed = {"image": d["image"], "spacing": d["spacing"], "spacing_decision": d.get("spacing_decision")}
    d["pred"] = _scores_for_way_back(scores, seed)  # not timed
    _release()
    with measure("cpu", interval=0.002) as m:
        d = post(d)
    times["way back"] = m.seconds
    label = d["pred"]
    _timed(times, "write", lambda: write_label(label, out_stem + ".nrrd"))
    _timed(times, "write .nii.gz", lambda: write_label(label, out_stem + ".nii.gz"))
    times["total"] = sum(times[s] for s in STAGES_NEW)
    return {"times": times, "memory": m.added_bytes, "state": preprocessed, "label_shape": tuple(label.shape[1:]), "scores": scores}


def _old_request(path: str, pre: Compose, engine: UNetEngine, device, out_stem: str, seed: int = 0) -> dict:
    """The old pipeline, stage by stage (see the module doc)."""
    from monailabel.transform.writer import write_itk

    load, zscore, resample = _split(pre)
    times: dict = {}
    d = _timed(times, "read", lambda: _apply(load, {"image": path}))
    d = _timed(times, "resample", lambda: _apply(resample, d))
    d = _timed(times, "z-score", lambda: _apply(zscore, d))
    window = pipeline.inferer(_roi(d["image"].shape[1:], engine.layout.divisor))
    scores = _timed(times, "network", lambda: pipeline.run_network(engine, window, d, device))
    preprocessed = {"image": d["image"], "spacing": d["spacing"]}
    d["pred"] = _scores_for_way_back(scores, seed)  # not timed
    _release()
    with measure("cpu", interval=0.002) as m:
        for name, step in _old_way_back(pre).items():
            d = _timed(times, name, lambda: step(d))
    label = d["pred"]
    # MONAI Label's Writer: SqueezeDimd, then ITK, the label's affine, the request's dtype
    _timed(times, "write", lambda: write_itk(label[0].numpy(), out_stem + ".nii.gz", label.affine.numpy(), "uint8", False))
    times["way back"] = times["Activationsd"] + times["Invertd"] + times["AsDiscreted"]
    times["total"] = sum(times[s] for s in STAGES_OLD)
    return {"times": times, "memory": m.added_bytes, "state": preprocessed, "label_shape": tuple(label.shape[1:]), "scores": scores}


def _old_way_back(pre: Compose) -> dict:
    return {
        "Activationsd": Activationsd("pred", softmax=True),
        "Invertd": Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
        "AsDiscreted": AsDiscreted("pred", argmax=True),
    }


def _way_back(kind: str, pre: Compose, state: dict, scores: torch.Tensor) -> tuple[float, int]:
    """Time and RSS growth of the way back of ``scores`` on the grid of ``state`` (one pipeline's)."""
    d = {"image": state["image"], "pred": scores}
    chain = pipeline.postprocessing(pre) if kind == "new" else Compose(list(_old_way_back(pre).values()))
    _release()
    with measure("cpu", interval=0.002) as m:
        out = chain(d)
    del out
    return m.seconds, m.added_bytes


def _warm_up(work: str, spec, engine: UNetEngine, device, run_old: bool) -> None:
    """Both pipelines once on a tiny image: imports and one-off costs (ITK's lazy loading, readers,
    writers) are paid before timing, as on a server that has answered a request."""
    path = os.path.join(work, "warm.nii.gz")
    _write_head(path, (24, 26, 22), 1.0, 99)
    _new_request(path, pipeline.preprocessing(spec, policy="target", target_spacing=[3.0] * 3), engine, device, os.path.join(work, "warm_new"))
    if run_old:
        _old_request(path, _old_preprocessing(spec, 3.0), engine, device, os.path.join(work, "warm_old"))


# --- report ---------------------------------------------------------------------------------------
def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("true", "1", "yes")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _s(t) -> str:
    if t is None or (isinstance(t, float) and math.isnan(t)):
        return "-"
    return f"{t:.2f} s" if t >= 0.1 else f"{t * 1000:.0f} ms"


def main(device: str = "auto", repeats: int = 1, scale: float = 1.0, output_dir: str | None = None, old=True,
         budgets=(5.0, 20.0), worst_case=True, seed: int = 0):
    """Run both cases (old and new pipeline), the way-back memory and ``auto``; print and save the tables.

    Args:
        device: ``auto`` (CUDA if available), ``cpu`` or ``cuda``; the network runs there, the rest
            on the CPU as in the app.
        repeats: runs per pipeline and case; the run with the smallest total is reported.
        scale: grid size factor per axis for both images (same spacings), e.g. 0.25 for a quick run.
        output_dir: where ``bench_pipeline.md`` and ``bench_pipeline.csv`` go (default: a new
            temporary folder); generated images and labels go to a temporary folder removed at the end.
        old: also run the old pipeline (``--old false`` skips it; on the 0.5 mm image it needs
            several GB and tens of seconds).
        budgets: time budgets (s) of the ``auto`` requests on the 0.5 mm image; ``[]``: none.
        worst_case: also time the way back on the random network's raw scores (label boundaries
            almost everywhere: the fused way back's worst case; about a minute at full size on 2 cores).
    """
    run_old, worst_case = _flag(old), _flag(worst_case)
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    budgets = [float(b) for b in (budgets if isinstance(budgets, (list, tuple)) else [budgets])]
    output_dir = output_dir or tempfile.mkdtemp(prefix="bench_pipeline_")
    os.makedirs(output_dir, exist_ok=True)
    spec = get_dataset("brats")
    lines: list[str] = []
    rows: list[dict] = []

    def out(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    def row(table, case, pipe, item, value, unit):
        rows.append({"table": table, "case": case, "pipeline": pipe, "item": item, "value": value, "unit": unit})

    started = time.perf_counter()
    torch.manual_seed(seed)
    net = HyperUNet(spatial_dims=3, in_channels=1, out_channels=spec.num_classes, channels=spec.channels,
                    hidden_features=spec.hidden_features).to(device).eval()
    engine = UNetEngine(net, compile=False).eval()
    hw = (f"{_cpu_model()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); network on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'the CPU'}, "
          f"the other stages on the CPU")

    cases = []
    for i, c in enumerate(CASES):
        shape = tuple(max(8, int(round(n * float(scale)))) for n in c["shape"])
        cases.append({**c, "shape": shape, "seed": seed + i})
    full = float(scale) == 1.0

    with tempfile.TemporaryDirectory(prefix="bench_pipeline_work_") as work:
        _warm_up(work, spec, engine, device, run_old)
        results = {}
        for c in cases:
            path = os.path.join(work, f"head_{c['name'].replace(' ', '')}.nii.gz")
            _write_head(path, c["shape"], c["spacing"], c["seed"])
            c["path"] = path
            _warm(engine, [c["working"]] * 3, device)  # weights for the working spacing, before timing
            pre = {"new": pipeline.preprocessing(spec, policy="target", target_spacing=[c["working"]] * 3),
                   "old": _old_preprocessing(spec, c["working"])}
            runs = {"new": [], "old": []}
            for r in range(max(1, int(repeats))):
                _release()
                runs["new"].append(_new_request(path, pre["new"], engine, device, os.path.join(work, f"new_{r}"), seed=c["seed"]))
                if run_old:
                    _release()
                    runs["old"].append(_old_request(path, pre["old"], engine, device, os.path.join(work, f"old_{r}"), seed=c["seed"]))
            best = {k: min(v, key=lambda x: x["times"]["total"]) for k, v in runs.items() if v}
            results[c["name"]] = {"case": c, "pre": pre, **best}
            print(f"[{c['name']}] done after {time.perf_counter() - started:.0f} s", flush=True)

        # --- stage tables
        out(f"# Inference pipeline per stage, old and new spacing pipeline\n\nhardware: {hw}\n")
        out(f"network: BraTS HyperUNet (channels {list(spec.channels)}, {spec.num_classes} classes, random weights) through UNetEngine "
            f"(eager), one whole-image window, weights generated before timing. The way back maps smooth {spec.num_classes}-class "
            f"scores of the network output's shape (a trained network's output is smooth; the random network's is not, see the "
            f"worst case below). --repeats {repeats}, --scale {float(scale):g}\n")
        ratio = lambda a, b: f"{a / b:.1f}" if a and b else "-"  # noqa: E731
        table = [  # label, old key, new key, user's figure key
            ("read", "read", "read", None),
            ("z-score", "z-score", "z-score", None),
            ("resample", "resample", "resample", "resample"),
            ("network", "network", "network", "network"),
            ("way back", "way back", "way back", None),
            ("  Activationsd (old)", "Activationsd", None, None),
            ("  Invertd (old)", "Invertd", None, "Invertd"),
            ("  AsDiscreted (old)", "AsDiscreted", None, "AsDiscreted"),
            ("write (old: ITK .nii.gz; new: .nrrd)", "write", "write", "write"),
            ("write .nii.gz, gzip level 1 (new; not in the total)", None, "write .nii.gz", None),
            ("total", "total", "total", "total"),
        ]
        for name, res in results.items():
            c = res["case"]
            new, old_ = res["new"]["times"], res.get("old", {}).get("times", {})
            grid = "x".join(map(str, res["new"]["state"]["image"].shape[1:]))
            out(f"## {'x'.join(map(str, c['shape']))} image at {c['spacing']:g} mm, working spacing {c['working']:g} mm (working grid {grid})\n")
            out("| stage | old (measured) | new (measured) | old / new | old (user's figure, MONAI Label) |")
            out("|---|---|---|---|---|")
            for label, ko, kn, kr in table:
                to, tn = (old_.get(ko) if ko else None), (new.get(kn) if kn else None)
                tr = c["reported"].get(kr) if kr and full else None
                out(f"| {label} | {_s(to)} | {_s(tn)} | {ratio(to, tn) if ko and kn else '-'} | {_s(tr)} |")
                for pipe, t in (("old", to), ("new", tn)):
                    if t is not None:
                        row("stages", name, pipe, label.strip(), round(t, 4), "s")
            outside = {k: (v["total"] - v["network"]) / v["network"] for k, v in (("old", old_), ("new", new)) if v}
            rep = c["reported"]
            rep_ratio = (rep["total"] - rep["network"]) / rep["network"]
            old_ratio = f"{outside['old']:.2f}" if "old" in outside else "-"
            rep_cell = f"{rep_ratio:.2f}" if full else "-"
            out(f"| **outside network / network** (target <= 1.0) | {old_ratio} | {outside['new']:.2f} | - | {rep_cell} |")
            for pipe, v in outside.items():
                row("stages", name, pipe, "outside network / network", round(v, 4), "ratio")
            verdict = "meets" if outside["new"] <= 1.0 else "misses"
            out(f"\nnew: {verdict} the target (time outside the network <= 1.0 x the network's); label "
                f"{'x'.join(map(str, res['new']['label_shape']))} uint8\n")

        # --- way back: memory, and the worst case
        big = results[cases[-1]["name"]]
        native = big["case"]["shape"]
        limit = 2 * 4 * float(np.prod(native))
        out(f"## Way back on the {'x'.join(map(str, native))} ({big['case']['spacing']:g} mm) image: peak memory\n")
        out(f"Peak memory = growth of the process RSS during the stage (temporaries + the returned label; the scores on the "
            f"working grid are held before it starts), on the CPU. Target <= 2 x native float32 = {limit / 1e6:.0f} MB. "
            f"Boundary cells: working-grid cells whose corners disagree on the class (the fused way back interpolates only those).\n")
        out("| classes | scores | boundary cells | pipeline | time | peak RSS added | / (2 x native float32) | meets target |")
        out("|---|---|---|---|---|---|---|---|")
        kinds = ("new", "old") if run_old else ("new",)
        smooth2 = _scores_for_way_back(big["new"]["scores"], big["case"]["seed"])
        mem_rows = [(spec.num_classes, "smooth (as in the stage table)", _boundary_fraction(smooth2), k, big[k]["times"]["way back"],
                     big[k]["memory"]) for k in kinds]
        logits8 = _smooth_logits(big["new"]["state"]["image"].shape[1:], MEMORY_CLASSES, big["case"]["seed"])
        for k in kinds:
            t, m = _way_back(k, big["pre"][k], big[k]["state"], logits8)
            mem_rows.append((MEMORY_CLASSES, "smooth random logits (no 8-class network run)", _boundary_fraction(logits8), k, t, m))
        if worst_case:
            for k in kinds:
                raw = big[k]["scores"]
                t, m = _way_back(k, big["pre"][k], big[k]["state"], raw)
                mem_rows.append((spec.num_classes, "random network's raw output (worst case)", _boundary_fraction(raw), k, t, m))
        for classes, scores, frac, kind, t, m in mem_rows:
            out(f"| {classes} | {scores} | {frac * 100:.2f} % | {kind} | {_s(t)} | {m / 1e6:.0f} MB | {m / limit:.2f} | {'yes' if m <= limit else 'no'} |")
            row("way back", big["case"]["name"], kind, f"{classes} classes, {scores}: seconds", round(t, 4), "s")
            row("way back", big["case"]["name"], kind, f"{classes} classes, {scores}: peak RSS added", int(m), "bytes")
        del logits8, smooth2
        _release()

        # --- auto
        if budgets:
            out(f"\n## auto: BudgetSpacing on the {'x'.join(map(str, native))} ({big['case']['spacing']:g} mm) image, window whole\n")
            cost = InferenceCost.calibrate(engine, roi_size=(128, 128, 128), overlap=0.5, in_channels=1, out_channels=spec.num_classes,
                                           spacing=(1.5, 1.5, 1.5), device=device)
            out(f"calibrated on {cost.device}: {cost.seconds_per_window:.2f} s per 128^3 window, {cost.seconds_per_voxel * 1e9:.1f} ns per "
                f"native voxel (resample, way back, write), {cost.window_bytes / 1e9:.2f} GB per 128^3 window. Candidates "
                f"clamped to {AUTO_RANGE.low[0]:g} - {AUTO_RANGE.high[0]:g} mm (not the BraTS range 1 - 3 mm; trained_range=None would "
                f"leave the native 0.5 mm as the only candidate). Measured total = read + z-score + resample + network + way back + "
                f"write .nrrd, from request_start.\n")
            out("| budget | chosen spacing | working grid | predicted total | measured total | measured read / network / rest | fits budget | "
                "(predicted - measured) / measured | within 15 % | weights ready |")
            out("|---|---|---|---|---|---|---|---|---|---|")
            read_s = big["new"]["times"]["read"]
            parts = []
            for budget_s in budgets:
                budget = BudgetSpacing(cost, AUTO_RANGE, time_budget_s=budget_s, window="whole")
                pre = pipeline.preprocessing(spec, policy="target", target_spacing=[1.0] * 3)
                _split(pre)[2][0].policy = budget  # this request's own transform, as the app does
                plan = budget.decide((big["case"]["spacing"],) * 3, native, read_s)
                available = psutil.virtual_memory().available
                if plan["predicted_memory_gb"] * 1e9 > 0.8 * available:
                    out(f"| {budget_s:g} s | {plan['spacing'][0]:g} mm (planned) | - | {plan['predicted_seconds']:.2f} s | skipped: needs "
                        f"{plan['predicted_memory_gb']:.1f} GB, {available / 1e9:.1f} GB available | - | - | - | - | - |")
                    continue
                _warm(engine, plan["spacing"], device)
                generated = net.generation_count
                _release()
                start = time.perf_counter()
                res = _new_request(big["case"]["path"], pre, engine, device, os.path.join(work, f"auto_{budget_s:g}"), start=start,
                                   seed=big["case"]["seed"])
                t = res["times"]
                measured = t["total"]
                decision = res["state"]["spacing_decision"]
                predicted = float(decision["predicted_seconds"])
                error = (predicted - measured) / measured
                grid = "x".join(map(str, res["state"]["image"].shape[1:]))
                spacing = "x".join(f"{v:g}" for v in decision["spacing"])
                fits = "yes" if measured <= budget_s else "no"
                out(f"| {budget_s:g} s | {spacing} mm | {grid} | {predicted:.2f} s | {measured:.2f} s | {_s(t['read'])} / {_s(t['network'])} / "
                    f"{_s(measured - t['read'] - t['network'])} | {fits}{'' if decision['fits'] else ' (planner: nothing fits)'} | "
                    f"{error * 100:+.1f} % | {'yes' if abs(error) <= 0.15 else 'no'} | "
                    f"{'yes' if net.generation_count == generated else 'no (generated in the request)'} |")
                # the prediction's parts: what had elapsed at the decision, the window, the native-grid steps
                native_pred = float(np.prod(native)) * cost.seconds_per_voxel
                window_pred = cost.predict(decision["native_spacing"], native, decision["spacing"], "whole")["seconds"] - native_pred
                parts.append((budget_s, predicted - window_pred - native_pred, t["read"] + t["z-score"], window_pred, t["network"], native_pred,
                              t["resample"] + t["way back"] + t["write"]))
                for item, value, unit in (("spacing", decision["spacing"][0], "mm"), ("predicted total", round(predicted, 4), "s"),
                                          ("measured total", round(measured, 4), "s"), ("measured network", round(t["network"], 4), "s")):
                    row("auto", f"budget {budget_s:g} s", "new", item, value, unit)
                del res
                _release()

            if parts:
                out("\nwhere the time went (predicted / measured); the planner decides after read and z-score, and its native-grid "
                    "term (the marginal cost per native voxel, calibrated after warm-up) is compared with the measured resample + way back + write\n")
                out("| budget | elapsed at the decision (read + z-score) | network (one whole window) | native-grid steps |")
                out("|---|---|---|---|")
                for budget_s, e_pred, e_meas, w_pred, w_meas, n_pred, n_meas in parts:
                    out(f"| {budget_s:g} s | {_s(e_pred)} / {_s(e_meas)} | {_s(w_pred)} / {_s(w_meas)} | {_s(n_pred)} / {_s(n_meas)} |")

        out(f"\nwall time of the benchmark: {time.perf_counter() - started:.0f} s")

    md = os.path.join(output_dir, "bench_pipeline.md")
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(output_dir, "bench_pipeline.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["table", "case", "pipeline", "item", "value", "unit"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwritten: {md} and {os.path.join(output_dir, 'bench_pipeline.csv')}")


if __name__ == "__main__":
    fire.Fire(main)
