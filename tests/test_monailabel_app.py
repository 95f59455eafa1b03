"""The MONAI Label app as 3D Slicer uses it: a real server process on 127.0.0.1, driven with MONAI
Label's own client (the REST calls the Slicer plugin makes), on a studies folder of generated
NIfTI / NRRD / MHA volumes. The bundles are served with CPU-sized overrides (fewer channels,
smaller windows) so that training takes seconds.

The tests share one server and pass in any order. What the server answers before anything is
labelled or trained is asked once, by the ``untouched`` fixture, before the first test that labels
or trains (each of them requests it); the segmentation model is trained once, by the ``trained``
fixture, for the tests that need labels and weights.
"""

import glob
import hashlib
import importlib
import json
import math
import os
import shutil
import sys
import time

import itk
import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from custom_networks.data.synthetic_datasets import write_synthetic_dataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the tests' own helpers
from serving import NO_AUTO_SCORING, running_server  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "brats_mri_tumour_segmentation"
INTERACTIVE = MODEL + "_interactive"  # its click-guided (DeepEdit-style) variant
OVERRIDES = {"patch_size": [32, 32, 32], "network_def#channels": [8, 16], "num_workers": 0, "cache_rate": 0.0}
SLICER = {"result_extension": ".nrrd", "result_dtype": "uint8"}  # what the Slicer plugin asks for
TUMOUR = [{"name": "tumour_core", "idx": 3}]  # a Slicer segment order that differs from the model's
README_COMMAND = ".venv/bin/python -m monailabel.main start_server --app monailabel_app --studies /path/to/images --conf models all"


def test_the_readmes_give_the_command_these_tests_run():
    for readme in ("README.md", "monailabel_app/README.md"):
        with open(os.path.join(ROOT, readme)) as f:
            assert README_COMMAND in f.read(), readme


def write_brats_studies(root: str) -> tuple[str, str]:
    """Three generated BraTS T1-CE volumes (about 48 x 48 x 32 voxels) as ``studies/case{i}.nii.gz``
    and their tumour-core labels (value 3) as ``labels/case{i}.nii.gz``."""
    studies, labels = os.path.join(root, "studies"), os.path.join(root, "labels")
    os.makedirs(studies)
    os.makedirs(labels)
    brats = write_synthetic_dataset("brats", os.path.join(root, "brats"), n_cases=3, seed=0)
    for i, case in enumerate(sorted(os.listdir(brats))):
        shutil.copy(os.path.join(brats, case, f"{case}_t1ce.nii.gz"), os.path.join(studies, f"case{i}.nii.gz"))
        seg = nib.load(os.path.join(brats, case, f"{case}_seg.nii.gz"))
        core = np.isin(np.asarray(seg.dataobj), [1, 4])  # BraTS necrosis + enhancing = tumour core
        nib.save(nib.Nifti1Image((3 * core).astype(np.uint8), seg.affine), os.path.join(labels, f"case{i}.nii.gz"))
    return studies, labels


def _write_studies(root: str) -> tuple[str, str]:
    """Images in three formats and orientations, a corrupt file, and hand-made labels (value 3)."""
    studies, labels = write_brats_studies(root)
    # thick slices (0.8 x 0.8 x 5 mm) as NRRD
    thick = write_synthetic_dataset("brats", os.path.join(root, "thick"), n_cases=1, seed=1, spacings=[[0.8, 0.8, 5.0]])
    itk.imwrite(itk.imread(glob.glob(os.path.join(thick, "*", "*_t1ce.nii.gz"))[0]), os.path.join(studies, "thick.nrrd"))
    # sagittal DICOM-like axis order and directions, as MHA
    spine = write_synthetic_dataset("spider", os.path.join(root, "spine"), n_cases=1, seed=2)
    shutil.copy(glob.glob(os.path.join(spine, "images", "*.mha"))[0], os.path.join(studies, "spine.mha"))
    with open(os.path.join(studies, "corrupt.nii.gz"), "wb") as f:
        f.write(b"this is not a NIfTI file")
    # images whose content or header no model should run on
    bad = np.random.default_rng(0).random((24, 24, 16)).astype(np.float32)
    bad[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(bad, np.eye(4)), os.path.join(studies, "nan.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((1, 1, 1), np.float32), np.eye(4)), os.path.join(studies, "tiny.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((24, 24, 16), np.float32), np.diag([1.0, 1.0, 1e-6, 1.0])), os.path.join(studies, "tinyspacing.nii.gz"))
    return studies, labels


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("monailabel"))
    studies, labels = _write_studies(root)
    model_dir = os.path.join(root, "models")
    # the README's command, plus where to keep checkpoints and the CPU-sized overrides
    args = [*README_COMMAND.replace("/path/to/images", studies).split()[1:],
            "--conf", "model_dir", model_dir, "--conf", "bundle_overrides", json.dumps(OVERRIDES), "--conf", "warmup", "true"]
    log_path = os.path.join(root, "server.log")
    with running_server(args, log_path, env=NO_AUTO_SCORING) as (url, proc):
        client = MONAILabelClient(url, tmpdir=os.path.join(root, "results"))
        os.makedirs(os.path.join(root, "results"))
        yield {"client": client, "url": url, "studies": studies, "labels": labels, "model_dir": model_dir, "proc": proc, "log": log_path}


