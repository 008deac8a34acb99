"""Callbacks of the :class:`~automlprune.train.trainer.Trainer` shared by several uses."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from automlprune.quantization import RECORD_ATTRIBUTE, WeightFakeQuant, quantize_weights_
from automlprune.train.trainer import Callback, Trainer


def without(groups: list[dict[str, Any]], params: list[torch.Tensor]) -> list[dict[str, Any]]:
    """Optimizer parameter groups with ``params`` taken out (groups left empty are dropped)."""
    return [{**g, "params": rest} for g in groups if (rest := [p for p in g["params"] if all(p is not q for q in params)])]


class SeparateAdam:
    """Parameters a callback steps in an Adam of their own (a reparametrization's learned scores
    or noise logits), kept out of the Trainer's optimizer: :meth:`split` takes them out of the
    Trainer's parameter groups (call it from ``param_groups``), :meth:`step` from ``before_step``,
    and the Adam's state travels in the callback's checkpoint (:meth:`state_dict`)."""

    def __init__(self, lr: float) -> None:
        self.lr = lr
        self.adam: torch.optim.Adam | None = None
        self._state: dict[str, Any] | None = None

    def split(self, groups: list[dict[str, Any]], params: list[torch.Tensor]) -> list[dict[str, Any]]:
        """``groups`` without ``params``, which this Adam steps from now on."""
        out = without(groups, params)
        self.adam = torch.optim.Adam(params, lr=self.lr)
        if self._state is not None:
            self.adam.load_state_dict(self._state)
        return out

    def step(self) -> None:
        if self.adam is not None:
            self.adam.step()
            self.adam.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"adam": self.adam.state_dict()} if self.adam is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = state.get("adam")
        if self.adam is not None and self._state is not None:
            self.adam.load_state_dict(self._state)


class Distillation(Callback):
    """Knowledge distillation from ``teacher`` (Hinton et al. 2015), or from the mean of the
    distillation losses of several teachers (a list): the loss becomes (1 - alpha) x cross-entropy
    + alpha x T^2 x KL(teacher || student) at temperature T. ``reduction``: ``batchmean`` (the
    true KL per image) or ``mean`` (averaged over images and classes, as the snapshot-ensemble
    official code does, a loss 1/classes as large)."""

    def __init__(self, teacher: nn.Module | Sequence[nn.Module], alpha: float = 0.5, temperature: float = 4.0,
                 reduction: str = "batchmean") -> None:
        self.teachers = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
        if reduction not in ("batchmean", "mean"):
            raise ValueError(f"distillation reduction must be batchmean or mean, got {reduction!r}")
        self.alpha, self.temperature, self.reduction = alpha, temperature, reduction

    def on_start(self, trainer: Trainer) -> None:
        for teacher in self.teachers:
            teacher.to(trainer.device).eval()

    def loss(self, trainer, x, y, logits, loss):
        t = self.temperature
        student = F.log_softmax(logits / t, dim=1)
        kd = 0.0
        with torch.no_grad():
            targets = [F.log_softmax(teacher(x) / t, dim=1) for teacher in self.teachers]
        for soft in targets:
            pointwise = soft.exp() * (soft - student)  # KL(teacher || student) per image and class
            kd = kd + pointwise.sum() / (pointwise.numel() if self.reduction == "mean" else len(pointwise)) * t ** 2
        kd = kd / len(self.teachers)
        return kd if self.alpha == 1 else (1 - self.alpha) * loss + self.alpha * kd


class QuantizationAware(Callback):
    """Quantization-aware training: while training, the named layers compute with fake-quantized
    weights (straight-through gradients to float shadow weights, :class:`WeightFakeQuant`); at
    the end the weights are left on their grids and the quantization recorded on the model."""

    def __init__(self, bits: Mapping[str, int], scheme: str = "per_channel_symmetric") -> None:
        self.bits = {name: b for name, b in bits.items() if b < 32}
        self.scheme = scheme

    def on_start(self, trainer: Trainer) -> None:
        for name, b in self.bits.items():
            parametrize.register_parametrization(trainer.model.get_submodule(name), "weight", WeightFakeQuant(b, self.scheme))

    def on_end(self, trainer: Trainer) -> None:
        model = trainer.model
        for name in self.bits:
            module = model.get_submodule(name)
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        record = getattr(model, RECORD_ATTRIBUTE, {})
        quantize_weights_(model, self.bits, self.scheme, record.get("activation_bits", 32))


class KeepDropped(Callback):
    """Keeps removed channels removed while training a full-shape network: at the start and after
    every step the dropped channels of each group are zeroed on every coupled layer (producers'
    filters and biases, batch-norm affine, readers' weight columns:
    :func:`automlprune.materialize.zero_dropped_`), and so are the optimizer's momentum buffers
    at those entries, so a dropped weight stays exactly zero (no momentum pushes it back between
    steps) and the network always computes what its materialized version does. ``kept``: group
    -> kept channel indices (groups absent are whole); :meth:`set_kept` changes them (methods
    that drop channels while they train)."""

    def __init__(self, space: object, kept: Mapping[str, torch.Tensor]) -> None:
        self.space = space
        self.set_kept(kept)

    def set_kept(self, kept: Mapping[str, torch.Tensor]) -> None:
        """Drop every channel outside ``kept`` from now on (takes effect at the next zeroing)."""
        self.kept = {name: torch.as_tensor(keep, dtype=torch.long) for name, keep in kept.items()
                     if len(keep) < self.space.group_by_name[name].channels}
        self._masks: dict[nn.Parameter, torch.Tensor] | None = None

    @torch.no_grad()
    def masks(self, model: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
        """Parameter -> 0/1 tensor of its shape (0 where a dropped channel's entry lies), for the
        parameters the dropped channels touch; found by zeroing a field of ones."""
        if self._masks is None:
            from automlprune.materialize import zero_dropped_

            layers = {m.layer for name in self.kept for m in self.space.group_by_name[name].members}
            params = [p for layer in sorted(layers) for p in model.get_submodule(layer).parameters(recurse=False)]
            saved = [p.detach().clone() for p in params]
            for p in params:
                p.fill_(1)
            zero_dropped_(model, self.space, self.kept)
            self._masks = {p: p.detach().clone() for p in params if not bool(p.all())}
            for p, value in zip(params, saved):
                p.copy_(value)
        return self._masks

    @torch.no_grad()
    def zero_(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        for param, mask in self.masks(model).items():
            param.mul_(mask)
            buffer = optimizer.state.get(param, {}).get("momentum_buffer") if optimizer is not None else None
            if buffer is not None:
                buffer.mul_(mask)

    def on_start(self, trainer: Trainer) -> None:
        self.zero_(trainer.model)

    def after_step(self, trainer: Trainer) -> None:
        self.zero_(trainer.model, trainer.optimizer)
