"""Accuracy of a network on batches or on a whole split."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from automlprune.data import DataSplits, iterate_batches
from automlprune.data.base import Split


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], topk: tuple[int, ...] = (1,)) -> dict[int, float]:
    """Top-k accuracies (fractions in [0, 1]) of ``model`` in eval mode over ``batches``."""
    was_training = model.training
    model.eval()
    correct = {k: 0 for k in topk}
    total = 0
    for x, y in batches:
        logits = model(x)
        top = logits.topk(max(topk), dim=1).indices
        hits = top.eq(y[:, None])
        for k in topk:
            correct[k] += int(hits[:, :k].any(dim=1).sum())
        total += len(y)
    model.train(was_training)
    return {k: correct[k] / max(total, 1) for k in topk}


def split_accuracy(model: nn.Module, split: Split, data: DataSplits, device: torch.device, batch_size: int = 256) -> float:
    """Top-1 accuracy on a whole split."""
    return accuracy(model, iterate_batches(split, data, batch_size, device))[1]