def _error(call, *args) -> tuple[int, str]:
    """(HTTP status, message) of a request that must fail."""
    with pytest.raises(MONAILabelClientException) as e:
        call(*args)
    msg = e.value.msg
    status = int(msg.split("Status: ")[1].split(";")[0])
    return status, msg


def _geometry(path: str) -> tuple:
    image = itk.imread(path)
    return (tuple(itk.size(image)), np.array(image.GetSpacing()), np.array(image.GetOrigin()),
            itk.array_from_matrix(image.GetDirection()))


def _assert_same_geometry(result: str, image: str) -> np.ndarray:
    (size_r, spacing_r, origin_r, direction_r), (size_i, spacing_i, origin_i, direction_i) = _geometry(result), _geometry(image)
    assert size_r == size_i, (result, image)
    np.testing.assert_allclose(spacing_r, spacing_i, atol=1e-4)
    np.testing.assert_allclose(origin_r, origin_i, atol=1e-3)
    np.testing.assert_allclose(direction_r, direction_i, atol=1e-5)
    return itk.array_from_image(itk.imread(result))


def _still_serving(server):
    assert MODEL in server["client"].info()["models"]


@pytest.fixture(scope="module")
def untouched(server):
    """The server's answers before anything is labelled or trained, asked once. Every test that
    saves a label or trains requests this fixture, so that it runs first, whatever the test order."""
    client = server["client"]
    return {
        "info": client.info(),
        "infer": _error(client.infer, MODEL, "case0", SLICER),
        "train": _error(client.train_start, MODEL, {"max_epochs": 1}),
        "first": client.next_sample("first", {})["id"],
        "random": client.next_sample("random", {})["id"],
    }


def test_info_lists_every_bundle_with_its_options(server, untouched):
    info = untouched["info"]
    bundles = {"brats_mri_tumour_segmentation", "spider_mri_spine_segmentation", "mmwhs_mri_heart_segmentation", "vessel_mra_segmentation"}
    assert set(info["models"]) == bundles | {b + "_interactive" for b in bundles} | {MODEL + "_occupancy"}
    assert {m["type"] for m in info["models"].values()} == {"segmentation", "deepedit"}
    interactive = info["models"][INTERACTIVE]
    assert interactive["type"] == "deepedit" and interactive["labels"] == {"background": 0, "tumour_core": 1}
    assert interactive["config"]["spacing_policy"][0] == "clamp" and interactive["trained"] is False
    model = info["models"][MODEL]
    assert model["labels"] == {"tumour_core": 1}
    assert info["models"]["vessel_mra_segmentation"]["labels"] == {"vessel": 1}
    assert model["config"]["spacing_policy"][0] == "clamp" and set(model["config"]["spacing_policy"]) == {"clamp", "native", "target", "auto"}
    assert set(model["config"]) >= {"target_spacing", "memory_budget_gb", "time_budget_s"}
    assert model["config"]["window"] == ["auto", "patch", "whole"]
    assert model["config"]["spacing_ensemble"] is False
    # only types Slicer's options panel can show
    assert all(isinstance(v, (bool, int, float, str, list)) for v in model["config"].values())
    assert model["trained"] is False and "Not trained yet" in model["description"]
    assert set(info["trainers"][MODEL]["config"]) >= {"max_epochs", "learning_rate", "spacing_range_mm"}
    assert set(info["strategies"]) == {"random", "first", "spacing_disagreement"}
    assert set(info["scoring"]) == {"spacing_disagreement"} and info["scoring"]["spacing_disagreement"]["model"] == MODEL
    assert info["datastore"]["total"] == 9
    # what is served does not change with what was labelled or trained since
    now = server["client"].info()
    assert set(now["models"]) == set(info["models"]) and now["models"][MODEL]["config"] == model["config"]


