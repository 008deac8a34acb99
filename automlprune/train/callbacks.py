"""Callbacks of the :class:`~automlprune.train.trainer.Trainer` shared by several uses."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from automlprune.nn import layer_types
from automlprune.quantization import RECORD_ATTRIBUTE, WeightFakeQuant, quantize_weights_
from automlprune.train.trainer import Callback, Trainer


class Distillation(Callback):
    """Knowledge distillation from ``teacher`` (Hinton et al. 2015): the loss becomes
    (1 - alpha) x cross-entropy + alpha x T^2 x KL(teacher || student) at temperature T."""

    def __init__(self, teacher: nn.Module, alpha: float = 0.5, temperature: float = 4.0) -> None:
        self.teacher, self.alpha, self.temperature = teacher, alpha, temperature

    def on_start(self, trainer: Trainer) -> None:
        self.teacher.to(trainer.device).eval()

    def loss(self, trainer, x, y, logits, loss):
        t = self.temperature
        with torch.no_grad():
            soft = F.log_softmax(self.teacher(x) / t, dim=1)
        kd = F.kl_div(F.log_softmax(logits / t, dim=1), soft, log_target=True, reduction="batchmean") * t ** 2
        return (1 - self.alpha) * loss + self.alpha * kd


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
