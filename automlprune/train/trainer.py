"""The one training loop of automlprune: baseline training, fine-tuning (distillation,
quantization-aware), DMCP's supernet and every training-time method are a :class:`Trainer`
with callbacks (the template method of stable-baselines3's ``learn`` and its callbacks).

One epoch: the training split in a seeded shuffled order with augmentation (the order is a
function of ``recipe.seed`` and the epoch, so a run is reproducible and an epoch can be
skipped when resuming), SGD (Nesterov when momentum > 0) with a cosine or one-cycle learning
rate stepped per optimizer step, then (optionally) the validation accuracy.

What a :class:`Callback` can do, in the order the loop calls it:

* ``on_start``: reparametrize the network (gates, masks, fake quantization) before the
  optimizer is built;
* ``param_groups``: rewrite the optimizer's parameter groups (per-group learning rate,
  momentum, weight decay; frozen parameters left out);
* ``train_step``: replace the whole step for a batch (methods with several forward passes
  per step, or alternating weight and architecture steps);
* ``loss``: add loss terms (distillation, regularizers on the differentiable cost model);
* ``before_step``: edit gradients between backward and the optimizer step;
* ``after_step``: act after each step (re-zero masked channels, update masks on a schedule);
  returning False stops training at once;
* ``on_epoch_end``: act per epoch; returning False stops training;
* ``on_end``: fold the reparametrization back into plain weights.

Several processes (``torchrun``, ``automlprune train --nproc N``): each rank trains on its chunk of
every global batch and the gradients are averaged before every step (:mod:`automlprune.train.distributed`).

Randomness: the data order comes from seeded generators; what draws from PyTorch's global
generator inside the loop (dropout, BWCP's Gumbel noise) runs under :func:`torch.random.fork_rng`,
seeded at the start of every epoch from ``recipe.seed`` and the epoch, so training is
reproducible, a run resumed after an epoch draws what the uninterrupted run drew, and the
caller's global random state is left as it was.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from automlprune.accuracy import split_accuracy
from automlprune.data import DataSplits, iterate_batches
from automlprune.errors import ConfigError
from automlprune.progress import Progress
from automlprune.train.distributed import average_buffers, average_gradients, broadcast_state, rank_and_world, sum_over_ranks

SCHEDULES = ("cosine", "onecycle", "constant", "triangular")
OPTIMIZERS = ("sgd", "adam")
EPOCH_SEED_STRIDE = 1_000_003
"""Epoch e of a recipe with seed s seeds PyTorch's global generator with s x stride + e."""


@dataclass(frozen=True)
class Recipe:
    """How to train: ``epochs`` of at most ``steps_per_epoch`` optimizer steps (None: the whole
    training split) of ``batch_size`` images; SGD at ``lr`` with ``momentum`` (Nesterov when
    positive, unless ``nesterov`` is False) and ``weight_decay``; the learning rate follows ``schedule`` (cosine decay,
    one-cycle, constant, or triangular: linear from ``lr_min`` up to ``lr`` over the first half
    of the steps and back down over the second) over all steps; cross-entropy with ``label_smoothing``; ``seed`` fixes the data
    order and any other randomness. ``optimizer``: ``sgd`` as above, or ``adam`` (Adam at ``lr`` with
    ``weight_decay``; momentum unused). ``onecycle``: the one-cycle schedule's (pct_start,
    div_factor, final_div_factor), PyTorch's defaults unless given; it cycles SGD's momentum
    (Adam's beta1) as PyTorch does."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    label_smoothing: float = 0.0
    steps_per_epoch: int | None = None
    seed: int = 0
    nesterov: bool = True
    lr_min: float = 0.0
    optimizer: str = "sgd"
    onecycle: tuple[float, float, float] = (0.3, 25.0, 1e4)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown learning-rate schedule '{self.schedule}'; use one of: {', '.join(SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer '{self.optimizer}'; use one of: {', '.join(OPTIMIZERS)}")


@dataclass
class FitHistory:
    """Per-epoch training loss and validation accuracy (fractions in [0, 1]; the latter empty
    without validation); what training cost: optimizer ``steps``, ``images`` seen and
    ``seconds`` of wall time; ``logs``: what callbacks recorded per epoch."""

    train_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    steps: int = 0
    images: int = 0
    seconds: float = 0.0
    logs: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class StepResult:
    """What a replaced training step did: its loss (for the epoch mean; None: not counted) and
    whether it stepped the network's optimizer (then the schedule advances and ``after_step`` runs)."""

    loss: float | None
    stepped: bool = True