def test_infer_without_weights_says_how_to_get_them(untouched):
    status, msg = untouched["infer"]
    assert status == 409 and "no trained weights yet" in msg and f"/train/{MODEL}" in msg


@pytest.mark.parametrize(
    "model, image, params, status, words",
    [
        ("no_such_model", "case0", {}, 404, "no model 'no_such_model'"),
        (MODEL, "no_such_image", {}, 404, "image 'no_such_image' is not in the datastore"),
        (MODEL, "case0", {"spacing_policy": "fastest"}, 400, "spacing_policy 'fastest' is not one of"),
        (MODEL, "case0", {"spacing_policy": "target", "target_spacing": ""}, 400, "has 0 values"),
        (MODEL, "case0", {"spacing_policy": "target", "target_spacing": "0"}, 400, "must be positive finite"),
        (MODEL, "case0", {"spacing_policy": "target", "target_spacing": "-1.5"}, 400, "must be positive finite"),
        (MODEL, "case0", {"spacing_policy": "target", "target_spacing": "nan"}, 400, "must be positive finite"),
        (MODEL, "case0", {"spacing_policy": "target", "target_spacing": "a,b,c"}, 400, "'a,b,c' is not numeric"),
        (MODEL, "case0", {"spacing_policy": "auto", "time_budget_s": "soon"}, 400, "time_budget_s 'soon' is not a number"),
        (MODEL, "case0", {"window": "tiles"}, 400, "window 'tiles' is not one of"),
        (MODEL, "case0", {"spacing_ensemble": "maybe"}, 400, "spacing_ensemble 'maybe' is not true or false"),
        (MODEL, "corrupt", {}, 415, "corrupt.nii.gz' is not an image this server can read"),
        (MODEL, "nan", {}, 422, "has 1 NaN or infinite voxel(s)"),
        (MODEL, "tiny", {}, 422, "expected at least 4 voxels on every axis"),
        (MODEL, "tinyspacing", {"spacing_policy": "native"}, 422, "expected 0.01 to 50 mm on every axis"),
    ],
)
def test_bad_infer_requests_get_a_clear_error_and_the_server_goes_on(server, model, image, params, status, words):
    got, msg = _error(server["client"].infer, model, image, {**params, **SLICER})
    assert got == status and words in msg, msg
    _still_serving(server)


def test_training_without_labels_is_refused(server, untouched):
    status, msg = untouched["train"]
    assert status == 409 and "no labelled images" in msg
    status, msg = _error(server["client"].train_start, "no_such_model", {})
    assert status == 404 and "no model 'no_such_model'" in msg
    _still_serving(server)


def test_activelearning_returns_unlabelled_images(server, untouched):
    client = server["client"]
    assert untouched["first"] == "case0"  # first by sorted id
    unlabelled = {"case0", "case1", "case2", "thick", "spine", "corrupt", "nan", "tiny", "tinyspacing"}
    assert untouched["random"] in unlabelled
    status, msg = _error(client.next_sample, "smartest", {})
    assert status == 404 and "no strategy 'smartest'" in msg


