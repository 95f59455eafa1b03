"""The paper's spacing sweeps: Dice, time and peak memory per case, method and spacing.

Each case (image and label at their native spacing) is first resampled to the sweep spacing ``s``
(anti-aliased image, nearest label): this simulates an acquisition at ``s``. Each method then
segments that image, and the Dice per structure is computed at ``s`` against the label resampled
to ``s`` (MONAI's ``DiceMetric``). How the methods run (paper, section 4):

============  ===================================================================================
``hs``        HyperUNet at ``s``
``hs_clamp``  HyperUNet at the trained range's nearest spacing to ``s``, prediction back to ``s``
``as``        the plain UNet trained with the spacing augmentation, at ``s`` (spacing ignored)
``fs``        resample to the fixed spacing, plain UNet, prediction back to ``s``
``fsnr``      the FS weights run at ``s`` without resampling
============  ===================================================================================

The time and peak memory of a row cover the method's pipeline on the image at ``s``: z-scoring,
its resampling, weight generation (HyperSpace weights are generated afresh for every row) and the
sliding window; the simulated acquisition and the Dice are not included. Peak memory is the CUDA
allocator's peak on a GPU and the process's RSS on the CPU (:mod:`custom_networks.pipeline.profiling`).

Spacing intervals are written as in the paper: ``"[0.5,3.5]^3"`` or ``"[1,5]x[0.2,1.5]^2"``
(mm per axis, tensor axis order).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from monai.transforms import Compose

from ..pipeline.batching import SpacingSlidingWindowInferer
from ..spacing import SpacingRange, parse_spacing
from ..pipeline import chain
from ..pipeline.transforms import NativeLabelsd, SpacingPolicyd
from ..pipeline.profiling import measure

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "Method", "SWEEP_COLUMNS", "evaluate_case", "parse_interval", "sample_spacings", "segment_spacings", "sweep_rows"]

METHODS = ("hs", "hs_clamp", "as", "fs", "fsnr")
SWEEP_COLUMNS = ("case", "method", "sweep", "spacing_0", "spacing_1", "spacing_2")


def parse_interval(text: str) -> tuple[tuple[float, float], ...]:
    """``"[1,5]x[0.2,1.5]^2"`` -> ``((1, 5), (0.2, 1.5), (0.2, 1.5))`` (mm per axis).

    Raises:
        ValueError: naming the text, when a factor is malformed, a bound is not positive and finite,
            or low exceeds high.
    """
    axes: list[tuple[float, float]] = []
    for factor in str(text).replace(" ", "").split("x"):
        m = re.fullmatch(r"\[([^,\]]+),([^\]]+)\](?:\^(\d+))?", factor)
        if not m:
            raise ValueError(f"interval {text!r}: {factor!r} is not of the form [low,high] or [low,high]^n (mm).")
        try:
            lo, hi = float(m.group(1)), float(m.group(2))
        except ValueError:
            raise ValueError(f"interval {text!r}: {factor!r} has non-numeric bounds.") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
            raise ValueError(f"interval {text!r}: bounds must be positive, finite and low <= high; got [{lo}, {hi}].")
        axes += [(lo, hi)] * int(m.group(3) or 1)
    return tuple(axes)


def sample_spacings(interval: str, n: int, seed: int = 0) -> list[tuple[float, ...]]:
    """``n`` spacings drawn uniformly per axis from ``interval`` (seeded: the same draws every time)."""
    axes = parse_interval(interval)
    rng = np.random.RandomState(seed)
    return [tuple(round(float(rng.uniform(lo, hi)), 4) for lo, hi in axes) for _ in range(int(n))]


def segment_spacings(start, end, n: int) -> list[tuple[float, ...]]:
    """``n`` evenly spaced spacings from ``start`` to ``end`` (both included): a Figure-2 curve."""
    a, b = np.asarray(parse_spacing(start, what="segment start")), np.asarray(parse_spacing(end, what="segment end"))
    if int(n) < 2:
        raise ValueError(f"a segment needs at least 2 points; got n={n}.")
    return [tuple(round(float(v), 4) for v in a + (b - a) * t) for t in np.linspace(0.0, 1.0, int(n))]


@dataclass
class Method:
    """One compared model and how it is run (see the module docstring).

    Args:
        name: one of :data:`METHODS`.
        network: a :class:`~custom_networks.HyperUNet` for ``hs``/``hs_clamp``, a
            :class:`~custom_networks.PlainUNet` otherwise; in eval mode.
        target_spacing: FS's training spacing (``fs`` only).
        trained_range: HyperSpace's trained range (``hs_clamp`` only).
    """

    name: str
    network: torch.nn.Module
    target_spacing: Sequence[float] | None = None
    trained_range: SpacingRange | None = None

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ValueError(f"method {self.name!r} is not one of {METHODS}.")
        if self.name == "fs" and self.target_spacing is None:
            raise ValueError("method 'fs' needs the fixed spacing it was trained at.")
        if self.name == "hs_clamp" and self.trained_range is None:
            raise ValueError("method 'hs_clamp' needs the trained spacing range.")

    def spacing_policy(self) -> dict:
        """How the method chooses its working spacing for an image at ``s``: ``SpacingPolicyd``
        arguments (``native`` for the methods that run at ``s``)."""
        if self.name == "fs":
            return {"policy": "target", "target_spacing": list(self.target_spacing)}
        if self.name == "hs_clamp":
            return {"policy": "clamp", "trained_range": self.trained_range}
        return {"policy": "native"}


def _acquire(image, label, spacing) -> tuple[torch.Tensor, torch.Tensor]:
    """The case as if acquired at ``spacing``: anti-aliased image, nearest label."""
    d = SpacingPolicyd(["image", "label"], policy="target", target_spacing=list(spacing), mode=["bilinear", "nearest"])(
        {"image": image, "label": label}
    )
    return d["image"], d["label"]


def evaluate_case(
    method: Method,
    image: torch.Tensor,
    label: torch.Tensor,
    spacing: Sequence[float],
    num_classes: int,
    inferer: SpacingSlidingWindowInferer,
    nonzero: bool = False,
    device: str | torch.device = "cpu",
) -> dict:
    """Segment one case at ``spacing`` with ``method``; Dice per structure at ``spacing``, time, memory.

    Args:
        image, label: ``(1, X, Y, Z)`` MetaTensors at their native spacing (after the data set's
            loading transforms: oriented, label in class indices).
        spacing: the sweep spacing (mm, tensor axis order).
        num_classes: including background; Dice is reported for classes ``1..num_classes-1``.
        inferer: the sliding-window inferer (window size, overlap).
        nonzero: z-score over non-zero voxels (the data set's ``zscore_nonzero``).

    Returns:
        ``{"dice": [per structure], "seconds", "peak_memory_gb", "memory_kind", "working_shape"}``
        (memory: see :func:`_memory`);
        a structure absent from both label and prediction has Dice NaN.
    """
    acquired, truth = _acquire(image, label, spacing)
    pred, m, shape = segment(method, acquired, inferer, nonzero, device)
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    dice = metric(one_hot(pred[None], num_classes), one_hot(torch.as_tensor(truth)[None].long(), num_classes))[0]
    return {"dice": [float(v) for v in dice], "working_shape": shape, **_memory(m)}


def _memory(m) -> dict:
    """Seconds and peak memory of a pipeline: the CUDA allocator's peak (weights included) on a
    GPU; on the CPU the growth of the process's RSS, since its level includes the whole Python
    process."""
    if m.kind == "cuda_allocated":
        return {"seconds": round(m.seconds, 3), "peak_memory_gb": round(m.peak_bytes / 1e9, 4), "memory_kind": m.kind}
    return {"seconds": round(m.seconds, 3), "peak_memory_gb": round(m.added_bytes / 1e9, 4), "memory_kind": "cpu_rss_growth"}


def segment(method: Method, image: torch.Tensor, inferer: SpacingSlidingWindowInferer, nonzero: bool = False, device="cpu"):
    """Run ``method``'s whole pipeline on ``image`` (``(1, X, Y, Z)`` MetaTensor); measured.

    The steps are the inference pipeline's (:mod:`custom_networks.pipeline.chain`): z-score, resample
    to the method's working spacing, network, fused way back to labels on the image's grid.

    Returns:
        ``(label (1, X, Y, Z) on the image's grid, Measurement, working grid)``. HyperSpace weights
        are generated afresh (the cache is cleared first), so their cost is included.
    """
    policy = method.spacing_policy()
    steps = Compose(chain.spacing_steps(nonzero, policy["policy"], policy.get("target_spacing"), policy.get("trained_range")))
    back = NativeLabelsd("pred", transform=steps, orig_keys="image")
    network = method.network.to(device).eval()
    if hasattr(network, "clear_cache"):
        network.clear_cache()
    with measure(device) as m:
        d = steps({"image": image})
        d["pred"] = chain.run_network(network, inferer, d, device, amp=False)
        pred = back(d)["pred"]
    return pred, m, list(d["image"].shape[1:])


def _key(row: dict) -> tuple:
    return tuple(str(row[c]) if not c.startswith("spacing") else f"{float(row[c]):.4f}" for c in SWEEP_COLUMNS)


def sweep_rows(
    output_csv: str,
    cases: Iterable[tuple[str, torch.Tensor, torch.Tensor]],
    methods: Sequence[Method],
    spacings: Sequence[tuple[str, Sequence[float] | None]],
    num_classes: int,
    inferer: SpacingSlidingWindowInferer,
    nonzero: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> str:
    """Evaluate every case x method x spacing and append one row each to ``output_csv``.

    Rows already in the file (same case, method, sweep name and spacing) are skipped, so an
    interrupted sweep resumes where it stopped; each row is written and flushed as soon as it is
    computed.

    Args:
        cases: ``(case id, image, label)`` with image and label as for :func:`evaluate_case`.
        spacings: ``(sweep name, spacing)`` pairs, e.g. ``("[0.5,3.5]^3", (1.2, 0.7, 3.1))``; a
            ``None`` spacing means the case's native spacing.

    Returns:
        ``output_csv``.
    """
    from tqdm import tqdm

    structures = [f"dice_{c}" for c in range(1, num_classes)]
    columns = [*SWEEP_COLUMNS, *structures, "mean_dice", "seconds", "peak_memory_gb", "memory_kind", "working_shape"]
    done: set = set()
    if os.path.isfile(output_csv):
        with open(output_csv, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != columns:
                raise ValueError(f"{output_csv} has columns {reader.fieldnames}; expected {columns} (another sweep's file?).")
            done = {_key(r) for r in reader}
    new_file = not os.path.isfile(output_csv)
    os.makedirs(os.path.dirname(os.path.abspath(output_csv)), exist_ok=True)
    cases = list(cases)
    total = len(cases) * len(methods) * len(spacings)
    with open(output_csv, "a", newline="") as f, tqdm(total=total, disable=not progress, desc="sweep") as bar:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new_file:
            writer.writeheader()
        for case_id, image, label in cases:
            native = tuple(float(s) for s in image.pixdim)
            for sweep_name, spacing in spacings:
                s = native if spacing is None else tuple(float(v) for v in spacing)
                for method in methods:
                    row = {"case": case_id, "method": method.name, "sweep": sweep_name, **{f"spacing_{i}": round(v, 4) for i, v in enumerate(s)}}
                    bar.update(1)
                    if _key(row) in done:
                        continue
                    result = evaluate_case(method, image, label, s, num_classes, inferer, nonzero, device)
                    finite = [v for v in result["dice"] if not math.isnan(v)]
                    row.update({k: round(v, 4) for k, v in zip(structures, result["dice"])})
                    row.update(
                        mean_dice=round(float(np.mean(finite)), 4) if finite else float("nan"),
                        seconds=result["seconds"],
                        peak_memory_gb=result["peak_memory_gb"],
                        memory_kind=result["memory_kind"],
                        working_shape="x".join(map(str, result["working_shape"])),
                    )
                    writer.writerow(row)
                    f.flush()
                    done.add(_key(row))
    return output_csv


def _read(csv_path: str) -> list[dict]:
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"sweep CSV {csv_path} does not exist; run the sweep first.")
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def table2(csv_path: str, methods: Sequence[str] = METHODS) -> str:
    """A Markdown table shaped like the paper's Table 2: mean (std) Dice per sweep and method.

    One row per sweep (interval, segment or ``native``, in order of first appearance), one column
    per method present. Each cell is over all cases and spacings of that sweep; a case's Dice is
    its mean over structures.
    """
    rows = _read(csv_path)
    sweeps = list(dict.fromkeys(r["sweep"] for r in rows))
    present = [m for m in methods if any(r["method"] == m for r in rows)]
    lines = ["| spacings | " + " | ".join(present) + " |", "|---|" + "---|" * len(present)]
    for sweep in sweeps:
        cells = []
        for m in present:
            values = [float(r["mean_dice"]) for r in rows if r["sweep"] == sweep and r["method"] == m]
            values = [v for v in values if not math.isnan(v)]
            cells.append(f"{np.mean(values):.2f} ({np.std(values):.2f})" if values else "-")
        lines.append(f"| {sweep} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(csv_path: str, output_dir: str, trained_range: SpacingRange | None = None, target_spacing: Sequence[float] | None = None) -> list[str]:
    """PNG plots shaped like the paper's Figure 2, one set per segment sweep (``"a->b"`` names).

    For each segment: Dice vs the spacing along the segment's most varying axis (mean over cases,
    one line per method), with the trained range shaded and the FS training spacing marked; and
    time and peak memory vs the same axis. Returns the files written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read(csv_path)
    os.makedirs(output_dir, exist_ok=True)
    written = []
    segments = [s for s in dict.fromkeys(r["sweep"] for r in rows) if "->" in s]
    for index, sweep in enumerate(segments):
        part = [r for r in rows if r["sweep"] == sweep]
        spacing = np.array([[float(r[f"spacing_{i}"]) for i in range(3)] for r in part])
        axis = int(np.argmax(spacing.max(0) - spacing.min(0)))
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for method in [m for m in METHODS if any(r["method"] == m for r in part)]:
            rs = [r for r in part if r["method"] == method]
            xs = sorted({float(r[f"spacing_{axis}"]) for r in rs})
            for ax, key in zip(axes, ("mean_dice", "seconds", "peak_memory_gb")):
                ys = [np.nanmean([float(r[key]) for r in rs if float(r[f"spacing_{axis}"]) == x]) for x in xs]
                ax.plot(xs, ys, marker="o", label=method)
        for ax, title in zip(axes, ("Dice (mean over cases)", "time per case (s)", "peak memory (GB)")):
            ax.set_xlabel(f"spacing along axis {axis} (mm)")
            ax.set_title(title)
            if trained_range is not None:
                ax.axvspan(trained_range.low[axis], trained_range.high[axis], color="0.9", label="trained range")
            if target_spacing is not None:
                ax.axvline(float(target_spacing[axis]), color="k", linestyle="--", label="FS spacing")
        axes[0].set_ylim(0, 1)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"segment {sweep}")
        fig.tight_layout()
        path = os.path.join(output_dir, f"figure2_segment{index}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _bundle_parser(bundle_dir: str, extra: str | None, overrides: dict):
    from ..bundle_tools import bundle_parser

    return bundle_parser(bundle_dir, ["inference.json"] + ([extra] if extra else []), overrides)


def load_methods(bundle_dir: str, checkpoints: dict | None = None, methods: Sequence[str] = METHODS, device="cpu", overrides: dict | None = None):
    """The compared models of a bundle, with their checkpoints.

    ``checkpoints`` maps ``hs`` / ``as`` / ``fs`` to checkpoint files (``hs_clamp`` uses the
    ``hs`` weights, ``fsnr`` the ``fs`` weights); by default the bundle's ``models/model.pt``,
    ``model_as.pt`` and ``model_fs.pt`` (what its ``train.json``, ``as.json`` and ``fs.json`` write).

    Returns:
        ``(methods, spec, inferer)``: :class:`Method` list, the data set spec and the bundle's inferer.
    """
    overrides = dict(overrides or {})
    parser = _bundle_parser(bundle_dir, None, overrides)
    spec, inferer = parser.get_parsed_content("spec"), parser.get_parsed_content("inferer")
    files = {"hs": "model.pt", "as": "model_as.pt", "fs": "model_fs.pt"}
    checkpoints = {k: os.path.join(bundle_dir, "models", v) for k, v in files.items()} | dict(checkpoints or {})
    source = {"hs": "hs", "hs_clamp": "hs", "as": "as", "fs": "fs", "fsnr": "fs"}
    extra = {"hs": None, "as": "as.json", "fs": "fs.json"}
    networks: dict[str, torch.nn.Module] = {}
    out = []
    for name in methods:
        family = source.get(name)
        if family is None:
            raise ValueError(f"method {name!r} is not one of {METHODS}.")
        if family not in networks:
            path = checkpoints[family]
            if not os.path.isfile(path):
                raise FileNotFoundError(f"method {name!r} needs the {family} checkpoint {path}; train it or pass checkpoints={{'{family}': path}}.")
            net = _bundle_parser(bundle_dir, extra[family], overrides).get_parsed_content("network_def")
            state = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(state["model"] if isinstance(state.get("model"), dict) else state)
            networks[family] = net.to(device).eval()
        out.append(Method(name, networks[family], target_spacing=spec.fs_target_spacing if name == "fs" else None,
                          trained_range=spec.spacing_range if name == "hs_clamp" else None))
    return out, spec, inferer


def sweep(
    bundle_dir: str,
    dataset_dir: str | None = None,
    data_list: str | None = None,
    split: str = "test",
    output_dir: str = "sweep",
    methods: str | Sequence[str] = "hs,hs_clamp,as,fs,fsnr",
    intervals: str | Sequence[str] | None = None,
    n: int = 20,
    seed: int = 0,
    segments: Sequence | None = None,
    points: int = 8,
    native: bool = True,
    checkpoints: dict | None = None,
    device: str | None = None,
    overrides: dict | str | None = None,
    max_cases: int | None = None,
) -> dict:
    """Run a spacing sweep on a bundle's test cases; write ``sweep.csv``, ``table2.md`` and the plots.

    Example (BraTS, the paper's two intervals, a Figure-2 segment, native)::

        python -m custom_networks.research.experiments sweep bundles/brats_mri_tumour_segmentation \\
            --dataset_dir /data/BraTS2021 --intervals "['[0.5,3.5]^3','[0.8,1.2]^3']" --n 20 \\
            --segments "[['1,1,1','1,1,5']]" --output_dir brats_sweep

    Args:
        bundle_dir: the bundle (its configs decide the data set, networks and inferer).
        dataset_dir / data_list / split: the cases, as for the bundle (``custom_networks.data.datalist``).
        methods: comma-separated subset of :data:`METHODS`.
        intervals: Monte Carlo intervals such as ``"[0.5,3.5]^3"``; ``n`` seeded samples each.
        segments: ``[start, end]`` spacing pairs; ``points`` evenly spaced spacings each.
        native: also evaluate at each case's native spacing.
        checkpoints: see :func:`load_methods`.
        overrides: bundle config overrides (JSON string or dict), e.g. a smaller network.
        max_cases: evaluate only the first cases of the split.
    """
    import json

    from monai.transforms import Compose

    from ..data.datalist import load_split

    overrides = json.loads(overrides) if isinstance(overrides, str) else dict(overrides or {})
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    method_list, spec, inferer = load_methods(bundle_dir, checkpoints, names, device, overrides)
    spacings: list[tuple[str, Sequence[float] | None]] = []
    for interval in [intervals] if isinstance(intervals, str) else list(intervals or []):
        spacings += [(interval, s) for s in sample_spacings(interval, n, seed)]
    for start, end in segments or []:
        name = f"{','.join(f'{v:g}' for v in parse_spacing(start))}->{','.join(f'{v:g}' for v in parse_spacing(end))}"
        spacings += [(name, s) for s in segment_spacings(start, end, points)]
    if native:
        spacings.append(("native", None))
    if not spacings:
        raise ValueError("nothing to sweep: give intervals, segments or native=True.")
    items = load_split(spec, dataset_dir, split, data_list)[: max_cases or None]
    load = Compose(spec.load_transforms())

    def cases():
        for item in items:
            d = load(dict(item))
            yield os.path.basename(str(item["image"])).split(".")[0], d["image"], d["label"]

    csv_path = sweep_rows(os.path.join(output_dir, "sweep.csv"), cases(), method_list, spacings, spec.num_classes, inferer,
                          spec.zscore_nonzero, device)
    table = table2(csv_path)
    with open(os.path.join(output_dir, "table2.md"), "w") as f:
        f.write(table)
    plots = plot_sweep(csv_path, output_dir, spec.spacing_range, spec.fs_target_spacing)
    print(table)
    return {"csv": csv_path, "table": os.path.join(output_dir, "table2.md"), "plots": plots}


def cost_table(
    bundle_dir: str,
    spacings: str | Sequence[float] = "1,1.5,2,3",
    field_mm: Sequence[float] = (240.0, 240.0, 155.0),
    device: str | None = None,
    overrides: dict | str | None = None,
    repeats: int = 2,
) -> str:
    """FS against HyperSpace at native spacing: time and peak memory per image, as ratios.

    For images of one field of view (mm) acquired at each isotropic spacing, FS resamples to its
    fixed spacing, runs the UNet and resamples the prediction back; HyperSpace runs at the native
    spacing. The networks are the bundle's with fresh weights (time and memory do not depend on
    the weights). Every figure comes from this one run; the fastest of ``repeats`` is kept.

        python -m custom_networks.research.experiments cost_table bundles/brats_mri_tumour_segmentation
    """
    import json

    from monai.data import MetaTensor

    overrides = json.loads(overrides) if isinstance(overrides, str) else dict(overrides or {})
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    values = [float(v) for v in (str(spacings).split(",") if isinstance(spacings, str) else spacings)]
    parser = _bundle_parser(bundle_dir, None, overrides)
    spec, inferer = parser.get_parsed_content("spec"), parser.get_parsed_content("inferer")
    hs = Method("hs", parser.get_parsed_content("network_def"))
    fs = Method("fs", _bundle_parser(bundle_dir, "fs.json", overrides).get_parsed_content("network_def"), target_spacing=spec.fs_target_spacing)
    lines = [
        f"| native spacing (mm) | grid | FS time | HS time | FS / HS time | FS peak memory | HS peak memory | FS / HS memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rng = np.random.RandomState(0)
    for s in values:
        shape = tuple(max(8, int(round(f / s))) for f in field_mm)
        image = MetaTensor(torch.as_tensor(rng.normal(100.0, 10.0, shape), dtype=torch.float32)[None], affine=torch.diag(torch.tensor([s, s, s, 1.0], dtype=torch.float64)))
        results = {}
        for method in (fs, hs):
            runs = [segment(method, image, inferer, spec.zscore_nonzero, device)[1] for _ in range(max(1, int(repeats)))]
            results[method.name] = (min(r.seconds for r in runs), max(r.added_bytes for r in runs), runs[0].kind)
        (t_fs, m_fs, kind), (t_hs, m_hs, _) = results["fs"], results["hs"]
        lines.append(f"| {s:g} | {'x'.join(map(str, shape))} | {t_fs:.3g} s | {t_hs:.3g} s | {t_fs / t_hs:.1f} | "
                     f"{m_fs / 1e9:.3g} GB | {m_hs / 1e9:.3g} GB | {m_fs / max(m_hs, 1):.1f} |")
    name = torch.cuda.get_device_name(0) if str(device).startswith("cuda") else f"CPU, {os.cpu_count()} cores"
    table = "\n".join(lines) + f"\n\n{name}; FS fixed spacing {list(spec.fs_target_spacing)} mm; peak memory: {kind} growth during the pipeline\n"
    print(table)
    return table


def cka_study(
    bundle_dir: str,
    image: str,
    spacings: str | Sequence[float] = "1,1.5,2,3",
    output_dir: str = "cka",
    checkpoint: str | None = None,
    region_mm: Sequence[float] = (96.0, 96.0, 96.0),
    positions: int = 4096,
    overrides: dict | str | None = None,
) -> dict:
    """Linear CKA between the layers of UNets generated at several spacings (paper, Figure 3).

    The same physical region (a ``region_mm`` box at the image centre) is resampled to each
    isotropic spacing and fed to the UNet HyperSpace generates for that spacing. Written to
    ``output_dir``: per spacing pair ``(a, b)`` the matrix ``cka_<a>mm_<b>mm.npy`` / ``.csv``
    (rows: layers of the ``a`` network, columns: layers of the ``b`` network; ``a == b`` is the
    within-network matrix) and a heatmap ``cka_<a>mm_<b>mm.png``.

        python -m custom_networks.research.experiments cka_study bundles/brats_mri_tumour_segmentation case_t1ce.nii.gz
    """
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from monai.transforms import CenterSpatialCropd

    from .analysis import cka_matrix, conv_activations

    overrides = json.loads(overrides) if isinstance(overrides, str) else dict(overrides or {})
    values = [float(v) for v in (str(spacings).split(",") if isinstance(spacings, str) else spacings)]
    parser = _bundle_parser(bundle_dir, None, overrides)
    spec, network = parser.get_parsed_content("spec"), parser.get_parsed_content("network_def").eval()
    checkpoint = checkpoint or os.path.join(bundle_dir, "models", parser.get_parsed_content("model_file"))
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"HyperSpace checkpoint {checkpoint} does not exist; train the bundle or pass --checkpoint.")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    network.load_state_dict(state["model"] if isinstance(state.get("model"), dict) else state)
    loaded = Compose(spec.load_transforms(keys=["image"], label_key=None))({"image": image})["image"]
    divisor = network.layout.divisor
    acts = {}
    for s in values:
        # the inference pipeline's steps (z-score at native resolution, resample), then the region
        d = Compose(chain.spacing_steps(spec.zscore_nonzero, "target", s))({"image": loaded})
        size = [max(divisor, int(round(r / s / divisor)) * divisor) for r in region_mm]
        d = CenterSpatialCropd("image", size)(d)
        if list(d["image"].shape[1:]) != size:
            raise ValueError(f"{image}: the image is smaller than the {list(region_mm)} mm region at {s} mm; choose a smaller region_mm.")
        with torch.no_grad():
            acts[s] = conv_activations(network.generate(s).eval(), d["image"][None].float())
    os.makedirs(output_dir, exist_ok=True)
    written = []
    for i, a in enumerate(values):
        for b in values[i:]:
            names_a, names_b, matrix = cka_matrix(acts[a], acts[b], positions=positions)
            stem = os.path.join(output_dir, f"cka_{a:g}mm_{b:g}mm")
            np.save(stem + ".npy", matrix)
            with open(stem + ".csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["layer", *names_b])
                w.writerows([[n, *[f"{v:.4f}" for v in row]] for n, row in zip(names_a, matrix)])
            fig, ax = plt.subplots(figsize=(7, 6))
            im = ax.imshow(matrix, vmin=0, vmax=1, cmap="magma")
            ax.set_xticks(range(len(names_b)), names_b, rotation=90, fontsize=6)
            ax.set_yticks(range(len(names_a)), names_a, fontsize=6)
            ax.set_xlabel(f"layers of the UNet for {b:g} mm")
            ax.set_ylabel(f"layers of the UNet for {a:g} mm")
            fig.colorbar(im, ax=ax, label="linear CKA")
            fig.tight_layout()
            fig.savefig(stem + ".png", dpi=100)
            plt.close(fig)
            written.append(stem)
    return {"matrices": written}


def miniature(
    output_dir: str = "miniature",
    iterations: int = 400,
    n: int = 4,
    points: int = 7,
    seed: int = 0,
    device: str | None = None,
) -> dict:
    """The paper's experiment in miniature, on generated data, in about 10 minutes on a CPU.

    The size task (:mod:`custom_networks.data.synthetic`): balls of radius 5 mm are foreground, balls of
    2.5 mm background, so the right answer depends on size in millimetres, not in voxels. Trains
    HyperSpace, AS and FS (fixed spacing 1.5 mm, patches first acquired at a random spacing) for
    ``iterations`` steps each on volumes at random spacings in U(1, 2.5) mm, derives FSNR and the
    clamp fallback, and sweeps held-out volumes over the trained interval ``[1,2.5]^3``, the
    coarser ``[2.5,4]^3`` (``n`` seeded draws each), ``points`` spacings from 1 to 4 mm, and
    native spacing.

        python -m custom_networks.research.experiments miniature --output_dir miniature

    Writes ``sweep.csv``, ``table2.md`` and ``figure2_segment0.png`` to ``output_dir``.
    """
    from monai.transforms import EnsureChannelFirstd, LoadImaged
    from monai.utils import set_determinism

    from .demo import DEMO_LAYOUT, train_on_volumes
    from ..nets.hyperspace import HyperUNet
    from ..data.synthetic import write_size_task_dataset
    from ..nets.unet import PlainUNet

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    trained = SpacingRange((1.0,) * 3, (2.5,) * 3)
    # the FS spacing mid-range, as the paper's FS spacings sit inside the data's spacings
    fixed = (1.5, 1.5, 1.5)
    patch = 24
    rng = np.random.RandomState(seed)
    train_spacings = [tuple(np.round(rng.uniform(1.0, 2.5, 3), 2)) for _ in range(10)]
    train_items = write_size_task_dataset(os.path.join(output_dir, "data", "train"), train_spacings, seed=seed)
    test_spacings = ((1.0, 1.0, 1.0), (1.5, 1.5, 1.5), (2.0, 2.0, 2.0), (1.2, 1.2, 2.4))
    test_items = write_size_task_dataset(os.path.join(output_dir, "data", "test"), test_spacings, seed=seed + 1)
    layout = {k: v for k, v in DEMO_LAYOUT.items()}
    networks = {}
    for family, net, target_spacing in (
        ("hs", HyperUNet(**layout), None),
        ("as", PlainUNet(**layout), None),
        ("fs", PlainUNet(**layout), fixed),
    ):
        set_determinism(seed)
        logger.info(f"training {family} for {iterations} iterations")
        networks[family] = train_on_volumes(net, train_items, trained, iterations, batch_size=4, patch=patch,
                                            target_spacing=target_spacing, device=device)
        torch.save(networks[family].state_dict(), os.path.join(output_dir, f"model_{family}.pt"))
    methods = [
        Method("hs", networks["hs"]),
        Method("hs_clamp", networks["hs"], trained_range=trained),
        Method("as", networks["as"]),
        Method("fs", networks["fs"], target_spacing=fixed),
        Method("fsnr", networks["fs"]),
    ]
    spacings: list = [(iv, s) for iv in ("[1,2.5]^3", "[2.5,4]^3") for s in sample_spacings(iv, n, seed)]
    spacings += [("1,1,1->4,4,4", s) for s in segment_spacings(1.0, 4.0, points)] + [("native", None)]
    load = Compose([LoadImaged(keys=["image", "label"]), EnsureChannelFirstd(keys=["image", "label"])])
    cases = []
    for item in test_items:
        d = load(dict(item))
        cases.append((os.path.basename(item["image"]).replace("_image.nii.gz", ""), d["image"], d["label"]))
    # windows of the training patch size, as usual: UNets trained on small patches lean on the
    # patch border (a plain UNet trained on 16-voxel patches lost Dice 0.78 -> 0.31 on a 1.5 mm
    # test volume in 32-voxel windows)
    inferer = SpacingSlidingWindowInferer(roi_size=(patch,) * 3, sw_batch_size=4, overlap=0.25)
    csv_path = sweep_rows(os.path.join(output_dir, "sweep.csv"), cases, methods, spacings, 2, inferer, device=device)
    table = table2(csv_path)
    with open(os.path.join(output_dir, "table2.md"), "w") as f:
        f.write(table)
    plots = plot_sweep(csv_path, output_dir, trained, fixed)
    print(table)
    return {"csv": csv_path, "table": os.path.join(output_dir, "table2.md"), "plots": plots}


if __name__ == "__main__":
    import sys

    import fire

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        fire.Fire({"sweep": sweep, "table": table2, "cost_table": cost_table, "cka_study": cka_study, "miniature": miniature})
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
