"""HyperSpace for MONAI: spacing-adaptive segmentation with hypernetworks.

The network (:class:`HyperUNet`, :class:`PlainUNet`, both built from one :class:`UNetLayout`) and
the training / inference pieces MONAI lacks around it.
"""

from .datasets import DATASETS, CheckImaged, DatasetSpec, MapLabelsd, get_dataset
from .engine import PrepareBatchSpacing, PrepareBatchSpacingAffine, SpacingInferer, SpacingSlidingWindowInferer, batch_spacing
from .hyperspace import HyperUNet
from .layout import UNetLayout
from .spacing import SPACING_POLICIES, SpacingRange, as_spacing_tensor, parse_spacing, working_spacing
from .transforms import NativeLabelsd, RandSpacingPatchd, SpacingPolicyd
from .unet import PlainUNet
from . import fast, interactive, pipeline  # noqa: E402  (custom_networks.fast.*, .interactive.*, .pipeline.*)

__version__ = "0.1.0"
