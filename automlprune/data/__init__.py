"""Datasets (digits, fashion-mnist, cifar10, imagefolder), seeded splits and batch iteration."""

from automlprune.data.base import Augmentation, DataSplits, ImageTensors
from automlprune.data.loaders import cached_batches, iterate_batches
from automlprune.data.sources import DATASETS, load_dataset, validation_indices

__all__ = ["Augmentation", "DATASETS", "DataSplits", "ImageTensors", "cached_batches", "iterate_batches",
           "load_dataset", "validation_indices"]
