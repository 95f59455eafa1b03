"""The bundles, driven as their READMEs drive them: `python -m monai.bundle run ...` subprocesses on
generated data in each data set's official layout, with small overrides so that a CPU run takes
seconds (fewer channels, smaller patches, one or two epochs)."""

import csv
import glob
import math
import os
import shutil
import socket
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from custom_networks import HyperUNet, build_network, get_dataset
from custom_networks.nets.build import matches_state_dict
from custom_networks.data.synthetic_datasets import write_synthetic_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES = {
    "brats": "brats_mri_tumour_segmentation",
    "spider": "spider_mri_spine_segmentation",
    "mmwhs": "mmwhs_mri_heart_segmentation",
    "vessel": "vessel_mra_segmentation",
}
# CPU-sized overrides; SPIDER has four downsamplings, so its patch axes are multiples of 16
SMALL = {
    "brats": ["--patch_size", "[32,32,32]", "--network_def#channels", "[8,16]"],
    "spider": ["--patch_size", "[16,32,32]", "--network_def#channels", "[4,8,8,8,8]"],
    "mmwhs": ["--patch_size", "[32,32,32]", "--network_def#channels", "[8,16]"],
    "vessel": ["--patch_size", "[32,32,32]", "--network_def#channels", "[8,16]"],
}

# the SDN U-Net's recurrence sits at 1/4 resolution and coarser: three levels at least
SMALL_SDN = {
    "brats": ["--primary_network", "sdn_unet", "--patch_size", "[32,32,32]", "--network_def#channels", "[4,8,8]"],
    "spider": ["--primary_network", "sdn_unet", *SMALL["spider"]],
    "mmwhs": ["--primary_network", "sdn_unet", "--patch_size", "[32,32,32]", "--network_def#channels", "[4,8,8]"],
    "vessel": ["--primary_network", "sdn_unet", "--patch_size", "[32,32,32]", "--network_def#channels", "[4,8,8]"],
}


def bundle_dir(name):
    return os.path.join(ROOT, "bundles", BUNDLES[name])


def run_bundle(name, run_id, configs, *overrides, expect_ok=True, small=None):
    files = [os.path.join(bundle_dir(name), "configs", c) for c in configs]
    config_file = files[0] if len(files) == 1 else "[" + ",".join(f"'{f}'" for f in files) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_file, *(small or SMALL[name]), *overrides]
    # CPU-sized runs pinned to the CPU (device and amp follow torch.cuda.is_available() in the configs)
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=900)
    if expect_ok:
        assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module", params=list(BUNDLES))
def trained(request, tmp_path_factory):
    """Generated data for one bundle and a bundle root trained on it for one epoch."""
    name = request.param
    data = str(tmp_path_factory.mktemp(f"{name}_data"))
    write_synthetic_dataset(name, data, n_cases=5, seed=0)
    root = str(tmp_path_factory.mktemp(f"{name}_run"))
    run_bundle(name, "training", ["train.json"], "--dataset_dir", data, "--bundle_root", root,
               "--epochs", "1", "--val_interval", "1", "--num_workers", "0", "--batch_size", "2")
    return name, data, root


def test_training_writes_a_loadable_checkpoint(trained):
    name, _, root = trained
    state = torch.load(os.path.join(root, "models", "model.pt"), map_location="cpu")
    assert all(k.startswith(("embed.", "heads.")) for k in state), list(state)[:5]
    assert len(glob.glob(os.path.join(root, "eval", "events.out.tfevents.*"))) >= 1  # TensorBoard


@pytest.mark.parametrize("policy", [("native",), ("target", "2,2,2")])  # clamp: tests/test_transforms.py
def test_inference_writes_labels_in_the_input_geometry(trained, policy, tmp_path):
    name, data, root = trained
    out = str(tmp_path / "pred")
    overrides = ["--spacing_policy", policy[0]] + (["--target_spacing", policy[1]] if len(policy) > 1 else [])
    run_bundle(name, "inference", ["inference.json"], "--dataset_dir", data, "--bundle_root", root, "--output_dir", out, *overrides)
    images = _images(name, data)
    preds = [os.path.join(out, _stem(image) + "_seg.nii.gz") for image in images]
    assert len(glob.glob(os.path.join(out, "*_seg.nii.gz"))) == len(images) == 5
    for image, pred in zip(images, preds):
        (shape, affine), seg = _geometry(image), nib.load(pred)
        assert seg.shape == shape, (image, pred)
        np.testing.assert_allclose(seg.affine, affine, atol=1e-4, err_msg=pred)
        assert seg.get_data_dtype() == np.uint8
        assert int(np.asarray(seg.dataobj).max()) < len(_classes(name))


