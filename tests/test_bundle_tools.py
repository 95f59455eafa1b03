"""Tests of the bundle sharing tools (custom_networks.bundle_tools) on a minimal HyperUNet bundle
built in a temporary folder: verify (schema, spacing description, verify_net_in_out with the
spacing), export (TorchScript for one spacing), pack (a zip that runs without this repository)."""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from monai.data import load_net_with_metadata

from custom_networks import HyperUNet
from custom_networks import bundle_tools
from custom_networks.bundle_tools import export, pack, spacing_input_description, verify
from custom_networks.nets.build import describe_network

REPO = Path(__file__).resolve().parents[1]
NETWORK = dict(spatial_dims=3, in_channels=1, out_channels=2, channels=[4, 8], convs_per_level=1)
TRAINED_RANGE = [[0.5, 3.0], [0.5, 3.0], [1.0, 4.0]]
SHAPE = ["8*n", "8*n", "8*n"]
ATOL = 1e-5


def _tensor_format(**kw):
    base = dict(type="image", dtype="float32", value_range=[], is_patch_data=True, spatial_shape=SHAPE)
    return {**base, **kw}


METADATA = {
    "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json",
    "version": "0.1.0",
    "changelog": {"0.1.0": "minimal test bundle"},
    "monai_version": "1.6.1",
    "pytorch_version": "2.13.0",
    "numpy_version": "2.0.0",
    "optional_packages_version": {"nibabel": "5.2.1"},
    "task": "Test segmentation",
    "description": "A tiny HyperUNet for the bundle tool tests",
    "authors": "HyperSpace for MONAI",
    "copyright": "Copyright (c) the authors",
    "intended_use": "tests only",
    "references": ["Joutard et al., HyperSpace, MICCAI 2024"],
    "network_data_format": {
        "inputs": {
            "image": _tensor_format(format="magnitude", modality="MR", num_channels=1, channel_def={"0": "image"}),
            "spacing": spacing_input_description(TRAINED_RANGE),
        },
        "outputs": {
            "pred": _tensor_format(format="labels", num_channels=2, channel_def={"0": "background", "1": "foreground"})
        },
    },
}
INFERENCE = {
    "imports": ["$import torch"],
    "bundle_root": ".",
    "ckpt_path": "$@bundle_root + '/models/model.pt'",
    "network_def": {"_target_": "custom_networks.HyperUNet", **NETWORK},
}


def write_bundle(root: Path, metadata=METADATA, weights=None) -> Path:
    for sub in ("configs", "models", "docs", "eval", "runs", "__pycache__"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=4))
    (root / "configs" / "inference.json").write_text(json.dumps(INFERENCE, indent=4))
    (root / "docs" / "README.md").write_text("# test bundle\n")
    (root / "LICENSE").write_text("Apache-2.0\n")
    (root / "eval" / "metrics.csv").write_text("dice\n0.5\n")
    (root / "runs" / "events.out").write_text("x")
    (root / "__pycache__" / "x.pyc").write_bytes(b"\0")
    if weights is not None:
        torch.save(weights, root / "models" / "model.pt")
    return root


@pytest.fixture(scope="module")
def trained():
    """The network whose weights the bundle holds (seeded apart from any fresh instance)."""
    torch.manual_seed(123)
    return HyperUNet(**NETWORK).eval()


@pytest.fixture
def bundle(tmp_path, trained):
    return write_bundle(tmp_path / "test_hyperspace_bundle", weights=trained.state_dict())


