"""The benchmark commands still run and print their tables (tiny settings; figures are not asserted)."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, env=None):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_bench_network_prints_forward_and_training_tables():
    out = _run("benchmarks/bench_network.py", "--device", "cpu", "--spacings", "[12]", "--patch", "16", "--repeats", "1")
    assert re.search(r"\| 12 \| 24x24x16 \| [\d.]+ ms \| [\d.]+ ms \| [\d.]+ \|", out), out
    assert re.search(r"training-step time ratio HyperUNet / plain: [\d.]+", out), out
    assert re.search(r"UNet parameters: 3\.3\d M; hypernetwork parameters: 169\.\d M", out), out


def test_bench_primary_prints_a_row_per_network():
    out = _run("benchmarks/bench_primary.py", "--device", "cpu", "--patches", "[16]", "--repeats", "1", "--channels", "[4,8,8]")
    for primary in ("unet", "sdn_unet"):
        for hyper in ("no", "yes"):
            assert re.search(rf"\| {primary} \| {hyper} \| [\d.]+ M \| [\d.]+ s \| -?[\d.]+ GiB \|", out), out
        assert re.search(rf"hypernetwork / plain time, {primary}: 16\^3 [\d.]+", out), out
    assert re.search(r"sdn_unet / unet time \(plain\): 16\^3 [\d.]+", out), out


def test_bench_augmentation_prints_per_sample_cost():
    out = _run("benchmarks/bench_augmentation.py", "--samples", "1", "--patch", "32")
    assert re.search(r"RandSpacingPatchd: \d+ ms per sample", out), out
    assert re.search(r"whole-volume Spacingd \+ crop: \d+ ms per sample", out), out


def test_bench_monailabel_sends_requests_through_the_real_server():
    """Tiny image and network: the server starts, answers every mode, and the table is printed."""
    out = _run("benchmarks/bench_monailabel.py", "--modes", "target:3,auto:5", "--repeats", "1", "--size", "[40,40,24]",
               "--overrides", '{"patch_size": [32, 32, 32], "network_def#channels": [8, 16]}',
               env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # the server on the CPU (cpu_rss), also where CUDA is available
    assert re.search(r"\| target:3 \| 3x3x3 \| \d+x\d+x\d+ \| (patch|whole) \| [\d.]+ s \| nan s \| [\d.]+ s \| - \| [\d.]+ GB \(cpu_rss\) \|", out), out
    assert re.search(r"\| auto:5 \| [\d.x]+ \| [\dx]+ \| (patch|whole) \|", out), out
    assert "image 40x40x24 at 1 mm" in out


def test_bench_inference_prints_end_to_end_peer_and_training_tables():
    out = _run("benchmarks/bench_inference.py", "--device", "cpu", "--spacings", "[16]", "--channels", "[4,8]", "--shrink_peers", "8",
               "--repeats", "1", "--train_steps", "1", "--patch", "16", "--workers", "0", "--backend", "aot_eager",
               "--field_mm", "[64,64,64]")  # DynUNet needs 64 voxels for a 2^3 bottleneck
    assert re.search(r"\| 16 \| 8x8x8 \| [\d.e-]+ s, [\d.]+ GiB \| [\d.e-]+ s, [\d.]+ GiB \| [\d.e-]+ s, [\d.]+ GiB \| [\d.e-]+ s, [\d.]+ GiB \| [\d.]+ \|", out), out
    for peer in ("nnU-Net-like, 128^3 windows", "nnU-Net-like, 128^3 windows + mirroring", "SegResNet (BraTS bundle), one window"):
        assert re.search(rf"\| {re.escape(peer)} \| [\d.e-]+ s \|", out), out
    assert re.search(r"real input path / data on the device: [\d.]+", out), out


def test_bench_pipeline_writes_the_stage_memory_and_auto_tables(tmp_path):
    """Small grids, new pipeline only: the Markdown file holds every stage row with a time."""
    _run("benchmarks/bench_pipeline.py", "--device", "cpu", "--scale", "0.2", "--old", "false", "--worst_case", "false",
         "--budgets", "[20]", "--output_dir", str(tmp_path))
    text = (tmp_path / "bench_pipeline.md").read_text()
    time = r"[\d.]+ m?s"
    assert text.count("| network | - | ") == 2, text  # both cases, no old column
    for stage in ("read", "z-score", "resample", "network", "way back", "total"):
        assert len(re.findall(rf"^\| {re.escape(stage)} \| - \| {time} \|", text, re.M)) == 2, (stage, text)
    assert len(re.findall(rf"^\| write \(old: ITK \.nii\.gz; new: \.nrrd\) \| - \| {time} \|", text, re.M)) == 2, text
    assert len(re.findall(r"^\| \*\*outside network / network\*\* \(target <= 1\.0\) \| - \| [\d.]+ \|", text, re.M)) == 2, text
    assert re.search(rf"^\| 8 \| smooth random logits \(no 8-class network run\) \| [\d.]+ % \| new \| {time} \| \d+ MB \| [\d.]+ \| (yes|no) \|", text, re.M), text
    assert re.search(rf"^\| 20 s \| [\d.x]+ mm \| [\dx]+ \| [\d.]+ s \| [\d.]+ s \|", text, re.M), text
    assert "hardware: " in text and (tmp_path / "bench_pipeline.csv").read_text().startswith("table,case,pipeline,item,value,unit")


def test_bench_occupancy_prints_memory_of_each_way_to_the_native_grid():
    out = _run("benchmarks/bench_occupancy.py", "--device", "cpu", "--extent_mm", "[16,16,12]", "--train_steps", "1")
    for kind in ("unet_upsampled", "unet_fused", "occupancy"):
        assert re.search(rf"\| {kind} \| [\d.]+ s \| [\d.]+ GiB \| ", out), out
    assert re.search(r"\| occupancy \| [\d.]+ s \| [\d.]+ GiB \| [\d.]+% \| [\d.]+ \|", out), out
    assert re.search(r"occupancy / unet_upsampled peak memory: [\d.]+; time: [\d.]+", out), out


def test_bench_ensemble_prints_one_look_ensemble_and_mirroring(tmp_path):
    out = _run("benchmarks/bench_ensemble.py", "--device", "cpu", "--spacing", "1", "--repeats", "1", "--channels", "[4,8]",
               "--field_mm", "[40,40,24]", "--output_dir", str(tmp_path))
    cells = r"\| [\d.e-]+ s \| [\d.]+ \| [\d.]+ GiB \| [\d.]+ \|"
    assert re.search(rf"^\| one look \| 1 \| 1 {cells}$", out, re.M), out
    assert re.search(rf"^\| ensemble \| 1, 1\.25, 1\.5 \| 3 {cells}$", out, re.M), out
    assert re.search(rf"^\| mirroring \| 1 \| 8 {cells}$", out, re.M), out
    assert "image: 40 x 40 x 24 mm at 1 mm (40x40x24 voxels)" in out, out
    assert (tmp_path / "bench_ensemble.md").read_text() in out
    assert (tmp_path / "bench_ensemble.csv").read_text().startswith("configuration,spacings_mm,network_runs,seconds,time_ratio,peak_bytes")
