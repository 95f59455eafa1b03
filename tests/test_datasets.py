"""Per-dataset specs, label maps, header checks, generated data in the official layouts, data lists."""

import json
import os
import runpy
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor, load_decathlon_datalist
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from custom_networks import PlainUNet
from custom_networks.data.datalist import find_cases, make_datalist, split_cases
from custom_networks.data.datasets import DATASETS, CheckImaged, MapLabelsd, check_image, get_dataset
from custom_networks.data.synthetic_datasets import SPACINGS, case_ids, write_synthetic_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("brats", "spider", "mmwhs", "vessel")


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Five generated cases of each data set in its official layout."""
    base = tmp_path_factory.mktemp("data")
    return {name: write_synthetic_dataset(name, str(base / name), n_cases=5, seed=0) for name in NAMES}


def load_raw(image, label):
    """LoadImaged + EnsureChannelFirstd only: the tensor axes are the file's (ITK index / NIfTI i, j, k)."""
    keys = ["image", "label"]
    return Compose([LoadImaged(keys, image_only=True), EnsureChannelFirstd(keys)])({"image": image, "label": label})


def case_paths(name, root, case, modality=None):
    spec = get_dataset(name)
    modality = modality or spec.modality
    # a layout with split folders (vessel): the folder that holds the case
    folders = [f for f in spec.split_folders.values() if os.path.isfile(os.path.join(root, f, case))] or [None]
    return (
        os.path.join(root, spec.image_template.format(case=case, modality=modality, split=folders[0])),
        os.path.join(root, spec.label_template.format(case=case, modality=modality, split=folders[0])),
    )


def labelled(values, filename="/data/case_seg.nii.gz"):
    return MetaTensor(torch.tensor(values, dtype=torch.float32).reshape(1, -1, 1, 1), meta={"filename_or_obj": filename})


def save_nifti(path, array, affine=None, sform=None):
    """A NIfTI file; ``sform`` writes the affine straight into the sform (nibabel refuses a singular qform)."""
    if sform is not None:
        header = nib.Nifti1Header()
        header.set_sform(sform, code="scanner")
        nib.save(nib.Nifti1Image(array, None, header=header), path)
    else:
        nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
    return str(path)


# --------------------------------------------------------------------------- registry


def test_registry_names_and_network_kwargs():
    assert set(DATASETS) == {"brats", "spider", "spider_discs", "mmwhs", "vessel"}
    with pytest.raises(ValueError, match=r"unknown dataset 'kits'.*brats.*mmwhs.*spider"):
        get_dataset("kits")
    for spec in DATASETS.values():
        kwargs = spec.network_kwargs()
        assert kwargs["out_channels"] == len(spec.classes) and spec.classes[0] == "background"
        assert spec.hypernetwork_kwargs()["hidden_features"] == spec.hidden_features
        assert spec.spacing_range.contains(spec.fs_target_spacing)
    assert get_dataset("BraTS").modality == "t1ce" and get_dataset("brats").zscore_nonzero
    spider = get_dataset("spider")
    # axis 0 is the thick-slice axis in the spacing range, the FS spacing and the patch alike
    assert spider.spacing_range.high[0] == 5.0 and spider.fs_target_spacing[0] == 3.3 and spider.patch_size == (48, 128, 256)
    net = PlainUNet(**spider.network_kwargs())
    assert len(net.down) == 5 and net.head.out_channels == 3


# --------------------------------------------------------------------------- label maps


@pytest.mark.parametrize(
    "name, raw, expected",
    [
        ("brats", [0, 1, 2, 4], [0, 1, 0, 1]),
        ("spider", [0, 1, 25, 100, 101, 125, 201, 225], [0, 1, 1, 2, 1, 1, 0, 0]),
        ("spider_discs", [0, 1, 25, 100, 101, 125, 201, 225], [0, 1, 1, 2, 1, 1, 3, 3]),
        ("mmwhs", [0, 205, 420, 421, 500, 550, 600, 820, 850], [0, 1, 2, 2, 3, 4, 5, 6, 7]),
        ("vessel", [0, 1], [0, 1]),
    ],
)
def test_label_maps(name, raw, expected):
    spec = get_dataset(name)
    out = MapLabelsd("label", spec.label_map)({"label": labelled(raw)})["label"]
    assert out.reshape(-1).tolist() == expected
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "/data/case_seg.nii.gz"