def test_spacing_ensemble_writes_labels_and_disagreement_in_the_input_geometry(trained, tmp_path):
    """``--spacing_ensemble true``: three looks; the label and the disagreement map (float32, nats,
    between 0 and ln 3) are written on each input's grid."""
    name, data, root = trained
    out = str(tmp_path / "pred")
    image = _images(name, data)[0]  # one image: the datalist's input may be a file
    run_bundle(name, "inference", ["inference.json"], "--dataset_dir", data, "--bundle_root", root, "--output_dir", out,
               "--datalist#input", image, "--spacing_ensemble", "true")
    assert len(glob.glob(os.path.join(out, "*_seg.nii.gz"))) == len(glob.glob(os.path.join(out, "*_disagreement.nii.gz"))) == 1
    for image in [image]:
        (shape, affine) = _geometry(image)
        seg = nib.load(os.path.join(out, _stem(image) + "_seg.nii.gz"))
        mi = nib.load(os.path.join(out, _stem(image) + "_disagreement.nii.gz"))
        for written in (seg, mi):
            assert written.shape == shape, image
            np.testing.assert_allclose(written.affine, affine, atol=1e-4, err_msg=image)
        assert seg.get_data_dtype() == np.uint8 and mi.get_data_dtype() == np.float32
        values = np.asarray(mi.dataobj)
        assert values.min() >= 0.0 and values.max() <= np.log(3) + 1e-4 and values.max() > 0.0


def test_evaluation_writes_dice_per_structure(trained):
    """Dice per structure for every bundle; the vessel bundle also clDice and connected components
    (its data set's ``extra_metrics``), the others nothing more."""
    name, data, root = trained
    run_bundle(name, "evaluating", ["train.json", "evaluate.json"], "--dataset_dir", data, "--bundle_root", root, "--num_workers", "0")
    extra = {"vessel": ["val_cldice", "val_components", "val_extra_components"]}.get(name, [])
    written = sorted(os.path.basename(p)[: -len("_raw.csv")] for p in glob.glob(os.path.join(root, "eval", "*_raw.csv")))
    assert written == sorted(["val_mean_dice", *extra])
    for metric in written:
        with open(os.path.join(root, "eval", f"{metric}_raw.csv")) as f:
            rows = list(csv.DictReader(f))
        assert len(rows) >= 1, metric
        structures = [k for k in rows[0] if k.startswith("class")]
        assert len(structures) == len(_classes(name)) - 1  # one value per structure, background excluded
        for row in rows:
            for k in structures:
                value = float(row[k])
                if metric in ("val_mean_dice", "val_cldice"):
                    assert math.isnan(value) or 0.0 <= value <= 1.0
                else:  # counts of pieces, per image
                    assert value == int(value) and (value >= 0 or metric == "val_extra_components")


def test_interactive_training_and_inference_commands(tmp_path):
    """The click-guided variant: README commands on MM-WHS (seven structures, so most patches miss
    some of them), training with DeepEdit's simulated clicks, then inference without clicks."""
    data = str(tmp_path / "data")
    write_synthetic_dataset("mmwhs", data, n_cases=5, seed=0)
    root = str(tmp_path / "root")
    run_bundle("mmwhs", "training", ["train.json", "train_interactive.json"], "--dataset_dir", data, "--bundle_root", root,
               "--epochs", "1", "--val_interval", "1", "--num_workers", "0", "--batch_size", "2")
    state = torch.load(os.path.join(root, "models", "model_interactive.pt"), map_location="cpu")
    net = HyperUNet(spatial_dims=3, in_channels=1 + len(_classes("mmwhs")), out_channels=len(_classes("mmwhs")), channels=(8, 16))
    net.load_state_dict(state)  # image + one guidance channel per label, background included
    assert not os.path.exists(os.path.join(root, "models", "model.pt"))  # the segmentation model is not touched
    out = str(tmp_path / "pred")
    run_bundle("mmwhs", "inference", ["inference.json", "inference_interactive.json"], "--dataset_dir", data,
               "--bundle_root", root, "--output_dir", out, "--spacing_policy", "target", "--target_spacing", "2,2,2")
    for image in _images("mmwhs", data):
        seg = nib.load(os.path.join(out, _stem(image) + "_seg.nii.gz"))
        shape, affine = _geometry(image)
        assert seg.shape == shape
        np.testing.assert_allclose(seg.affine, affine, atol=1e-4)


