"""Running searches for a task: the baseline, the shared evaluator, the run store, and one
search per (strategy, seed, budget)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

import automlprune
from automlprune.baseline import ensure_baseline
from automlprune.cost import CostModel, Costs
from automlprune.evaluator import EvalResult, Evaluator
from automlprune.latency_table import LatencyTable, measure_latency_table
from automlprune.progress import Progress
from automlprune.search import STRATEGIES
from automlprune.search.base import SearchContext, SearchOutcome, run_strategy
from automlprune.search.budget import Budget, check_achievable
from automlprune.search.store import UNPRUNED_STUDY, RunStore
from automlprune.search.tolerance import build_strategy
from automlprune.self_check import check_space
from automlprune.tasks import Task
from automlprune.train import distributed


@dataclass(frozen=True)
class StageInput:
    """What a pipeline stage searches instead of the task's baseline (:mod:`automlprune.search.pipeline`):
    ``network``, the network the earlier stages handed on (materialized, fine-tuned); ``bits`` and
    ``sparsity``, the settings they gave its layers (:meth:`SearchSpace.carry`); ``reference``, the
    unpruned network's costs, which every relative cost and budget is measured against;
    ``teacher``, the unpruned network (fine-tunes distil from it); ``prefix``, put before the
    stage's study names."""

    network: nn.Module
    bits: Mapping[str, int]
    sparsity: Mapping[str, tuple[str, float]]
    reference: Costs
    teacher: nn.Module
    prefix: str


