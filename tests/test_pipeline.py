"""The one spacing pipeline: shared transforms are stateless, training sees what inference sees,
the bundles declare the chain :mod:`custom_networks.pipeline.chain` builds, and labels are written fast
and atomically in the format asked for."""

import glob
import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import CacheDataset, DataLoader, Dataset, MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, NormalizeIntensityd

from custom_networks import get_dataset, pipeline
from custom_networks.bundle_tools import bundle_parser
from custom_networks.pipeline.cost import BudgetSpacing, InferenceCost
from custom_networks.data.fileio import write_label
from custom_networks.pipeline.transforms import NativeLabelsd, RandSpacingPatchd, SpacingPolicyd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES = {"brats": "brats_mri_tumour_segmentation", "spider": "spider_mri_spine_segmentation", "mmwhs": "mmwhs_mri_heart_segmentation"}
RANGE = [[1.0, 3.0]] * 3


def _items(root, n=24, seed=0):
    """NIfTI images of different native spacings (so each has its own clamped working spacing) and content."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        spacing = rng.uniform(0.6, 3.6, 3)
        shape = [int(round(30 / s)) + 8 for s in spacing]
        path = os.path.join(str(root), f"case{i}.nii.gz")
        nib.save(nib.Nifti1Image(rng.normal(i, 1.0, shape).astype(np.float32), np.diag([*spacing, 1.0])), path)
        items.append({"image": path, "id": i})
    return items


LOAD = [LoadImaged("image", image_only=True), EnsureChannelFirstd("image")]


def _fingerprint(d) -> tuple:
    image = d["image"][0] if d["image"].dim() == 5 else d["image"]  # DataLoader adds a batch axis
    spacing = torch.as_tensor(d["spacing"]).reshape(-1)
    return (
        tuple(round(float(s), 6) for s in spacing),
        tuple(image.shape),
        hashlib.sha1(image.detach().cpu().contiguous().numpy().tobytes()).hexdigest(),
    )


def test_one_spacing_transform_shared_by_threads_and_processes_gives_each_image_its_own_spacing(tmp_path):
    items = _items(tmp_path)
    transform = Compose(LOAD + pipeline.spacing_steps(False, "clamp", trained_range=RANGE))
    sequential = {it["id"]: _fingerprint(transform(dict(it))) for it in items}
    # each image's own working spacing: its native spacing clamped to [1, 3] mm
    for it in items:
        native = np.abs(np.diag(nib.load(it["image"]).affine)[:3])
        np.testing.assert_allclose(sequential[it["id"]][0], np.clip(native, 1.0, 3.0), rtol=1e-6)

    cached = CacheDataset(items, transform=transform, cache_rate=1.0, num_workers=4, progress=False)
    assert {cached[i]["id"]: _fingerprint(cached[i]) for i in range(len(items))} == sequential

    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(lambda it: transform(dict(it)), items))
    assert {d["id"]: _fingerprint(d) for d in threaded} == sequential

    # DataLoader worker processes run torch with one thread, whose float sums (the z-score's mean
    # and std) round differently from two threads: the same spacing and shape, values to 1e-5
    loader = DataLoader(Dataset(items, transform=transform), batch_size=1, num_workers=2)
    reference = {it["id"]: transform(dict(it)) for it in items}
    for batch in loader:
        i = int(batch["id"][0])
        assert _fingerprint(batch)[:2] == sequential[i][:2]
        torch.testing.assert_close(batch["image"][0].as_tensor(), reference[i]["image"].as_tensor(), atol=1e-5, rtol=0)


def test_budget_policy_shared_by_threads_keeps_each_decision_in_its_own_data(tmp_path):
    items = _items(tmp_path, 12)
    cost = InferenceCost((16, 16, 16), 0.5, 1, 2, seconds_per_window=1e-4, seconds_per_voxel=1e-8, window_bytes=1e6)
    resample = Compose(LOAD + [SpacingPolicyd("image", policy=BudgetSpacing(cost, RANGE, time_budget_s=100.0))])
    sequential = {it["id"]: resample(dict(it))["spacing_decision"] for it in items}
    with ThreadPoolExecutor(6) as pool:
        threaded = {d["id"]: d["spacing_decision"] for d in pool.map(lambda it: resample(dict(it)), items)}
    assert threaded == sequential
    assert len({tuple(d["spacing"]) for d in sequential.values()}) > 6  # the images really differ


def test_random_patches_from_threads_carry_the_spacing_of_their_own_grid():
    """Every patch's spacing entry is the spacing of its own affine, whichever thread drew it."""
    image = MetaTensor(torch.rand(1, 60, 60, 40), affine=torch.eye(4, dtype=torch.float64))
    label = MetaTensor((torch.rand(1, 60, 60, 40) > 0.7).to(torch.uint8), affine=torch.eye(4, dtype=torch.float64))
    patches = RandSpacingPatchd(["image", "label"], [[0.5, 3.0]] * 3, (16, 16, 16), samples_per_spacing=2).set_random_state(0)
    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(lambda _: patches({"image": image, "label": label}), range(64)))
    for d in out:
        spacing = affine_to_spacing(d["image"].affine, r=3).numpy()
        np.testing.assert_allclose(spacing, d["spacing"].numpy(), rtol=1e-5)
        np.testing.assert_allclose(affine_to_spacing(d["label"].affine, r=3).numpy(), spacing, rtol=1e-6)
    # samples_per_spacing=2 under threads: the 64 draws still come in pairs of one spacing
    spacings = sorted(tuple(np.round(d["spacing"].numpy(), 6)) for d in out)
    assert all(spacings.count(s) % 2 == 0 for s in set(spacings))


