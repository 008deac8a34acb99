"""Optuna samplers as strategies: multi-objective (accuracy up, budget metric down) with the
budget as Optuna's constraint. By default every proposal is moved to the budget along its shape
before it is evaluated (:mod:`automlprune.search.repair`), so the sampler searches allocations
and each evaluated network uses its budget; the trial keeps the sampled parameters and is told
the repaired network's accuracy and cost. With ``repair=false``, proposals over the budget are
refused on their (analytic) cost without spending an evaluation: they are told to the study with
accuracy 0, the constraint violated and ``evaluated = False``, so the sampler learns to avoid
them; reports ignore them."""

from __future__ import annotations

import warnings
from typing import Any, Callable, ClassVar

import optuna
from optuna.distributions import BaseDistribution, IntDistribution
from optuna.trial import FrozenTrial

from automlprune.search.base import Strategy
from automlprune.search.store import NATIVE_CONSTRAINTS, RunStore, distributions, from_params, mark_worker, to_params
from automlprune.search.warm_start import warm_start_candidates
from automlprune.proposal import Proposal
from automlprune.space import Candidate

MAX_REFUSED_IN_A_ROW = 500
WARM_START = "warm_start"
"""User attribute of an enqueued warm-start trial: the allocator's exact candidate, evaluated as it is."""


def _constraints(trial: FrozenTrial) -> list[float]:
    return [float(trial.user_attrs.get("constraint", 0.0))]


def _sampler(kind: str, seed: int, max_evals: int) -> optuna.samplers.BaseSampler:
    constraints = None if NATIVE_CONSTRAINTS else _constraints
    samplers: dict[str, Callable[[], optuna.samplers.BaseSampler]] = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, multivariate=True, constraints_func=constraints,
                                                  n_startup_trials=min(10, max(2, max_evals // 4))),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed, constraints_func=constraints,
                                                      population_size=max(4, min(50, max_evals // 4))),
        "nsga3": lambda: optuna.samplers.NSGAIIISampler(seed=seed, constraints_func=constraints,
                                                        population_size=max(4, min(50, max_evals // 4))),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed, constraints_func=constraints),
    }
    with warnings.catch_warnings():  # NSGA-III and QMC are marked experimental by Optuna; we offer them knowingly
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return samplers[kind]()


class OptunaStrategy(Strategy):
    """Base of the Optuna-backed strategies; ``sampler_kind`` picks the sampler."""

    replays_on_resume = False
    workers = "shared"
    repairs = True
    sampler_kind: ClassVar[str] = "tpe"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.context.study is None:
            raise ValueError("Optuna strategies need the run's study in their context")
        self.study = self.context.study
        self.study.sampler = _sampler(self.sampler_kind, self.seed, self.max_evals)
        self.dists = distributions(self.space)
        if self.warm_start and not self.study.trials:  # a fresh study: the allocators' answers come first
            for candidate in warm_start_candidates(self, self.warm_start):  # the exact answer rides along (it may lie off the grid)
                self.study.enqueue_trial(to_params(self.space, candidate), user_attrs={WARM_START: candidate.to_dict()},
                                         skip_if_exists=True)

    def ask(self) -> Candidate | Proposal | None:
        for _ in range(MAX_REFUSED_IN_A_ROW):
            trial = self.study.ask()
            mark_worker(trial)  # before its sampler runs (seconds for GP): other workers fail a trial untagged for 2 s
            _sample(trial, self.dists)
            warm = trial.user_attrs.get(WARM_START)
            candidate = Candidate.from_dict(warm) if warm else from_params(self.space, trial.params)
            costs = self.cost_model(candidate)
            if self.repair or self.budget.met_by(costs):
                self.pending_trial = trial
                return Proposal(candidate, as_proposed=True) if warm else candidate
            RunStore.refuse(self.study, trial, candidate, violation=self.budget.violation(costs),
                            cost_fraction=self.budget.cost_fraction(costs))
        self.stopped = (f"its sampler proposed {MAX_REFUSED_IN_A_ROW} networks in a row over {self.budget.label} "
                        "(repair is off: option repair=true moves proposals to the budget)")
        return None


def _sample(trial: optuna.Trial, dists: dict[str, BaseDistribution]) -> None:
    """Sample the trial's parameters, as ``study.ask(dists)`` would (the sampler's relative
    sampling runs at the first suggestion)."""
    for name, dist in dists.items():
        if isinstance(dist, IntDistribution):
            trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            trial.suggest_categorical(name, dist.choices)


def _make(kind: str) -> type[OptunaStrategy]:
    return type(f"Optuna{kind.upper()}Strategy", (OptunaStrategy,), {"name": f"optuna-{kind}", "sampler_kind": kind,
                                                                    "__doc__": f"Optuna's {kind} sampler (see module docstring)."})


TPEStrategy = _make("tpe")
NSGA2Strategy = _make("nsga2")
NSGA3Strategy = _make("nsga3")
RandomSamplerStrategy = _make("random")
QMCStrategy = _make("qmc")
GPStrategy = _make("gp")
