"""PruneNet-style global channel importance and width allocation (after Khetan & Karnin,
'PruneNet: Channel Pruning via Global Importance', 2020, built from its abstract).

What is computed (the paper's exact equations are not available to us):

1. Importance, once per run, from a few training batches (the evaluator's BN batches): the
   ``prunenet`` criterion of :mod:`automlprune.reconstruction`. For each group, the layers
   reading its channels define a least-squares reconstruction problem; channels are eliminated
   backward, each time the one whose loss is best absorbed by re-weighting the kept channels.
   A channel's score is the group's cumulative loss once it and every channel eliminated
   before it are gone, as a fraction of the readers' output energy: one scale across layers.
   Sorted, a group's scores are its redundancy curve (loss vs channels kept).
2. Allocation, per budget, with the one cost model: start from the full network and repeatedly
   remove one rounding unit of channels from the group with the least loss added per unit of
   budget metric saved (costs recomputed after every removal, so a channel's cost reflects its
   neighbours' current widths), until the budget is met; then add back, while anything fits,
   the unit with the most loss recovered per unit of cost. The answer meets the budget and no
   single unit can be added back within it. No evaluation is spent on the allocation.
3. The candidate is materialized with the same importance and the least-squares fold of the
   removed channels into the kept ones (``evaluation.reconstruction: least_squares``), then goes
   through the shared evaluator, run store and fine-tune like every strategy's answer.

One scoring pass serves every budget of a run (the evaluator's scores are computed once); each
budget costs one allocation (well under a second) and one evaluation.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from automlprune.cost import uniform_ratio_for_budget
from automlprune.search.baselines import OneShotStrategy
from automlprune.space import Candidate


ALLOCATION_PREFIX = "prunenet-"
"""Allocation profiles are the run artifacts ``prunenet-<budget slug>.json``: {"title", "groups": {group: ...}}."""


class PruneNetStrategy(OneShotStrategy):
    """Reconstruction-loss importance on one global scale, then a cost-aware allocation exact for the budget."""

    name = "prunenet"
    evaluation: ClassVar[dict[str, Any]] = {"criterion": "prunenet", "reconstruction": "least_squares"}

    def loss_curves(self) -> dict[str, np.ndarray]:
        """Group -> loss when keeping k channels, k = 0..channels (the sorted scores; 0 at full width)."""
        curves = {}
        for name in self.space.prunable:
            scores = np.sort(self.context.channel_scores[name].double().cpu().numpy())[::-1]
            curves[name] = np.append(scores, 0.0)  # keeping k channels loses the score of the (k+1)-th best
        return curves

    def _candidate(self, kept: dict[str, int]) -> Candidate:
        return Candidate.make({g: k / self.space.group_by_name[g].channels for g, k in kept.items()})

    def propose(self) -> Candidate:
        curves = self.loss_curves()
        channels = {g: self.space.group_by_name[g].channels for g in curves}
        floor = {g: self.space.min_width(g) for g in channels}
        kept = dict(channels)

        def step(g: str, direction: int) -> int | None:
            """The width of group g one rounding step narrower (-1) or wider (+1), None outside its range."""
            unit = self.space.rounding_step(self.space.group_by_name[g].unit)
            if direction < 0:
                k = (kept[g] - 1) // unit * unit if kept[g] % unit else kept[g] - unit
                return k if k >= floor[g] else None
            k = min(channels[g], (kept[g] // unit + 1) * unit)
            return k if k > kept[g] else None

        metric = self.budget.metric
        costs_of = lambda widths: self.cost_model(self._candidate(widths))  # noqa: E731
        now = costs_of(kept)
        while not self.budget.met_by(now):  # remove the cheapest loss per unit of cost saved
            best = None
            for g in curves:
                k = step(g, -1)
                if k is None:
                    continue
                trial = costs_of({**kept, g: k})
                saved = now[metric] - trial[metric]
                if saved > 0:
                    ratio = (curves[g][k] - curves[g][kept[g]]) / saved
                    if best is None or ratio < best[0]:
                        best = (ratio, g, k, trial)
            if best is None:
                break
            _, g, kept[g], now = best
        while True:  # add back what still fits, best recovered loss per unit of cost first
            best = None
            for g in curves:
                k = step(g, +1)
                if k is None:
                    continue
                trial = costs_of({**kept, g: k})
                if not self.budget.met_by(trial):
                    continue
                ratio = (curves[g][kept[g]] - curves[g][k]) / max(trial[metric] - now[metric], 1e-12)
                if best is None or ratio > best[0]:
                    best = (ratio, g, k, trial)
            if best is None:
                break
            _, g, kept[g], now = best
        self._save_profile(curves, kept)
        return self._candidate(kept)

    def _save_profile(self, curves: dict[str, np.ndarray], kept: dict[str, int]) -> None:
        """Per-group redundancy curves and the allocated widths next to the uniform ones, as the
        run artifact ``prunenet-<budget>.json`` (``automlprune plot`` draws it)."""
        if self.context.artifacts is None:
            return
        uniform = self.space.uniform(uniform_ratio_for_budget(self.cost_model, self.budget.metric, self.limit))
        uniform_kept = dict(zip([g.name for g in self.space.groups], self.space.kept_channels(uniform).tolist()))
        profile = {g: {"channels": int(len(c) - 1), "kept": int(kept[g]), "uniform_kept": int(uniform_kept[g]),
                       "loss_at_kept": float(c[kept[g]]), "loss_curve": [float(v) for v in c]} for g, c in curves.items()}
        self.context.artifacts.write_json(f"{ALLOCATION_PREFIX}{self.budget.slug}.json",
                                          {"title": f"prunenet at {self.budget.label}", "groups": profile})
