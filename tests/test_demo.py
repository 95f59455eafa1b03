"""The README's built-in default job, run as a user runs it (a subprocess), on fewer iterations."""

import json
import os
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from custom_networks.pipeline.inference import predict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cmd = [sys.executable, "-m", "custom_networks.research.demo", "--output_dir", str(out), "--iterations", "4"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads((out / "summary.json").read_text())


def test_demo_writes_predictions_on_the_input_grid(demo):
    out, summary = demo
    assert os.path.isfile(summary["checkpoint"])
    records = summary["predictions"]
    assert len(records) == 4  # two held-out volumes x (native, 2 mm)
    for record in records:
        pred, image = nib.load(record["output"]), nib.load(record["image"])
        assert pred.shape == image.shape
        np.testing.assert_allclose(pred.affine, image.affine, atol=1e-5)
        assert pred.get_data_dtype() == np.uint8
        assert set(np.unique(np.asanyarray(pred.dataobj))) <= {0, 1}
        assert 0.0 <= record["dice"] <= 1.0
    native = [r for r in records if "/native/" in r["output"]]
    coarse = [r for r in records if "/2mm/" in r["output"]]
    for r in native:
        np.testing.assert_allclose(r["working_spacing_mm"], nib.load(r["image"]).header.get_zooms()[:3], atol=1e-4)
    for r in coarse:
        assert r["working_spacing_mm"] == [2.0, 2.0, 2.0]


def test_predict_names_missing_file(demo, tmp_path):
    from custom_networks import HyperUNet

    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        predict(HyperUNet(channels=(4, 8)), [str(tmp_path / "nope.nii.gz")], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_readme_has_exactly_two_newcomer_commands():
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["bash scripts/quickstart.sh", "bash scripts/test.sh"]
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "bash scripts/test.sh" in ci
