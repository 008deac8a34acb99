"""Budgets: a cost metric and a limit, as a fraction of the unpruned network or an absolute value.

Written ``macs=0.5`` (half the unpruned MACs), ``params=1.2M`` or ``bytes=250k`` (absolute),
``latency=0.6`` (60% of the unpruned network's predicted latency) or ``latency=2.5ms``,
several at once as ``macs=0.3,0.5,0.7`` (a value without a metric takes the previous one's).
Latency budgets use the per-layer latency table (:mod:`automlprune.latency_table`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from automlprune.cost import BUDGET_METRICS, Costs, CostModel
from automlprune.errors import ConfigError

UNITS = {"macs": "MACs", "params": "parameters", "bytes": "bytes", "bitops": "BitOps", "latency": "ms (predicted)"}
TOLERANCE = 1e-9
"""Relative slack on a budget's limit, so float rounding never rejects a candidate exactly at it."""
_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}
_VALUE = re.compile(r"^\s*(?P<num>[0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(?P<suffix>ms|[kmg]?)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """metric: one of macs, params, bytes, bitops, latency. value: a fraction of the unpruned
    network's cost when ``relative``, else an absolute amount in the metric's units (see
    :mod:`automlprune.cost`; milliseconds for latency)."""

    metric: str
    value: float
    relative: bool

    @property
    def label(self) -> str:
        if self.relative:
            return f"{self.metric}={self.value:g}"
        return f"{self.metric}={self.value:.6g}ms" if self.metric == "latency" else f"{self.metric}={self.value:.6g}abs"

    def limit(self, base: Costs) -> float:
        """The budget in absolute units of its metric."""
        return self.limit_for(base.get(self.metric))

    def limit_for(self, base_amount: float) -> float:
        """The budget in absolute units, given the unpruned network's amount of the metric."""
        return self.value * base_amount if self.relative else self.value

    def fits(self, amount: float, base_amount: float) -> bool:
        """Whether ``amount`` (absolute units of the metric) is within the budget."""
        return amount <= self.limit_for(base_amount) * (1 + TOLERANCE)

    @property
    def slug(self) -> str:
        """The label as a file-name part: ``macs=0.5`` -> ``macs0p5``."""
        return self.label.replace("=", "").replace(".", "p")

    def fraction(self, base: Costs) -> float:
        """The budget as a fraction of the unpruned network's cost."""
        return self.limit(base) / base.get(self.metric)

    def violation(self, costs: Costs, base: Costs) -> float:
        """cost / limit - 1: at most 0 when ``costs`` meet the budget (Optuna's constraint convention)."""
        return costs.get(self.metric) / self.limit(base) - 1.0

    def met_by(self, costs: Costs, base: Costs) -> bool:
        return self.fits(costs.get(self.metric), base.get(self.metric))


def parse_budget(text: str, default_metric: str | None = None) -> Budget:
    """One budget from ``metric=value`` (or ``value`` when ``default_metric`` is given)."""
    metric, sep, raw = text.strip().partition("=")
    if not sep:
        if default_metric is None:
            raise ConfigError(f"budget '{text}' is not of the form metric=value, e.g. macs=0.5")
        metric, raw = default_metric, text
    metric = metric.strip().lower()
    if metric not in BUDGET_METRICS:
        raise ConfigError(f"unknown budget metric '{metric}' in '{text}'; use one of: {', '.join(BUDGET_METRICS)}")
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
    return Budget(metric, value, relative)


def parse_budgets(text: str) -> list[Budget]:
    """Several budgets from ``macs=0.3,0.5,0.7`` or ``macs=0.5,params=0.4``."""
    budgets, metric = [], None
    for part in filter(None, (p.strip() for p in text.split(","))):
        budget = parse_budget(part, metric)
        budgets.append(budget)
        metric = budget.metric
    if not budgets:
        raise ConfigError("no budget given; write one like macs=0.5")
    if len({b.label for b in budgets}) != len(budgets):
        raise ConfigError(f"budget list '{text}' names the same budget twice")
    return budgets


def check_achievable(budget: Budget, cost_model: CostModel) -> None:
    """Refuse a budget below what the space's smallest candidate costs, naming that value."""
    smallest = cost_model(cost_model.space.smallest()).get(budget.metric)
    base = cost_model.base.get(budget.metric)
    if not budget.fits(smallest, base):
        unit = UNITS[budget.metric]
        raise ConfigError(
            f"budget {budget.label} is impossible: the smallest network this space allows costs {smallest:.4g} "
            f"{unit} ({smallest / base:.1%} of the unpruned network); raise the budget or widen the space's ratios"
        )
