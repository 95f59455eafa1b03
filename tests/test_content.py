"""Label content, not only headers: an oracle network through the real inference paths.

The oracle (:class:`oracle.ThresholdNetwork`) answers "z-scored image > threshold", and the test
images are built so that this is a known, asymmetric object mask of the file's own voxels (see
``tests/oracle.py``). Every path that loads, orients, resamples, z-scores, runs the network,
inverts and saves must then give back that mask voxel for voxel at the native spacing, and nearly
(Dice) through a coarser working grid. A mirrored, transposed or shifted label fails, which a
shape-and-affine check cannot see.

Paths: each bundle's inference workflow (``configs/inference.json``, in-process with MONAI's
``ConfigWorkflow``, and once as the ``python -m monai.bundle run inference`` command) with the
spacing policies ``native``, ``clamp`` and ``target``, and the live MONAI Label server (BraTS)
driven with its official client, as 3D Slicer does. Images: RAS, LPS, sagittal (axes swapped in the
file), oblique (20 degrees) and thick-slice geometries, each as NIfTI, NRRD and MetaImage, with
native spacings inside each bundle's trained range. One more BraTS case checks that the z-score on
a coarse grid uses the head's statistics (a small head in a wide, empty field of view). On the live
server, the ``spacing_disagreement`` scoring and strategy offer an image with heavy noise first.
"""

import glob
import json
import os
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from custom_networks import get_dataset

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
sys.path.insert(0, TESTS)  # `oracle`, here and as the bundles' network_def target (pytest's importlib mode adds nothing)
from oracle import (GEOMETRIES, ORIGIN, ThresholdNetwork, cases_for, core_image, dice, expected_label, object_image,  # noqa: E402
                    ras_affine, read_itk, write_image)
from serving import NO_AUTO_SCORING, running_server  # noqa: E402

BUNDLES = {
    "brats": "brats_mri_tumour_segmentation",
    "spider": "spider_mri_spine_segmentation",
    "mmwhs": "mmwhs_mri_heart_segmentation",
}
# z-score > 0.1: the object (z = +1) against the rest (z = -1) and BraTS's exact-zero background
# (z stays 0), with no voxel at a tie between the two classes. Sharpness 1: the class
# probabilities vary smoothly across a blurred edge, so that interpolating them back from a coarse
# grid puts the boundary where the z-score crosses the threshold (at the native grid any sharpness
# gives the same argmax).
THRESHOLD = 0.1
ORACLE = {"_target_": "oracle.ThresholdNetwork", "in_channels": 1, "out_channels": "$@spec.num_classes",
          "threshold": THRESHOLD, "sharpness": 1.0}
# a working grid about twice as coarse as the images' native spacing (mm, L-R, P-A, I-S)
COARSE = {"brats": "2.4,2.6,2.8", "spider": "6,2.4,2.6", "mmwhs": "2.4,2.6,2.8"}
MIN_DICE = 0.95
CASES = {name: cases_for(name) for name in BUNDLES}
SERVER_MODEL = BUNDLES["brats"]
SLICER = {"result_extension": ".nrrd", "result_dtype": "uint8"}  # what the Slicer plugin asks for


# --- images ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Per data set: a folder of every test image, and the oracle's answer for each (from the file)."""
    out = {}
    for name in BUNDLES:
        folder = str(tmp_path_factory.mktemp(f"{name}_images"))
        nonzero = get_dataset(name).zscore_nonzero
        volume, mask = object_image(head=nonzero)
        assert np.array_equal(expected_label(volume, nonzero, THRESHOLD), mask)  # the design holds
        for case in CASES[name]:
            assert get_dataset(name).spacing_range.contains(case.ras_spacing), case  # voxel equality in range
            write_image(os.path.join(folder, case.filename), volume, case.spacing, case.origin, case.direction)
        truth = {}
        for case in CASES[name]:
            array, geometry = read_itk(os.path.join(folder, case.filename))
            truth[case.name] = (expected_label(array, nonzero, THRESHOLD), geometry)
        out[name] = {"folder": folder, "truth": truth}
    return out


