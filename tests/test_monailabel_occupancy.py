"""The BraTS bundle's occupancy decoder served by the real MONAI Label server, asked with MONAI
Label's own client: the label comes back on the input's grid, equal voxel for voxel to the
library's decoding, with the encoder spacing and the output grid in its params."""

import json
import os
import shutil
import sys

import itk
import numpy as np
import pytest
import torch
from monai.transforms import Compose, NormalizeIntensityd
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from custom_networks import get_dataset
from custom_networks.data.synthetic_datasets import write_synthetic_dataset
from custom_networks.nets.occupancy import OccupancyNetwork
from custom_networks.pipeline.occupancy import occupancy_labels

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving import NO_AUTO_SCORING, running_server  # noqa: E402

MODEL = "brats_mri_tumour_segmentation_occupancy"
OVERRIDES = {"patch_size": [32, 32, 32], "network_def#channels": [8, 16], "num_workers": 0, "cache_rate": 0.0}


def _network() -> OccupancyNetwork:
    torch.manual_seed(0)
    net = OccupancyNetwork(in_channels=1, out_channels=2, channels=(8, 16), hidden_features=get_dataset("brats").hidden_features)
    with torch.no_grad():  # a decoder whose classes follow the image: the head reads the first block's output
        net.decoder.head.bias.copy_(torch.tensor([0.0, -0.2]))
    return net.eval()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("occupancy_app")
    studies, model_dir = root / "studies", root / "models"
    studies.mkdir()
    model_dir.mkdir()
    brats = write_synthetic_dataset("brats", str(root / "brats"), n_cases=1, seed=0)
    case = sorted(os.listdir(brats))[0]
    shutil.copy(os.path.join(brats, case, f"{case}_t1ce.nii.gz"), studies / "lps.nii.gz")
    thick = write_synthetic_dataset("brats", str(root / "thick"), n_cases=1, seed=1, spacings=[[0.8, 0.8, 5.0]])
    itk.imwrite(itk.imread(os.path.join(thick, sorted(os.listdir(thick))[0], f"{sorted(os.listdir(thick))[0]}_t1ce.nii.gz")), str(studies / "thick.nrrd"))
    net = _network()
    torch.save(net.state_dict(), model_dir / f"{MODEL}.pt")
    args = ["-m", "monailabel.main", "start_server", "--app", "monailabel_app", "--studies", str(studies),
            "--conf", "models", "brats_mri_tumour_segmentation", "--conf", "model_dir", str(model_dir),
            "--conf", "bundle_overrides", json.dumps(OVERRIDES)]
    with running_server(args, str(root / "server.log"), env=NO_AUTO_SCORING) as (url, _):
        (root / "results").mkdir()
        yield {"client": MONAILabelClient(url, tmpdir=str(root / "results")), "studies": studies, "net": net}


def _expected(net, path: str, spacing) -> np.ndarray:
    """The library's decoding of the image as the bundle prepares it (RAS, z-scored)."""
    spec = get_dataset("brats")
    load = Compose(spec.load_transforms(["image"], None) + [NormalizeIntensityd("image", nonzero=spec.zscore_nonzero, channel_wise=True)])
    labels, _ = occupancy_labels(net, load({"image": path})["image"], spacing=spacing)
    return labels.as_tensor()[0].numpy()


def _as_ras(path: str) -> np.ndarray:
    spec = get_dataset("brats")
    return Compose(spec.load_transforms(["image"], None))({"image": path})["image"].as_tensor()[0].numpy().astype(np.uint8)


def test_info_lists_the_occupancy_model_with_its_options(served):
    info = served["client"].info()
    assert MODEL in info["models"], list(info["models"])
    config = info["models"][MODEL]["config"]
    assert config["spacing_policy"] == ["clamp", "native", "target"]
    assert "window" not in config and "spacing_ensemble" not in config


@pytest.mark.parametrize("image, params, encoder", [
    ("lps", {"spacing_policy": "target", "target_spacing": "2"}, (2.0, 2.0, 2.0)),
    ("thick", {"spacing_policy": "clamp"}, None),
])
def test_occupancy_labels_come_back_on_the_input_grid_equal_to_the_decoding(served, image, params, encoder, tmp_path):
    client, studies = served["client"], served["studies"]
    path = str(studies / ("lps.nii.gz" if image == "lps" else "thick.nrrd"))
    label_file, result = client.infer(MODEL, image, {**params, "result_extension": ".nrrd", "result_dtype": "uint8"})
    label = itk.imread(label_file)
    source = itk.imread(path)
    assert tuple(itk.size(label)) == tuple(itk.size(source))
    np.testing.assert_allclose(np.array(label.GetSpacing()), np.array(source.GetSpacing()), atol=1e-5)
    np.testing.assert_allclose(np.array(label.GetOrigin()), np.array(source.GetOrigin()), atol=1e-4)
    np.testing.assert_allclose(itk.array_from_matrix(label.GetDirection()), itk.array_from_matrix(source.GetDirection()), atol=1e-6)
    params_out = result["params"] if "params" in result else result
    trained = get_dataset("brats").spacing_range
    expected_encoder = encoder or tuple(trained.clamp(params_out["native_spacing_mm"]))
    np.testing.assert_allclose(params_out["encoder_spacing_mm"], expected_encoder, atol=1e-4)
    assert params_out["output_grid"]["spacing_mm"] == params_out["native_spacing_mm"]
    assert 0 < params_out["queried_voxels"] <= 1
    # voxel for voxel, in the bundle's RAS frame: a mirrored or transposed label would differ
    copy = str(tmp_path / "label.nrrd")
    shutil.copy(label_file, copy)
    expected = _expected(served["net"], path, expected_encoder)
    assert 0 < expected.mean() < 1, "the test network should give both classes"
    assert np.array_equal(_as_ras(copy), expected)


@pytest.mark.parametrize("params, words", [
    ({"spacing_policy": "auto"}, ["spacing_policy", "auto"]),
    ({"spacing_policy": "clamp", "spacing_ensemble": "true"}, ["spacing_ensemble"]),
    ({"spacing_policy": "target", "target_spacing": "-1"}, ["target_spacing"]),
])
def test_options_the_decoder_does_not_have_get_a_400_naming_them(served, params, words):
    with pytest.raises(MONAILabelClientException) as e:
        served["client"].infer(MODEL, "lps", params)
    assert "Status: 400" in e.value.msg, e.value.msg
    for word in words:
        assert word in e.value.msg, e.value.msg
