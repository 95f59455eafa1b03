"""Data: the data sets' layouts and label maps, data lists, generated volumes, atomic file writers."""

from .datasets import DATASETS, CheckImaged, DatasetSpec, MapLabelsd, get_dataset

__all__ = ["DATASETS", "CheckImaged", "DatasetSpec", "MapLabelsd", "get_dataset"]
