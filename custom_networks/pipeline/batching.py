"""Handing the spacing to the network inside MONAI's ignite engines and inferers.

MONAI's ``PrepareBatchExtraInput`` forwards extra batch entries, but a spacing must also be
derivable from the image's affine when no transform stored it, and MONAI's sliding-window
inference strips image metadata and batches windows of several images together: the network
would not know which spacing a window has. These two pieces close that gap.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.engines import PrepareBatchExtraInput
from monai.inferers import Inferer, SlidingWindowInferer
from monai.utils import ensure_tuple_rep

from ..spacing import as_spacing_tensor

__all__ = ["PrepareBatchSpacing", "PrepareBatchSpacingAffine", "SpacingInferer", "SpacingSlidingWindowInferer", "batch_spacing"]


def batch_spacing(images: torch.Tensor, spacing=None) -> torch.Tensor:
    """The ``(B, D)`` spacing (mm) of a batch: ``spacing`` if given, else from the images' affines.

    Raises:
        ValueError: if neither is available or the spacing is invalid.
    """
    dims = images.dim() - 2
    if spacing is None:
        if not isinstance(images, MetaTensor):
            raise ValueError(
                "the batch has no 'spacing' entry and its images carry no affine; expected a (B, "
                f"{dims}) spacing in mm or MetaTensor images (e.g. from LoadImaged)."
            )
        affine = images.affine
        affine = affine if affine.dim() == 3 else affine[None].expand(images.shape[0], -1, -1)
        spacing = torch.stack([torch.as_tensor(affine_to_spacing(a, r=dims)) for a in affine])
    return as_spacing_tensor(spacing, images.shape[0], dims, device=images.device)


class PrepareBatchSpacing(PrepareBatchExtraInput):
    """``prepare_batch`` for MONAI engines that passes ``spacing=(B, D)`` (mm) to the network.

    The spacing comes from the batch's ``spacing_key`` (stored by
    :class:`~custom_networks.pipeline.transforms.RandSpacingPatchd` or
    :class:`~custom_networks.pipeline.transforms.SpacingPolicyd`) or, if absent, from the image affines.
    Networks receive it as the keyword argument ``spacing``; :class:`PlainUNet` accepts and
    ignores it, so baselines use the same engines.

    Example (bundle config)::

        "prepare_batch": {"_target_": "custom_networks.PrepareBatchSpacing"}
    """

    def __init__(self, spacing_key: str = "spacing", image_key: str = "image"):
        super().__init__(extra_keys={"spacing": spacing_key})
        self.spacing_key = spacing_key
        self.image_key = image_key

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs: Any):
        batchdata = dict(batchdata)
        # MONAI's default_prepare_batch reads the image from "image": honour a custom image_key
        batchdata["image"] = batchdata[self.image_key]
        batchdata[self.spacing_key] = batch_spacing(batchdata[self.image_key], batchdata.get(self.spacing_key))
        return super().__call__(batchdata, device, non_blocking, **kwargs)


class PrepareBatchSpacingAffine:
    """``prepare_batch`` returning ``(image, label)``, the spacing carried by the image's affine.

    For engines driven by MONAI's DeepEdit ``Interaction``, which unpacks ``prepare_batch`` into
    two values and calls ``inferer(inputs, network)`` without extra arguments: the images come back
    as a batched MetaTensor whose per-sample affine is ``diag(spacing, 1)``, from which
    :class:`SpacingInferer` and :class:`SpacingSlidingWindowInferer` read the spacing. The spacing
    is the batch's ``spacing_key`` entry or, if absent, the images' own affines.
    """

    def __init__(self, spacing_key: str = "spacing", image_key: str = "image", label_key: str = "label"):
        self.spacing_key = spacing_key
        self.image_key = image_key
        self.label_key = label_key

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs: Any):
        images = batchdata[self.image_key]
        spacing = batch_spacing(images, batchdata.get(self.spacing_key)).to(torch.float64)
        affine = torch.diag_embed(torch.cat([spacing.cpu(), torch.ones(len(spacing), 1, dtype=torch.float64)], dim=1))
        plain = images.as_tensor() if isinstance(images, MetaTensor) else torch.as_tensor(images)
        images = MetaTensor(plain.to(device=device, non_blocking=non_blocking), affine=affine)
        images.is_batch = True
        labels = batchdata.get(self.label_key)
        if labels is not None:
            labels = torch.as_tensor(labels).to(device=device, non_blocking=non_blocking)
        return images, labels


class SpacingInferer(Inferer):
    """Whole-input inference that hands the network ``spacing=(B, D)`` (mm).

    ``inferer(inputs, network, spacing=None)``: the spacing as given or read from the inputs'
    affines (see :class:`PrepareBatchSpacingAffine`). The network gets a plain tensor.
    """

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, spacing=None, **kwargs: Any):
        spacing = batch_spacing(inputs, spacing)
        plain = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        return network(plain, *args, spacing=spacing, **kwargs)


class SpacingSlidingWindowInferer(SlidingWindowInferer):
    """MONAI's ``SlidingWindowInferer`` that hands each window its image's spacing.

    ``inferer(inputs, network, spacing=None)``: ``spacing`` is ``(B, D)`` in mm (or taken from the
    inputs' affines). Images of the batch are processed one after another so that every window
    batch has a single spacing, i.e. a single generated weight set. All other arguments are
    MONAI's (``roi_size``, ``sw_batch_size``, ``overlap``, ``mode``, ...).

    On an axis where the image is smaller than ``roi_size``, the window shrinks to the image size
    rounded up to the network's ``layout.divisor`` (when the network has a ``layout``) instead of
    MONAI's padding to the full window: at a coarse working spacing a 80 x 80 x 52 grid then runs
    as 80 x 80 x 56 rather than as a 128^3 window that is mostly padding (6x less work).
    """

    def window_size(self, spatial_shape, network) -> tuple[int, ...]:
        """The window for an image of ``spatial_shape``: ``roi_size``, shrunk where the image is smaller."""
        layout = getattr(network, "layout", None)
        divisor = int(getattr(layout, "divisor", 1) or 1)
        roi = ensure_tuple_rep(self.roi_size, len(spatial_shape))
        return tuple(min(int(r), -(-int(s) // divisor) * divisor) for r, s in zip(roi, spatial_shape))

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, spacing=None, **kwargs: Any):
        spacing = batch_spacing(inputs, spacing)
        window = self.window_size(inputs.shape[2:], network)
        inferer = self
        if window != tuple(self.roi_size):
            # a copy, so that concurrent calls with other image sizes keep their own window
            inferer = copy.copy(self)
            inferer.roi_size = window
            inferer.roi_weight_map = None
        outputs = [
            SlidingWindowInferer.__call__(inferer, inputs[b : b + 1], network, *args, spacing=spacing[b : b + 1], **kwargs)
            for b in range(inputs.shape[0])
        ]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
