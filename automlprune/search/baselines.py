"""Baseline strategies: uniform, random, greedy (sensitivity) and global (importance ranking)."""

from __future__ import annotations

from typing import Any

import numpy as np

import torch

from automlprune.cost import uniform_density_for_budget, uniform_ratio_for_budget
from automlprune.evaluator import EvalResult
from automlprune.search.base import SearchContext, Strategy
from automlprune.search.budget import Budget
from automlprune.proposal import Proposal
from automlprune.search.warm_start import warm_start_candidates
from automlprune.errors import ConfigError
from automlprune.space import Candidate


class OneShotStrategy(Strategy):
    """A strategy that computes one candidate from the cost model (and weights) and evaluates it."""

    uses_seed = False
    takes_tolerance = "bisect"
    workers = "shared"  # deterministic: a second worker asks the same network and reads the first's result

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._asked = False

    def ask(self) -> Candidate | None:
        if self._asked:
            return None
        self._asked = True
        return self.propose()

    def propose(self) -> Candidate:
        raise NotImplementedError


class UniformStrategy(OneShotStrategy):
    """One keep ratio for every prunable group: the largest that meets the budget, found by
    bisection on the continuous ratio (the common baseline). One evaluation. In a space that
    searches weight densities but not widths (one keep ratio, e.g. ``--space sparse``), one
    density for every sparsity-searchable layer instead (in its free pattern: SearchSpace.uniform), the largest
    that meets the budget; in one that searches bits but not widths (``--space bits-only``),
    the most bits, one choice for every layer, that meet the budget (channels stay whole).

    Options: ``bits``: every bit-searchable layer at these weight bits (one of the space's bit
    choices; e.g. uniform 4-bit), the ratio (or density) then the largest that still meets the
    budget; ``density``: every sparsity-searchable layer at this weight density, the ratio then
    the largest that meets the budget."""

    name = "uniform"
    option_names = ("bits", "density")
    option_types = {"bits": int, "density": float}
    option_ranges = {"density": (lambda v: 0 < v <= 1, "must be a fraction of weights kept in (0, 1]")}

    def propose(self) -> Candidate:
        bits, density = self.options.get("bits"), self.options.get("density")
        if bits is not None and (not self.space.bit_searchable or bits not in self.space.config.bit_choices):
            raise ConfigError(f"uniform bits={bits!r} is not among the space's bit choices {list(self.space.config.bit_choices)}; "
                              "use a space with bit choices (e.g. --space mixed-precision) and one of them")
        if density is not None and not self.space.layer_patterns:
            raise ConfigError(f"uniform density={density!r} needs a space that searches weight densities (e.g. --space joint)")
        if self.space.layer_patterns and len(self.space.config.ratios) == 1 and density is None:
            return self.space.uniform(1.0, bits, uniform_density_for_budget(self.cost_model, self.budget.metric, self.limit, bits=bits))
        if len(self.space.config.ratios) == 1 and self.space.bit_searchable and bits is None:
            return self._uniform_bits()
        ratio = uniform_ratio_for_budget(self.cost_model, self.budget.metric, self.limit, bits=bits, density=density)
        return self.space.uniform(ratio, bits, density)

    def _uniform_bits(self) -> Candidate:
        """In a space that fixes the widths (one keep ratio) and searches bits: the most bits, one
        choice for every bit-searchable layer, that meet the budget (uniform quantization)."""
        for b in sorted(self.space.config.bit_choices, reverse=True):
            candidate = self.space.uniform(1.0, b)
            if self.feasible(candidate):
                return candidate
        raise ConfigError(f"budget {self.budget.label} is below what uniform {min(self.space.config.bit_choices)}-bit weights reach "
                          "with every channel kept; raise the budget or use a space that prunes channels")


