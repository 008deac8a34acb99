"""Training and loading the baseline network of a task."""

from __future__ import annotations

import torch
from torch import nn

from automlprune.models import save_checkpoint
from automlprune.tasks import Task
from automlprune.accuracy import split_accuracy
from automlprune.train import FitHistory, Trainer, distributed


def train_baseline(task: Task, device: torch.device, epochs: int | None = None, progress: bool = True) -> dict:
    """Train the task's architecture from scratch with its train settings and save the
    checkpoint it names; returns the checkpoint metadata (accuracies as fractions)."""
    s = task.spec.train
    data = task.data
    with torch.random.fork_rng(devices=[]):  # fresh weights drawn from the seed, the caller's RNG untouched
        torch.manual_seed(s.seed)
        model = task.build_model()
    epochs = s.epochs if epochs is None else epochs
    history: FitHistory = Trainer(model, data, device, s.recipe(epochs), description=f"train {task.spec.name}",
                                  progress=progress).fit()
    meta = {
        **task.checkpoint_identity(), "task": task.spec.name, "epochs": epochs,
        "num_classes": data.num_classes, "in_channels": data.in_channels, "image_size": list(data.image_size),
        "mean": list(data.mean), "std": list(data.std),
        "val_accuracy": history.val_accuracy[-1] if history.val_accuracy else split_accuracy(model, data.val, data, device),
        "test_accuracy": split_accuracy(model, data.test, data, device), "train_seconds": history.seconds,
    }
    if distributed.is_main():  # several training processes: one writes the checkpoint
        save_checkpoint(task.spec.checkpoint, model, meta)
    return meta


def ensure_baseline(task: Task, device: torch.device, progress: bool = True) -> nn.Module:
    """The trained baseline on ``device``; trains it first when the checkpoint is missing and the
    task says ``auto_train: true`` (otherwise the error says how to make it)."""
    if not task.spec.checkpoint.is_file() and task.spec.auto_train:
        train_baseline(task, device, progress=progress)
    return task.load_model().to(device)
