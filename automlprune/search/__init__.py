"""Search strategies (registered by name), budgets, the run store and the search loop."""

from automlprune.registry import Registry

STRATEGIES: Registry = Registry("strategy")

for _name, _entry, _desc in [
    ("uniform", "baselines:UniformStrategy", "one keep ratio for every group, by bisection to the budget"),
    ("random", "baselines:RandomStrategy", "random feasible candidates from the grid"),
    ("greedy", "baselines:GreedyStrategy", "per-group sensitivity, then greedy allocation to the budget (AIMET/NetAdapt style)"),
    ("global", "baselines:GlobalStrategy", "one importance ranking of channels across groups, cut to the budget"),
    ("optuna-tpe", "optuna_strategies:TPEStrategy", "Optuna multivariate TPE, accuracy vs cost with the budget as constraint"),
    ("optuna-nsga2", "optuna_strategies:NSGA2Strategy", "Optuna NSGA-II, accuracy vs cost with the budget as constraint"),
    ("optuna-nsga3", "optuna_strategies:NSGA3Strategy", "Optuna NSGA-III, accuracy vs cost with the budget as constraint"),
    ("optuna-random", "optuna_strategies:RandomSamplerStrategy", "Optuna's random sampler (refuses over-budget proposals)"),
    ("optuna-qmc", "optuna_strategies:QMCStrategy", "Optuna's quasi-Monte-Carlo sampler"),
    ("optuna-gp", "optuna_strategies:GPStrategy", "Optuna's Gaussian-process sampler with the budget as constraint"),
]:
    STRATEGIES.register(_name, f"automlprune.search.{_entry}", description=_desc)

__all__ = ["STRATEGIES"]