def test_images_hold_the_geometry_they_claim(images):
    """The sagittal, oblique and LPS files really carry the directions they claim (read back with
    ITK), and the objects are asymmetric, so that a flipped or transposed label cannot pass."""
    truth = images["spider"]["truth"]
    for fmt in ("nii", "nrrd", "mha"):
        sagittal = truth[f"sagittal-{fmt}"][1]["direction"]
        assert np.allclose(sagittal, GEOMETRIES["sagittal"], atol=1e-6) and not np.allclose(np.abs(sagittal), np.eye(3))
        assert np.abs(sagittal[2, 0]) == pytest.approx(1.0)  # the file's first axis runs superior-inferior
        oblique = truth[f"oblique-{fmt}"][1]["direction"]
        assert np.degrees(np.arccos(np.clip((np.trace(oblique @ GEOMETRIES["ras"].T) - 1) / 2, -1, 1))) == pytest.approx(20.0, abs=1e-3)
        lps = truth[f"lps-{fmt}"][1]["direction"]
        assert np.allclose(lps, np.eye(3), atol=1e-6)
    # the object is asymmetric: a flip of any axis moves many voxels (a swap changes the shape)
    for name in ("spider", "brats"):
        mask = images[name]["truth"]["ras-nii"][0]
        for axis in range(3):
            assert dice(mask, np.flip(mask, axis)) < 0.8, (name, axis)
    # BraTS: exact zeros outside the head, which z-scoring over non-zero voxels keeps at 0
    array, _ = read_itk(os.path.join(images["brats"]["folder"], "ras-nii.nii.gz"))
    assert 0.02 < (array == 0).mean() < 0.2


# --- the bundles' inference workflows -----------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("oracle") / "oracle.pt")
    torch.save(ThresholdNetwork().state_dict(), path)
    return path


def _override_file(folder: str) -> str:
    path = os.path.join(folder, "oracle_override.json")
    with open(path, "w") as f:
        json.dump({"network_def": ORACLE}, f)
    return path


def _run_workflow(name: str, policy: str, target, paths: list, checkpoint: str, work: str) -> str:
    """The bundle's inference workflow (``configs/inference.json`` with the oracle as its network),
    in-process with MONAI's ConfigWorkflow, on ``paths``; returns the output folder."""
    from monai.bundle import ConfigWorkflow

    bundle = os.path.join(ROOT, "bundles", BUNDLES[name])
    workflow = ConfigWorkflow(
        config_file=[os.path.join(bundle, "configs", "inference.json"), _override_file(work)],
        meta_file=os.path.join(bundle, "configs", "metadata.json"),
        logging_file=False,
        workflow_type="infer",
        bundle_root=bundle,
        output_dir=os.path.join(work, "out"),
        ckpt_path=checkpoint,
        datalist=[{"image": p} for p in paths],
        spacing_policy=policy,
        target_spacing=target,
        device="$torch.device('cpu')",  # exact oracle labels: on the CPU without autocast, also where CUDA is available
        amp=False,
    )
    workflow.initialize()
    assert isinstance(workflow.parser.get_parsed_content("network"), ThresholdNetwork)
    workflow.run()
    workflow.finalize()
    return os.path.join(work, "out")


@pytest.fixture(scope="module")
def bundle_run(images, checkpoint, tmp_path_factory):
    """``(data set, policy) -> output folder``: the bundle's inference workflow on every test image,
    run once per data set and policy."""
    done = {}

    def run(name: str, policy: str) -> str:
        if (name, policy) not in done:
            paths = [os.path.join(images[name]["folder"], c.filename) for c in CASES[name]]
            target = COARSE[name] if policy == "target" else None
            done[(name, policy)] = _run_workflow(name, policy, target, paths, checkpoint, str(tmp_path_factory.mktemp(f"{name}_{policy}")))
        return done[(name, policy)]

    return run


def _label_file(folder: str, stem: str) -> str:
    found = glob.glob(os.path.join(folder, "**", f"{stem}_seg.*"), recursive=True)
    assert len(found) == 1, f"expected one label for {stem} under {folder}, found {found}: {sorted(os.listdir(folder))}"
    return found[0]


