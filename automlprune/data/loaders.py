"""Batch iteration over splits, on the target device.

In-memory splits (:class:`ImageTensors`) are sliced, normalised and augmented batch-wise
on the device (much faster than per-sample transforms on a 2-core machine); other splits
go through a ``DataLoader`` with worker processes and pinned memory on CUDA.
"""

from __future__ import annotations

import os
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from automlprune.data.base import Augmentation, DataSplits, ImageTensors, Split

Batch = tuple[torch.Tensor, torch.Tensor]


def _random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop of each image after zero padding; x: (B, C, H, W) float."""
    b, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def _augment(x: torch.Tensor, aug: Augmentation, generator: torch.Generator) -> torch.Tensor:
    if aug.crop_padding > 0:
        x = _random_crop(x, aug.crop_padding, generator)
    if aug.hflip:
        flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def channels_first(x: torch.Tensor) -> torch.Tensor:
    """``x`` with the strides of a contiguous (B, C, H, W) tensor. A one-channel batch cut from
    a channels-last view is "contiguous" in both formats (its channel stride does not matter), but
    PyTorch reads its strides as channels-last and runs every convolution of the network in NHWC;
    oneDNN's AVX2 1x1 stride-2 backward-weights kernel then hangs (or, on other machines, returns
    wrong gradients) for layers with fewer than 8 input channels (uxlfoundation/oneDNN issue 6035),
    exactly the narrow shortcut convolutions pruning makes. Batches are therefore always handed out
    channels-first."""
    if x.dim() == 4 and x.stride() != torch.empty(x.shape, device="meta").stride():
        return x.clone(memory_format=torch.contiguous_format)
    return x


def iterate_batches(split: Split, data: DataSplits, batch_size: int, device: torch.device | str = "cpu",
                    shuffle: bool = False, augment: bool = False, seed: int = 0,
                    max_batches: int | None = None, drop_last: bool = False) -> Iterator[Batch]:
    """Yield (inputs, labels) on ``device``: inputs float32 (B, C, H, W) normalised with the
    dataset's mean/std, channels-first strides (:func:`channels_first`), labels int64 (B,). Same
    seed, same batches."""
    device = torch.device(device)
    if isinstance(split, ImageTensors):
        for x, y in _tensor_batches(split, data, batch_size, device, shuffle, augment, seed, max_batches, drop_last):
            yield channels_first(x), y
        return
    generator = torch.Generator().manual_seed(seed)
    workers = min(8, os.cpu_count() or 1) if len(split) > 4 * batch_size else 0
    loader = DataLoader(split, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=workers,
                        pin_memory=device.type == "cuda", drop_last=drop_last, persistent_workers=False)
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        yield channels_first(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)


def _tensor_batches(split: ImageTensors, data: DataSplits, batch_size: int, device: torch.device, shuffle: bool,
                    augment: bool, seed: int, max_batches: int | None, drop_last: bool) -> Iterator[Batch]:
    generator = torch.Generator().manual_seed(seed)
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
    images, labels = split.images, split.labels
    if device.type == "cuda":  # one copy of the whole (uint8) split per pass; batches are sliced on the GPU
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        order = order.to(device)
    stop = n - n % batch_size if drop_last else n
    for count, start in enumerate(range(0, stop, batch_size)):
        if max_batches is not None and count >= max_batches:
            break
        idx = order[start:start + batch_size]
        x = images[idx].to(device, non_blocking=True).float().div_(255)
        if augment:
            x = _augment(x, data.augmentation, generator)
        yield (x - mean) / std, labels[idx].to(device, non_blocking=True)


def cached_batches(split: Split, data: DataSplits, batch_size: int, device: torch.device | str,
                   max_samples: int | None = None, seed: int = 0, shuffle: bool = False) -> list[Batch]:
    """Materialise up to ``max_samples`` samples of a split as a list of device batches
    (used by the evaluator so every candidate sees exactly the same data)."""
    max_batches = None if max_samples is None else -(-max_samples // batch_size)
    batches = list(iterate_batches(split, data, batch_size, device, shuffle=shuffle, seed=seed, max_batches=max_batches))
    if max_samples is not None and batches:
        kept, out = 0, []
        for x, y in batches:
            take = min(len(y), max_samples - kept)
            if take <= 0:
                break
            out.append((x[:take], y[:take]))
            kept += take
        batches = out
    return batches
