"""HyperSpace for MONAI: spacing-adaptive segmentation with hypernetworks.

The package is layered; imports flow one way, downwards:

- ``research``  (experiments, analysis, demo) and the bundle tooling (``bundle_tools``, ``checkpoint``)
- ``pipeline``  spacing: resampling, normalisation, the spacing-aware batching and inferers,
  the compiled engine, the inference chain, the cost model, click guidance
- ``data``      data sets, data lists, generated data, atomic file writers
- ``nets``      the networks: :class:`UNetLayout`, :class:`PlainUNet`, :class:`SDNUNet`, the
  generic :class:`HyperNetwork` and :class:`HyperUNet`, and :func:`build_network` for bundles
- ``losses``, ``metrics`` (beside ``nets``): SPOCKMIP's MIP loss and the focal Tversky loss;
  clDice and connected components for tubular structures
- ``spacing``   the vocabulary every layer shares: parsing and ranges of spacings (mm)

The names below are the ones users import from ``custom_networks`` directly.
"""

from .spacing import SPACING_POLICIES, SpacingRange, as_spacing_tensor, parse_spacing, working_spacing
from .nets import HyperNetwork, HyperUNet, PlainUNet, SDNUNet, UNetLayout, build_network
from .data import DATASETS, CheckImaged, DatasetSpec, MapLabelsd, get_dataset
from .pipeline import (
    NativeLabelsd,
    PrepareBatchSpacing,
    PrepareBatchSpacingAffine,
    RandSpacingPatchd,
    SpacingInferer,
    SpacingPolicyd,
    SpacingSlidingWindowInferer,
    batch_spacing,
)
from . import data, losses, metrics, nets, pipeline  # noqa: F401  (custom_networks.pipeline.*, .data.*, ... in bundle expressions)

__version__ = "0.1.0"