@pytest.fixture
def no_download(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a schema download was attempted")

    monkeypatch.setattr("monai.apps.utils._download_with_progress", fail)
    monkeypatch.setattr("monai.apps.utils.urlopen", fail)


# --------------------------------------------------------------------------- verify


def test_verify_passes_and_hands_the_spacing_to_forward(bundle, no_download, monkeypatch):
    seen = []
    forward = HyperUNet.forward

    def recording_forward(self, x, spacing):
        seen.append((tuple(x.shape), spacing.tolist()))
        return forward(self, x, spacing)

    monkeypatch.setattr(HyperUNet, "forward", recording_forward)
    verify(bundle, device="cpu")
    # MONAI's fake input (n=1 -> 8 voxels per axis) with a (1, 3) spacing at both ends of value_range
    assert seen == [((1, 1, 8, 8, 8), [[0.5, 0.5, 0.5]]), ((1, 1, 8, 8, 8), [[4.0, 4.0, 4.0]])]
    seen.clear()
    verify(bundle, spacing="1,1.5,2", device="cpu")
    assert seen == [((1, 1, 8, 8, 8), [[1.0, 1.5, 2.0]])]


def test_repo_schema_is_the_one_used_and_packed_copy_is_the_fallback(bundle, tmp_path, monkeypatch):
    assert bundle_tools.find_schema(bundle) == REPO / "bundles" / "meta_schema.json"
    monkeypatch.setattr(bundle_tools, "REPO_SCHEMA", tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="meta_schema.json"):
        bundle_tools.find_schema(bundle)
    shutil.copy(REPO / "bundles" / "meta_schema.json", bundle / "configs" / "meta_schema.json")
    assert bundle_tools.find_schema(bundle) == bundle / "configs" / "meta_schema.json"


def _edited(metadata, edit):
    metadata = json.loads(json.dumps(metadata))
    edit(metadata)
    return metadata


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.pop("authors"), "'authors' is a required property"),
        (lambda m: m.pop("changelog"), "'changelog' is a required property"),
        (lambda m: m.pop("optional_packages_version"), "'required_packages_version' is a required property"),
        (lambda m: m["network_data_format"]["inputs"]["image"].pop("modality"), "'modality' is a required property"),
        (lambda m: m["network_data_format"]["outputs"]["pred"].update(value_range=[1]), r"outputs.pred.value_range: \[1\]"),
        (lambda m: m.update(version="0.2.0"), "version '0.2.0' is missing from changelog"),
        (lambda m: m["network_data_format"]["inputs"].pop("spacing"), "no 'spacing' entry"),
        (lambda m: m["network_data_format"]["inputs"]["spacing"].update(num_channels=2), "num_channels 2 should be 3"),
        (lambda m: m["network_data_format"]["inputs"]["spacing"].update(value_range=[]), r"value_range \[\] should be"),
    ],
)
def test_verify_fails_with_a_clear_message(tmp_path, no_download, edit, message):
    root = write_bundle(tmp_path / "bad_bundle", metadata=_edited(METADATA, edit))
    with pytest.raises(ValueError, match=message) as err:
        verify(root, device="cpu")
    assert str(root / "configs" / "metadata.json") in str(err.value)


def test_schema_accepts_either_packages_key_with_monai_verify_metadata(tmp_path, no_download):
    from monai.bundle import verify_metadata

    # the specification's "optional_packages_version" and MONAI's current "required_packages_version"
    renamed = _edited(METADATA, lambda m: m.update(required_packages_version=m.pop("optional_packages_version")))
    for i, metadata in enumerate([METADATA, renamed]):
        meta_file = tmp_path / f"metadata{i}.json"
        meta_file.write_text(json.dumps(metadata))
        verify_metadata(meta_file=str(meta_file), filepath=str(REPO / "bundles" / "meta_schema.json"))


def test_verify_fails_when_the_network_does_not_match_the_metadata(bundle, no_download):
    metadata = _edited(METADATA, lambda m: m["network_data_format"]["outputs"]["pred"].update(num_channels=3))
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=r"failed verify_net_in_out at spacing \[0.5, 0.5, 0.5\] mm.*`2` doesn't match: `3`"):
        verify(bundle, device="cpu")


def test_verify_says_when_the_test_image_is_too_small(tmp_path, no_download):
    def tiny(m):
        for entry in (m["network_data_format"]["inputs"]["image"], m["network_data_format"]["outputs"]["pred"]):
            entry["spatial_shape"] = ["2*n"] * 3  # n=1: a 1-voxel bottleneck, which InstanceNorm rejects

    root = write_bundle(tmp_path / "tiny_bundle", metadata=_edited(METADATA, tiny))
    with pytest.raises(ValueError, match="too small for the UNet's levels"):
        verify(root, spacing=1.0, device="cpu")
    verify(root, spacing=1.0, device="cpu", n=4)


# --------------------------------------------------------------------------- export


def test_export_matches_the_hypernetwork_at_its_spacing(bundle, trained, tmp_path):
    spacing = [1.0, 1.5, 2.5]
    path = export(bundle, "1,1.5,2.5", output=tmp_path / "out" / "unet.ts")
    assert Path(path) == tmp_path / "out" / "unet.ts"
    ts_net, meta, extra = load_net_with_metadata(path, more_extra_files=("inference.json",))
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 12, 8)
    with torch.no_grad():
        expected = trained(x, torch.tensor([spacing]))
        other = trained(x, torch.tensor([[3.0, 3.0, 4.0]]))
        out = ts_net(x)
    assert torch.allclose(out, expected, atol=ATOL)
    assert not torch.allclose(out, other, atol=1e-3)
    assert meta["generated_for_spacing_mm"] == spacing
    assert meta["version"] == METADATA["version"]
    assert "spacing" not in meta["network_data_format"]["inputs"]  # weights fixed: the image is the only input
    assert json.loads(extra["inference.json"]) == INFERENCE
    assert os.listdir(tmp_path / "out") == ["unet.ts"]


