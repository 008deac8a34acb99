"""The one training loop (baseline training and fine-tuning) and accuracy measurement."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from automlprune.data import DataSplits, iterate_batches
from automlprune.data.base import Split
from automlprune.errors import ConfigError
from automlprune.progress import Progress


@dataclass
class FitHistory:
    """Per-epoch training loss and validation accuracy (fractions in [0, 1]); seconds of wall time."""

    train_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0


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


def fit(model: nn.Module, data: DataSplits, device: torch.device, *, epochs: int, batch_size: int, lr: float,
        momentum: float = 0.9, weight_decay: float = 5e-4, schedule: str = "cosine", label_smoothing: float = 0.0,
        seed: int = 0, teacher: nn.Module | None = None, distill_alpha: float = 0.5, distill_temperature: float = 4.0,
        description: str = "train", progress: bool = True, steps_per_epoch: int | None = None) -> FitHistory:
    """Train ``model`` in place on ``data.train`` with augmentation, SGD (nesterov) and a cosine
    or one-cycle schedule stepped per batch; validation accuracy after each epoch. With a
    ``teacher``, the loss mixes cross-entropy and distillation (see FinetuneSettings).
    ``steps_per_epoch`` caps the batches of an epoch (short, fixed-cost fine-tunes)."""
    if schedule not in ("cosine", "onecycle"):
        raise ConfigError(f"unknown learning-rate schedule '{schedule}'; use cosine or onecycle")
    torch.manual_seed(seed)
    model.to(device).train()
    if teacher is not None:
        teacher.to(device).eval()
    steps_per_epoch = min(steps_per_epoch or 10 ** 12, max(1, len(data.train) // batch_size))
    total_steps = max(1, epochs * steps_per_epoch)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    if schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    history = FitHistory()
    start = time.perf_counter()
    reporter = Progress(description, epochs, "epoch", progress)
    for epoch in range(epochs):
        model.train()
        running, count = 0.0, 0
        for step, (x, y) in enumerate(iterate_batches(data.train, data, batch_size, device, shuffle=True, augment=True,
                                                      seed=seed * 100003 + epoch, drop_last=True)):
            if step >= steps_per_epoch:
                break
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
            if teacher is not None:
                with torch.no_grad():
                    soft = F.log_softmax(teacher(x) / distill_temperature, dim=1)
                kd = F.kl_div(F.log_softmax(logits / distill_temperature, dim=1), soft, log_target=True,
                              reduction="batchmean") * distill_temperature ** 2
                loss = (1 - distill_alpha) * loss + distill_alpha * kd
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += loss.item() * len(y)
            count += len(y)
        history.train_loss.append(running / max(count, 1))
        history.val_accuracy.append(split_accuracy(model, data.val, data, device))
        reporter.update(epoch + 1, f"{description}: epoch {epoch + 1}/{epochs} loss {history.train_loss[-1]:.3f} "
                        f"val_acc {history.val_accuracy[-1]:.4f} ({time.perf_counter() - start:.0f}s)",
                        loss=f"{history.train_loss[-1]:.3f}", val_acc=f"{history.val_accuracy[-1]:.4f}")
    reporter.close()
    history.seconds = time.perf_counter() - start
    model.eval()
    return history