def test_map_labels_names_file_and_unexpected_values(tmp_path):
    # BraTS 2023 codes enhancing tumour as 3; a BraTS 2021 map must refuse it, not call it background
    seg = np.zeros((6, 6, 6), np.uint8)
    seg[1, 1, 1], seg[2, 2, 2], seg[3, 3, 3] = 1, 3, 4
    path = save_nifti(tmp_path / "BraTS2021_00001_seg.nii.gz", seg)
    data = load_raw(path, path)
    with pytest.raises(ValueError) as e:
        MapLabelsd("label", get_dataset("brats").label_map)(data)
    message = str(e.value)
    assert path in message and "values 3 " in message and "expected only 0-2, 4" in message
    with pytest.raises(ValueError, match=r"values 0\.5.*expected only 0-2, 4"):
        MapLabelsd("label", get_dataset("brats").label_map)({"label": labelled([0, 0.5, 1])})


# --------------------------------------------------------------------------- header checks


def test_check_image_accepts_a_volume(tmp_path):
    affine = np.diag([0.8, 0.9, 3.0, 1.0])
    path = save_nifti(tmp_path / "ok.nii.gz", np.zeros((4, 5, 6), np.float32), affine)
    data = load_raw(path, path)
    assert check_image(data["image"]) == pytest.approx((0.8, 0.9, 3.0))
    assert CheckImaged(["image", "label"])(data)["image"] is data["image"]


def test_check_image_refuses_4d_file_with_several_volumes(tmp_path):
    path = save_nifti(tmp_path / "flair_t1_stack.nii.gz", np.zeros((4, 5, 6, 3), np.float32))
    data = load_raw(path, path)
    assert data["image"].shape == (3, 4, 5, 6)  # EnsureChannelFirstd makes the volumes channels
    with pytest.raises(ValueError, match=r"flair_t1_stack\.nii\.gz: 'image' holds 3 volumes.*expected 1"):
        CheckImaged("image")(data)


def test_check_image_refuses_2d_file(tmp_path):
    path = save_nifti(tmp_path / "slice.nii.gz", np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match=r"slice\.nii\.gz: 'image' has shape \(1, 4, 5\).*\(1, X, Y, Z\)"):
        CheckImaged("image")(load_raw(path, path))


def test_check_image_refuses_zero_spacing_in_header(tmp_path):
    sform = np.diag([1.0, 0.0, 1.0, 1.0])
    path = save_nifti(tmp_path / "broken_header.nii.gz", np.zeros((4, 5, 6), np.float32), sform=sform)
    data = load_raw(path, path)
    # MetaTensor.pixdim shows the zero spacing as 1 mm, so the check must read the affine itself
    with pytest.raises(ValueError, match=r"broken_header\.nii\.gz: 'image' has voxel spacing \[1\.0, 0\.0, 1\.0\] mm"):
        CheckImaged("image")(data)
    # inside a pipeline MONAI wraps the error; the message still names the file
    with pytest.raises(RuntimeError) as e:
        Compose(get_dataset("brats").load_transforms())({"image": path, "label": path})
    assert "broken_header.nii.gz" in str(e.value.__cause__)


def test_check_image_refuses_non_finite_spacing():
    # not through a file: MONAI's NIfTI reader rewrites a NaN sform from the header's pixdim on loading
    affine = torch.diag(torch.tensor([1.0, float("nan"), 1.0, 1.0], dtype=torch.float64))
    img = MetaTensor(torch.zeros(1, 4, 5, 6), affine=affine, meta={"filename_or_obj": "/data/nan.nii.gz"})
    with pytest.raises(ValueError, match=r"/data/nan\.nii\.gz: 'image' has voxel spacing \[1\.0, nan, 1\.0\] mm"):
        check_image(img)


def test_check_image_refuses_label_on_another_grid(tmp_path):
    image = save_nifti(tmp_path / "img.nii.gz", np.zeros((4, 5, 6), np.float32))
    label = save_nifti(tmp_path / "seg.nii.gz", np.zeros((4, 5, 7), np.uint8))
    with pytest.raises(ValueError, match=r"seg\.nii\.gz: 'label' has spatial shape \(4, 5, 7\).*img\.nii\.gz"):
        CheckImaged(["image", "label"])(load_raw(image, label))


# --------------------------------------------------------------------------- generated data