def _read_bundle_label(folder: str, stem: str, geometry: dict) -> np.ndarray:
    """The written label (NIfTI) as an ``(i, j, k)`` array, after checking its shape and affine
    against the input file's geometry."""
    seg = nib.load(_label_file(folder, stem))
    assert seg.shape == geometry["size"], (stem, seg.shape, geometry["size"])
    np.testing.assert_allclose(seg.affine, ras_affine(geometry["spacing"], geometry["origin"], geometry["direction"]), atol=1e-3,
                               err_msg=stem)
    assert seg.get_data_dtype() == np.uint8
    label = np.asarray(seg.dataobj)
    assert set(np.unique(label).tolist()) <= {0, 1}, np.unique(label)
    return label


def _where_they_differ(label: np.ndarray, expected: np.ndarray) -> str:
    wrong = label.astype(bool) != expected
    hints = [f"{int(wrong.sum())} of {wrong.size} voxels differ (label {int(label.astype(bool).sum())}, expected {int(expected.sum())})"]
    for axis in range(3):
        hints.append(f"Dice with the expected mask flipped on axis {axis}: {dice(label, np.flip(expected, axis)):.3f}")
    return "; ".join(hints) + f"; Dice as is {dice(label, expected):.3f}"


def _case_params():
    return [pytest.param(name, case, id=f"{name}-{case.name}") for name in BUNDLES for case in CASES[name]]


@pytest.mark.parametrize("policy", ["native", "clamp"])  # clamp: every image is inside the trained range
@pytest.mark.parametrize("name, case", _case_params())
def test_bundle_inference_gives_back_the_oracle_label_voxel_for_voxel(bundle_run, images, name, case, policy):
    expected, geometry = images[name]["truth"][case.name]
    label = _read_bundle_label(bundle_run(name, policy), case.name, geometry)
    assert np.array_equal(label.astype(bool), expected), _where_they_differ(label, expected)


@pytest.mark.parametrize("name, case", _case_params())
def test_bundle_inference_on_a_coarser_grid_keeps_the_label_in_place(bundle_run, images, name, case):
    expected, geometry = images[name]["truth"][case.name]
    label = _read_bundle_label(bundle_run(name, "target"), case.name, geometry)
    score = dice(label, expected)
    assert score >= MIN_DICE, _where_they_differ(label, expected)


def test_brats_coarse_grid_z_scores_with_the_statistics_of_the_head(checkpoint, tmp_path):
    """BraTS z-scores over the non-zero voxels (the skull-stripped head). On a coarser working grid
    the anti-aliasing blur spreads the head into the exact-zero background; those halo voxels
    (values down to 1e-27) are not head, and must not enter the statistics. A small head in a wide
    field of view (as BraTS stores a brain: most of the volume is zeros) with its inner half bright:
    the object's edge is a 300 -> 100 step several voxels away from the zeros, so with the head's
    statistics (mean 200, std 100) the oracle's boundary stays put (Dice about 0.98 at 2x), while
    statistics that count the halo as tissue lower the mean towards 100 and grow the object."""
    name = "brats"
    volume, mask = core_image()
    path = str(tmp_path / "core.nii.gz")
    spacing = (1.2, 1.3, 1.4)
    write_image(path, volume, spacing, ORIGIN, GEOMETRIES["ras"])
    array, geometry = read_itk(path)
    expected = expected_label(array, True, THRESHOLD)
    assert np.array_equal(expected, mask)
    out = _run_workflow(name, "target", ",".join(f"{2 * s:g}" for s in spacing), [path], checkpoint, str(tmp_path))
    label = _read_bundle_label(out, "core", geometry)
    score = dice(label, expected)
    assert score >= MIN_DICE, _where_they_differ(label, expected)


def test_bundle_inference_command_gives_back_the_oracle_label(images, checkpoint, tmp_path):
    """The command users run (``python -m monai.bundle run inference``), once, on MM-WHS (eight classes)."""
    name = "mmwhs"
    bundle = os.path.join(ROOT, "bundles", BUNDLES[name])
    picked = [c for c in CASES[name] if c.geometry in ("sagittal", "oblique") and c.fmt != "nii"]
    datalist = [{"image": os.path.join(images[name]["folder"], c.filename)} for c in picked]
    out = str(tmp_path / "out")
    config = f"['{bundle}/configs/inference.json','{_override_file(str(tmp_path))}']"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", config, "--bundle_root", bundle,
           "--output_dir", out, "--ckpt_path", checkpoint, "--datalist", json.dumps(datalist), "--spacing_policy", "native"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [TESTS, ROOT, os.environ.get("PYTHONPATH")])),
           "CUDA_VISIBLE_DEVICES": ""}  # on the CPU, without autocast, also where CUDA is available
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    for case in picked:
        expected, geometry = images[name]["truth"][case.name]
        label = _read_bundle_label(out, case.name, geometry)
        assert np.array_equal(label.astype(bool), expected), f"{case.name}: {_where_they_differ(label, expected)}"


