"""Datasets as integer-level tensors with fixed, stratified train / validation / test splits.

A layer of its own beside flows/: it imports nothing else of mixflow_core, and eval/ (the
baselines), training/ and study/ read it.
"""

from .datasets import (
    CLASS_NAMES,
    DEBIAN_FASHION_MNIST,
    DataConfig,
    DatasetNotFoundError,
    Splits,
    load_data,
    read_idx,
    classes_tag,
    resolve_classes,
)

__all__ = ["CLASS_NAMES", "DEBIAN_FASHION_MNIST", "DataConfig", "DatasetNotFoundError", "Splits", "load_data",
           "classes_tag", "read_idx", "resolve_classes"]