def test_export_default_output(bundle):
    path = export(bundle, 2)
    assert Path(path) == bundle / "models" / "model_2x2x2mm.ts"
    assert sorted(os.listdir(bundle / "models")) == ["model.pt", "model_2x2x2mm.ts"]
    torch.jit.load(path)


def test_export_warns_outside_the_trained_range(bundle, tmp_path):
    with pytest.warns(UserWarning, match=r"outside the trained range \[0.5, 4.0\] mm"):
        export(bundle, "1,1,10", output=tmp_path / "far.ts")


def test_export_error_while_writing_leaves_nothing(bundle, monkeypatch):
    def half_write(jit_obj, filename, **kwargs):
        Path(filename).write_bytes(b"PK partial")
        raise OSError("disk full")

    monkeypatch.setattr("monai.data.save_net_with_metadata", half_write)
    with pytest.raises(OSError, match="disk full"):
        export(bundle, 1.5)
    assert os.listdir(bundle / "models") == ["model.pt"]


@pytest.mark.parametrize("spacing", ["0", "nan", "a,b,c", "1,2"])
def test_export_rejects_a_bad_spacing_and_writes_nothing(bundle, spacing):
    with pytest.raises(ValueError, match="spacing"):
        export(bundle, spacing)
    assert os.listdir(bundle / "models") == ["model.pt"]


def test_export_without_checkpoint_names_it(bundle):
    missing = bundle / "models" / "nothing.pt"
    with pytest.raises(FileNotFoundError, match="nothing.pt not found. Train the bundle"):
        export(bundle, 1.5, ckpt=missing)
    (bundle / "models" / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match=str(bundle / "models" / "model.pt")):
        export(bundle, 1.5)
    assert os.listdir(bundle / "models") == []


# --------------------------------------------------------------------------- pack


