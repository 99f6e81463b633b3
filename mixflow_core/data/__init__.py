"""Datasets as integer-level tensors with fixed, stratified train / validation / test splits.

A layer of its own beside flows/: it imports nothing else of mixflow_core, and eval/ (the
baselines), training/ and study/ read it.
"""

from .datasets import DEBIAN_FASHION_MNIST, DataConfig, DatasetNotFoundError, Splits, load_data, read_idx

__all__ = ["DEBIAN_FASHION_MNIST", "DataConfig", "DatasetNotFoundError", "Splits", "load_data", "read_idx"]
