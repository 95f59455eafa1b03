"""Spacing sweeps (custom_networks.research.experiments): intervals, seeded sampling, per-case evaluation, the
tidy CSV and resuming an interrupted sweep. Tiny untrained networks on a small generated case."""

import csv
import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from custom_networks import HyperUNet, PlainUNet, SpacingRange, SpacingSlidingWindowInferer
from custom_networks.bundle_tools import bundle_parser
from custom_networks.research.experiments import Method, evaluate_case, parse_interval, sample_spacings, segment_spacings, sweep_rows


def _case(shape=(24, 20, 12), spacing=(1.0, 1.0, 2.0)):
    """A ball label and an image that shows it (foreground 100, background 10, noise)."""
    grid = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    center = [n * s / 2 for n, s in zip(shape, spacing)]
    ball = sum((g - c) ** 2 for g, c in zip(grid, center)) <= 7.0**2
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    rng = np.random.RandomState(0)
    image = MetaTensor(torch.tensor(np.where(ball, 100.0, 10.0) + rng.normal(0, 1, shape), dtype=torch.float32)[None], affine=affine)
    label = MetaTensor(torch.tensor(ball, dtype=torch.float32)[None], affine=affine)
    return image, label


class _Threshold(torch.nn.Module):
    """A 'network' whose logits say foreground where the z-scored image is positive."""

    def forward(self, x, spacing=None):
        return torch.cat([-x, x], dim=1)


INFERER = SpacingSlidingWindowInferer(roi_size=(16, 16, 16), sw_batch_size=1, overlap=0.25)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[0.5,3.5]^3", ((0.5, 3.5),) * 3),
        ("[1,5]x[0.2,1.5]^2", ((1.0, 5.0), (0.2, 1.5), (0.2, 1.5))),
        ("[0.7,1.1]^2 x [1,1.4]", ((0.7, 1.1), (0.7, 1.1), (1.0, 1.4))),
    ],
)
def test_intervals_are_read_as_in_the_paper(text, expected):
    assert parse_interval(text) == expected


@pytest.mark.parametrize("text", ["0.5,3.5", "[0.5;3.5]^3", "[a,b]^3", "[3,1]^3", "[0,1]^3", "[1,nan]^3"])
def test_bad_intervals_are_refused_naming_the_text(text):
    with pytest.raises(ValueError, match="interval"):
        parse_interval(text)


def test_seeded_sampling_draws_the_same_spacings_twice():
    a, b = sample_spacings("[1,5]x[0.2,1.5]^2", 20, seed=3), sample_spacings("[1,5]x[0.2,1.5]^2", 20, seed=3)
    assert a == b and len(a) == 20
    assert sample_spacings("[1,5]x[0.2,1.5]^2", 20, seed=4) != a
    arr = np.array(a)
    assert arr[:, 0].min() >= 1 and arr[:, 0].max() <= 5 and arr[:, 1:].min() >= 0.2 and arr[:, 1:].max() <= 1.5


def test_segments_include_both_ends():
    points = segment_spacings("1,1,1", "3,3,5", 5)
    assert points[0] == (1.0, 1.0, 1.0) and points[-1] == (3.0, 3.0, 5.0) and points[2] == (2.0, 2.0, 3.0)


def test_case_dice_is_monai_dice_at_the_working_spacing():
    image, label = _case()
    out = evaluate_case(Method("as", _Threshold()), image, label, (2.0, 2.0, 2.0), 2, INFERER)
    assert out["working_shape"] == [12, 10, 12]
    # the same prediction, by hand: the image and label as acquired at 2 mm, z-score, threshold
    from custom_networks.research.experiments import _acquire

    acquired, truth = _acquire(image, label, (2.0, 2.0, 2.0))
    z = (acquired - acquired.mean()) / acquired.std()
    pred = (z > 0).long()
    expected = DiceMetric(include_background=False, reduction="none")(one_hot(pred[None], 2), one_hot(truth[None].long(), 2))
    assert out["dice"] == pytest.approx([float(expected[0, 0])], abs=1e-5)
    assert out["dice"][0] > 0.7
    assert out["seconds"] > 0 and out["peak_memory_gb"] >= 0 and out["memory_kind"] == "cpu_rss_growth"