def test_sdn_unet_trains_one_epoch_and_infers_in_the_input_geometry(trained, tmp_path):
    """``--primary_network sdn_unet``: the hypernetwork generates an SDN U-Net's weights; the
    checkpoint is that network's, and inference writes labels on each input's grid."""
    name, data, _ = trained
    root = str(tmp_path / "sdn")
    run_bundle(name, "training", ["train.json"], "--dataset_dir", data, "--bundle_root", root, "--epochs", "1",
               "--val_interval", "1", "--num_workers", "0", "--batch_size", "2", small=SMALL_SDN[name])
    state = torch.load(os.path.join(root, "models", "model.pt"), map_location="cpu")
    channels = [int(c) for c in SMALL_SDN[name][SMALL_SDN[name].index("--network_def#channels") + 1].strip("[]").split(",")]
    layout = dict(in_channels=1, out_channels=len(_classes(name)), channels=channels, hidden_features=get_dataset(name).hidden_features)
    with torch.device("meta"):
        assert matches_state_dict(build_network("sdn_unet", **layout), state)
        assert not matches_state_dict(build_network("unet", **layout), state)
    out = str(tmp_path / "pred")
    run_bundle(name, "inference", ["inference.json"], "--dataset_dir", data, "--bundle_root", root, "--output_dir", out,
               "--spacing_policy", "target", "--target_spacing", "2,2,2", small=SMALL_SDN[name])
    images = _images(name, data)
    assert len(glob.glob(os.path.join(out, "*_seg.nii.gz"))) == len(images)
    for image in images:
        seg = nib.load(os.path.join(out, _stem(image) + "_seg.nii.gz"))
        shape, affine = _geometry(image)
        assert seg.shape == shape, image
        np.testing.assert_allclose(seg.affine, affine, atol=1e-4, err_msg=image)
        assert int(np.asarray(seg.dataobj).max()) < len(_classes(name))


@pytest.mark.parametrize("trained", ["brats"], indirect=True)  # the occupancy option is the BraTS bundle's
def test_occupancy_decoder_trains_and_writes_native_labels_in_the_input_geometry(trained, tmp_path):
    """``train_occupancy.json`` / ``inference_occupancy.json``: the HyperSpace encoder at 2 mm and the
    occupancy decoder on each input's own grid. The labels equal the library's ``occupancy_labels``
    on the oriented image, voxel for voxel (a mirrored or transposed result would not)."""
    from monai.transforms import Compose, NormalizeIntensityd

    from custom_networks.nets.occupancy import OccupancyNetwork
    from custom_networks.pipeline.occupancy import occupancy_labels

    name, data, _ = trained
    root, out = str(tmp_path / "occupancy"), str(tmp_path / "pred")
    run_bundle(name, "training", ["train.json", "train_occupancy.json"], "--dataset_dir", data, "--bundle_root", root,
               "--epochs", "1", "--val_interval", "1", "--num_workers", "0", "--batch_size", "2", "--num_points", "2048")
    state = torch.load(os.path.join(root, "models", "model_occupancy.pt"), map_location="cpu")
    net = OccupancyNetwork(in_channels=1, out_channels=2, channels=(8, 16), hidden_features=get_dataset(name).hidden_features)
    net.load_state_dict(state)
    image = _images(name, data)[0]
    run_bundle(name, "inference", ["inference.json", "inference_occupancy.json"], "--dataset_dir", data, "--bundle_root", root,
               "--output_dir", out, "--datalist#input", image, "--spacing_policy", "target", "--target_spacing", "2,2,2")
    seg = nib.load(os.path.join(out, _stem(image) + "_seg.nii.gz"))
    shape, affine = _geometry(image)
    assert seg.shape == shape and seg.get_data_dtype() == np.uint8
    np.testing.assert_allclose(seg.affine, affine, atol=1e-4)
    spec = get_dataset(name)
    load = Compose(spec.load_transforms(["image"], None) + [NormalizeIntensityd("image", nonzero=spec.zscore_nonzero, channel_wise=True)])
    oriented = load({"image": image})["image"]
    expected, _ = occupancy_labels(net, oriented, spacing=(2.0, 2.0, 2.0))
    written = Compose(spec.load_transforms(["image"], None))({"image": os.path.join(out, _stem(image) + "_seg.nii.gz")})["image"]
    assert torch.equal(written.as_tensor().to(torch.uint8), expected.as_tensor()), "the written label is not the decoded one"