# --- the live MONAI Label server ----------------------------------------------------------------

@pytest.fixture(scope="module")
def server(images, checkpoint, tmp_path_factory):
    """A MONAI Label server serving the BraTS bundle with the oracle as its network, on the BraTS
    test images; stopped (with everything it started) at the end of the module."""
    from monailabel.client import MONAILabelClient

    root = tmp_path_factory.mktemp("server")
    model_dir = root / "models"
    model_dir.mkdir()
    torch.save(ThresholdNetwork().state_dict(), model_dir / f"{SERVER_MODEL}.pt")  # where --conf model_dir makes the app look
    _write_hard_images(images["brats"]["folder"])
    args = ["-m", "monailabel.main", "start_server", "--app", "monailabel_app", "--studies", images["brats"]["folder"],
            "--conf", "models", SERVER_MODEL, "--conf", "model_dir", str(model_dir),
            "--conf", "bundle_overrides", json.dumps({"network_def": ORACLE})]
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])), **NO_AUTO_SCORING}  # the oracle imports in the server
    log_path = root / "server.log"
    with running_server(args, str(log_path), env) as (url, proc):
        (root / "results").mkdir()
        yield {"client": MONAILabelClient(url, tmpdir=str(root / "results")), "url": url, "log": log_path, "model_dir": str(model_dir)}


def _write_hard_images(folder: str) -> None:
    """For the active-learning test, beside the clean test images: the RAS image with heavy noise in
    the head (std half the object's contrast), whose speckle the looks at several spacings segment
    differently, and a file that is no image."""
    volume, _ = object_image(head=True)
    noise = np.random.default_rng(0).normal(0.0, 100.0, volume.shape)
    noisy = np.where(volume > 0, np.clip(volume + noise, 1.0, None), 0.0).astype(np.float32)
    case = next(c for c in CASES["brats"] if c.name == "ras-nii")
    write_image(os.path.join(folder, "noisy.nii.gz"), noisy, case.spacing, case.origin, case.direction)
    with open(os.path.join(folder, "corrupt.nii.gz"), "wb") as f:
        f.write(b"this is not a NIfTI file")


def _server_label(server, case, params: dict, geometry: dict) -> tuple[np.ndarray, dict]:
    """The label the server returns for ``case``, as an ``(i, j, k)`` array, after checking that
    its geometry (ITK: size, spacing, origin, direction) is the input's."""
    result, out = server["client"].infer(SERVER_MODEL, case.name, {**params, **SLICER})
    assert result.endswith(".nrrd"), result
    label, got = read_itk(result)
    assert got["size"] == geometry["size"], (case.name, got["size"], geometry["size"])
    np.testing.assert_allclose(got["spacing"], geometry["spacing"], atol=1e-4, err_msg=case.name)
    np.testing.assert_allclose(got["origin"], geometry["origin"], atol=1e-3, err_msg=case.name)
    np.testing.assert_allclose(got["direction"], geometry["direction"], atol=1e-5, err_msg=case.name)
    assert label.dtype == np.uint8 and set(np.unique(label).tolist()) <= {0, 1}, np.unique(label)
    return label, out


@pytest.mark.parametrize("case", CASES["brats"], ids=[c.name for c in CASES["brats"]])
def test_server_native_label_is_the_oracle_label_voxel_for_voxel(server, images, case):
    expected, geometry = images["brats"]["truth"][case.name]
    label, out = _server_label(server, case, {"spacing_policy": "native"}, geometry)
    np.testing.assert_allclose(out["working_spacing_mm"], case.ras_spacing, atol=1e-3)
    assert np.array_equal(label.astype(bool), expected), _where_they_differ(label, expected)