def test_fs_resamples_to_its_spacing_and_back():
    image, label = _case()
    fs = evaluate_case(Method("fs", _Threshold(), target_spacing=(1.0, 1.0, 1.0)), image, label, (2.0, 2.0, 2.0), 2, INFERER)
    assert fs["working_shape"] == [23, 19, 23]  # run at the fixed 1 mm (MONAI keeps the corner voxels)
    assert fs["dice"][0] > 0.7  # and scored back at 2 mm
    with pytest.raises(ValueError, match="fixed spacing"):
        Method("fs", _Threshold())
    with pytest.raises(ValueError, match="not one of"):
        Method("nnunet", _Threshold())


def test_sweep_writes_tidy_rows_and_resumes_without_duplicates(tmp_path):
    torch.manual_seed(0)
    image, label = _case()
    hyper = HyperUNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), convs_per_level=1).eval()
    plain = PlainUNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), convs_per_level=1).eval()
    methods = [
        Method("hs", hyper),
        Method("hs_clamp", hyper, trained_range=SpacingRange((1.0,) * 3, (1.5,) * 3)),
        Method("as", plain),
        Method("fsnr", plain),
    ]
    spacings = [("native", None)] + [("[1,3]^3", s) for s in sample_spacings("[1,3]^3", 2, seed=0)]
    out = str(tmp_path / "sweep.csv")
    sweep_rows(out, [("c0", image, label), ("c1", image, label)], methods, spacings, 2, INFERER, progress=False)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 4 * 3
    assert list(rows[0])[:8] == ["case", "method", "sweep", "spacing_0", "spacing_1", "spacing_2", "dice_1", "mean_dice"]
    assert {r["method"] for r in rows} == {"hs", "hs_clamp", "as", "fsnr"}
    native = [r for r in rows if r["sweep"] == "native"]
    assert {(r["spacing_0"], r["spacing_1"], r["spacing_2"]) for r in native} == {("1.0", "1.0", "2.0")}
    for r in rows:
        assert math.isnan(float(r["dice_1"])) or 0.0 <= float(r["dice_1"]) <= 1.0
        assert float(r["seconds"]) > 0
    # hs runs at the sweep spacing; hs_clamp at the sweep spacing clamped into its trained range
    # [1, 1.5] mm, so on a finer grid wherever the sweep is coarser (it is still scored at the sweep spacing)
    extent_mm = np.array([24.0, 20.0, 24.0])  # the case's field of view: (24, 20, 12) voxels at (1, 1, 2) mm
    swept = [r for r in rows if r["method"] in ("hs", "hs_clamp") and r["sweep"] != "native"]
    for r in swept:
        spacing = np.array([float(r[f"spacing_{i}"]) for i in range(3)])
        run_at = np.clip(spacing, 1.0, 1.5) if r["method"] == "hs_clamp" else spacing
        shape = np.array([int(v) for v in r["working_shape"].split("x")])
        np.testing.assert_allclose(shape, extent_mm / run_at, atol=1.0, err_msg=str(r))
    coarse = [r for r in swept if r["method"] == "hs_clamp" and max(float(r[f"spacing_{i}"]) for i in range(3)) > 1.6]
    assert coarse, "no sweep spacing outside the clamp range: the draws no longer test the clamp"

    # interrupted: drop the last three rows, run again: only they are recomputed, none duplicated
    with open(out) as f:
        lines = f.readlines()
    with open(out, "w") as f:
        f.writelines(lines[:-3])
    sweep_rows(out, [("c0", image, label), ("c1", image, label)], methods, spacings, 2, INFERER, progress=False)
    with open(out, newline="") as f:
        again = list(csv.DictReader(f))
    assert len(again) == len(rows)
    keys = [(r["case"], r["method"], r["sweep"], r["spacing_0"], r["spacing_1"], r["spacing_2"]) for r in again]
    assert len(set(keys)) == len(keys)


def test_sweep_refuses_a_csv_of_another_shape(tmp_path):
    out = tmp_path / "other.csv"
    out.write_text("a,b\n1,2\n")
    image, label = _case()
    with pytest.raises(ValueError, match="has columns"):
        sweep_rows(str(out), [("c0", image, label)], [Method("as", _Threshold())], [("native", None)], 2, INFERER, progress=False)


