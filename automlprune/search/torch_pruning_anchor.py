"""Torch-Pruning's own pruner as an anchor: what a user gets from the library directly.

``tp-local`` and ``tp-global`` run ``torch_pruning.pruner.BasePruner`` with
``GroupMagnitudeImportance(p=2)`` (``global_pruning`` False / True) for ``iterative_steps``
steps (option, default 1; Torch-Pruning's linear schedule) on a copy of the trained model, the
last layer and the space's pinned groups ignored, rounding widths to the space's ``round_to``.
The pruning ratio is the largest (by bisection) whose pruned network meets the budget by the
cost model. The widths Torch-Pruning chose become the candidate, and the channels kept inside
each group are ranked by the same Torch-Pruning importance (criterion ``tp_magnitude``), so the
evaluated network is the one Torch-Pruning builds: identical for one step (tested). With several
steps Torch-Pruning recomputes the importance on the shrinking network, so some kept channels
differ: on FMNIST ResNet-20 at 50% MACs and 5 steps, Torch-Pruning's own network scores 79.85%
(local) / 81.30% (global) before fine-tuning and ours 81.85% / 80.95%. Then it goes through the
shared evaluator and fine-tune like any answer. One evaluation.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from automlprune.cost import largest_within
from automlprune.errors import ConfigError
from automlprune.search.baselines import OneShotStrategy
from automlprune.space import Candidate

MAX_RATIO = 0.9


def torch_pruning_network(model: nn.Module, space: Any, ratio: float, global_pruning: bool, steps: int) -> nn.Module:
    """A copy of ``model`` pruned by Torch-Pruning's BasePruner (magnitude importance) at ``ratio``."""
    import torch_pruning as tp

    net = copy.deepcopy(model).eval()
    device = next(net.parameters()).device
    ignored = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][-1:]
    ignored += [net.get_submodule(g) for g in space.pinned]
    with torch.enable_grad():
        pruner = tp.pruner.BasePruner(net, space.example_input.to(device), importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      global_pruning=global_pruning, pruning_ratio=ratio, iterative_steps=steps,
                                      ignored_layers=ignored, round_to=space.config.round_to if space.config.round_to > 1 else None)
        for _ in range(steps):
            pruner.step()
    return net


class TorchPruningStrategy(OneShotStrategy):
    """See the module docstring; option ``iterative_steps`` (default 1: the evaluated network is exactly Torch-Pruning's)."""

    name = "tp-local"
    global_pruning: ClassVar[bool] = False
    evaluation = {"criterion": "tp_magnitude"}
    option_names = ("iterative_steps",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steps = int(self.options.get("iterative_steps", 1))
        if self.steps < 1:
            raise ConfigError(f"iterative_steps must be at least 1, got {self.steps}")
        if self.context.model is None:
            raise ConfigError("the Torch-Pruning anchors need the trained model in their context")
        self.spent = {}
        self._widths: dict[float, Candidate] = {}

    def widths(self, ratio: float) -> Candidate:
        """The candidate of the widths Torch-Pruning chooses at ``ratio`` (each ratio pruned once)."""
        if ratio not in self._widths:
            self._widths[ratio] = self._prune(ratio)
        return self._widths[ratio]

    def _prune(self, ratio: float) -> Candidate:
        net = torch_pruning_network(self.context.model, self.space, ratio, self.global_pruning, self.steps)
        ratios = {}
        for group in self.space.groups:
            kept = net.get_submodule(group.name).weight.shape[0]
            full = self.context.model.get_submodule(group.name).weight.shape[0]
            if kept < full:
                ratios[group.name] = kept / full
        return Candidate.make(ratios)

    def propose(self) -> Candidate:
        if self.feasible(self.space.full()):
            return self.space.full()
        # the largest ratios can make Torch-Pruning skip layers it would empty (then it prunes
        # less), so start the bisection from the largest ratio on a coarse grid that meets the budget
        top = next((r for r in np.arange(MAX_RATIO, 0.0, -0.1) if self.feasible(self.widths(float(r)))), None)
        if top is None:
            raise ConfigError(f"Torch-Pruning's pruner cannot meet {self.budget.label} on this model at any pruning ratio "
                              f"up to {MAX_RATIO}; raise the budget")
        keep = largest_within(lambda k: self.feasible(self.widths(1 - k)), 1 - float(top), 1.0, 14)
        self.spent["pruning_ratio"] = 1 - keep
        return self.widths(1 - keep)


class TorchPruningGlobalStrategy(TorchPruningStrategy):
    """Torch-Pruning's BasePruner with ``global_pruning=True`` (see the module docstring)."""

    name = "tp-global"
    global_pruning = True