@pytest.mark.parametrize("case", CASES["brats"], ids=[c.name for c in CASES["brats"]])
def test_server_coarse_label_keeps_the_object_in_place(server, images, case):
    expected, geometry = images["brats"]["truth"][case.name]
    target = ",".join(f"{2 * s:g}" for s in case.ras_spacing)
    label, out = _server_label(server, case, {"spacing_policy": "target", "target_spacing": target}, geometry)
    np.testing.assert_allclose(out["working_spacing_mm"], [2 * s for s in case.ras_spacing], atol=1e-3)
    score = dice(label, expected)
    assert score >= MIN_DICE, _where_they_differ(label, expected)


# --- active learning: the spacing-disagreement scoring and strategy on the live server ------------

def _run_scoring(server, method: str, params: dict, timeout: float = 300) -> dict:
    """``POST /scoring/<method>`` as MONAI Label runs it in the background (a subprocess that builds
    the app), waited for; the summary the method returned (its task's ``Result:`` line)."""
    import requests

    reply = requests.post(f"{server['url']}/scoring/{method}", json=params, timeout=60)
    assert reply.status_code == 200, reply.text
    deadline = time.time() + timeout
    while time.time() < deadline:
        task = requests.get(f"{server['url']}/scoring/", timeout=60).json()
        if task["id"] == reply.json()["id"] and task["status"] not in ("SUBMITTED", "RUNNING"):
            break
        time.sleep(0.5)
    assert task["status"] == "DONE", "\n".join(task.get("details", []))
    results = [line.split("Result: ", 1)[1] for line in task["details"] if "Result: " in line]
    assert results, task["details"]
    return json.loads(results[-1])


def _image_infos(client, key: str, timeout: float = 60) -> dict:
    """Image id -> datastore info, once every image holds ``key`` (the server reloads the datastore
    file that the scoring subprocess wrote when its file watcher sees the change)."""
    deadline = time.time() + timeout
    while True:
        infos = {i: o["image"]["info"] for i, o in client.datastore()["objects"].items()}
        if all(key in info for info in infos.values()) or time.time() > deadline:
            return infos
        time.sleep(0.5)


def test_server_offers_the_noisy_image_first_by_spacing_disagreement(server):
    """``/scoring/spacing_disagreement`` scores every unlabelled image in MONAI Label's background
    task (the oracle's looks at 1x, 1.25x and 1.5x the working spacing agree but on the object's
    boundary, and disagree on the noisy image's speckle), the scores land in the datastore, and
    "Next Sample" with the ``spacing_disagreement`` strategy gives the noisy image first, then the
    clean ones, and the file that is no image last."""
    client = server["client"]
    clean = [c.name for c in CASES["brats"]]
    summary = _run_scoring(server, "spacing_disagreement", {})
    assert summary["model"] == SERVER_MODEL and summary["total"] == len(clean) + 2, summary
    assert (summary["executed"], summary["failed"], summary["skipped"]) == (len(clean) + 1, 1, 0), summary
    infos = _image_infos(client, "spacing_disagreement")
    scores = {i: info["spacing_disagreement"] for i, info in infos.items()}
    print("spacing disagreement:", {i: round(v, 4) for i, v in sorted(scores.items(), key=lambda kv: -kv[1])})
    assert scores["noisy"] > 2 * max(scores[c] for c in clean), scores
    assert min(scores[c] for c in clean) > 0.0 and scores["corrupt"] == -1.0, scores
    assert infos["corrupt"]["spacing_disagreement_meta"]["error"].startswith("415"), infos["corrupt"]
    meta = infos["noisy"]["spacing_disagreement_meta"]
    assert meta["model"] == SERVER_MODEL and meta["checkpoint"] == os.path.join(server["model_dir"], f"{SERVER_MODEL}.pt"), meta
    # the stored score is the one an ensemble request from Slicer reports
    _, out = client.infer(SERVER_MODEL, "noisy", {"spacing_ensemble": True, **SLICER})
    assert out["spacing_ensemble"]["score"] == pytest.approx(scores["noisy"], abs=1e-6)
    assert out["spacing_ensemble"]["spacings"] == meta["spacings"]

    served = [client.next_sample("spacing_disagreement", {})["id"] for _ in range(len(scores))]
    assert served[0] == "noisy" and served[-1] == "corrupt", served
    assert sorted(served) == sorted(scores), served  # each image once, highest score first
    assert [scores[i] for i in served] == sorted(scores.values(), reverse=True), served