@dataclass
class SearchSession:
    """A task's baseline, space, cost model, evaluator and run store, ready to run searches
    (``stage``: a pipeline stage's network and frame instead of the baseline)."""

    task: Task
    device: torch.device
    store: RunStore
    space_name: str | None = None
    progress: bool = True
    stage: StageInput | None = None
    model: Any = field(init=False)

    def __post_init__(self) -> None:
        for name, options in self.task.spec.strategies.items():
            STRATEGIES.get(name).check_options(options)
        stage = self.stage
        self.model = ensure_baseline(self.task, self.device, progress=self.progress) if stage is None else stage.network.to(self.device)
        self.space = self.task.search_space(self.model, self.space_name)
        if stage is not None:
            self.space.carry(stage.bits, stage.sparsity)
        self.cost_model = CostModel(self.space, self.model)
        check_space(self.space, self.model, self.task.data.example_input(), self.cost_model)  # before any search uses it
        if stage is not None:
            self.cost_model.rebase(stage.reference)
        self.teacher = None if stage is None else stage.teacher
        self.evaluator = Evaluator(self.model, self.space, self.task.data, self.task.spec.evaluation, self.device,
                                   cost_model=self.cost_model, teacher=self.teacher)
        self._evaluators = {self.evaluator.settings: self.evaluator}

    def evaluator_for(self, strategy: str) -> Evaluator:
        """The evaluator a strategy's candidates are scored and fine-tuned with: the task's, or,
        for a strategy with its own evaluation settings (e.g. its importance criterion), one
        built once with them (same data, seed and cost model)."""
        settings = STRATEGIES.get(strategy).evaluation_settings(self.task.spec.evaluation)
        if settings not in self._evaluators:
            self._evaluators[settings] = Evaluator(self.model, self.space, self.task.data, settings, self.device,
                                                   cost_model=self.cost_model, teacher=self.teacher)
        return self._evaluators[settings]

    def prepare(self, budgets: Sequence[Budget]) -> None:
        """Attach the latency table when a budget needs it: reloaded from the run directory (so a
        resumed run keeps its numbers), else measured once (at the evaluation's ``latency_batch``,
        on this device) and saved there."""
        if self.cost_model.latency_table is not None or all(b.metric != "latency" for b in budgets):
            return
        batch = self.evaluator.settings.latency_batch
        path = self.store.run_dir / "latency_table.json"  # one per run: the evaluation settings, batch included, are the run's
        with distributed.main_first():  # several training processes: rank 0 measures, the others read its table
            table = LatencyTable.load(path) if path.is_file() else None
            if table is None or table.device != str(self.device) or table.batch_size != batch:
                table = measure_latency_table(self.model, self.space, self.device, batch_size=batch, progress=self.progress)
                table.save(path)
        self.cost_model.attach_latency_table(table)

    def check_budgets(self, budgets: Sequence[Budget]) -> None:
        """Refuse impossible budgets (after attaching the latency table if one is needed)."""
        self.prepare(budgets)
        for budget in budgets:
            check_achievable(budget, self.cost_model)

    def save_config(self, strategies: Sequence[str], budgets: Sequence[Budget], seeds: Sequence[int],
                    max_evals: int, time_limit: float | None, options: dict[str, Any]) -> None:
        self.store.save_config({
            "task": self.task.spec.to_dict(), "space": self.space.config.to_dict(), "strategies": list(strategies),
            "budgets": [b.label for b in budgets], "seeds": list(seeds), "max_evals": max_evals, "time_limit": time_limit,
            "options": options, "evaluator_seed": self.evaluator.seed,
            "versions": {"automlprune": automlprune.__version__, "torch": str(torch.__version__)},
        })

    def record_unpruned(self) -> float:
        """The unpruned network's validation accuracy (a fraction), stored once per run (the
        reference point of the plots and of accuracy tolerances; one evaluation, about a second)."""
        with distributed.main_first():  # several training processes: rank 0 evaluates and stores, the others read
            study = self.store.study(UNPRUNED_STUDY)
            if self.store.summary(study).val_accuracy is None:
                self.store.update_summary(study, val_accuracy=self.evaluator.evaluate(self.space.full()).accuracy)
            return float(self.store.summary(study).val_accuracy)

    def run(self, strategy: str, budget: Budget, seed: int, max_evals: int, time_limit: float | None = None,
            options: dict[str, Any] | None = None) -> SearchOutcome:
        """One search; resumes the stored one of the same strategy, budget and seed if any."""
        self.check_budgets([budget])
        budget = budget.with_reference(self.record_unpruned())
        cls = STRATEGIES.get(strategy)
        name = (self.stage.prefix if self.stage else "") + RunStore.study_name(strategy, budget.label, seed)
        attrs = {"task": self.task.spec.name, "strategy": strategy, "budget": budget.label, "seed": seed,
                 "automlprune_version": automlprune.__version__, "torch_version": str(torch.__version__)}
        if self.stage is not None:
            attrs["pipeline_stage"] = self.stage.prefix.rstrip("/")
        with distributed.main_first():  # rank 0 makes the study; other training processes open it
            study = self.store.study(name, attrs if distributed.is_main() else None)
        evaluator = self.evaluator_for(strategy)
        if distributed.is_main():
            self.store.update_summary(study, scoring_seconds=evaluator.scoring_seconds)  # shared by every search of this evaluator
        context = SearchContext(self.space, self.cost_model, study, evaluator.scores, self.model, self.store.artifacts,
                                self.task.data, self.device, evaluator.scores_under, evaluator.validation_accuracy)
        options = {**self.task.spec.strategies.get(strategy, {}), **(options or {})}
        instance = build_strategy(cls, context, budget, seed, max_evals, options)
        reporter = _SearchProgress(f"{strategy} {budget.label} seed {seed}", max_evals, self.progress and distributed.is_main(),
                                   budget.metric if budget.tolerance else None)
        try:
            outcome = run_strategy(instance, evaluator, self.store, study, max_evals=max_evals, time_limit=time_limit,
                                   attrs=attrs, progress=reporter,
                                   run_settings=json.dumps({"options": options, "max_evals": max_evals}, sort_keys=True, default=str))
        finally:
            reporter.close()
        if outcome.stopped and self.progress and distributed.is_main():
            print(f"{strategy} {budget.label} seed {seed} stopped after {outcome.evaluations} of {max_evals} evaluations: "
                  f"{outcome.stopped}", file=sys.stderr, flush=True)
        return outcome


class _SearchProgress(Progress):
    """The search loop's progress callback: evaluations done and the best feasible accuracy."""

    def __init__(self, label: str, total: int, enabled: bool, tolerance_metric: str | None = None) -> None:
        super().__init__(label, total, "eval", enabled)
        self.label, self.tolerance_metric = label, tolerance_metric

    def __call__(self, done: int, total: int, best: EvalResult | None, elapsed: float) -> None:
        if self.tolerance_metric:  # an accuracy tolerance: the cheapest accepted so far
            metric = self.tolerance_metric
            best_text = f"{best.accuracy:.4f} at {best.relative[metric]:.1%} {metric}" if best else "none accepted yet"
            what = "cheapest accepted"
        else:
            best_text = f"{best.accuracy:.4f}" if best else "none feasible yet"
            what = "best feasible accuracy"
        self.update(done, f"{self.label}: {done}/{total} evaluations, {what} {best_text}, {elapsed:.0f}s", best=best_text)
