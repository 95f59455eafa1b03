"""Metrics MONAI lacks for tubular structures: centerline Dice (clDice) and connected components,
and their handlers for the bundles' evaluation. A layer beside ``nets``: it imports only MONAI,
torch, numpy, scipy and scikit-image (the latter when a skeleton is computed)."""

from .handlers import METRIC_PACKAGES, METRICS, metric_handlers
from .topology import ClDiceMetric, ConnectedComponentsMetric, count_components, skeleton

__all__ = ["METRICS", "METRIC_PACKAGES", "ClDiceMetric", "ConnectedComponentsMetric", "count_components", "metric_handlers", "skeleton"]
