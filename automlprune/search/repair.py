"""Budget-aware repair of black-box proposals: every evaluated network uses the budget it was given.

A sampler that knows nothing of costs (random search, Optuna's samplers) proposes networks far
under the budget as often as over it; evaluating them gives away accuracy the budget allowed
(under a 70% MACs budget, TPE's answer used 53%). :func:`repair_to_budget` moves a proposal to
the budget along its own shape before it is evaluated: every keep ratio is scaled by one common
factor ``s`` (so the proposal's relative allocation is kept), each snapped down to the space's
ratio grid, with ``s`` the largest factor that meets the budget (bisection: the cost grows with
``s``); then groups whose scaled ratio lost the most to the snapping are raised one grid step
while the budget still holds, so the result is within one grid step of the budget. A proposal
over the budget is shrunk the same way; one that meets the budget at least as closely as its
repair would (an allocator's exact answer between grid points) is kept. Bit widths are left as
proposed.

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
    when no prunable group may move, or when no grid step up fits and it meets the budget."""
    groups = list(space.prunable)
    if not groups:
        return candidate
    grid = np.asarray(space.config.ratios, dtype=np.float64)
    proposed = np.array([candidate.ratio_map.get(g, 1.0) for g in groups], dtype=np.float64)
    bits = candidate.bit_map

    def snapped(scale: float) -> np.ndarray:
        wanted = np.minimum(1.0, proposed * scale)
        index = np.searchsorted(grid, wanted + 1e-9, side="right") - 1  # the grid step at or below
        return grid[np.clip(index, 0, len(grid) - 1)]

    def fits(ratios: np.ndarray) -> bool:
        return budget.met_by(cost_model(_make(groups, ratios, bits)))

    lo, hi = (1.0, 1.0 / proposed.min()) if fits(snapped(1.0)) else (0.0, 1.0)
    if fits(snapped(hi)):
        lo = hi
    for _ in range(BISECTION_STEPS):  # largest scale whose snapped ratios fit (fits(lo) holds, or lo = 0)
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(snapped(mid)) else (lo, mid)
    ratios = snapped(lo)
    if not fits(ratios):
        return _make(groups, ratios, bits)  # even the narrowest scaled network is over: evaluated as infeasible
    lost = np.minimum(1.0, proposed * lo) - ratios
    for i in np.argsort(-lost, kind="stable"):  # fill what the snapping left, largest loss first
        position = int(np.searchsorted(grid, ratios[i] + 1e-9, side="right"))
        if position < len(grid):
            trial = ratios.copy()
            trial[i] = grid[position]
            if fits(trial):
                ratios = trial
    repaired = _make(groups, ratios, bits)
    proposed_costs = cost_model(candidate)
    if budget.met_by(proposed_costs) and proposed_costs[budget.metric] >= cost_model(repaired)[budget.metric]:
        return candidate  # already as close to the budget (an allocator's exact answer off the grid): kept as proposed
    return repaired


def _make(groups: list[str], ratios: np.ndarray, bits: dict[str, int]) -> Candidate:
    return Candidate.make({g: float(r) for g, r in zip(groups, ratios)}, bits or None)
