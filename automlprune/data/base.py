"""The containers every dataset loader returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from torch.utils.data import Dataset


@dataclass(frozen=True)
class ImageTensors:
    """A whole split held in memory.

    images: uint8 tensor of shape (N, C, H, W); labels: int64 tensor of shape (N,).
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError("images must be a uint8 tensor of shape (N, C, H, W)")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must have shape (N,) matching images")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: torch.Tensor) -> "ImageTensors":
        return ImageTensors(self.images[indices], self.labels[indices])


Split = Union[ImageTensors, Dataset]
"""A split is either held in memory (small datasets) or a torch Dataset of normalised tensors."""


@dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation for in-memory splits: random crop after zero padding
    of ``crop_padding`` pixels on each side, and horizontal flips with probability 0.5."""

    crop_padding: int = 0
    hflip: bool = False


@dataclass(frozen=True)
class DataSplits:
    """Train / validation / test splits of one dataset plus what a model needs to know.

    The validation split is carved (seeded) from the training set: searches only ever see
    it; the test split is for final reports. ``mean`` and ``std`` are per channel, on the
    [0, 1] pixel scale, and are applied by the batch iterators, not by the model.
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augmentation: Augmentation = Augmentation()

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        """A zero input of the network's shape, (batch_size, C, H, W), float32."""
        return torch.zeros(batch_size, self.in_channels, *self.image_size)
