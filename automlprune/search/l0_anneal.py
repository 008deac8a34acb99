"""Annealing with direct L0 control of the channel count: ``l0-anneal`` (Guo, She, Barbu,
'Network Pruning via Annealing and Direct Sparsity Control', IJCNN 2021; arXiv 2002.04301;
``../shared/references/training-time-methods.md`` section 7). No official code exists; the
schedule is the same group's Feature Selection with Annealing as implemented by its co-author
(N. Lay, ``ComputeNumberToKeepInverse``).

While SGD trains the network (no sparsity penalty: the constraint is an L0 count, not an L1
pull), after every annealing step e (one every ``prune_every`` optimizer steps) each pruned
group keeps its M_e channels with the largest filter norm and the others are zeroed for good,
weights and momentum (:mod:`automlprune.search.gradual`)::

    M_e = k + (M - k) * max(0, (N - 2e) / (2 e mu + N))

with M the group's channels, k its target from the budget, N the annealing steps of the whole
run and ``mu`` (default 20, FSA's). M_e reaches k at e = N/2: annealing fills the first half of
training, which then goes on at the target size (the paper's "training at the final sparsity").

Choices the readable sources leave open, stated:

* **Criterion**: the L2 norm of each channel's filters over the group's producing layers (the
  group form of FSA's largest-|w| selection); the paper may use another (BN |gamma|).
* **Per group, not global**: the budget, in any metric, becomes per-group counts k through the
  cost model (``widths``: one keep ratio for the pruned groups, or PruneNet's allocation); the
  paper's layer-wise or global choice is not known.
* **Annealing unit**: ``prune_every`` optimizer steps (FSA anneals per iteration; the paper per
  epoch or iteration); N = the run's steps // ``prune_every``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from automlprune.search.gradual import GradualSettings, GradualStrategy, annealed_fraction


@dataclass(frozen=True)
class L0AnnealSettings(GradualSettings):
    """See the module docstring; ``mu``: the annealing rate (larger: the count falls faster early)."""

    mu: float = 20.0


class L0AnnealStrategy(GradualStrategy):
    """Channel counts annealed to the budget's on FSA's schedule, dropped channels held at zero."""

    ddp_refusal = None  # decisions from weights and gradients alone: every rank decides alike under --nproc

    name = "l0-anneal"
    settings_class = L0AnnealSettings

    def fraction_left(self, step: int, total_steps: int) -> float:
        every = self.prune_interval(total_steps)
        return annealed_fraction(step // every, max(1, total_steps // every), self.settings.mu)

    def scores(self, net: nn.Module, group: str) -> torch.Tensor:
        return self.filter_norms(net, group, 2)