@pytest.mark.parametrize("name", NAMES)
def test_generated_data_loads_with_written_spacing_and_classes(roots, name):
    spec = get_dataset(name)
    load = Compose(spec.load_transforms())
    for i, case in enumerate(case_ids(name, 5)):
        image, label = case_paths(name, roots[name], case)
        assert os.path.isfile(image) and os.path.isfile(label)
        d = load({"image": image, "label": label})
        assert d["image"].shape[0] == 1 and d["image"].shape == d["label"].shape
        assert torch.allclose(d["label"].affine, d["image"].affine)  # MapLabelsd keeps the geometry
        # the spacing written, in tensor axis order after Orientationd(RAS)
        assert d["image"].pixdim.tolist() == pytest.approx(SPACINGS[name][i], abs=1e-4)
        assert torch.unique(d["label"]).tolist() == list(range(len(spec.classes)))  # every structure, no other value
        if name == "brats":  # skull-stripped: zero outside the brain, as zscore_nonzero assumes
            assert (d["image"] == 0).float().mean() > 0.2 and (d["image"][d["label"] > 0] > 0).all()


def test_generated_data_stored_in_ras_loads_without_reorientation(roots):
    """Cases stored in RAS voxel order: LoadImaged + EnsureChannelFirstd alone give the written spacing."""
    for name in ("spider", "mmwhs"):
        for i in (0, 2, 4):
            d = load_raw(*case_paths(name, roots[name], case_ids(name, 5)[i]))
            assert d["image"].pixdim.tolist() == pytest.approx(SPACINGS[name][i], abs=1e-4)


def test_spider_mha_slice_axis_first_after_orientation(roots):
    """A sagittal .mha whose slice axis is ITK's last index axis: Orientationd(RAS) makes it axis 0."""
    spec = get_dataset("spider")
    image, label = case_paths("spider", roots["spider"], case_ids("spider", 5)[1])
    raw = load_raw(image, label)
    assert raw["image"].pixdim.tolist() == pytest.approx((0.9, 0.9, 4.0))  # as stored: thick axis last
    d = Compose(spec.load_transforms(label_key=None))({"image": image, "label": label})
    assert d["image"].pixdim.tolist() == pytest.approx((4.0, 0.9, 0.9))
    seg = d["label"][0].numpy()
    centre = {v: np.argwhere(seg == v).mean(0) for v in np.unique(seg) if v}
    vertebrae = [v for v in sorted(centre) if 1 <= v <= 25]
    assert len(vertebrae) >= 3 and 200 + vertebrae[0] in centre and any(101 <= v <= 125 for v in centre)
    # numbered from the bottom up along axis 2 (inferior -> superior) ...
    assert np.all(np.diff([centre[v][2] for v in vertebrae]) > 0)
    # ... with the canal behind the bodies along axis 1 (posterior -> anterior)
    assert centre[100][1] < min(centre[v][1] for v in vertebrae)


# --------------------------------------------------------------------------- data lists


def ids(items):
    return [item["image"] for item in items]


@pytest.mark.parametrize("name", NAMES)
def test_make_datalist_splits(roots, name, tmp_path):
    output = tmp_path / "out" / "datalist.json"
    first = make_datalist(name, roots[name], output=str(output), seed=0)
    splits = [ids(first[k]) for k in ("training", "validation", "test")]
    assert all(splits) and sum(map(len, splits)) == 5
    assert len(set().union(*map(set, splits))) == 5  # disjoint, together all cases
    for item in first["training"] + first["validation"] + first["test"]:
        assert os.path.isabs(item["image"]) and os.path.isfile(item["image"]) and os.path.isfile(item["label"])
    assert first == make_datalist(name, roots[name], seed=0)
    other = make_datalist(name, roots[name], seed=1)
    if get_dataset(name).split_folders:  # the folders are the split, whatever the seed
        assert splits == [ids(other[k]) for k in ("training", "validation", "test")]
    else:
        assert splits != [ids(other[k]) for k in ("training", "validation", "test")]
    assert json.loads(output.read_text()) == first and os.listdir(output.parent) == ["datalist.json"]
    assert load_decathlon_datalist(str(output), data_list_key="validation") == first["validation"]
    assert first["labels"] == {str(i): c for i, c in enumerate(get_dataset(name).classes)}