def _write_rows(path, rows):
    from custom_networks.research.experiments import SWEEP_COLUMNS

    columns = [*SWEEP_COLUMNS, "dice_1", "mean_dice", "seconds", "peak_memory_gb", "memory_kind", "working_shape"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({"memory_kind": "cpu_rss", "working_shape": "8x8x8", "dice_1": r["mean_dice"], **r})


def test_table2_has_one_row_per_interval_and_one_column_per_method(tmp_path):
    from custom_networks.research.experiments import table2

    rows = []
    for sweep, base in (("[0.5,3.5]^3", 0.8), ("[0.8,1.2]^3", 0.9)):
        for method, shift in (("hs", 0.0), ("as", -0.1), ("fs", -0.2)):
            for k, d in enumerate((0.0, 0.1)):
                rows.append({"case": f"c{k}", "method": method, "sweep": sweep, "spacing_0": 1, "spacing_1": 1, "spacing_2": 1,
                             "mean_dice": base + shift + d, "seconds": 1.0, "peak_memory_gb": 0.1})
    path = str(tmp_path / "s.csv")
    _write_rows(path, rows)
    table = table2(path).strip().splitlines()
    assert table[0] == "| spacings | hs | as | fs |"
    assert len(table) == 2 + 2
    assert table[2] == "| [0.5,3.5]^3 | 0.85 (0.05) | 0.75 (0.05) | 0.65 (0.05) |"
    assert table[3].startswith("| [0.8,1.2]^3 | 0.95 (0.05) |")


def test_figure2_plots_are_png_files(tmp_path):
    from custom_networks.research.experiments import plot_sweep

    rows = []
    for s in segment_spacings("1,1,1", "1,1,4", 4):
        for method in ("hs", "fsnr"):
            rows.append({"case": "c0", "method": method, "sweep": "1,1,1->1,1,4", "spacing_0": s[0], "spacing_1": s[1], "spacing_2": s[2],
                         "mean_dice": 0.9 if method == "hs" else 1.0 / s[2], "seconds": 1.0 / s[2], "peak_memory_gb": 0.1 / s[2]})
    path = str(tmp_path / "s.csv")
    _write_rows(path, rows)
    files = plot_sweep(path, str(tmp_path / "plots"), SpacingRange((1.0,) * 3, (3.0,) * 3), (1.0, 1.0, 1.0))
    assert len(files) == 1
    with open(files[0], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(files[0]).size == (1500, 400)


def test_sweep_command_on_a_bundle_writes_csv_table_and_plots(tmp_path):
    """The documented command, on generated BraTS cases with small untrained checkpoints of each family."""
    import json
    import os
    import subprocess
    import sys

    
    from custom_networks.data.datalist import find_cases
    from custom_networks.data.synthetic_datasets import write_synthetic_dataset

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bundle = os.path.join(root, "bundles", "brats_mri_tumour_segmentation")
    overrides = {"patch_size": [32, 32, 32], "network_def#channels": [4, 8]}
    data = write_synthetic_dataset("brats", str(tmp_path / "data"), n_cases=1, seed=0)
    data_list = tmp_path / "datalist.json"
    data_list.write_text(json.dumps({"test": find_cases("brats", data)}))
    checkpoints = {}
    for family, extra in (("hs", None), ("as", "as.json"), ("fs", "fs.json")):
        parser = bundle_parser(bundle, ["inference.json"] + ([extra] if extra else []), overrides)
        checkpoints[family] = str(tmp_path / f"{family}.pt")
        torch.save(parser.get_parsed_content("network_def").state_dict(), checkpoints[family])
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "custom_networks.research.experiments", "sweep", bundle, "--data_list", str(data_list),
           "--output_dir", str(out), "--intervals", "['[1,3]^3']", "--n", "1", "--segments", "[['1,1,1','2,2,3']]",
           "--points", "2", "--checkpoints", json.dumps(checkpoints), "--overrides", json.dumps(overrides), "--device", "cpu"]
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 * 5 * (1 + 2 + 1)  # cases x methods x (MC + segment + native)
    assert {r["sweep"] for r in rows} == {"[1,3]^3", "1,1,1->2,2,3", "native"}
    assert (out / "table2.md").read_text().splitlines()[0] == "| spacings | hs | hs_clamp | as | fs | fsnr |"
    assert (out / "figure2_segment0.png").read_bytes()[:4] == b"\x89PNG"
    # a missing checkpoint is named
    bad = subprocess.run(cmd[:-8] + ["--checkpoints", json.dumps({"hs": str(tmp_path / "missing.pt")}), "--device", "cpu"],
                         cwd=root, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "missing.pt" in bad.stderr


def test_cost_table_compares_fs_with_hyperspace_per_native_spacing():
    import os
    import re

    from custom_networks.research.experiments import cost_table

    bundle = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundles", "brats_mri_tumour_segmentation")
    table = cost_table(bundle, spacings="1,3", field_mm=(24, 24, 16), device="cpu", repeats=1,
                       overrides={"patch_size": [16, 16, 16], "network_def#channels": [4, 8]})
    rows = [line for line in table.splitlines() if re.match(r"\| \d", line)]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "3"]
    assert rows[1].split("|")[2].strip() == "8x8x8"  # 24 mm at 3 mm, at least 8 voxels per axis
    for r in rows:
        fs_t, hs_t, ratio = (float(c.strip().split()[0]) for c in r.split("|")[3:6])
        assert ratio == pytest.approx(fs_t / hs_t, rel=0.1, abs=0.06)
    assert "FS fixed spacing [1.0, 1.0, 1.0] mm" in table


def test_cka_study_writes_matrices_and_heatmaps(tmp_path):
    import glob
    import os

    
    from custom_networks.research.experiments import cka_study
    from custom_networks.data.synthetic_datasets import write_synthetic_dataset

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bundle = os.path.join(root, "bundles", "brats_mri_tumour_segmentation")
    overrides = {"network_def#channels": [4, 8]}
    parser = bundle_parser(bundle, "inference.json", overrides)
    torch.manual_seed(0)
    ckpt = str(tmp_path / "hs.pt")
    torch.save(parser.get_parsed_content("network_def").state_dict(), ckpt)
    data = write_synthetic_dataset("brats", str(tmp_path / "data"), n_cases=1)
    image = glob.glob(os.path.join(data, "*", "*_t1ce.nii.gz"))[0]
    out = cka_study(bundle, image, spacings="1,2", output_dir=str(tmp_path / "cka"), checkpoint=ckpt,
                    region_mm=(24, 24, 16), positions=512, overrides=overrides)
    assert [os.path.basename(p) for p in out["matrices"]] == ["cka_1mm_1mm", "cka_1mm_2mm", "cka_2mm_2mm"]
    within = np.load(str(tmp_path / "cka" / "cka_1mm_1mm.npy"))
    assert within.shape[0] == within.shape[1] and np.allclose(np.diag(within), 1.0)
    across = np.load(str(tmp_path / "cka" / "cka_1mm_2mm.npy"))
    assert ((across >= -1e-9) & (across <= 1 + 1e-9)).all()
    assert (tmp_path / "cka" / "cka_1mm_2mm.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "cka" / "cka_1mm_2mm.csv").read_text().startswith("layer,")


def test_miniature_experiment_command_writes_its_table_and_plot(tmp_path):
    """The documented one-command experiment, cut to a few iterations and spacings."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "mini"
    cmd = [sys.executable, "-m", "custom_networks.research.experiments", "miniature", "--output_dir", str(out),
           "--iterations", "2", "--n", "1", "--points", "2", "--device", "cpu"]
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 5 * (1 + 1 + 2 + 1)  # test volumes x methods x spacings
    table = (out / "table2.md").read_text().splitlines()
    assert table[0] == "| spacings | hs | hs_clamp | as | fs | fsnr |" and len(table) == 2 + 4
    assert (out / "figure2_segment0.png").read_bytes()[:4] == b"\x89PNG"
    assert {p.name for p in out.glob("model_*.pt")} == {"model_hs.pt", "model_as.pt", "model_fs.pt"}
