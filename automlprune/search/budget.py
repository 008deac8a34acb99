"""Budgets: a cost metric and a limit, as a fraction of the unpruned network or an absolute value.

Written ``macs=0.5`` (half the unpruned MACs), ``params=1.2M`` or ``bytes=250k`` (absolute),
``latency=0.6`` (60% of the unpruned network's predicted latency) or ``latency=2.5ms``,
several at once as ``macs=0.3,0.5,0.7`` (a value without a metric takes the previous one's).
The metrics are the budgetable ones of the registry (:mod:`automlprune.cost.metrics`).
Latency budgets use the per-layer latency table (:mod:`automlprune.latency_table`).

An accuracy tolerance is the other kind of budget: ``accuracy_drop=0.5`` asks for the cheapest
network (in MACs; ``accuracy_drop=0.5@params`` in another metric) whose validation accuracy is at
most 0.5 points below the unpruned network's, measured by the shared evaluator on validation data
(never test data). Such a budget has no cost limit; its answer is the cheapest accepted result
(:meth:`BoundBudget.accepts`, :func:`~automlprune.search.base.best_feasible`), and it is bound to the
unpruned network's validation accuracy (:meth:`Budget.with_reference`) before a search starts.
Strategies take it natively (``play-and-prune``) or through a bisection over cost budgets
(one-shot allocators; :mod:`automlprune.search.tolerance`).

A :class:`Budget` is what the user wrote; bound to the unpruned network's amount of its metric
(:meth:`Budget.bind`) it becomes a :class:`BoundBudget`, which checks costs on its own and is
stored as data with every search (so reports never re-parse labels or rebuild the network).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

from automlprune.cost import Costs, CostModel, budget_metrics
from automlprune.cost.metrics import metric as metric_info
from automlprune.errors import ConfigError

TOLERANCE = 1e-9
"""Relative slack on a budget's limit, so float rounding never rejects a candidate exactly at it."""
_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}
ACCURACY_DROP = "accuracy_drop"
"""The budget kind of an accuracy tolerance (points of validation accuracy below the unpruned network)."""
TOLERANCE_METRIC = "macs"
"""The cost an accuracy tolerance minimizes unless its label names another (``accuracy_drop=0.5@params``)."""
_VALUE = re.compile(r"^\s*(?P<num>[-+]?[0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(?P<suffix>ms|[kmg]?)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """metric: a budgetable metric of the registry. value: a fraction of the unpruned
    network's cost when ``relative``, else an absolute amount in the metric's units
    (milliseconds for latency).

    accuracy_drop: for an accuracy tolerance, the points (of %) of validation accuracy the answer may
    lose against the unpruned network (then ``metric`` is the cost minimized and the cost limit is
    the unpruned network's, ``value`` 1); reference_accuracy: the unpruned network's validation
    accuracy (a fraction in [0, 1]) once bound by :meth:`with_reference`."""

    metric: str
    value: float
    relative: bool
    accuracy_drop: float | None = None
    reference_accuracy: float | None = None

    @property
    def tolerance(self) -> bool:
        """Whether this is an accuracy tolerance (``accuracy_drop``), not a cost limit."""
        return self.accuracy_drop is not None

    def with_reference(self, accuracy: float) -> "Budget":
        """This tolerance bound to the unpruned network's validation ``accuracy`` (a fraction); a
        cost budget is returned unchanged."""
        return replace(self, reference_accuracy=float(accuracy)) if self.tolerance else self

    @property
    def min_accuracy(self) -> float:
        """The lowest validation accuracy (a fraction) a tolerance accepts."""
        if self.reference_accuracy is None:
            raise RuntimeError(f"budget {self.label} is not bound to the unpruned network's accuracy; call with_reference first")
        return self.reference_accuracy - self.accuracy_drop / 100.0

    @property
    def label(self) -> str:
        if self.tolerance:
            return f"{ACCURACY_DROP}={self.accuracy_drop:g}" + ("" if self.metric == TOLERANCE_METRIC else f"@{self.metric}")
        if self.relative:
            return f"{self.metric}={self.value:g}"
        return f"{self.metric}={self.value:.6g}ms" if self.metric == "latency" else f"{self.metric}={self.value:.6g}abs"

    @property
    def slug(self) -> str:
        """The label as a file-name part: ``macs=0.5`` -> ``macs0p5``."""
        return self.label.replace("=", "").replace(".", "p").replace("@", "-")

    @property
    def unit(self) -> str:
        return metric_info(self.metric).unit

    def bind(self, base: Costs | float) -> "BoundBudget":
        """This budget for a network whose unpruned amount of the metric is ``base`` (a number,
        or the unpruned network's :class:`Costs`)."""
        amount = base[self.metric] if isinstance(base, Costs) else float(base)
        return BoundBudget(self.metric, self.value, self.relative, self.accuracy_drop, self.reference_accuracy, amount)


@dataclass(frozen=True)
class BoundBudget(Budget):
    """A budget bound to the unpruned network's amount ``base`` of its metric (its unit)."""

    base: float = float("nan")

    @property
    def limit(self) -> float:
        """The budget in absolute units of its metric."""
        return self.value * self.base if self.relative else self.value

    @property
    def fraction(self) -> float:
        """The limit as a fraction of the unpruned network's cost."""
        return self.limit / self.base

    def bind(self, base: Costs | float) -> "BoundBudget":
        return Budget(self.metric, self.value, self.relative, self.accuracy_drop, self.reference_accuracy).bind(base)

    def fits(self, amount: float) -> bool:
        """Whether ``amount`` (absolute units of the metric) is within the budget."""
        return amount <= self.limit * (1 + TOLERANCE)

    def met_by(self, costs: Costs) -> bool:
        """Whether ``costs`` are within the cost limit (for a tolerance: not above the unpruned network's)."""
        return self.fits(costs[self.metric])

    def accepts(self, result: Any) -> bool:
        """Whether an evaluation result (an :class:`~automlprune.evaluator.EvalResult`) can answer
        this budget: a full evaluation within the cost limit and, for a tolerance, at least
        :attr:`min_accuracy` on validation data."""
        return result.full and self.met_by(result.costs) and (not self.tolerance or result.accuracy >= self.min_accuracy - TOLERANCE)

    def violation(self, costs: Costs) -> float:
        """cost / limit - 1: at most 0 when ``costs`` meet the budget (Optuna's constraint convention)."""
        return costs[self.metric] / self.limit - 1.0

    def cost_fraction(self, costs: Costs) -> float:
        """``costs`` of the budget's metric as a fraction of the unpruned network's."""
        return costs[self.metric] / self.base

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label, "unit": self.unit, "limit": self.limit}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BoundBudget":
        drop, reference = data.get("accuracy_drop"), data.get("reference_accuracy")
        return cls(str(data["metric"]), float(data["value"]), bool(data["relative"]),
                   None if drop is None else float(drop), None if reference is None else float(reference), float(data["base"]))


def parse_budget(text: str, default_metric: str | None = None, bare_amounts: bool = False) -> Budget:
    """One budget from ``metric=value`` (or ``value`` when ``default_metric`` is given): a bare
    number in (0, 1] is a fraction of the unpruned network; an amount needs a unit (``20M``,
    ``1.5k``, latency ``3ms``), so ``macs=1.5`` is refused rather than read as 1.5 MACs
    (``bare_amounts``: accept bare amounts above 1, as stored labels write them)."""
    metric, sep, raw = text.strip().partition("=")
    if metric.strip().lower() == ACCURACY_DROP:
        return _parse_tolerance(text, raw)
    if not sep:
        if default_metric is None:
            raise ConfigError(f"budget '{text}' is not of the form metric=value, e.g. macs=0.5")
        metric, raw = default_metric, text
    metric = metric.strip().lower()
    if metric not in budget_metrics():
        raise ConfigError(f"unknown budget metric '{metric}' in '{text}'; use one of: {', '.join(budget_metrics())}")
    match = _VALUE.match(raw)
    if not match:
        raise ConfigError(f"budget value '{raw.strip()}' in '{text}' is not a number; write a fraction like 0.5 or an amount like 20M")
    suffix = match["suffix"].lower()
    if suffix == "ms" and metric != "latency":
        raise ConfigError(f"'ms' is a unit of latency budgets only, not of '{text}'")
    value = float(match["num"]) * (1.0 if suffix == "ms" else _SUFFIX[suffix])
    relative = not suffix and value <= 1.0
    if value <= 0:
        raise ConfigError(f"budget '{text}' must be positive")
    if not suffix and value > 1.0 and not bare_amounts:
        unit = "ms" if metric == "latency" else "M"
        raise ConfigError(f"budget '{text}' is above 1: write a fraction of the unpruned network in (0, 1] like {metric}=0.5, "
                          f"or an amount with its unit like {metric}={match['num']}{unit}")
    return Budget(metric, value, relative)


def _parse_tolerance(text: str, raw: str) -> Budget:
    """``accuracy_drop=POINTS[@METRIC]``: see the module docstring."""
    points, _, metric = raw.partition("@")
    metric = (metric or TOLERANCE_METRIC).strip().lower()
    if metric not in budget_metrics():
        raise ConfigError(f"unknown cost metric '{metric}' in '{text}'; an accuracy tolerance minimizes one of: {', '.join(budget_metrics())}")
    try:
        drop = float(points)
    except ValueError:
        raise ConfigError(f"accuracy tolerance '{text}' needs a number of points, e.g. accuracy_drop=0.5") from None
    if not 0 <= drop < 100:
        raise ConfigError(f"accuracy tolerance '{text}' must be in [0, 100) points of validation accuracy")
    return Budget(metric, 1.0, True, accuracy_drop=drop)


def parse_label(label: str) -> Budget:
    """Inverse of :attr:`Budget.label` (absolute amounts end in ``abs``)."""
    return parse_budget(label[:-3] if label.endswith("abs") else label, bare_amounts=True)


def parse_budgets(text: str) -> list[Budget]:
    """Several budgets from ``macs=0.3,0.5,0.7``, ``macs=0.5,params=0.4`` or ``accuracy_drop=0.5,1``."""
    budgets, metric = [], None
    for part in filter(None, (p.strip() for p in text.split(","))):
        budget = parse_budget(part if metric != ACCURACY_DROP or "=" in part else f"{ACCURACY_DROP}={part}", metric)
        budgets.append(budget)
        metric = ACCURACY_DROP if budget.tolerance else budget.metric
    if not budgets:
        raise ConfigError("no budget given; write one like macs=0.5")
    if len({b.label for b in budgets}) != len(budgets):
        raise ConfigError(f"budget list '{text}' names the same budget twice")
    return budgets


def check_achievable(budget: Budget, cost_model: CostModel) -> None:
    """Refuse a budget below what the space's smallest candidate costs, naming that value."""
    bound = budget.bind(cost_model.base)
    smallest = cost_model(cost_model.space.smallest())[budget.metric]
    if not bound.fits(smallest):
        raise ConfigError(
            f"budget {budget.label} is impossible: the smallest network this space allows costs {smallest:.4g} "
            f"{budget.unit} ({smallest / bound.base:.1%} of the unpruned network); raise the budget or widen the space's ratios"
            + (" (weight sparsity lowers bytes, not the MACs PyTorch executes)" if cost_model.space.layer_patterns and budget.metric != "bytes" else "")
        )