def test_vessel_layout_keeps_its_split_folders(roots):
    """SMILE-UHURA / StudyForrest layout: the split is the folders', image and label share a name."""
    root = roots["vessel"]
    datalist = make_datalist("vessel", root, seed=3)
    where = {k: [os.path.relpath(item["image"], root) for item in datalist[k]] for k in ("training", "validation", "test")}
    assert where == {
        "training": ["train/sub-01.nii.gz", "train/sub-02.nii.gz", "train/sub-03.nii.gz"],
        "validation": ["validate/sub-04.nii.gz"],
        "test": ["test/sub-05.nii.gz"],
    }
    for item in datalist["training"] + datalist["validation"] + datalist["test"]:
        folder, name = os.path.split(os.path.relpath(item["label"], root))
        assert folder in ("train_label", "validate_label", "test_label") and name == os.path.basename(item["image"])
    assert datalist["labels"] == {"0": "background", "1": "vessel"} and datalist["modality"] == "tof"


def test_vessel_layout_without_validate_folder_draws_it_from_train(roots, tmp_path):
    root = tmp_path / "uhura"
    shutil.copytree(roots["vessel"], root)
    shutil.rmtree(root / "validate")
    shutil.rmtree(root / "validate_label")
    # .nii files are read as well as .nii.gz; other files are ignored
    os.rename(root / "train" / "sub-03.nii.gz", root / "train" / "sub-03.nii")
    nib.save(nib.load(str(root / "train_label" / "sub-03.nii.gz")), str(root / "train_label" / "sub-03.nii"))
    (root / "train" / "notes.txt").write_text("not an image")
    datalist = make_datalist("vessel", str(root))
    names = {k: sorted(os.path.basename(i["image"]) for i in datalist[k]) for k in ("training", "validation", "test")}
    assert names["test"] == ["sub-05.nii.gz"] and len(names["validation"]) == 1 and len(names["training"]) == 2
    assert sorted(names["training"] + names["validation"]) == ["sub-01.nii.gz", "sub-02.nii.gz", "sub-03.nii"]
    assert names == {k: sorted(os.path.basename(i["image"]) for i in make_datalist("vessel", str(root))[k]) for k in names}


def test_vessel_image_without_label_and_wrong_folder_are_named(roots, tmp_path):
    root = tmp_path / "uhura"
    shutil.copytree(roots["vessel"], root)
    os.remove(root / "test_label" / "sub-05.nii.gz")
    with pytest.raises(FileNotFoundError) as e:
        make_datalist("vessel", str(root))
    assert str(root / "test" / "sub-05.nii.gz") in str(e.value) and f"expected label {root / 'test_label' / 'sub-05.nii.gz'}" in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        make_datalist("vessel", roots["mmwhs"])
    assert "{train,validate,test}/*" in str(e.value) and "dataset='mmwhs'" in str(e.value)


def test_inference_items_of_the_vessel_layout_are_every_split(roots):
    from custom_networks.data.datalist import inference_items

    items = [os.path.relpath(i["image"], roots["vessel"]) for i in inference_items(roots["vessel"], "vessel")]
    assert items == ["train/sub-01.nii.gz", "train/sub-02.nii.gz", "train/sub-03.nii.gz", "validate/sub-04.nii.gz", "test/sub-05.nii.gz"]
    test_only = inference_items(os.path.join(roots["vessel"], "test"), "vessel")  # a plain folder of images
    assert [os.path.basename(i["image"]) for i in test_only] == ["sub-05.nii.gz"]


def test_generated_vessel_trees_are_thin_connected_and_bright():
    """Radii 2 mm down to 0.3 mm; the label is one connected tree; vessels are brighter than tissue."""
    from custom_networks.data.synthetic_datasets import vessel_tree
    from custom_networks.metrics import count_components

    rng = np.random.RandomState(0)
    for spacing in ((0.3, 0.3, 0.45), (0.7, 0.7, 1.0)):
        shape = tuple(int(round(e / s)) for e, s in zip((20.0, 20.0, 16.0), spacing))
        image, label = vessel_tree(shape, spacing, rng)
        assert image.shape == label.shape == shape and set(np.unique(label)) == {0, 1}
        assert 0.005 < label.mean() < 0.1 and count_components(label) <= 2  # a branch may leave and re-enter the view
        assert image[label == 1].mean() > image[label == 0].mean() + 50


def test_find_cases_natural_order(roots):
    # the split permutes this order, so it must not depend on the file system's listing order
    names = [os.path.basename(item["image"]) for item in find_cases("spider", roots["spider"])]
    assert names == ["1_t1.mha", "5_t1.mha", "9_t1.mha", "13_t1.mha", "17_t1.mha"]


