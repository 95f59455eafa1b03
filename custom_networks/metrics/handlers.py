"""The evaluation metrics a data set asks for by name (``DatasetSpec.extra_metrics``), as MONAI
metric handlers for an evaluator's ``additional_metrics``."""

from __future__ import annotations

from typing import Callable, Sequence

from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import CumulativeIterationMetric

from .topology import ClDiceMetric, ConnectedComponentsMetric

__all__ = ["METRICS", "METRIC_PACKAGES", "metric_handlers"]

# name -> metric factory; an evaluator reports the metric as "val_<name>"
METRICS: dict[str, Callable[[], CumulativeIterationMetric]] = {
    "cldice": ClDiceMetric,
    "components": ConnectedComponentsMetric,
    "extra_components": lambda: ConnectedComponentsMetric(subtract_label=True),
}
# what a metric needs beyond MONAI's own requirements; a bundle's metadata lists it
METRIC_PACKAGES: dict[str, tuple[str, ...]] = {"cldice": ("scikit-image",)}


def metric_handlers(names: Sequence[str], prefix: str = "val_") -> dict[str, IgniteMetricHandler]:
    """``{prefix + name: handler}`` for the metrics named (keys of :data:`METRICS`), per-image
    details kept (``save_details``) so that MONAI's ``MetricsSaver`` writes them per case.

    The handlers read ``pred`` and ``label`` from the engine's output, one-hot and binarised as for
    MONAI's ``MeanDice``. ``evaluate.json`` passes ``@spec.extra_metrics``: nothing for the data sets
    that report Dice alone, ``("cldice", "components", "extra_components")`` for vessels.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; expected names among {sorted(METRICS)}.")
    return {
        prefix + name: IgniteMetricHandler(metric_fn=METRICS[name](), output_transform=from_engine(["pred", "label"]), save_details=True)
        for name in names
    }
