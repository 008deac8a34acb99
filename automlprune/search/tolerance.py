"""Accuracy tolerances (``--budget accuracy_drop=0.5``) for the strategies that answer a cost budget.

A tolerance asks for the cheapest network whose validation accuracy, as the shared evaluator
measures it, is at most the given points below the unpruned network's
(:mod:`automlprune.search.budget`). Strategies take it in one of two ways, declared by their
``takes_tolerance``:

* ``"native"``: the strategy steers by the tolerance itself (``play-and-prune``'s pruning-rate
  controller) and is built with the tolerance budget.
* ``"bisect"``: a one-shot allocator (``uniform``, ``global``, ``global-magnitude``, ``prunenet``,
  the Torch-Pruning anchors) is asked for its answer under cost budgets, bisected over the cost
  fraction of the tolerance's metric (:class:`ToleranceBisection`): the first evaluation is the
  unpruned network (served from the evaluator's cache, accepted by definition), then each step
  halves the interval between the largest fraction refused and the smallest accepted, until it is
  :data:`RESOLUTION` of the unpruned cost wide or the evaluation budget (``--evals``) is spent.
  Accuracy is assumed to rise with the cost budget (true of these allocators up to evaluation
  noise); the answer is the cheapest accepted evaluation, whichever step made it. Every step is an
  evaluation in the search's study, so a resumed run replays them from the evaluator's cache.

Search strategies (random, the Optuna samplers, RL, DMCP, the training-time methods that train
to a cost budget) maximize accuracy under a cost limit and are refused with one sentence
(:meth:`~automlprune.search.base.Strategy.check_budgets`): bisecting a whole search per step would
multiply its cost by the number of steps without saying so.
"""

from __future__ import annotations

from typing import Any

from automlprune.errors import ConfigError
from automlprune.evaluator import EvalResult
from automlprune.proposal import Proposal
from automlprune.search.base import SearchContext, Strategy
from automlprune.search.budget import Budget
from automlprune.space import Candidate

RESOLUTION = 0.005
"""Width (fraction of the unpruned network's cost) at which the bisection stops."""


class ToleranceBisection(Strategy):
    """A one-shot allocator under an accuracy tolerance, by bisection over its cost budget (see the
    module docstring). ``inner``: the allocator's class; ``options``: its options."""

    uses_seed = False

    def __init__(self, inner: type[Strategy], context: SearchContext, budget: Budget, seed: int = 0, max_evals: int = 50,
                 **options: Any) -> None:
        inner.check_options(options)
        super().__init__(context, budget, seed, max_evals)
        self.inner, self.inner_options = inner, options
        self.name = inner.name
        floor = self.cost_model(self.space.smallest())[self.budget.metric] / self.budget.base
        self.lo, self.hi = floor, 1.0
        """Largest cost fraction refused so far (the space's floor at the start), smallest accepted."""
        self.fraction: float | None = None
        """The cost fraction of the pending proposal (None: the unpruned network)."""
        self.steps: list[dict[str, Any]] = []
        self._started = False

    def ask(self) -> Candidate | Proposal | None:
        if not self._started:
            self._started = True
            self.fraction = None
            return self.space.full()
        while self.hi - self.lo > RESOLUTION:
            fraction = (self.lo + self.hi) / 2
            try:
                allocator = self.inner(self.context, Budget(self.budget.metric, fraction, True), self.seed, 1, **self.inner_options)
                asked = allocator.ask()
            except ConfigError as error:  # e.g. no uniform ratio reaches this fraction: treat it as refused
                self.steps.append({"fraction": fraction, "accepted": False, "why": str(error)})
                self.lo = fraction
                continue
            if asked is None:
                self.lo = fraction
                continue
            self.fraction = fraction
            return asked
        return None

    def tell(self, candidate: Candidate | Proposal, result: EvalResult) -> None:
        super().tell(candidate, result)
        if self.fraction is None:
            return
        accepted = self.budget.accepts(result)
        self.steps.append({"fraction": self.fraction, "accepted": accepted, "accuracy": result.accuracy,
                           "cost_fraction": self.budget.cost_fraction(result.costs)})
        if accepted:
            self.hi = self.fraction
        else:
            self.lo = max(self.lo, self.fraction)
        self.spent = {"bisection_steps": float(len(self.steps))}


def build_strategy(cls: type[Strategy], context: SearchContext, budget: Budget, seed: int, max_evals: int,
                   options: dict[str, Any]) -> Strategy:
    """The strategy instance for one search: ``cls`` itself, or, under an accuracy tolerance, the
    bisection around it when ``cls`` takes tolerances that way."""
    cls.check_budgets([budget])
    if budget.tolerance and cls.takes_tolerance == "bisect":
        return ToleranceBisection(cls, context, budget, seed=seed, max_evals=max_evals, **options)
    return cls(context, budget, seed=seed, max_evals=max_evals, **options)