@pytest.mark.parametrize("trained", ["brats"], indirect=True)  # packing is the same for every bundle
def test_packed_zip_trains_infers_and_passes_monai_checks_outside_the_repository(trained, tmp_path):
    """A shared bundle needs only the requirements: unzip it away from this checkout, then train one
    short epoch and infer with the model zoo's single-file commands, and pass MONAI's checks."""
    import json
    import zipfile

    from custom_networks.bundle_tools import pack

    name, data, root = trained
    archive = pack(bundle_dir(name), output=str(tmp_path / "bundle.zip"), ckpt=os.path.join(root, "models", "model.pt"))
    with zipfile.ZipFile(archive) as z:
        # real files, not links to bundles/common, and the whole metadata
        assert not any((info.external_attr >> 16) & 0o170000 == 0o120000 for info in z.infolist())
        meta = json.loads(z.read(f"{BUNDLES[name]}/configs/metadata.json"))
        assert meta["dataset_name"] == name and "network_data_format" in meta
        elsewhere = tmp_path / "elsewhere"
        z.extractall(elsewhere)
    unpacked = elsewhere / BUNDLES[name]
    assert not str(unpacked).startswith(ROOT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(unpacked)
    env["CUDA_VISIBLE_DEVICES"] = ""  # on the CPU, also where CUDA is available
    where = subprocess.run([sys.executable, "-c", "import custom_networks; print(custom_networks.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True)
    assert where.stdout.strip().startswith(str(unpacked)), where.stdout + where.stderr

    def run(*args):
        result = subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{args}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        return result

    configs = unpacked / "configs"
    out = tmp_path / "pred"
    run("-m", "monai.bundle", "run", "inference", "--config_file", str(configs / "inference.json"),
        "--bundle_root", str(unpacked), "--dataset_dir", data, "--output_dir", str(out), *SMALL[name])
    assert len(list(out.glob("*_seg.nii.gz"))) == 5
    trained_again = tmp_path / "train_run"
    run("-m", "monai.bundle", "run", "training", "--config_file", str(configs / "train.json"), "--bundle_root", str(trained_again),
        "--dataset_dir", data, "--epochs", "1", "--val_interval", "1", "--num_workers", "0", "--batch_size", "2", *SMALL[name])
    assert (trained_again / "models" / "model.pt").is_file()
    # MONAI's checks on the unzipped bundle: metadata schema, network in/out with the spacing, properties
    run("-m", "custom_networks.bundle_tools", "verify", str(unpacked), "--device", "cpu", "--n", "2")
    run("-c", "from monai.bundle import ConfigWorkflow; import sys; r, d = sys.argv[1:]\n"
        "for c, t in (('train.json', 'train'), ('inference.json', 'infer')):\n"
        "    w = ConfigWorkflow(config_file=f'{r}/configs/{c}', workflow_type=t, bundle_root=r, dataset_dir=d)\n"
        "    w.initialize(); assert not w.check_properties(), w.check_properties()", str(unpacked), data)


@pytest.mark.parametrize("trained", ["vessel"], indirect=True)
def test_packed_vessel_bundle_carries_its_loss_and_metrics_and_passes_monai_checks(trained, tmp_path):
    """The vessel bundle's zip, unzipped outside the repository, builds its MIP loss and its
    evaluation metrics from its own copy of the package, lists scikit-image (clDice) among its
    required packages, and passes MONAI's checks."""
    import json
    import zipfile

    from custom_networks.bundle_tools import pack

    name, data, root = trained
    archive = pack(bundle_dir(name), output=str(tmp_path / "bundle.zip"), ckpt=os.path.join(root, "models", "model.pt"))
    with zipfile.ZipFile(archive) as z:
        meta = json.loads(z.read(f"{BUNDLES[name]}/configs/metadata.json"))
        z.extractall(tmp_path / "elsewhere")
    assert "scikit-image" in meta["required_packages_version"]
    unpacked = tmp_path / "elsewhere" / BUNDLES[name]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=str(unpacked), CUDA_VISIBLE_DEVICES="")
    check = ("import sys, custom_networks; from monai.bundle import ConfigParser; from custom_networks.losses import VoxelMIPLoss\n"
             "assert custom_networks.__file__.startswith(sys.argv[1]), custom_networks.__file__\n"
             "p = ConfigParser(); p.read_config([f'{sys.argv[1]}/configs/train.json', f'{sys.argv[1]}/configs/evaluate.json'])\n"
             "p.read_meta(f'{sys.argv[1]}/configs/metadata.json'); p['bundle_root'] = sys.argv[1]\n"
             "assert isinstance(p.get_parsed_content('loss'), VoxelMIPLoss)\n"
             "assert sorted(p.get_parsed_content('validate#extra_metrics')) == ['val_cldice', 'val_components', 'val_extra_components']")
    for args in (["-c", check, str(unpacked)], ["-m", "custom_networks.bundle_tools", "verify", str(unpacked), "--device", "cpu", "--n", "2"]):
        result = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{args}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"


@pytest.mark.parametrize("name", list(BUNDLES))
def test_config_workflows_have_the_bundle_properties(name, tmp_path):
    data = str(tmp_path / "data")
    write_synthetic_dataset(name, data, n_cases=5, seed=1)
    meta = os.path.join(bundle_dir(name), "configs", "metadata.json")
    configs = [(["train.json"], "train"), (["inference.json"], "infer"),
               (["train.json", "train_interactive.json"], "train"), (["inference.json", "inference_interactive.json"], "infer")]
    if name == "brats":  # the occupancy decoder's overrides
        configs += [(["train.json", "train_occupancy.json"], "train"), (["inference.json", "inference_occupancy.json"], "infer")]
    for config, kind in configs:
        workflow = ConfigWorkflow(
            config_file=[os.path.join(bundle_dir(name), "configs", c) for c in config],
            meta_file=meta,
            logging_file=os.path.join(bundle_dir(name), "configs", "logging.conf"),
            workflow_type=kind,
            bundle_root=str(tmp_path / "root"),
            dataset_dir=data,
            num_workers=0,
        )
        workflow.initialize()
        assert workflow.check_properties() == [], (config, workflow.check_properties())


def _free_port() -> int:
    """A TCP port no process listens on now: the kernel's pick for port 0."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_gloo_write_one_checkpoint(tmp_path):
    data = str(tmp_path / "data")
    write_synthetic_dataset("brats", data, n_cases=10, seed=2)  # 2 validation cases for 2 ranks
    root = str(tmp_path / "root")
    train = os.path.join(bundle_dir("brats"), "configs")
    # an explicit free port: torchrun's default 29500 collides with any other DDP job on the machine
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", "-m", "monai.bundle", "run", "training",
        "--config_file", f"['{train}/train.json','{train}/multi_gpu_train.json']",
        "--dataset_dir", data, "--bundle_root", root, "--epochs", "1", "--val_interval", "1",
        "--num_workers", "0", "--batch_size", "1", *SMALL["brats"],
    ]
    # gloo on the CPU: with CUDA visible, multi_gpu_train.json would put the 2 ranks on cuda:0 and cuda:1 with nccl
    env = {**os.environ, "TORCH_SHOW_CPP_STACKTRACES": "1", "CUDA_VISIBLE_DEVICES": ""}
    # No retry. The earlier one retried on "terminate called without an active exception", but that abort
    # is not specific to gloo's teardown: any process that exits while a C++ thread still runs prints it,
    # e.g. one stopping on a bad label while MONAI's CacheDataset thread is still loading (see
    # tests/test_resume.py), so a retry on it could hide a real failure. A failure is reported at once,
    # with PyTorch's C++ stack traces.
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-4000:]}"
    # the best model and the resume point, written once (by rank 0), no temporary file left
    assert sorted(os.listdir(os.path.join(root, "models"))) == ["last_model.pt", "model.pt"]
    state = torch.load(os.path.join(root, "models", "model.pt"), map_location="cpu")
    net = HyperUNet(out_channels=2, channels=(8, 16))
    net.load_state_dict(state)  # saved unwrapped: no "module." prefix from DDP
    last = torch.load(os.path.join(root, "models", "last_model.pt"), map_location="cpu", weights_only=True)
    net.load_state_dict(last["network"])
    assert last["trainer"]["iteration"] == last["trainer"]["epoch_length"]  # one epoch


def test_bad_image_and_label_fail_naming_the_file(tmp_path):
    data = tmp_path / "data"
    write_synthetic_dataset("brats", str(data), n_cases=5, seed=3)
    case = sorted(p for p in data.iterdir() if p.is_dir())[0]
    t1ce = next(case.glob("*_t1ce.nii.gz"))
    ref = nib.load(str(t1ce))

    weights = tmp_path / "r" / "models"
    weights.mkdir(parents=True)
    torch.save(HyperUNet(out_channels=2, channels=(8, 16)).state_dict(), weights / "model.pt")

    # a 4-D image where a single 3-D volume is expected
    stacked = np.stack([np.asarray(ref.dataobj)] * 2, axis=-1)
    nib.save(nib.Nifti1Image(stacked, ref.affine), str(t1ce))
    out = tmp_path / "pred"
    result = run_bundle("brats", "inference", ["inference.json"], "--dataset_dir", str(data), "--bundle_root", str(tmp_path / "r"),
                        "--output_dir", str(out), expect_ok=False)
    assert result.returncode != 0
    assert str(t1ce) in result.stderr and "volumes" in result.stderr, result.stderr[-3000:]
    assert not out.exists() or not any(out.iterdir())  # nothing half-written

    # a spacing header of 0 mm
    flat = ref.affine.copy()
    flat[:, 0] = 0.0
    header = nib.Nifti1Header()
    header.set_sform(flat, code="scanner")  # nibabel refuses a singular affine anywhere else
    nib.save(nib.Nifti1Image(np.asarray(ref.dataobj), None, header=header), str(t1ce))
    result = run_bundle("brats", "inference", ["inference.json"], "--dataset_dir", str(data), "--bundle_root", str(tmp_path / "r"),
                        "--output_dir", str(out), expect_ok=False)
    assert result.returncode != 0
    assert str(t1ce) in result.stderr and "spacing" in result.stderr, result.stderr[-3000:]
    assert not out.exists() or not any(out.iterdir())  # nothing half-written

    # a label value outside the BraTS label map (0, 1, 2, 4)
    nib.save(ref, str(t1ce))
    for seg in data.glob("*/*_seg.nii.gz"):  # every case, whichever split it lands in
        s = nib.load(str(seg))
        bad = np.asarray(s.dataobj).copy()
        bad[0, 0, 0] = 3
        nib.save(nib.Nifti1Image(bad, s.affine), str(seg))
    root = tmp_path / "train"
    result = run_bundle("brats", "training", ["train.json"], "--dataset_dir", str(data), "--bundle_root", str(root),
                        "--epochs", "1", "--num_workers", "0", "--batch_size", "2", "--cache_rate", "0", expect_ok=False)
    assert result.returncode != 0
    assert "_seg.nii.gz" in result.stderr and "values 3" in result.stderr, result.stderr[-3000:]
    assert not (root / "models" / "model.pt").exists()


def _images(name, data):
    from custom_networks.data.datalist import inference_items

    return [item["image"] for item in inference_items(data, name)]


def _stem(path):
    name = os.path.basename(path)
    for ext in (".nii.gz", ".nii", ".mha", ".nrrd"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _classes(name):
    return get_dataset(name).classes


def _geometry(path):
    """Spatial shape and RAS affine of an input image as MONAI reads it (NIfTI, or SPIDER's .mha)."""
    from monai.transforms import LoadImage

    img = LoadImage(image_only=True)(path)
    return tuple(img.shape[:3]), np.asarray(img.affine)


@pytest.mark.parametrize("name", list(BUNDLES))
def test_bundle_passes_monai_verify_metadata_and_net_in_out(name):
    """MONAI's verify_metadata (schema kept in the repo, no download) and verify_net_in_out with the
    spacing as an extra forward argument, on the bundle's full-size network."""
    from custom_networks.bundle_tools import verify

    verify(bundle_dir(name), device="cpu", n=2)  # n=1 leaves a 1-voxel bottleneck for InstanceNorm
