"""Reading a run back from its store: one :class:`SearchRecord` per (strategy, budget, seed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from automlprune.evaluator import EvalResult
from automlprune.search.budget import BoundBudget, parse_label
from automlprune.search.store import RunStore, RunSummary


@dataclass
class SearchRecord:
    """One stored search. ``points`` are its evaluations in order; ``answer`` the strategy's
    answer (an :class:`EvalResult` dict); ``finetune`` and ``latency_ms`` are filled by ``compare``;
    ``scoring_seconds`` is the one-off channel scoring of the strategy's evaluator (seconds), shared
    by all its searches and not part of :attr:`seconds`."""

    study_name: str
    strategy: str
    budget: BoundBudget
    seed: int
    points: list[EvalResult]
    elapsed_s: list[float]
    answer: dict[str, Any] | None
    finetune: dict[str, Any] | None = None
    latency_ms: dict[str, float] | None = None
    scoring_seconds: float | None = None
    spent: dict[str, float] | None = None
    """What the strategy spent besides evaluations (training seconds, steps, images)."""
    stopped: str | None = None
    """Why the search ended before its evaluation budget (:attr:`RunSummary.stopped`)."""

    @property
    def metric(self) -> str:
        return self.budget.metric

    @property
    def evaluations(self) -> int:
        return len(self.points)

    @property
    def seconds(self) -> float:
        return max(self.elapsed_s, default=0.0)

    def cost_fractions(self, full_only: bool = False) -> list[float]:
        """Each evaluation's budget metric as a fraction of the unpruned network's (``full_only``:
        of the full-fidelity evaluations only, leaving out screenings)."""
        return [p.relative[self.metric] for p in self.points if p.full or not full_only]

    def accuracies(self, full_only: bool = False) -> list[float]:
        """Each evaluation's validation accuracy (``full_only``: see :meth:`cost_fractions`)."""
        return [p.accuracy for p in self.points if p.full or not full_only]

    def feasible(self) -> list[bool]:
        """Whether each evaluation met the budget in a full evaluation (a screening never
        competes for the answer: :mod:`automlprune.search.screening`); for an accuracy tolerance,
        whether it was accurate enough."""
        return [self.budget.accepts(p) for p in self.points]


def _bound_budget(attrs: dict[str, Any], summary: RunSummary, records: list) -> BoundBudget:
    """The search's budget as stored; runs written before budgets were stored as data recover
    the unpruned amount from a stored evaluation's relative cost."""
    if summary.bound_budget is not None:
        return BoundBudget.from_dict(summary.bound_budget)
    budget = parse_label(attrs["budget"])
    point = next((r.result for r in records if r.result.relative.get(budget.metric)), None)
    base = point.costs[budget.metric] / point.relative[budget.metric] if point is not None else float("nan")
    return budget.bind(base)


def _evaluations(store: RunStore, study: Any, summary: RunSummary) -> tuple[list, list[float]]:
    """A search's stored evaluations and their elapsed search times (s); for a pipeline in a
    comparison (:meth:`~automlprune.search.pipeline.PipelineRun.record`), every stage's in order,
    each stage's times after the stages before it."""
    import optuna

    stages = (summary.stage or {}).get("stages")
    if not stages:
        records = store.records(study)
        return records, [r.elapsed_s for r in records]
    records, elapsed, offset = [], [], 0.0
    for name in stages:
        stage = optuna.load_study(study_name=name, storage=store.storage)
        mine = store.records(stage)
        records += mine
        elapsed += [offset + r.elapsed_s for r in mine]
        offset += float(store.summary(stage).search_seconds or max((r.elapsed_s for r in mine), default=0.0))
    return records, elapsed


def collect(store: RunStore) -> list[SearchRecord]:
    """Every search of the run, in (strategy, budget, seed) order."""
    import optuna

    out = []
    for name in store.study_names():
        study = optuna.load_study(study_name=name, storage=store.storage)
        attrs = study.user_attrs
        if "strategy" not in attrs or "pipeline_stage" in attrs:  # a pipeline's stages are read through the pipeline's own study
            continue
        summary = store.summary(study)
        points, elapsed = _evaluations(store, study, summary)
        out.append(SearchRecord(name, attrs["strategy"], _bound_budget(attrs, summary, points), int(attrs["seed"]),
                                [r.result for r in points], elapsed, summary.answer,
                                summary.finetune, summary.latency_ms, summary.scoring_seconds, summary.spent, summary.stopped))
    return sorted(out, key=lambda r: (r.strategy, r.budget.metric, r.budget.value, r.seed))
