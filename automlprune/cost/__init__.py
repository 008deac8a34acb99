"""Costs: the metric registry (:mod:`.metrics`) and the one cost model (:mod:`.model`)."""

from automlprune.cost.metrics import METRICS, Metric, analytic_metrics, budget_metrics, differentiable_metrics
from automlprune.cost.model import (CostModel, Costs, MissingMetric, count_macs, largest_within, relative_costs,
                                    uniform_density_for_budget, uniform_ratio_for_budget)

__all__ = ["METRICS", "CostModel", "Costs", "Metric", "MissingMetric", "analytic_metrics", "budget_metrics",
           "count_macs", "differentiable_metrics", "largest_within", "relative_costs", "uniform_density_for_budget", "uniform_ratio_for_budget"]
