"""Gradual channel pruning while training with feature relevance scores: ``gradual-frs`` (Aketi,
Roy, Raghunathan, Roy, 'Gradual Channel Pruning while Training using Feature Relevance Scores
for Convolutional Neural Networks', IEEE Access 2020; arXiv 2002.09958), after the official code
(``purdue-nrl/Gradual-Channel-Pruning-using-FRS``; ``../shared/references/training-time-methods.md``
section 10).

While the network trains, after every ``prune_every`` steps until ``prune_until`` of the run
(official: every 21 epochs until epoch 150 of 200, 7 events; ``events``), every pruned channel is
scored by its feature relevance score and the globally lowest go, and stay exactly zero
(:mod:`automlprune.search.gradual`). The score, as ``compute_rscore.py`` / ``utils_1.py``:

1. Class weights from the confusion matrix on the scoring images: acc_k = diag / row sum,
   a_k = acc_k / max_j acc_j, s_k = sigmoid(1 / a_k) (poorly classified classes weigh more).
2. Relevance by layer-wise relevance propagation from the one-hot true label, alpha 2 beta 1
   (:mod:`automlprune.lrp`), in eval mode on training images with the training augmentation.
3. Per image and channel the spatial mean of the relevance at the channel's batch-norm output
   (equal to the relevance after the following ReLU, which LRP passes unchanged), summed per
   class into F[k, c].
4. FRS(c) = | (1/K) sum_k s_k F[k, c] / N'_k |, with N'_k the class's images plus the number of
   batches (the official code's ``csize += 1`` per batch, kept), then divided per group by its
   L2 norm (+1e-9), which makes the global ranking across layers meaningful.

Deviations and choices, stated:

* **Budget.** The official code removes a fixed x channels per event (120 for ResNet-56). Here
  each event lowers the cost, in the budget's metric through the one cost model, in equal steps
  from the full network to the budget: the globally lowest-scored channels go until the event's
  cost is met (bisection on how many), so the last event meets the budget exactly.
* **Which channels.** The official code also scores block outputs and then masks only that
  block's residual branch, which no narrower standard network can express. ``groups: internal``
  (default) prunes what materializes exactly, each block's internal channels; ``groups: all``
  also prunes whole residual groups, scored by the mean of their batch norms' relevance.
* **Scoring images.** ``score_samples`` training images per event (default 4096; the official
  code uses the whole training set each time, which costs an epoch of LRP per event).
* A group keeps at least the space's smallest keep ratio.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from automlprune.data import iterate_batches
from automlprune.errors import ConfigError
from automlprune.lrp import Relevance
from automlprune.search.gradual import GradualSettings, GradualStrategy, linear_fraction


@dataclass(frozen=True)
class GradualFRSSettings(GradualSettings):
    """See the module docstring: ``events`` pruning events spread over the first ``prune_until``
    of the run's steps (unless ``prune_every`` is given); ``score_samples`` training images scored
    per event, ``score_batch_size`` at a time."""

    events: int = 7
    prune_until: float = 0.75
    score_samples: int = 4096
    score_batch_size: int = 256


class GradualFRSStrategy(GradualStrategy):
    """Channels pruned at intervals while training by their feature relevance score, globally."""

    name = "gradual-frs"
    chooses_widths = True
    settings_class = GradualFRSSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.relevance: Relevance | None = None
        self.scored_events = 0

    # ---- schedule -----------------------------------------------------------------------------
    def prune_interval(self, total_steps: int) -> int:
        s = self.settings
        return s.prune_every or max(1, int(s.prune_until * total_steps) // s.events)

    def fraction_left(self, step: int, total_steps: int) -> float:
        s, every = self.settings, self.prune_interval(total_steps)
        events = max(1, int(s.prune_until * total_steps) // every) if s.prune_every else s.events
        return linear_fraction(step // every, events)

    def reached(self, kept: dict[str, torch.Tensor]) -> bool:
        return self.feasible(self.widths_of(kept))

    # ---- selection ----------------------------------------------------------------------------
    def select(self, net: nn.Module, kept: dict[str, torch.Tensor], fraction_left: float) -> dict[str, torch.Tensor]:
        """The globally lowest-scored channels go until the cost is at most the event's share of
        the way from the full network's cost to the budget (see the module docstring)."""
        base = self.budget.base
        target = self.limit + (base - self.limit) * fraction_left
        metric = self.budget.metric
        if self.cost_model(self.widths_of(kept))[metric] <= target:
            return kept
        cut, fits = self.cut_to_cost(kept, self.feature_relevance(net), target)
        if not fits and fraction_left == 0:
            raise ConfigError(f"gradual-frs cannot meet {self.budget.label} by pruning its {self.settings.groups} groups "
                              "down to the space's smallest keep ratio; raise the budget or use --option groups=all")
        return cut

    # ---- the score ----------------------------------------------------------------------------
    @torch.no_grad()
    def feature_relevance(self, net: nn.Module) -> dict[str, torch.Tensor]:
        """Group -> FRS of each channel, L2-normalized per group (see the module docstring)."""
        s, data = self.settings, self.context.data
        if self.relevance is None or self.relevance.model is not net:  # traced once per trained network
            self.relevance = Relevance(net)
        groups = list(self.pruning.targets)
        layers = {g: self.measured_layers(g) for g in groups}
        wanted = sorted({layer for measured in layers.values() for layer, _ in measured})
        classes = data.num_classes
        confusion = torch.zeros(classes, classes)
        per_class = {g: torch.zeros(classes, self.space.group_by_name[g].channels) for g in groups}
        batches = 0
        was_training = net.training
        net.eval()
        try:
            for x, y in iterate_batches(data.train, data, s.score_batch_size, self.device, shuffle=True, augment=True,
                                        seed=self.seed * 7919 + self.scored_events,
                                        max_batches=-(-s.score_samples // s.score_batch_size)):
                batches += 1
                predicted = net(x).argmax(1)
                confusion.index_put_((y.cpu(), predicted.cpu()), torch.ones(len(y)), accumulate=True)
                relevance = self.relevance.at_outputs(x, y, wanted)
                for group, measured in layers.items():
                    r = sum(spatial_mean(relevance[layer])[:, index.to(x.device)] for layer, index in measured) / len(measured)
                    per_class[group].index_add_(0, y.cpu(), r.float().cpu())
        finally:
            net.train(was_training)
        self.scored_events += 1
        accuracy = confusion.diag() / confusion.sum(1).clamp_min(1)
        weight = torch.sigmoid(1 / (accuracy / accuracy.max().clamp_min(1e-12)).clamp_min(1e-12))
        images = confusion.sum(1) + batches  # N'_k: the official per-batch increment kept
        out = {}
        for group, f in per_class.items():
            frs = ((weight[:, None] * f / images[:, None]).sum(0) / classes).abs()
            out[group] = frs / (frs.norm() + 1e-9)
        return out

    def method_state(self) -> dict[str, Any]:
        return {"scored_events": self.scored_events}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.scored_events = state["scored_events"]


def spatial_mean(relevance: torch.Tensor) -> torch.Tensor:
    """(N, C): a layer output's relevance averaged over its spatial positions (none for (N, C) outputs)."""
    return relevance.flatten(2).mean(2) if relevance.dim() > 2 else relevance