class Callback:
    """Hooks into :class:`Trainer`; every method is optional (see the module docstring)."""

    def on_start(self, trainer: "Trainer") -> None:
        """Before the optimizer is built: reparametrize ``trainer.model``."""

    def param_groups(self, trainer: "Trainer", groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The optimizer's parameter groups (``torch.optim`` dicts); return them changed or as they are."""
        return groups

    def batches_in_epoch(self, trainer: "Trainer", epoch: int, steps: int) -> int | None:
        """How many batches epoch ``epoch`` draws (None: ``steps``, one per optimizer step)."""
        return None

    def train_step(self, trainer: "Trainer", x: torch.Tensor, y: torch.Tensor) -> StepResult | None:
        """Replace the default step for this batch (None: the default step runs)."""
        return None

    def loss(self, trainer: "Trainer", x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor,
             loss: torch.Tensor) -> torch.Tensor:
        """The training loss with this callback's terms added."""
        return loss

    def before_step(self, trainer: "Trainer") -> None:
        """Between backward and the optimizer step (gradients are in ``.grad``)."""

    def after_step(self, trainer: "Trainer") -> bool | None:
        """After each optimizer step; False stops training at once (mid-epoch)."""

    def on_epoch_end(self, trainer: "Trainer", epoch: int) -> bool | None:
        """After epoch ``epoch`` (0-based) and its validation; False stops training."""
        return None

    def on_end(self, trainer: "Trainer") -> None:
        """After the last epoch (also when training stops early or fails): fold reparametrizations back."""

    def state_dict(self) -> dict[str, Any]:
        """What this callback must keep to resume from a checkpoint (tensors and plain values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` when training resumes from a checkpoint."""


class Trainer:
    """Trains ``model`` in place on ``data.train`` following ``recipe``, with ``callbacks``.

    ``validate``: validation accuracy after each epoch (the baseline and fine-tunes report it);
    ``start_epoch``: start at this epoch (the schedule is advanced past the skipped steps and
    the data order of later epochs is the same as in an uninterrupted run);
    ``checkpoint``: a file written (atomically) after every epoch with the model, optimizer,
    schedule, history and every callback's :meth:`Callback.state_dict`; when it exists at the
    start, training resumes after its epoch, so a crash loses at most the epoch under way
    (the file is removed once training ends); the global generator is seeded per epoch, so the
    resumed epochs draw what they would have drawn.
    Inside callbacks: ``model``, ``optimizer``, ``scheduler``, ``epoch``, ``batch_index`` (within
    the epoch), ``step`` (optimizer steps so far), ``history`` and ``log`` (a dict a callback
    fills with this epoch's figures; shown in progress lines and kept in ``history.logs``).
    """

    def __init__(self, model: nn.Module, data: DataSplits, device: torch.device | str, recipe: Recipe,
                 callbacks: Sequence[Callback] = (), *, description: str = "train", progress: bool = True,
                 validate: bool = True, start_epoch: int = 0, checkpoint: Path | None = None) -> None:
        self.model, self.data, self.device, self.recipe = model, data, torch.device(device), recipe
        self.callbacks = list(callbacks)
        self.description, self.progress, self.validate, self.start_epoch = description, progress, validate, start_epoch
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.rank, self.world = rank_and_world()
        """This process's rank and the number of processes training together (0, 1: one process)."""
        if recipe.batch_size % self.world:
            raise ConfigError(f"the batch size {recipe.batch_size} must be divisible by the {self.world} training processes; "
                              "change the batch size or the number of processes")
        self._prior_seconds = 0.0
        self.resumed_from: int | None = None
        """The epoch a checkpoint resumed training after (None: trained from the start)."""
        self.steps_per_epoch = min(recipe.steps_per_epoch or 10 ** 12, max(1, len(data.train) // recipe.batch_size))
        self.total_steps = max(1, recipe.epochs * self.steps_per_epoch)
        self.history = FitHistory()
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.epoch = self.batch_index = self.step = 0
        self.stopped = False
        """True once a callback stopped training (``after_step`` or ``on_epoch_end`` returned False)."""
        self.log: dict[str, Any] = {}
        self._started = time.perf_counter()

    # ---- the loop ---------------------------------------------------------------------------------
    def fit(self) -> FitHistory:
        """Run the recipe; returns the history (the model is left in eval mode)."""
        forked = [self.device.index if self.device.index is not None else torch.cuda.current_device()] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked):
            torch.manual_seed(self.recipe.seed)  # what callbacks draw before the first epoch
            self._fit()
        return self.history

    @property
    def elapsed(self) -> float:
        """Seconds since this run's training started."""
        return time.perf_counter() - self._started

    def _fit(self) -> None:
        start = self._started = time.perf_counter()
        self.model.to(self.device).train()
        for cb in self.callbacks:
            cb.on_start(self)
        if self.world > 1:
            broadcast_state(self.model)
        try:
            self._build_optimizer()
            if not self._resume():
                self._skip_to(self.start_epoch)
            reporter = Progress(self.description, self.recipe.epochs, "epoch", self.progress and self.rank == 0)
            try:
                for epoch in range(self.start_epoch, self.recipe.epochs):
                    self.epoch, self.log = epoch, {}
                    torch.manual_seed(self.recipe.seed * EPOCH_SEED_STRIDE + epoch)  # what the epoch draws depends on it alone
                    self._run_epoch(epoch)
                    if self.world > 1:
                        average_buffers(self.model)
                    if self.validate:
                        self.history.val_accuracy.append(split_accuracy(self.model, self.data.val, self.data, self.device))
                    go_on = [cb.on_epoch_end(self, epoch) for cb in self.callbacks]
                    self.history.logs.append(dict(self.log))
                    self._report(reporter, epoch, time.perf_counter() - start)
                    self.stopped = self.stopped or any(v is False for v in go_on)
                    if self.stopped:
                        break
                    self._save(epoch)
            finally:
                reporter.close()
            if self.checkpoint is not None and self.rank == 0:
                self.checkpoint.unlink(missing_ok=True)
        finally:
            for cb in self.callbacks:
                cb.on_end(self)
            self.history.seconds = self._prior_seconds + time.perf_counter() - start
            self.model.eval()

    def _save(self, epoch: int) -> None:
        if self.checkpoint is None or self.rank != 0:
            return
        history = {**asdict(self.history), "seconds": self._prior_seconds + self.elapsed}
        state = {"epoch": epoch, "step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "history": history,
                 "callbacks": [cb.state_dict() for cb in self.callbacks]}
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint.with_name(f"{self.checkpoint.name}.{os.getpid()}.tmp")
        torch.save(state, tmp)
        tmp.replace(self.checkpoint)

    def _resume(self) -> bool:
        """Load the checkpoint if there is one; True when training resumes from it."""
        if self.checkpoint is None or not self.checkpoint.is_file():
            return False
        state = torch.load(self.checkpoint, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for cb, cb_state in zip(self.callbacks, state["callbacks"]):
            cb.load_state_dict(cb_state)
        self.history = FitHistory(**state["history"])
        self._prior_seconds = self.history.seconds
        self.step = state["step"]
        self.start_epoch = self.resumed_from = state["epoch"] + 1
        return True

    def _build_optimizer(self) -> None:
        r = self.recipe
        groups: list[dict[str, Any]] = [{"params": [p for p in self.model.parameters() if p.requires_grad]}]
        for cb in self.callbacks:
            groups = cb.param_groups(self, groups)
        if r.optimizer == "adam":
            self.optimizer = torch.optim.Adam(groups, lr=r.lr, weight_decay=r.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay,
                                             nesterov=r.nesterov and r.momentum > 0)
        if r.schedule == "onecycle":
            pct_start, div_factor, final_div_factor = r.onecycle
            self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
                self.optimizer, max_lr=[g.get("lr", r.lr) for g in groups], total_steps=self.total_steps, pct_start=pct_start,
                div_factor=div_factor, final_div_factor=final_div_factor, cycle_momentum=r.optimizer == "adam" or r.momentum > 0)
        elif r.schedule == "constant":
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)
        elif r.schedule == "triangular":
            low, half = r.lr_min / r.lr, self.total_steps / 2
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda step: low + (1 - low) * max(0.0, 1 - abs(step - half) / half))
        else:
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=self.total_steps)
        if self.world > 1:
            self.optimizer.register_step_pre_hook(average_gradients)

    def _skip_to(self, epoch: int) -> None:
        with warnings.catch_warnings():  # stepping a schedule before its optimizer is expected here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(epoch * self.steps_per_epoch):
                self.scheduler.step()

    def _run_epoch(self, epoch: int) -> None:
        self.model.train()
        limit = next((n for cb in self.callbacks if (n := cb.batches_in_epoch(self, epoch, self.steps_per_epoch)) is not None),
                     self.steps_per_epoch)
        running, count = 0.0, 0
        batches = iterate_batches(self.data.train, self.data, self.recipe.batch_size, self.device, shuffle=True,
                                  augment=True, seed=self.recipe.seed * 100003 + epoch, drop_last=True)
        for index, (x, y) in enumerate(batches):
            if index >= limit:
                break
            if self.world > 1:  # this rank's chunk of the global batch
                x, y = x.chunk(self.world)[self.rank], y.chunk(self.world)[self.rank]
            self.batch_index = index
            result = next((r for cb in self.callbacks if (r := cb.train_step(self, x, y)) is not None), None)
            if result is None:
                result = self._default_step(x, y)
            if result.stepped:
                self.scheduler.step()
                self.step += 1
                go_on = [cb.after_step(self) for cb in self.callbacks]
                self.stopped = any(v is False for v in go_on)
            if result.loss is not None:
                running += result.loss * len(y)
                count += len(y)
            self.history.images += len(y) * self.world
            if self.stopped:
                break
        self.history.steps = self.step
        if self.world > 1:
            running, count = sum_over_ranks([running, count], self.device)
        self.history.train_loss.append(running / max(count, 1))

    def _default_step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.recipe.label_smoothing)
        for cb in self.callbacks:
            loss = cb.loss(self, x, y, logits, loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for cb in self.callbacks:
            cb.before_step(self)
        self.optimizer.step()
        return StepResult(loss.item())

    def _report(self, reporter: Progress, epoch: int, elapsed: float) -> None:
        loss = self.history.train_loss[-1]
        parts = [f"loss {loss:.3f}"]
        postfix = {"loss": f"{loss:.3f}"}
        if self.validate:
            parts.append(f"val_acc {self.history.val_accuracy[-1]:.4f}")
            postfix["val_acc"] = f"{self.history.val_accuracy[-1]:.4f}"
        parts += [f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in self.log.items()]
        reporter.update(epoch + 1, f"{self.description}: epoch {epoch + 1}/{self.recipe.epochs} {' '.join(parts)} "
                        f"({elapsed:.0f}s)", **postfix)


def fit(model: nn.Module, data: DataSplits, device: torch.device | str, recipe: Recipe,
        callbacks: Sequence[Callback] = (), **options: Any) -> FitHistory:
    """``Trainer(model, data, device, recipe, callbacks, **options).fit()``."""
    return Trainer(model, data, device, recipe, callbacks, **options).fit()
