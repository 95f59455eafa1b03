"""The one inference pipeline: load -> z-score -> resample to the working spacing -> network ->
labels on the native grid -> save.

Every inference path builds its chain here or from a bundle's ``inference.json``, which declares
the same steps (a test compares the two): :func:`custom_networks.pipeline.inference.predict`, the
experiments and the benchmarks call :func:`preprocessing` and :func:`postprocessing`; the MONAI
Label app and ``python -m monai.bundle run inference`` parse the bundle config.

==============  ====================================================================================
step            what it is
==============  ====================================================================================
load            the data set's ``DatasetSpec.load_transforms``: read, channel first, header check,
                reorientation to the data set's axis codes
normalize       MONAI's ``NormalizeIntensityd(nonzero, channel_wise=True)`` at the native resolution,
                the same normalisation as the training patches (:mod:`custom_networks.pipeline.transforms`)
resample        :class:`~custom_networks.pipeline.transforms.SpacingPolicyd` to the working spacing
(network)       :class:`~custom_networks.pipeline.batching.SpacingSlidingWindowInferer`
to native       :class:`~custom_networks.pipeline.transforms.NativeLabelsd`: softmax, back to the native grid
                and the input's orientation, argmax, fused
save            :class:`SaveLabeld`: MONAI's ``SaveImaged`` with atomic writers, ``uint8``, the input's
                geometry; ``.nii.gz`` at a fast gzip level, NRRD / MetaImage uncompressed
==============  ====================================================================================
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from monai.transforms import Compose, NormalizeIntensityd, SaveImaged

from .batching import SpacingSlidingWindowInferer
from ..data.fileio import writer_for
from .transforms import NativeLabelsd, SpacingPolicyd

__all__ = ["SaveLabeld", "inferer", "postprocessing", "preprocessing", "run_network", "spacing_steps"]


class SaveLabeld(SaveImaged):
    """MONAI's ``SaveImaged`` for label maps: atomic writes, ``uint8``, no resampling, one folder.

    Args:
        keys: the label key (``"pred"``).
        output_dir: the folder; files are ``<input name>_<output_postfix><output_ext>``.
        output_ext: ``".nii.gz"``, ``".nii"``, ``".nrrd"``, ``".mha"``, ...
        compresslevel: gzip level of ``.nii.gz`` (0-9, default 1: fast); for other formats ``> 0``
            turns on ITK's compression (default 0: uncompressed, as 3D Slicer asks for NRRD).
        kwargs: other ``SaveImaged`` arguments.
    """

    def __init__(self, keys="pred", output_dir: str = "./", output_postfix: str = "seg", output_ext: str = ".nii.gz",
                 compresslevel: int | None = None, output_dtype=np.uint8, **kwargs):
        kwargs.setdefault("resample", False)
        kwargs.setdefault("separate_folder", False)
        kwargs.setdefault("print_log", False)
        kwargs.setdefault("savepath_in_metadict", True)
        super().__init__(keys, output_dir=output_dir, output_postfix=output_postfix, output_ext=output_ext,
                         output_dtype=output_dtype, writer=writer_for(output_ext), **kwargs)
        if compresslevel is None:
            compresslevel = 1 if output_ext.lower().endswith(".gz") else 0
        if not 0 <= int(compresslevel) <= 9:
            raise ValueError(f"compresslevel {compresslevel!r} must be a gzip level from 0 to 9.")
        self.set_options(write_kwargs={"compresslevel": int(compresslevel)})


def spacing_steps(nonzero: bool, policy="clamp", target_spacing=None, trained_range=None, keys: Sequence[str] = ("image",),
                  mode: Sequence[str] | str = "bilinear") -> list:
    """The steps between loading and the network: ``[normalize, resample]`` (see module doc).

    ``keys[0]`` is the image (z-scored and resampled); further keys (labels, with ``mode``
    ``"nearest"``) are resampled alike.
    """
    keys = list(keys)
    return [
        NormalizeIntensityd(keys=keys[0], nonzero=bool(nonzero), channel_wise=True),
        SpacingPolicyd(keys=keys, policy=policy, target_spacing=target_spacing, trained_range=trained_range, mode=mode),
    ]


def preprocessing(spec, policy="clamp", target_spacing=None) -> Compose:
    """The inference preprocessing of data set ``spec`` (a :class:`~custom_networks.DatasetSpec`):
    load, z-score, resample to the working spacing ``policy`` chooses (``"clamp"`` to the trained
    range by default), as a bundle's ``inference.json`` declares it."""
    return Compose(spec.load_transforms(keys=["image"], label_key=None)
                   + spacing_steps(spec.zscore_nonzero, policy, target_spacing, spec.spacing_range))


def postprocessing(pre: Compose, output_dir: str | None = None, output_postfix: str = "seg", output_ext: str = ".nii.gz",
                   compresslevel: int | None = None) -> Compose:
    """Network output to a saved label map in the input's geometry (``output_dir=None``: not saved)."""
    steps = [NativeLabelsd(keys="pred", transform=pre, orig_keys="image")]
    if output_dir is not None:
        steps.append(SaveLabeld(keys="pred", output_dir=output_dir, output_postfix=output_postfix, output_ext=output_ext,
                                compresslevel=compresslevel))
    return Compose(steps)


def inferer(roi_size: Sequence[int], overlap: float = 0.5, sw_batch_size: int = 1) -> SpacingSlidingWindowInferer:
    """The bundles' sliding window: Gaussian-weighted windows of the training patch size."""
    return SpacingSlidingWindowInferer(roi_size=list(roi_size), sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian")


def run_network(network: torch.nn.Module, window: SpacingSlidingWindowInferer, data: dict, device="cpu", amp: bool | None = None) -> torch.Tensor:
    """The network on one preprocessed item (``data["image"]`` ``(C, *working)``, ``data["spacing"]``):
    float32 scores ``(classes, *working)`` on the CPU, where the way back runs."""
    device = torch.device(device)
    amp = device.type == "cuda" if amp is None else amp
    x = data["image"][None].to(device)
    spacing = torch.as_tensor(data["spacing"], dtype=torch.float32)[None].to(device)
    # bf16, the dtype UNetEngine's compiled path uses: one autocast dtype for the whole forward
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        return window(x, network, spacing=spacing)[0].float().cpu()