class GlobalMagnitudeStrategy(OneShotStrategy):
    """Global magnitude pruning: one threshold on |w| across every sparsity-searchable layer
    (unstructured), the lowest that meets the budget, so each layer's density is the fraction of
    its weights above it (the classic baseline of Han et al. 2015 and of the lottery-ticket
    line of work; layers the space keeps dense stay dense). Every channel is kept; option
    ``bits`` as for ``uniform``. One evaluation; its densities are exact, not on the space's grid."""

    name = "global-magnitude"
    option_names = ("bits",)
    option_types = {"bits": int}

    def propose(self) -> Proposal:
        space = self.space
        layers = [l for l, options in space.layer_patterns.items() if any(p.name == "unstructured" for p in options)]
        if not layers:
            raise ConfigError("global-magnitude needs a space that searches unstructured weight densities "
                              "(sparsity.patterns with unstructured, e.g. --space sparse)")
        bits = self.options.get("bits")
        if bits is not None and bits not in space.config.bit_choices:
            raise ConfigError(f"global-magnitude bits={bits!r} is not among the space's bit choices {list(space.config.bit_choices)}")
        bit_map = {l: bits for l in space.bit_searchable} if bits else None
        magnitudes = [self.context.model.get_submodule(l).weight.detach().abs().flatten().cpu() for l in layers]
        ordered = torch.sort(torch.cat(magnitudes), descending=True).values
        sizes = [m.numel() for m in magnitudes]

        def candidate(kept: int) -> Candidate:
            threshold = ordered[kept - 1]
            densities = {l: max(int((m >= threshold).sum()), 1) / n for l, m, n in zip(layers, magnitudes, sizes)}
            return Candidate.make(None, bit_map, densities, {l: "unstructured" for l, d in densities.items() if d < 1})

        fits = lambda kept: self.budget.met_by(self.cost_model(candidate(kept)))  # noqa: E731
        lo, hi = 1, ordered.numel()
        if fits(hi):
            return Proposal(candidate(hi), as_proposed=True)
        if not fits(lo):
            raise ConfigError(f"budget {self.budget.label} is below what global magnitude pruning reaches with one weight per layer; raise the budget")
        while hi - lo > 1:  # largest kept count that fits
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return Proposal(candidate(lo), as_proposed=True)