def test_pack_error_while_writing_leaves_nothing(bundle, tmp_path, monkeypatch):
    write = zipfile.ZipFile.write

    def failing_write(self, filename, arcname=None, *args, **kwargs):
        if str(arcname).endswith("hyperspace.py"):
            raise OSError("disk full")
        return write(self, filename, arcname, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        pack(bundle, output=tmp_path / "dist" / "b.zip")
    assert os.listdir(tmp_path / "dist") == []

RUN_UNPACKED = textwrap.dedent(
    """
    import json, sys
    import torch
    import custom_networks
    from custom_networks import bundle_tools
    from monai.bundle import ConfigParser

    root = sys.argv[1]
    bundle_tools.verify(root, device="cpu")
    parser = ConfigParser()
    parser.read_config(root + "/configs/inference.json")
    parser.read_meta(root + "/configs/metadata.json")
    parser["bundle_root"] = root
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(parser.get_parsed_content("ckpt_path"), weights_only=True))
    torch.manual_seed(0)
    x = torch.randn(1, 1, 16, 12, 8)
    with torch.no_grad():
        y = net.eval()(x, torch.tensor([[1.0, 1.5, 2.5]]))
    torch.save(y, "y.pt")
    print(json.dumps({"custom_networks": custom_networks.__file__, "schema": str(bundle_tools.find_schema(root))}))
    """
)


def test_pack_runs_without_the_repository(bundle, trained, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="custom_networks.bundle_tools"):
        zip_path = Path(pack(bundle, output=tmp_path / "dist" / "b.zip"))
    assert "PYTHONPATH=<dir>/test_hyperspace_bundle python -m monai.bundle run --config_file" in caplog.text
    assert os.listdir(tmp_path / "dist") == ["b.zip"]
    names = set(zipfile.ZipFile(zip_path).namelist())
    top = "test_hyperspace_bundle/"
    for member in [
        "configs/metadata.json",
        "configs/inference.json",
        "configs/meta_schema.json",
        "models/model.pt",
        "docs/README.md",
        "LICENSE",
        "custom_networks/__init__.py",
        "custom_networks/nets/hyperspace.py",
        "custom_networks/bundle_tools.py",
    ]:
        assert top + member in names
    assert all(n.startswith(top) for n in names)
    assert not [n for n in names if any(p in n for p in ("/eval/", "/runs/", "__pycache__", ".pyc"))]

    unpacked = tmp_path / "elsewhere"
    zipfile.ZipFile(zip_path).extractall(unpacked)
    root = unpacked / "test_hyperspace_bundle"
    assert REPO not in root.parents
    (unpacked / "run.py").write_text(RUN_UNPACKED)
    # PYTHONPATH = the unzipped bundle only, cwd outside the repository: PYTHONPATH entries come
    # before site-packages on sys.path, and the editable install's finder is appended to
    # sys.meta_path after the path finder, so the bundled copy is the one imported
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(root)
    result = subprocess.run(
        [sys.executable, "run.py", str(root)], cwd=unpacked, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["custom_networks"]) == root / "custom_networks" / "__init__.py"
    assert Path(report["schema"]) == root / "configs" / "meta_schema.json"
    torch.manual_seed(0)
    x = torch.randn(1, 1, 16, 12, 8)
    with torch.no_grad():
        expected = trained(x, torch.tensor([[1.0, 1.5, 2.5]]))
    assert torch.allclose(torch.load(unpacked / "y.pt"), expected, atol=ATOL)


# --------------------------------------------------------------------------- the repository's bundles: one source

REPO_BUNDLES = {
    "brats": "brats_mri_tumour_segmentation",
    "spider": "spider_mri_spine_segmentation",
    "mmwhs": "mmwhs_mri_heart_segmentation",
    "vessel": "vessel_mra_segmentation",
}


OCCUPANCY_CONFIGS = {"train_occupancy.json", "inference_occupancy.json"}


@pytest.mark.parametrize("name", REPO_BUNDLES)
def test_each_bundle_holds_only_its_differences(name):
    """Shared configs are links to bundles/common; the bundle's own metadata names its data set,
    holds no generated entry, and its versions are the pinned requirements."""
    bundle = REPO / "bundles" / REPO_BUNDLES[name]
    common = REPO / "bundles" / "common" / "configs"
    own = sorted(p.name for p in (bundle / "configs").iterdir() if not p.is_symlink())
    assert own == ["metadata.json"]
    for link in (bundle / "configs").iterdir():
        if link.is_symlink():
            assert link.resolve() == (common / link.name).resolve()
    # every shared config is linked, except the occupancy decoder's overrides: a BraTS option
    shared = [p.name for p in common.iterdir() if name == "brats" or p.name not in OCCUPANCY_CONFIGS]
    assert sorted(shared) == sorted(p.name for p in (bundle / "configs").iterdir() if p.is_symlink())
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["dataset_name"] == name
    assert not set(meta) & set(bundle_tools.DERIVED_METADATA)
    pins = bundle_tools._pins()
    assert (meta["monai_version"], meta["pytorch_version"], meta["numpy_version"]) == (pins["monai"], pins["torch"], pins["numpy"])


@pytest.mark.parametrize("name", REPO_BUNDLES)
def test_generated_metadata_follows_datasets_py(name):
    from custom_networks import get_dataset

    spec = get_dataset(name)
    meta = bundle_tools.metadata(REPO / "bundles" / REPO_BUNDLES[name])
    inputs, pred = meta["network_data_format"]["inputs"], meta["network_data_format"]["outputs"]["pred"]
    assert inputs["spacing"] == spacing_input_description(spec.spacing_range)
    assert inputs["image"]["num_channels"] == 1 and inputs["image"]["channel_def"] == {"0": spec.modality}
    assert pred["num_channels"] == spec.num_classes
    assert list(pred["channel_def"].values()) == [c.replace("_", " ") for c in spec.classes]
    assert meta["required_packages_version"]["nibabel"] == bundle_tools._pins()["nibabel"]
    # clDice's skeletons need scikit-image: listed for the data set that reports it, not for the others
    assert ("scikit-image" in meta["required_packages_version"]) == ("cldice" in spec.extra_metrics)
    if "cldice" in spec.extra_metrics:
        assert meta["required_packages_version"]["scikit-image"] == bundle_tools._pins()["scikit-image"]
    assert meta["network"] == {"primary_network": "unet", "hypernetwork": True, "description": describe_network("unet", True)}
    baseline = bundle_tools.metadata(REPO / "bundles" / REPO_BUNDLES[name], overrides={"hypernetwork": False})
    assert (baseline["network"]["primary_network"], baseline["network"]["hypernetwork"]) == ("unet", False)


def test_pack_of_an_sdn_checkpoint_names_the_sdn_in_its_configs_and_metadata(tmp_path):
    """Weights trained with ``--primary_network sdn_unet`` are packed with configs that build that
    network, so the unzipped bundle loads them with its single-file commands."""
    bundle = REPO / "bundles" / REPO_BUNDLES["brats"]
    overrides = {"primary_network": "sdn_unet", "network_def#channels": [4, 8, 8]}
    state = bundle_tools.bundle_parser(bundle, overrides=overrides).get_parsed_content("network_def").state_dict()
    ckpt = tmp_path / "model.pt"
    torch.save(state, ckpt)
    # the channels are given, the primary network is read off the weights
    archive = Path(pack(bundle, output=tmp_path / "b.zip", ckpt=ckpt, **{"network_def#channels": [4, 8, 8]}))
    folder = REPO_BUNDLES["brats"]
    with zipfile.ZipFile(archive) as z:
        configs = {n: json.loads(z.read(f"{folder}/configs/{n}")) for n in ("train.json", "inference.json", "as.json")}
        meta = json.loads(z.read(f"{folder}/configs/metadata.json"))
        z.extractall(tmp_path / "unzipped")
    assert configs["train.json"]["primary_network"] == configs["inference.json"]["primary_network"] == "sdn_unet"
    assert "primary_network" not in configs["as.json"]  # the rest of each config as it was
    assert configs["train.json"]["network_def"]["channels"] == [4, 8, 8]
    assert configs["inference.json"]["hypernetwork"] is True
    assert meta["network"]["primary_network"] == "sdn_unet" and "SDNUNet" in meta["network"]["description"]
    unzipped = bundle_tools.bundle_parser(tmp_path / "unzipped" / folder)
    unzipped.get_parsed_content("network_def").load_state_dict(state)  # the packed configs build the SDN U-Net
    with pytest.raises(ValueError, match="network_def#chanels"):
        pack(bundle, output=tmp_path / "c.zip", ckpt=ckpt, **{"network_def#chanels": [4, 8, 8]})
    assert not (tmp_path / "c.zip").exists()
    # a UNet checkpoint packs with the primary network unchanged
    unet = bundle_tools.bundle_parser(bundle, overrides={"network_def#channels": [4, 8]}).get_parsed_content("network_def")
    torch.save(unet.state_dict(), ckpt)
    with zipfile.ZipFile(pack(bundle, output=tmp_path / "u.zip", ckpt=ckpt, **{"network_def#channels": [4, 8]})) as z:
        assert json.loads(z.read(f"{folder}/configs/inference.json"))["primary_network"] == "unet"


def test_bundle_folders_repeat_fewer_than_40_config_lines():
    """Configuration lines of one bundle folder that stand again in another (links not counted)."""
    def lines(folder):
        out = set()
        for p in folder.rglob("*"):
            if p.is_file() and not p.is_symlink() and p.suffix in (".json", ".conf", ".yaml"):
                out |= {ln.strip() for ln in p.read_text().splitlines() if len(ln.strip()) > 2}
        return out

    folders = [lines(REPO / "bundles" / b) for b in REPO_BUNDLES.values()]
    repeated = set()
    for i, a in enumerate(folders):
        for b in folders[i + 1 :]:
            repeated |= a & b
    assert len(repeated) < 40, sorted(repeated)


def test_config_expressions_are_at_most_70_characters():
    """Configs stay declarative: no ``$`` expression longer than 70 characters in any config."""
    def expressions(value):
        if isinstance(value, dict):
            return [e for v in value.values() for e in expressions(v)]
        if isinstance(value, list):
            return [e for v in value for e in expressions(v)]
        return [value] if isinstance(value, str) and value.startswith("$") else []

    found = [e for f in (REPO / "bundles" / "common" / "configs").glob("*.json") for e in expressions(json.loads(f.read_text()))]
    assert len(found) > 50  # the configs were read
    assert max(map(len, found)) <= 70, max(found, key=len)


def test_a_linked_bundle_that_types_generated_metadata_is_refused(tmp_path):
    bundle = tmp_path / "bundles" / "mine"
    shutil.copytree(REPO / "bundles" / "common", tmp_path / "bundles" / "common")
    (bundle / "configs").mkdir(parents=True)
    for p in (tmp_path / "bundles" / "common" / "configs").iterdir():
        (bundle / "configs" / p.name).symlink_to(Path("../../common/configs") / p.name)
    meta = json.loads((REPO / "bundles" / REPO_BUNDLES["brats"] / "configs" / "metadata.json").read_text())
    (bundle / "configs" / "metadata.json").write_text(json.dumps({**meta, "pred_classes": "0: nothing"}))
    with pytest.raises(ValueError, match="pred_classes"):
        bundle_tools.metadata(bundle)
