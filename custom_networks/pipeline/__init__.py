"""Spacing: everything between a file on disk and the network, both ways.

``resample`` (the one anti-aliased resampler), ``transforms`` (training patches at a random
spacing, the inference spacing policy, the way back to the native grid), ``batching`` (the
spacing handed to the network by MONAI's engines and inferers), ``compiled`` (the bucketed,
compiled network runner), ``chain`` (the one inference chain the bundles declare), ``inference``
(that chain on a list of files), ``cost`` (the time and memory model behind ``auto``),
``interactive`` (click guidance in mm), ``ensemble`` (one model at several working spacings: mean
label and disagreement), ``profiling`` (wall time and peak memory).
"""

from .batching import PrepareBatchSpacing, PrepareBatchSpacingAffine, SpacingInferer, SpacingSlidingWindowInferer, batch_spacing
from .transforms import NativeLabelsd, RandSpacingPatchd, SpacingPolicyd
from .chain import SaveLabeld, inferer, postprocessing, preprocessing, run_network, spacing_steps
from .ensemble import ensemble_spacings, spacing_ensemble
from . import chain, compiled, ensemble, interactive  # noqa: F401  (custom_networks.pipeline.chain.* in bundle expressions)

__all__ = [
    "NativeLabelsd",
    "SaveLabeld",
    "PrepareBatchSpacing",
    "PrepareBatchSpacingAffine",
    "RandSpacingPatchd",
    "SpacingInferer",
    "SpacingPolicyd",
    "SpacingSlidingWindowInferer",
    "batch_spacing",
    "ensemble_spacings",
    "inferer",
    "postprocessing",
    "preprocessing",
    "run_network",
    "spacing_ensemble",
    "spacing_steps",
]
