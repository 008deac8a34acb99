"""Reports of runs: Pareto fronts and hypervolume (one implementation), plots, comparison tables."""

from automlprune.report.pareto import best_within, hypervolume, pareto_front

__all__ = ["best_within", "hypervolume", "pareto_front"]
