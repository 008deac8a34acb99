"""Budget-aware repair of black-box proposals: every evaluated network uses the budget it was given.

A sampler that knows nothing of costs (random search, Optuna's samplers) proposes networks far
under the budget as often as over it; evaluating them gives away accuracy the budget allowed
(under a 70% MACs budget, TPE's answer used 53%). :func:`repair_to_budget` moves a proposal to
the budget along its own shape before it is evaluated: every keep ratio is scaled by one common
factor ``s`` (so the proposal's relative allocation is kept), each rounded to the widths the
space can build (whole channels in its rounding step: ``round_to``, a grouped convolution's
unit; :meth:`SearchSpace.channels_for`), with ``s`` the largest factor that meets the budget
(bisection: the cost grows with ``s``); then groups whose scaled width lost the most to the
rounding are widened by one rounding step while the budget still holds, so the result is within
one rounding step of the budget (finer than the ratio grid, which is the samplers' resolution,
not the network's). A proposal
over the budget is shrunk the same way; one that meets the budget at least as closely as its
repair would (an allocator's exact answer between grid points) is kept. Bit widths are left as
proposed. In a space that searches weight densities, the densities of unstructured and block
layers are scaled by the same factor (continuous: a density's kept count is whole weights, not
a grid); N:M layers keep their fixed density; a space with one keep ratio (densities alone)
moves only the densities.

The search loop (:func:`automlprune.search.base.run_strategy`) applies it to the strategies
that ask for it (``Strategy.repairs``; switch off with ``--option repair=false``) and records the
proposed candidate beside the evaluated one.
"""

from __future__ import annotations

import numpy as np

from automlprune.cost import CostModel
from automlprune.search.budget import BoundBudget
from automlprune.space import Candidate, SearchSpace

BISECTION_STEPS = 40


def repair_to_budget(candidate: Candidate, space: SearchSpace, cost_model: CostModel, budget: BoundBudget) -> Candidate:
    """``candidate`` scaled to the budget along its shape (see the module docstring); unchanged
    when nothing may move, or when it already meets the budget at least as closely."""
    groups = list(space.prunable) if len(space.config.ratios) > 1 else []
    shape = _Shape(candidate, space, groups)
    if not groups and not shape.layers:
        return candidate
    channels = np.array([space.group_by_name[g].channels for g in groups], dtype=np.float64)
    units = [space.group_by_name[g].unit for g in groups]
    steps = np.array([space.rounding_step(u) for u in units], dtype=np.float64)
    proposed = np.array([candidate.ratio_map.get(g, 1.0) for g in groups], dtype=np.float64)

    def snapped(scale: float) -> np.ndarray:
        wanted = np.minimum(1.0, proposed * scale)
        return np.array([space.channels_for(int(c), float(w), u) for c, w, u in zip(channels, wanted, units)]) / channels

    def fits(ratios: np.ndarray, scale: float) -> bool:
        return budget.met_by(cost_model(shape.make(groups, ratios, scale)))

    smallest = min([*proposed, *shape.proposed]) if len(proposed) or shape.layers else 1.0
    lo, hi = (1.0, 1.0 / smallest) if fits(snapped(1.0), 1.0) else (0.0, 1.0)
    if fits(snapped(hi), hi):
        lo = hi
    for _ in range(BISECTION_STEPS):  # largest scale whose snapped ratios fit (fits(lo) holds, or lo = 0)
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(snapped(mid), mid) else (lo, mid)
    ratios = snapped(lo)
    if not fits(ratios, lo):
        return shape.make(groups, ratios, lo)  # even the narrowest scaled network is over: evaluated as infeasible
    lost = np.minimum(1.0, proposed * lo) - ratios
    for i in np.argsort(-lost, kind="stable"):  # fill what the rounding left, largest loss first
        if ratios[i] < 1.0:
            trial = ratios.copy()
            trial[i] = min(1.0, (round(ratios[i] * channels[i]) + steps[i]) / channels[i])
            if fits(trial, lo):
                ratios = trial
    repaired = shape.make(groups, ratios, lo)
    proposed_costs = cost_model(candidate)
    if budget.met_by(proposed_costs) and proposed_costs[budget.metric] >= cost_model(repaired)[budget.metric]:
        return candidate  # already as close to the budget: kept as proposed
    return repaired


class _Shape:
    """The parts of a proposal repair keeps or scales besides its widths: bits as proposed; the
    densities of the layers whose pattern allows any density (unstructured, block; a dense layer
    in its first such pattern), scaled with the widths' factor (at most 1, or the pattern's
    maximum, at least :data:`MIN_DENSITY`); N:M layers and layers the space keeps dense as proposed."""

    def __init__(self, candidate: Candidate, space: SearchSpace, groups: list[str]) -> None:
        self.bits = candidate.bit_map
        sparsity = candidate.sparsity()
        self.fixed = {l: v for l, v in sparsity.items() if l not in space.layer_patterns}
        self.layers, self.patterns, self.caps, proposed = [], {}, {}, []
        for layer, options in space.layer_patterns.items():
            name, density = sparsity.get(layer, (None, 1.0))
            pattern = next((p for p in options if p.name == name), None) if name else space.free_pattern(layer)
            if pattern is None or pattern.fixed_density is not None:
                if name:
                    self.fixed[layer] = (name, density)
                continue
            self.layers.append(layer)
            self.patterns[layer], self.caps[layer] = pattern.name, pattern
            proposed.append(density)
        self.proposed = np.array(proposed, dtype=np.float64)

    def make(self, groups: list[str], ratios: np.ndarray, scale: float) -> Candidate:
        densities = {l: d for l, (_, d) in self.fixed.items()}
        patterns = {l: p for l, (p, _) in self.fixed.items()}
        for layer, d in zip(self.layers, np.clip(self.proposed * scale, MIN_DENSITY, 1.0)):
            if d < 1.0:
                densities[layer], patterns[layer] = self.caps[layer].clip(float(d)), self.patterns[layer]
        return Candidate.make({g: float(r) for g, r in zip(groups, ratios)}, self.bits or None, densities, patterns)


MIN_DENSITY = 1e-3
"""The lowest density repair gives a layer (each keeps at least one weight in any case)."""