def _train(client, params, timeout=300, model=MODEL) -> dict:
    client.train_start(model, params)
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.train_status()
        if status["status"] not in ("SUBMITTED", "RUNNING"):
            return status
        time.sleep(1)
    raise AssertionError(f"training did not finish in {timeout} s: {status}")


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _app_module(name: str):
    """A module of the app's ``lib`` package (e.g. ``lib.configs``), imported as the server imports it."""
    sys.path.insert(0, os.path.join(ROOT, "monailabel_app"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def _bundle_config(model_dir, name: str = MODEL, overrides: dict = OVERRIDES, conf: dict | None = None):
    """The app's ``HyperSpaceConfig`` of bundle ``name``, checkpoints in ``model_dir``, without a server."""
    config = _app_module("lib.configs").HyperSpaceConfig()
    config.init(name, str(model_dir), {"compile": "false"} if conf is None else conf, None,
                bundle_path=os.path.join(ROOT, "bundles", name), overrides=overrides)
    return config


def _save_labels(server) -> None:
    """The hand-made tumour-core labels of case0-2, saved as Slicer saves them."""
    for i in range(3):
        saved = server["client"].save_label(f"case{i}", os.path.join(server["labels"], f"case{i}.nii.gz"), params={"label_info": TUMOUR})
        assert saved["label"] == f"case{i}"


@pytest.fixture(scope="module")
def trained(server, untouched):
    """Labels saved from 'Slicer' for case0-2, and the segmentation model trained from scratch on
    them: once, for every test that needs labels or weights."""
    _save_labels(server)
    done = _train(server["client"], {"max_epochs": 3, "val_interval": 1, "train_batch_size": 2, "learning_rate": 0.003})
    assert done["status"] == "DONE", "\n".join(done.get("details", []))
    return done


def test_annotate_train_and_segment(server, trained):
    """Labels saved from 'Slicer' and a training from scratch (the ``trained`` fixture); segment in
    every spacing mode, retrain, segment again."""
    client, studies = server["client"], server["studies"]
    assert client.next_sample("first", {})["id"] == "corrupt"  # the labelled ones are no longer offered
    status, msg = _error(client.train_start, MODEL, {"max_epochs": "many"})
    assert status == 400 and "max_epochs 'many'" in msg

    checkpoint = os.path.join(server["model_dir"], f"{MODEL}.pt")
    assert os.path.isfile(checkpoint)
    info = client.info()
    assert info["models"][MODEL]["trained"] is True
    assert info["train_stats"][MODEL]["epoch"] == 3 and 0.0 <= info["train_stats"][MODEL]["best_metric"] <= 1.0

    cases = [("case0", "case0.nii.gz", (1.0, 1.0, 1.0)), ("thick", "thick.nrrd", (0.8, 0.8, 5.0)), ("spine", "spine.mha", None)]
    modes = [
        ({"spacing_policy": "native", "window": "patch"}, lambda native: native),
        ({"spacing_policy": "clamp", "window": "whole"}, lambda native: tuple(min(max(s, 1.0), 3.0) for s in native)),  # BraTS: 1-3 mm
        ({"spacing_policy": "target", "target_spacing": "2,2,2.5"}, lambda native: (2.0, 2.0, 2.5)),
        ({"spacing_policy": "auto", "time_budget_s": 60}, None),
        ({"spacing_policy": "clamp", "spacing_ensemble": True}, lambda native: tuple(min(max(s, 1.0), 3.0) for s in native)),
    ]
    for image_id, name, native in cases:
        for params, expected in modes:
            result, out = client.infer(MODEL, image_id, {**params, **SLICER})
            assert result.endswith(".nrrd"), result
            label = _assert_same_geometry(result, os.path.join(studies, name))
            assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1}
            assert out["spacing_policy"] == params["spacing_policy"]
            assert out["window"] == params.get("window", out["window"]) and out["window"] in ("patch", "whole")
            assert out["seconds"] > 0 and out["peak_memory_gb"] > 0 and out["memory_kind"] == "cpu_rss"
            if native is not None:
                np.testing.assert_allclose(out["native_spacing_mm"], native, atol=1e-4)
            if expected is not None and native is not None:
                np.testing.assert_allclose(out["working_spacing_mm"], expected(native), atol=1e-4)
            # outside BraTS's trained 1-3 mm (thick slices in native mode) the result says so
            assert out["trained_spacing_range_mm"] == "1,3"
            assert out["extrapolated"] is (not all(1.0 <= s <= 3.0 for s in out["working_spacing_mm"]))
            if params.get("spacing_ensemble"):  # looks at 1x, 1.25x, 1.5x of the working spacing, in 1-3 mm
                looks = out["spacing_ensemble"]
                assert looks["spacings"][0] == out["working_spacing_mm"] and 2 <= len(looks["spacings"]) <= 3
                assert all(1.0 <= v <= 3.0 for spacing in looks["spacings"] for v in spacing)
                assert len(looks["seconds_per_look"]) == len(looks["spacings"]) and 0.0 <= looks["score"] <= math.log(2)
            else:
                assert "spacing_ensemble" not in out
            if params["spacing_policy"] == "auto":
                assert out["auto"]["fits"] is True and out["auto"]["predicted_seconds"] <= 60
                assert out["working_spacing_mm"] == out["auto"]["spacing"]
    # NIfTI results at the gzip level asked for; a level that is none gets a 400
    for level in (1, 9):
        result, _ = client.infer(MODEL, "case0", {"spacing_policy": "target", "target_spacing": "2", "result_extension": ".nii.gz",
                                                  "result_dtype": "uint8", "result_compress_level": level})
        assert result.endswith(".nii.gz")
        _assert_same_geometry(result, os.path.join(studies, "case0.nii.gz"))
    status, msg = _error(client.infer, MODEL, "case0", {"result_extension": ".nii.gz", "result_compress_level": 12})
    assert status == 400 and "result_compress_level 12" in msg
    # auto with a budget nothing meets: the coarsest candidate, and it says so
    _, out = client.infer(MODEL, "case0", {"spacing_policy": "auto", "time_budget_s": 1e-6, **SLICER})
    assert out["auto"]["fits"] is False and min(out["working_spacing_mm"]) >= 2.9

    # the user corrects the thick-slice result in Slicer and saves it; retraining fine-tunes
    result, _ = client.infer(MODEL, "thick", {"spacing_policy": "clamp", **SLICER})
    corrected = itk.imread(result)
    array = itk.array_view_from_image(corrected)
    array[array.shape[0] // 2, 20:40, 20:40] = 1
    edited = os.path.join(os.path.dirname(result), "thick_edited.nrrd")
    itk.imwrite(corrected, edited)
    client.save_label("thick", edited, params={"label_info": [{"name": "tumour_core", "idx": 1}]})
    before, mtime = _sha(checkpoint), os.path.getmtime(checkpoint)
    loads = open(server["log"]).read().count("Loaded checkpoint")
    done = _train(client, {"max_epochs": 1, "val_interval": 1, "train_batch_size": 2, "pretrained": True})
    assert done["status"] == "DONE", "\n".join(done.get("details", []))
    assert _sha(checkpoint) != before and os.path.getmtime(checkpoint) > mtime
    assert f"Fine-tuning from {checkpoint}" in open(server["log"]).read()
    # the next request loads the new checkpoint
    result, _ = client.infer(MODEL, "thick", {"spacing_policy": "native", **SLICER})
    _assert_same_geometry(result, os.path.join(studies, "thick.nrrd"))
    assert open(server["log"]).read().count("Loaded checkpoint") == loads + 1


def test_spacing_disagreement_scoring_skips_what_this_checkpoint_scored(tmp_path):
    """The scoring method on its own, on a datastore of three images: bounded by max_samples, images
    the same checkpoint file scored are skipped, a new checkpoint scores them again; bad options
    raise. (The live server's scoring and strategy: ``test_content.py``, with the oracle network.)"""
    import torch
    from monailabel.datastore.local import LocalDatastore

    SpacingDisagreementScoring = _app_module("lib.scoring").SpacingDisagreementScoring
    # the oracle network (a threshold of the input, tests/oracle.py): this test is about bookkeeping
    config = _bundle_config(tmp_path, overrides={**OVERRIDES, "network_def": {"_target_": "oracle.ThresholdNetwork", "in_channels": 1, "out_channels": 2}})
    studies, _ = write_brats_studies(str(tmp_path / "data"))
    datastore = LocalDatastore(studies, extensions=["*.nii.gz"], auto_reload=False)
    scoring = SpacingDisagreementScoring({MODEL: config.infer()}, MODEL, max_samples=2)
    counts = lambda summary: (summary["executed"], summary["skipped"], summary["failed"])  # noqa: E731
    assert counts(scoring({}, datastore)) == (0, 3, 0)  # no checkpoint yet: nothing to score with
    torch.save(config.build_network("cpu").state_dict(), config.path)
    assert counts(scoring({}, datastore)) == (2, 0, 0)
    assert counts(scoring({}, datastore)) == (1, 2, 0)
    assert counts(scoring({"max_samples": 0}, datastore)) == (0, 3, 0)
    meta = {i: datastore.get_image_info(i)["spacing_disagreement_meta"] for i in datastore.list_images()}
    assert all(0.0 <= datastore.get_image_info(i)["spacing_disagreement"] <= math.log(2) for i in meta), meta
    assert {m["checkpoint"] for m in meta.values()} == {config.path} and all(len(m["spacings"]) == 3 for m in meta.values()), meta
    stat = os.stat(config.path)  # a new checkpoint file (a training wrote it): the images are scored again
    os.utime(config.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert counts(scoring({"max_samples": 1}, datastore)) == (1, 0, 0)
    rescored = [i for i in meta if datastore.get_image_info(i)["spacing_disagreement_meta"]["mtime_ns"] == stat.st_mtime_ns + 10**9]
    assert len(rescored) == 1, rescored
    for bad, words in (({"max_samples": -1}, "max_samples -1"), ({"max_samples": "some"}, "max_samples 'some'"),
                       ({"model": "no_such_model"}, "no segmentation model 'no_such_model'")):
        with pytest.raises(ValueError, match=words):
            scoring(bad, datastore)
    with pytest.raises(ValueError, match="model 'no_such_model' is not a served segmentation model"):
        SpacingDisagreementScoring({MODEL: config.infer()}, "no_such_model")


def test_interactive_model_trains_then_segments_and_refines_with_clicks(server, trained):
    """DeepEdit-style: train on the saved labels with simulated clicks, then an automatic result
    (no clicks) and a click request on the thick-slice NRRD, both on the input's own grid."""
    client, studies = server["client"], server["studies"]
    done = _train(client, {"max_epochs": 2, "val_interval": 1, "train_batch_size": 2, "learning_rate": 0.003}, model=INTERACTIVE)
    assert done["status"] == "DONE", "\n".join(done.get("details", []))
    checkpoint = os.path.join(server["model_dir"], f"{INTERACTIVE}.pt")
    assert os.path.isfile(checkpoint) and client.info()["models"][INTERACTIVE]["trained"] is True

    image = os.path.join(studies, "thick.nrrd")  # 0.8 x 0.8 x 5 mm
    size = _geometry(image)[0]
    options = {"spacing_policy": "target", "target_spacing": "2", **SLICER}
    result, auto = client.infer(INTERACTIVE, "thick", options)
    _assert_same_geometry(result, image)
    assert auto["clicks"] == {"background": 0, "tumour_core": 0}
    np.testing.assert_allclose(auto["working_spacing_mm"], [2.0, 2.0, 2.0])
    # clicks as the Slicer plugin sends them: voxel indices [i, j, k] of the image, per label name
    clicks = {"tumour_core": [[size[0] // 2, size[1] // 2, size[2] // 2]], "background": [[5, 5, 1], [size[0] - 5, 10, 2]]}
    result, refined = client.infer(INTERACTIVE, "thick", {**options, **clicks})
    label = _assert_same_geometry(result, image)
    assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1}
    assert refined["clicks"] == {"background": 2, "tumour_core": 1}

    for bad, words in (({"tumour_core": [[size[0] + 40, 3, 3]]}, "lies outside the image"),
                       ({"background": [[1, 2]]}, "must be 3 voxel indices")):
        status, msg = _error(client.infer, INTERACTIVE, "thick", {**options, **bad})
        assert status == 400 and words in msg, msg
    _still_serving(server)


def test_training_with_a_label_of_unknown_segments_fails_with_its_name(server, untouched):
    client = server["client"]
    label = os.path.join(server["labels"], "case2.nii.gz")
    client.save_label("case2", label, params={"label_info": [{"name": "liver", "idx": 3}]})
    try:
        done = _train(client, {"max_epochs": 1})
    finally:
        # the label as the other tests know it
        client.save_label("case2", label, params={"label_info": TUMOUR})
    assert done["status"] == "ERROR"
    assert any("segments ['liver'] are not structures of" in line for line in done["details"]), done["details"]
    _still_serving(server)


def test_warmup_loads_a_trained_model_and_generates_its_weights_once(tmp_path):
    """``--conf warmup true``: the infer task's warm-up (run in the server process at start-up)."""
    config = _bundle_config(tmp_path)
    task = config.infer()
    assert task.warmup("cpu") is False  # no checkpoint yet: nothing to warm up
    import torch

    torch.save(config.build_network("cpu").state_dict(), config.path)
    assert task.warmup("cpu") is True
    engine = task._networks["cpu"][0]
    assert engine.compile_mode is False and engine.network.generation_count == 1
    with pytest.raises(ValueError, match="--conf compile 'sometimes'"):
        _bundle_config(tmp_path, overrides={}, conf={"compile": "sometimes"})


def test_an_sdn_checkpoint_is_served_and_fine_tuned_as_the_network_it_holds(tmp_path):
    """A bundle trained with ``--primary_network sdn_unet``: its config still says ``unet``; the
    infer task builds the SDN U-Net the checkpoint holds and segments on the image's own grid,
    and the trainer fine-tunes that network."""
    import torch

    from custom_networks import SDNUNet

    config = _bundle_config(tmp_path, overrides={**OVERRIDES, "network_def#channels": [4, 8, 8]})  # the SDN sits at 1/4 resolution: 3 levels
    assert config.checkpoint_overrides() == {}  # no checkpoint yet
    torch.manual_seed(0)
    sdn = config.build_network("cpu", primary_network="sdn_unet")
    torch.save(sdn.state_dict(), config.path)
    assert config.checkpoint_overrides() == {"primary_network": "sdn_unet"}  # what the trainer fine-tunes
    task = config.infer()
    studies, _ = write_brats_studies(str(tmp_path / "data"))
    image = os.path.join(studies, "case0.nii.gz")
    result, out = task({"image": image, "spacing_policy": "target", "target_spacing": "2", **SLICER})
    engine = task._networks["cpu"][0]
    assert type(engine.network.primary) is SDNUNet
    label = _assert_same_geometry(result, image)
    np.testing.assert_allclose(out["working_spacing_mm"], (2.0, 2.0, 2.0))
    torch.testing.assert_close(engine.network.state_dict(), sdn.state_dict())  # the saved weights, loaded strictly
    assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1}
    unet = config.build_network("cpu")
    torch.save(unet.state_dict(), config.path + ".tmp")
    os.replace(config.path + ".tmp", config.path)
    assert config.checkpoint_overrides() == {}
    task({"image": image, "spacing_policy": "target", "target_spacing": "2", **SLICER})
    assert type(task._networks["cpu"][0].network).__name__ == "HyperUNet"  # reloaded as the UNet it now holds


def test_the_vessel_bundle_is_served_with_its_label_on_the_input_grid(tmp_path):
    """The vessel bundle through the same infer task: a generated anisotropic ToF volume stored LPS,
    segmented at a working spacing the request chooses; the label comes back on the input's grid."""
    import torch

    config = _bundle_config(tmp_path, "vessel_mra_segmentation")
    torch.manual_seed(0)
    torch.save(config.build_network("cpu").state_dict(), config.path)
    data = write_synthetic_dataset("vessel", str(tmp_path / "data"), n_cases=2, seed=0, spacings=[[0.5, 0.5, 0.8], [0.6, 0.45, 0.5]])
    image = os.path.join(data, "train", "sub-02.nii.gz")  # the odd case: stored LPS
    result, out = config.infer()({"image": image, "spacing_policy": "target", "target_spacing": "0.7", **SLICER})
    label = _assert_same_geometry(result, image)
    np.testing.assert_allclose(out["working_spacing_mm"], (0.7, 0.7, 0.7))
    np.testing.assert_allclose(out["native_spacing_mm"], (0.6, 0.45, 0.5), atol=1e-5)
    assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1}


def test_a_corrupt_checkpoint_is_named_and_the_previous_model_keeps_serving(server, trained):
    client, studies = server["client"], server["studies"]
    checkpoint = os.path.join(server["model_dir"], f"{MODEL}.pt")
    params = {"spacing_policy": "target", "target_spacing": "3", **SLICER}
    before = _assert_same_geometry(client.infer(MODEL, "case1", params)[0], os.path.join(studies, "case1.nii.gz"))
    good = open(checkpoint, "rb").read()
    try:
        # a truncated file where the served model lives (what a killed copy would leave)
        tmp = checkpoint + ".partial"
        with open(tmp, "wb") as f:
            f.write(good[: len(good) // 3])
        os.replace(tmp, checkpoint)
        result, _ = client.infer(MODEL, "case1", params)
        assert np.array_equal(_assert_same_geometry(result, os.path.join(studies, "case1.nii.gz")), before)
        log = open(server["log"]).read()
        assert f"checkpoint {checkpoint} of '{MODEL}' cannot be loaded" in log and "still serving" in log
    finally:
        tmp = checkpoint + ".restore"
        with open(tmp, "wb") as f:
            f.write(good)
        os.replace(tmp, checkpoint)
    _still_serving(server)
