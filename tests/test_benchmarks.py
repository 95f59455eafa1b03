"""The benchmark commands still run and print their tables (tiny settings; figures are not asserted)."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_bench_network_prints_forward_and_training_tables():
    out = _run("benchmarks/bench_network.py", "--device", "cpu", "--spacings", "[12]", "--patch", "16", "--repeats", "1")
    assert re.search(r"\| 12 \| 24x24x16 \| [\d.]+ ms \| [\d.]+ ms \| [\d.]+ \|", out), out
    assert re.search(r"training-step time ratio HyperUNet / plain: [\d.]+", out), out
    assert re.search(r"UNet parameters: 3\.3\d M; hypernetwork parameters: 169\.\d M", out), out


def test_bench_augmentation_prints_per_sample_cost():
    out = _run("benchmarks/bench_augmentation.py", "--samples", "1", "--patch", "32")
    assert re.search(r"RandSpacingPatchd: \d+ ms per sample", out), out
    assert re.search(r"whole-volume Spacingd \+ crop: \d+ ms per sample", out), out
