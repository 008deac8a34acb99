"""The one Pareto-front and hypervolume implementation (accuracy up, cost down), shared by
reports, plots and comparisons."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def pareto_front(costs: Sequence[float], accuracies: Sequence[float]) -> np.ndarray:
    """Indices of the non-dominated points, by increasing cost. A point is dominated when another
    costs no more and is at least as accurate, and is strictly better in one of the two."""
    costs, accs = np.asarray(costs, dtype=float), np.asarray(accuracies, dtype=float)
    order = np.lexsort((-accs, costs))  # cost ascending, then accuracy descending
    front, best = [], -np.inf
    for i in order:
        if accs[i] > best:
            front.append(i)
            best = accs[i]
    return np.array(front, dtype=int)


def hypervolume(costs: Sequence[float], accuracies: Sequence[float], ref_cost: float = 1.0, ref_accuracy: float = 0.0) -> float:
    """Area dominated by the points inside the box cost <= ref_cost, accuracy >= ref_accuracy
    (costs as fractions of the unpruned network, accuracies as fractions: at most 1)."""
    costs, accs = np.asarray(costs, dtype=float), np.asarray(accuracies, dtype=float)
    inside = (costs <= ref_cost) & (accs >= ref_accuracy)
    if not inside.any():
        return 0.0
    c, a = costs[inside], accs[inside]
    front = pareto_front(c, a)
    area = 0.0
    for k, i in enumerate(front):
        right = c[front[k + 1]] if k + 1 < len(front) else ref_cost
        area += (right - c[i]) * (a[i] - ref_accuracy)
    return float(area)


def best_within(costs: Sequence[float], accuracies: Sequence[float], limit: float) -> int | None:
    """Index of the most accurate point costing at most ``limit`` (cheapest among equals), or None."""
    costs, accs = np.asarray(costs, dtype=float), np.asarray(accuracies, dtype=float)
    ok = np.flatnonzero(costs <= limit * (1 + 1e-9))
    if len(ok) == 0:
        return None
    return int(ok[np.lexsort((costs[ok], -accs[ok]))[0]])