class GridWalk:
    """Candidates as grid-index vectors (one index per dimension of the space)."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self.sizes = np.array([len(d.choices) for d in strategy.space.dimensions])
        self.lowerable = np.array([d.kind != "pattern" for d in strategy.space.dimensions], dtype=bool)

    def candidate(self, index: np.ndarray) -> Candidate:
        n = np.maximum(self.sizes - 1, 1)
        return self.strategy.space.decode(np.where(self.sizes > 1, 2 * index / n - 1, 0.0))

    def repair(self, index: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
        """Lower random dimensions one grid step at a time until the candidate meets the budget
        (sparsity patterns are categories, not amounts: they are never lowered)."""
        index = index.copy()
        while not self.strategy.feasible(self.candidate(index)):
            lowerable = np.flatnonzero((index > 0) & self.lowerable)
            if len(lowerable) == 0:
                return None
            index[rng.choice(lowerable)] -= 1
        return index


class RandomStrategy(Strategy):
    """Random feasible candidates: each dimension drawn uniformly from its grid, then random
    dimensions lowered one step until the budget is met (and, with the default ``repair``, the
    result scaled up along its shape to the budget by the search loop); the one-shot allocators'
    answers first (``warm_start``)."""

    name = "random"
    repairs = True
    workers = "partitioned"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.walk = GridWalk(self)
        self._asked: set[str] = set()
        self._warm = warm_start_candidates(self, self.warm_start)

    def ask(self) -> Candidate | Proposal | None:
        while self._warm:
            candidate = self._warm.pop(0)
            if candidate.key not in self._asked:
                self._asked.add(candidate.key)
                return Proposal(candidate, as_proposed=True)
        for _ in range(200):
            index = self.walk.repair(self.rng.integers(0, self.walk.sizes), self.rng)
            if index is None:
                continue
            candidate = self.walk.candidate(index)
            if candidate.key not in self._asked:
                self._asked.add(candidate.key)
                return candidate
        return None


class GreedyStrategy(Strategy):
    """Per-group sensitivity, then allocation (as AIMET's greedy compression-ratio selection and
    NetAdapt do).

    1. Evaluate the unpruned network, then each prunable group alone at ``probes`` keep ratios
       from the grid (others whole): accuracy loss of group g at ratio r.
    2. Starting from every group whole, repeatedly lower by one grid step the group whose
       (interpolated) accuracy loss grows least per unit of budget metric saved, until the
       budget is met; evaluate that candidate.

    ``probes`` defaults to what the evaluation budget allows (at most every grid ratio below 1).
    """

    name = "greedy"
    uses_seed = False

    option_ranges = {"probes": (lambda v: v >= 1, "must be at least 1")}

    def __init__(self, context: SearchContext, budget: Budget, seed: int = 0, max_evals: int = 50,
                 probes: int | None = None, **options: Any) -> None:
        super().__init__(context, budget, seed, max_evals, **options)
        grid = [r for r in self.space.config.ratios if r < 1.0]
        groups = self.space.prunable
        per_group = probes or max(1, (max_evals - 2) // max(1, len(groups)))
        per_group = min(per_group, len(grid))
        picks = np.unique(np.round(np.linspace(0, len(grid) - 1, per_group)).astype(int))
        self.probe_ratios = [grid[i] for i in picks]
        self.queue: list[Candidate] = [self.space.full()] + [
            Candidate.make({g: r}) for g in groups for r in self.probe_ratios]
        self.loss: dict[str, dict[float, float]] = {g: {1.0: 0.0} for g in groups}
        self.base_accuracy: float | None = None
        self._final_asked = False

    def ask(self) -> Candidate | None:
        if self.queue:
            return self.queue.pop(0)
        if self._final_asked:
            return None
        self._final_asked = True
        return self.allocate()

    def tell(self, candidate: Candidate, result: EvalResult) -> None:
        super().tell(candidate, result)
        ratios = candidate.ratio_map
        if not ratios and self.base_accuracy is None:
            self.base_accuracy = result.accuracy
        elif len(ratios) == 1 and self.base_accuracy is not None and not self._final_asked:
            (group, ratio), = ratios.items()
            self.loss[group][ratio] = self.base_accuracy - result.accuracy

    def _loss_at(self, group: str, ratio: float) -> float:
        known = sorted(self.loss[group].items())
        xs, ys = [k for k, _ in known], [v for _, v in known]
        return float(np.interp(ratio, xs, ys))

    def allocate(self) -> Candidate:
        """Lower the cheapest-to-lose group one grid step at a time until the budget is met."""
        grid = list(self.space.config.ratios)
        level = {g: len(grid) - 1 for g in self.space.prunable}
        current = self.space.full()
        while not self.feasible(current):
            best, best_score = None, np.inf
            current_cost = self.cost(current)
            for g, i in level.items():
                if i == 0:
                    continue
                trial = Candidate.make({**current.ratio_map, g: grid[i - 1]})
                saved = current_cost - self.cost(trial)
                if saved <= 0:
                    continue
                score = (self._loss_at(g, grid[i - 1]) - self._loss_at(g, grid[i])) / saved
                if score < best_score:
                    best, best_score = g, score
            if best is None:
                break
            level[best] -= 1
            current = Candidate.make({g: grid[i] for g, i in level.items()})
        return current


class GlobalStrategy(OneShotStrategy):
    """One ranking of all prunable channels across groups by importance (each group's scores
    divided by their mean, so groups compare on one scale, as Torch-Pruning's global pruning
    with a mean normalizer), cut at the largest number of channels kept that meets the budget.
    The scores are the evaluator's (the task's ``evaluation.criterion``), so the channels
    materialization removes are exactly the ones ranked lowest. One evaluation."""

    name = "global"

    def propose(self) -> Candidate:
        groups = [self.space.group_by_name[g] for g in self.space.prunable]
        floors = [self.space.min_width(g) for g in groups]
        entries = []  # (score, group index) for every removable channel, lowest score first
        for gi, group in enumerate(groups):
            scores = self.context.channel_scores[group.name]
            scores = (scores / scores.abs().mean().clamp_min(1e-12)).sort().values.tolist()
            entries += [(s, gi) for s in scores[: group.channels - floors[gi]]]
        entries.sort()

        def candidate(removed: int) -> Candidate:
            counts = np.zeros(len(groups), dtype=int)
            for _, gi in entries[:removed]:
                counts[gi] += 1
            return Candidate.make({g.name: (g.channels - c) / g.channels for g, c in zip(groups, counts)})

        lo, hi = 0, len(entries)  # smallest number of removed channels that meets the budget
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self.feasible(candidate(mid)) else (mid + 1, hi)
        while lo < len(entries) and not self.feasible(candidate(lo)):  # rounding may break monotonicity
            lo += 1
        return candidate(lo)
