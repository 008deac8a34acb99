"""Users' own data (DataLoaders, Datasets, tensors) as :class:`~automlprune.data.DataSplits`,
checked against their model's input shape and classes before any work."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, random_split

from automlprune.data.base import DataSplits
from automlprune.errors import ConfigError

VAL_FRACTION = 0.1
"""Share of ``train`` carved (seeded) into the validation split when none is given (at most 5,000 items)."""
LABELS_CHECKED = 512
"""Items of each split whose inputs and labels are checked before any work."""


def as_split(obj: Any, name: str) -> Dataset:
    """A DataLoader's dataset, a Dataset, or ``(inputs, labels)`` tensors as a TensorDataset."""
    if isinstance(obj, DataLoader):
        return obj.dataset
    if isinstance(obj, Dataset):
        return obj
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj):
        inputs, labels = obj
        if len(inputs) != len(labels):
            raise ConfigError(f"{name} holds {len(inputs)} inputs but {len(labels)} labels; give one label per input")
        return TensorDataset(inputs.float(), labels.long())
    raise ConfigError(f"{name} must be a DataLoader, a Dataset or an (inputs, labels) pair of tensors, not {type(obj).__name__}")


def _check_split(split: Dataset, name: str, example_input: torch.Tensor, classes: int) -> None:
    """Inputs of the example's shape and labels in [0, classes) (the first items), else one sentence."""
    if len(split) == 0:
        raise ConfigError(f"{name} is empty; give it some labelled inputs")
    for i in range(min(len(split), LABELS_CHECKED)):
        x, y = split[i]
        if tuple(x.shape) != tuple(example_input.shape[1:]):
            raise ConfigError(f"{name} item {i} has an input of shape {tuple(x.shape)}, but the example input's is "
                              f"{tuple(example_input.shape[1:])}; give inputs of one shape")
        label = int(y)
        if not 0 <= label < classes:
            raise ConfigError(f"{name} item {i} has label {label}, but the model outputs {classes} classes; labels must be 0..{classes - 1}")


def user_data(train: Any, val: Any, test: Any, example_input: torch.Tensor, classes: int, seed: int = 0) -> DataSplits:
    """The user's data as :class:`DataSplits` (see :func:`automlprune.api.compress`): inputs used as given (mean 0, std 1)."""
    train_set = as_split(train, "train")
    if val is None:
        n = len(train_set)
        k = max(1, min(5000, round(VAL_FRACTION * n)))
        if n - k < 1:
            raise ConfigError(f"train holds {n} items, too few to carve a validation split; give val")
        train_set, val_set = random_split(train_set, [n - k, k], generator=torch.Generator().manual_seed(seed))
    else:
        val_set = as_split(val, "val")
    test_set = val_set if test is None else as_split(test, "test")
    for split, name in ((train_set, "train"), (val_set, "val"), (test_set, "test")):
        _check_split(split, name, example_input, classes)
    channels, height, width = example_input.shape[1:]
    return DataSplits("user", train_set, val_set, test_set, classes, int(channels), (int(height), int(width)),
                      (0.0,) * channels, (1.0,) * channels)