def _skull_stripped(shape=(48, 48, 40), radius=16.0, seed=0) -> tuple[MetaTensor, torch.Tensor]:
    """A 'brain': a ball of positive intensities, exact zeros outside (as BraTS after skull stripping)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij"))
    ball = (grid**2).sum(0) <= radius**2
    data = np.where(ball, rng.normal(300.0, 40.0, shape) + 40 * grid[0] / radius, 0.0).astype(np.float32)
    return MetaTensor(torch.as_tensor(data)[None], affine=torch.eye(4, dtype=torch.float64)), torch.as_tensor(ball)


@pytest.mark.parametrize("chain", ["bundle", "standalone"])
def test_training_patches_see_the_inference_input(chain):
    """Same normalisation in training and inference: background exactly 0 in both, and at native
    spacing a patch equals the matching crop of the inference input voxel for voxel."""
    image, ball = _skull_stripped()
    inference = Compose(pipeline.spacing_steps(True, "native"))({"image": image})["image"]
    assert float(inference[0][~ball].abs().max()) == 0.0  # background stays 0
    fg = inference[0][ball]
    assert abs(float(fg.mean())) < 1e-4 and abs(float(fg.std(unbiased=False)) - 1.0) < 1e-4

    if chain == "bundle":  # as train.json: NormalizeIntensityd cached, then patches without normalize
        steps = [NormalizeIntensityd("image", nonzero=True, channel_wise=True), RandSpacingPatchd("image", [[1.0, 1.0]] * 3, (24, 24, 24), label_key=None, mode="bilinear", normalize=False)]
    else:
        steps = [RandSpacingPatchd("image", [[1.0, 1.0]] * 3, (24, 24, 24), mode="bilinear", label_key=None, nonzero=True)]
    train = Compose(steps).set_random_state(3)
    for _ in range(4):
        patch = train({"image": image})["image"]
        start = [int(round(v)) for v in patch.affine[:3, 3].tolist()]
        crop = inference[0][tuple(slice(s, s + 24) for s in start)]
        torch.testing.assert_close(patch[0], crop, atol=1e-5, rtol=0)

    # through a coarser grid: background 0 and the same foreground statistics (interior voxels)
    coarse_inf = Compose(pipeline.spacing_steps(True, "target", 2.0))({"image": image})["image"]
    coarse_train = Compose([NormalizeIntensityd("image", nonzero=True, channel_wise=True),
                            RandSpacingPatchd("image", [[2.0, 2.0]] * 3, (20, 20, 16), mode="bilinear", label_key=None, normalize=False, pos_fraction=0.0)]).set_random_state(0)
    patch = coarse_train({"image": image})["image"]
    for img in (coarse_inf, patch):
        assert float(img[0, 0, 0, 0]) == 0.0  # a corner is background in both
    interior_inf = coarse_inf[0, 6:18, 6:18, 5:15]
    interior_patch = patch[0, 4:16, 4:16, 3:13]
    assert abs(float(interior_inf.mean()) - float(interior_patch.mean())) < 0.15
    assert abs(float(interior_inf.std()) - float(interior_patch.std())) < 0.1


@pytest.mark.parametrize("name", BUNDLES)
def test_bundle_inference_declares_the_pipeline_chain(name):
    """inference.json and pipeline.preprocessing / postprocessing build the same steps."""
    bundle = os.path.join(ROOT, "bundles", BUNDLES[name])
    parser = bundle_parser(bundle)
    pre = parser.get_parsed_content("preprocessing")
    post = parser.get_parsed_content("postprocessing")
    spec = get_dataset(name)
    ours_pre = pipeline.preprocessing(spec)
    ours_post = pipeline.postprocessing(ours_pre, output_dir="/tmp/unused")
    assert [type(t).__name__ for t in pre.transforms] == [type(t).__name__ for t in ours_pre.transforms]
    assert [type(t).__name__ for t in post.transforms] == [type(t).__name__ for t in ours_post.transforms]
    normalize, resample = pre.transforms[-2], pre.transforms[-1]
    assert normalize.normalizer.nonzero == spec.zscore_nonzero and normalize.normalizer.channel_wise
    # the default policy is clamp (the paper's fallback), to the data set's trained range
    assert resample.policy == "clamp" and parser.get_parsed_content("spacing_policy") == "clamp"
    assert resample.trained_range == spec.spacing_range


def test_policy_budget_counts_the_time_already_spent():
    cost = InferenceCost((16, 16, 16), 0.5, 1, 2, seconds_per_window=0.0, seconds_per_voxel=0.0, window_bytes=1.0)
    resample = SpacingPolicyd("image", policy=BudgetSpacing(cost, RANGE, time_budget_s=100.0))
    image = MetaTensor(torch.rand(1, 20, 20, 20), affine=torch.eye(4, dtype=torch.float64))
    d = resample({"image": image, "request_start": time.perf_counter() - 7.0})
    assert 7.0 <= d["spacing_decision"]["predicted_seconds"] < 8.0


def test_labels_are_written_in_the_format_asked_for_atomically(tmp_path):
    label = MetaTensor(torch.zeros(1, 60, 50, 40, dtype=torch.uint8), affine=torch.diag(torch.tensor([-0.8, -0.8, 2.0, 1.0], dtype=torch.float64)))
    label[0, 10:40, 5:30, 3:30] = 2
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha"):
        path = str(tmp_path / f"label{ext}")
        write_label(label, path)
        back = nib.load(path).get_fdata() if ext.startswith(".nii") else None
        if back is not None:
            assert np.array_equal(back, label[0].numpy()) and np.allclose(nib.load(path).affine, label.affine.numpy())
    # NRRD and MetaImage uncompressed (what 3D Slicer asks for): about one byte per voxel
    assert os.path.getsize(tmp_path / "label.nrrd") >= 60 * 50 * 40
    # .nii.gz: level 1 by default, a higher level on request gives a smaller file
    write_label(label, str(tmp_path / "nine.nii.gz"), compresslevel=9)
    assert os.path.getsize(tmp_path / "nine.nii.gz") <= os.path.getsize(tmp_path / "label.nii.gz")
    assert not glob.glob(str(tmp_path / ".tmp-*"))  # no temporary file left behind
    with pytest.raises(ValueError, match="compresslevel"):
        pipeline.SaveLabeld("pred", output_dir=str(tmp_path), compresslevel=12)


def test_a_failed_write_leaves_no_file(tmp_path):
    label = MetaTensor(torch.zeros(1, 4, 4, 4, dtype=torch.uint8))
    with pytest.raises(Exception):
        write_label(label, str(tmp_path / "label.unknownformat"))
    assert os.listdir(tmp_path) == []


def test_native_labels_without_a_resampling_step_say_what_is_missing():
    pre = Compose([NormalizeIntensityd("image")])
    d = pre({"image": MetaTensor(torch.rand(1, 4, 4, 4))})
    d["pred"] = torch.rand(2, 4, 4, 4)
    with pytest.raises(ValueError, match="SpacingPolicyd"):
        NativeLabelsd("pred", transform=pre)(d)