def test_make_datalist_spider_t2(roots):
    datalist = make_datalist("spider", roots["spider"], modality="t2")
    for item in datalist["training"]:
        assert item["image"].endswith("_t2.mha") and os.sep + "masks" + os.sep in item["label"]
        assert item["label"].endswith("_t2.mha")
    with pytest.raises(ValueError, match=r"spider has no modality 't3'.*'t1', 't2'"):
        make_datalist("spider", roots["spider"], modality="t3")


def test_split_cases_sizes():
    assert [len(v) for v in split_cases(list(range(3))).values()] == [1, 1, 1]
    assert [len(v) for v in split_cases(list(range(100))).values()] == [70, 20, 10]
    with pytest.raises(ValueError, match="2 case"):
        split_cases([0, 1])
    with pytest.raises(ValueError, match="val_fraction must be in"):
        split_cases(list(range(10)), val_fraction=1.5)


def assert_nothing_written(folder):
    assert os.listdir(folder) == [], "an error must leave neither the JSON nor a temporary file"


def test_datalist_missing_root(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    missing = str(tmp_path / "BraTS2021")
    with pytest.raises(FileNotFoundError, match=f"{missing} does not exist"):
        make_datalist("brats", missing, output=str(out / "datalist.json"))
    assert_nothing_written(out)


def test_datalist_empty_folder(tmp_path):
    out, empty = tmp_path / "out", tmp_path / "empty"
    out.mkdir()
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        make_datalist("mmwhs", str(empty), output=str(out / "datalist.json"))
    assert str(empty) in str(e.value) and "mr_train/mr_train_*_image.nii.gz" in str(e.value)
    assert_nothing_written(out)


def test_datalist_wrong_dataset_folder(roots, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        make_datalist("brats", roots["spider"], output=str(out / "datalist.json"))
    message = str(e.value)
    assert roots["spider"] in message and "*_t1ce.nii.gz" in message and "dataset='spider'" in message
    assert_nothing_written(out)


def test_datalist_image_without_label(roots, tmp_path):
    root, out = tmp_path / "BraTS2021", tmp_path / "out"
    shutil.copytree(roots["brats"], root)
    out.mkdir()
    case = case_ids("brats", 5)[3]
    image, label = case_paths("brats", str(root), case)
    os.remove(label)
    with pytest.raises(FileNotFoundError) as e:
        make_datalist("brats", str(root), output=str(out / "datalist.json"))
    assert image in str(e.value) and f"expected label {label}" in str(e.value)
    assert_nothing_written(out)


def test_datalist_cli_writes_json(roots, tmp_path, monkeypatch, capsys):
    """The fire command line in this process (a new interpreter costs ~8 s of MONAI import; the test
    below pays it once): arguments parsed, JSON written, split sizes reported."""
    output = tmp_path / "cli" / "datalist.json"
    argv = ["datalist", "mmwhs", "--root", roots["mmwhs"], "--output", str(output), "--seed", "3"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_module("custom_networks.data.datalist", run_name="__main__")
    assert "3 training, 1 validation, 1 test (mmwhs, mr)" in capsys.readouterr().out
    assert json.loads(output.read_text()) == make_datalist("mmwhs", roots["mmwhs"], seed=3)


def test_datalist_cli_for_the_vessel_layout(roots, tmp_path, monkeypatch, capsys):
    output = tmp_path / "x.json"
    monkeypatch.setattr(sys, "argv", ["datalist", "vessel", "--root", roots["vessel"], "--output", str(output)])
    runpy.run_module("custom_networks.data.datalist", run_name="__main__")
    assert "3 training, 1 validation, 1 test (vessel, tof)" in capsys.readouterr().out
    assert json.loads(output.read_text()) == make_datalist("vessel", roots["vessel"])


def test_datalist_cli_bad_root_subprocess(tmp_path):
    """As a user runs it: exit code != 0 and one clear line on stderr, no traceback, no file."""
    bad, output = str(tmp_path / "no_such_folder"), tmp_path / "datalist.json"
    cmd = [sys.executable, "-m", "custom_networks.data.datalist", "spider", "--root", bad, "--output", str(output)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert f"error: spider data folder {bad} does not exist" in run.stderr and "Traceback" not in run.stderr
    assert not output.exists()


@pytest.mark.parametrize("content", ["", "[1, 2]", "{not json"])
def test_a_malformed_data_list_file_is_named(tmp_path, content):
    from custom_networks.data.datalist import load_split

    path = tmp_path / "datalist.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="datalist.json"):
        load_split("brats", str(tmp_path), "training", str(path))
