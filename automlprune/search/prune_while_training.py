"""Pruning filters while training: ``prune-while-training`` (Roy, Panda, Srinivasan,
Raghunathan, 'Pruning Filters while Training for Efficiently Optimizing Deep Learning
Networks', IJCNN 2020; arXiv 2003.02800; ``../shared/references/training-time-methods.md``
section 9). No official code exists and the full text was not readable; what follows the
abstract is marked, the rest is this implementation's choice.

[abstract] Filters are pruned during training itself, with no separate retraining, by one of
three criteria (option ``criterion``): ``l1`` (the L1 norm of the channel's filters over the
group's producing layers; the abstract's best), ``mean_activation`` (the mean of each channel's
positive part (what a ReLU passes) of its batch-norm output, or of the producer's output where
the group has no batch norm, over the training batches seen since the last pruning event), or
``random`` (seeded).

Choices, stated (the paper's start, interval, step size and stop are unknown):

* **Schedule**: a pruning event every ``prune_every`` optimizer steps until ``prune_until`` of the
  run's steps (default 0.75, as the same group's gradual FRS pruning stops at epoch 150 of 200,
  section 10), each removing an equal share of every group's channels to go; training then goes
  on at the target size (:mod:`automlprune.search.gradual`: dropped channels held at exactly zero,
  weights and momentum).
* **Target**: the paper's "fraction of filters" is per layer; here the budget, in any metric,
  becomes per-group counts through the cost model (``widths``: one keep ratio, or PruneNet's
  allocation).
* Channels are scored per coupled group, summed over its producers (mean activation: averaged over
  its batch norms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from automlprune.errors import ConfigError
from automlprune.search.gradual import GradualSettings, GradualStrategy, linear_fraction
from automlprune.train import Trainer

CRITERIA = ("l1", "mean_activation", "random")


@dataclass(frozen=True)
class PruneWhileTrainingSettings(GradualSettings):
    """See the module docstring."""

    criterion: str = "l1"
    prune_until: float = 0.75


class PruneWhileTrainingStrategy(GradualStrategy):
    """Filters pruned at intervals while training by L1, mean activation or at random."""

    name = "prune-while-training"
    settings_class = PruneWhileTrainingSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.settings.criterion not in CRITERIA:
            raise ConfigError(f"prune-while-training criterion '{self.settings.criterion}' is unknown; use one of: {', '.join(CRITERIA)}")
        self.activation_sums: dict[str, torch.Tensor] = {}
        self.activation_batches = 0
        """Training forward passes since the last pruning event (mean activation)."""
        self._hooks: list[Any] = []
        self._generator = torch.Generator().manual_seed(self.seed)

    def fraction_left(self, step: int, total_steps: int) -> float:
        every = self.prune_interval(total_steps)
        events = max(1, int(self.settings.prune_until * total_steps) // every)
        return linear_fraction(step // every, events)

    def scores(self, net: nn.Module, group: str) -> torch.Tensor:
        channels = self.space.group_by_name[group].channels
        if self.settings.criterion == "random":
            return torch.rand(channels, generator=self._generator)
        if self.settings.criterion == "l1":
            return self.filter_norms(net, group, 1)
        return self.activation_sums[group] / max(self.activation_batches, 1)

    # ---- mean activation: forward hooks on the measured layers ---------------------------------

    def on_train_start(self, trainer: Trainer) -> None:
        if self.settings.criterion != "mean_activation":
            return
        self._hooks.append(trainer.model.register_forward_pre_hook(self._count_batch))
        for group in self.pruning.targets:
            self.activation_sums.setdefault(group, torch.zeros(self.space.group_by_name[group].channels))
            layers = self.measured_layers(group)
            for layer, index in layers:
                self._hooks.append(trainer.model.get_submodule(layer).register_forward_hook(self._recorder(group, index, len(layers))))

    def _count_batch(self, module: nn.Module, inputs: Any) -> None:
        if module.training:
            self.activation_batches += 1

    def _recorder(self, group: str, index: torch.Tensor, measured: int):
        def record(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if module.training:
                with torch.no_grad():
                    means = output.detach().clamp_min(0).transpose(0, 1).flatten(1).mean(1)
                    self.activation_sums[group] += means[index.to(means.device)].cpu() / measured
        return record

    def after_prune(self, trainer: Trainer) -> None:
        """Mean activations are measured afresh between pruning events."""
        for sums in self.activation_sums.values():
            sums.zero_()
        self.activation_batches = 0

    def on_train_end(self, trainer: Trainer) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def method_state(self) -> dict[str, Any]:
        return {"activation_sums": dict(self.activation_sums), "activation_batches": self.activation_batches,
                "generator": self._generator.get_state()}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.activation_sums = {g: t.cpu() for g, t in state["activation_sums"].items()}
        self.activation_batches = state["activation_batches"]
        self._generator.set_state(state["generator"].cpu())
