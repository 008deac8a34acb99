"""Compression pipelines: stages of one run, each searched on the network the stage before it
handed on (``automlprune pipeline TASK PIPELINE``; the files: :mod:`automlprune.search.pipeline_spec`).

A stage is one search (its strategy, options, space, budget and evaluations) in the run's store,
on the network the earlier stages left: the unpruned network for the first, then each stage's
answer (with the weights its strategy trained), fine-tuned when the stage asks for it and
materialized (fewer channels for real). What a stage decides besides channels is carried to the
later ones (:meth:`~automlprune.space.SearchSpace.carry`): a layer's weight bits and its weight
sparsity (the pattern and the density of the weights it still has) hold for every candidate of a
later stage that does not search that axis for that layer, so a bits stage after a sparsity
stage is costed and evaluated with the sparsity, and a later stage fine-tunes with the carried
masks and bit grids. The unpruned network stays the reference of every relative cost and budget
(``bytes=0.125`` in any stage is an eighth of the unpruned network's float32 size) and the
teacher of every fine-tune that distils.

Resuming: stage k's study is named ``<pipeline>/stage<k>-<name>@<digest>/<strategy>|<budget>|seed<s>``,
the digest covering stages 1..k and the seed (:meth:`PipelineSpec.digest`), and the network it
hands on is saved as the run artifact ``pipeline/stage<k>-<digest>.pt`` (weights, sparsity masks
and quantization record) once its fine-tune is done. A rerun reloads every finished stage from
its file and resumes the interrupted stage's search where its study stopped, so a crash in stage 2
never repeats stage 1; the same file with another final ``--budget`` shares the earlier stages.

Left open: latency budgets and accuracy tolerances in stages (refused with a sentence), layers
whose activations are quantized (activation bits are a space setting of the stage that sets
them, not carried), and a channel stage after a sparsity stage re-applies the carried density
to the narrower layer by the evaluator's weight criterion (the zeros the earlier stage left are
the weights it then removes first).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from automlprune.accuracy import split_accuracy
from automlprune.cost import Costs, CostModel
from automlprune.errors import ConfigError
from automlprune.quantization import RECORD_ATTRIBUTE
from automlprune.search.budget import Budget
from automlprune.search.pipeline_spec import PipelineSpec, finetune_settings
from automlprune.search.runner import SearchSession, StageInput
from automlprune.search.store import RunStore
from automlprune.sparsity.masks import SPARSITY_ATTRIBUTE, sparsity_record


@dataclass
class StageOutcome:
    """What one stage did: its ``answer`` (an :class:`~automlprune.evaluator.EvalResult` dict,
    costs relative to the unpruned network), its search (``evaluations``, ``seconds``,
    ``training_images`` its strategy trained on), the costs of its ``input`` network (fractions of
    the unpruned one), its fine-tune (``finetune``: epochs, val/test accuracy, seconds, images;
    None without one), where its network is saved, and the accuracies of that network
    (``val_accuracy``, ``test_accuracy``: fractions, after the fine-tune when there is one)."""

    index: int
    name: str
    strategy: str
    budget: str
    study_name: str
    answer: dict[str, Any]
    evaluations: int
    seconds: float
    training_images: float
    input: dict[str, float]
    finetune: dict[str, Any] | None
    network_path: str
    val_accuracy: float
    test_accuracy: float
    budget_fraction: float = float("nan")
    """The budget's limit as a fraction of the unpruned network's cost."""
    training_seconds: float = 0.0
    """Wall time the stage's strategy spent training (part of ``seconds``)."""
    network_candidate: dict[str, Any] = field(default_factory=dict)
    """The network this stage hands on, as a candidate of the unpruned network (:meth:`Candidate.to_dict`):
    each group's kept channels over the unpruned network's, every layer's bits and sparsity so far."""


@dataclass
class PipelineOutcome:
    """Every stage's outcome, and the final network (the last stage's, fine-tuned when asked)."""

    pipeline: PipelineSpec
    seed: int
    stages: list[StageOutcome]
    network: nn.Module = field(repr=False)
    unpruned_val_accuracy: float = float("nan")

    @property
    def final(self) -> StageOutcome:
        return self.stages[-1]

    @property
    def strategy(self) -> str:
        """The pipeline's name as a comparison lists it beside single strategies."""
        return f"{PIPELINE_PREFIX}{self.pipeline.name}"


PIPELINE_PREFIX = "pipeline:"
"""How ``compare --strategies`` names a pipeline (``pipeline:two-stage-drl``)."""


class PipelineRun:
    """Runs ``pipeline`` (with its last budget set) on ``base``'s task and store (see the module docstring)."""

    def __init__(self, base: SearchSession, pipeline: PipelineSpec, seed: int = 0, evals: int = 50, progress: bool = True) -> None:
        self.base, self.pipeline, self.seed, self.evals, self.progress = base, pipeline, seed, evals, progress
        self.store: RunStore = base.store
        self.reference: Costs = base.cost_model.base
        self.budgets: list[Budget] = [pipeline.budget(k) for k in range(len(pipeline.stages))]
        self.finetunes = [finetune_settings(stage, base.task.spec.finetune, f"pipeline '{pipeline.name}' stage '{stage.name}'")
                          for stage in pipeline.stages]
        self.check_spaces()

    # ---- checks -------------------------------------------------------------------------------
    def check_spaces(self) -> None:
        """Refuse a stage whose space cannot lower its budget's metric, judged on the unpruned
        network: its narrowest candidate costs no less than the full network."""
        from automlprune.space import SearchSpace

        example = self.base.task.data.example_input().to(next(self.base.model.parameters()).device)
        for stage, budget in zip(self.pipeline.stages, self.budgets):
            config = self.base.task.space_config(stage.space)
            space = SearchSpace(self.base.model, example, config)
            model = CostModel(space)
            smallest = model(space.smallest())
            lowers = [m for m in ("macs", "params", "bytes", "bitops") if smallest[m] < model.base[m] * (1 - 1e-9)]
            if budget.metric not in lowers:
                raise ConfigError(f"pipeline '{self.pipeline.name}' stage '{stage.name}' cannot lower {budget.metric}: its space "
                                  f"'{config.name}' changes only {', '.join(lowers) or 'nothing'}; budget the stage in "
                                  f"{' or '.join(lowers) or 'another metric'}, or give it a space that searches what lowers {budget.metric}")

    def _check_tighter(self, k: int, session: SearchSession) -> dict[str, float]:
        """The stage's input costs (fractions of the unpruned network); refuse a budget the input already meets."""
        stage, budget = self.pipeline.stages[k], self.budgets[k].bind(session.cost_model.base)
        costs = session.cost_model(session.space.full())
        relative = {m: costs[m] / self.reference[m] for m in costs if m in self.reference}
        if k and budget.fits(costs[budget.metric]):
            raise ConfigError(f"pipeline '{self.pipeline.name}' stage '{stage.name}' budget {stage.budget} is looser than what the "
                              f"earlier stages already reached ({relative[budget.metric]:.4g} of the unpruned {budget.metric}); "
                              f"tighten it below {relative[budget.metric]:.4g} or drop the stage")
        return relative

    # ---- running --------------------------------------------------------------------------------
    def run(self) -> PipelineOutcome:
        network, bits, sparsity = self.base.model, {}, {}
        unpruned = self.base.record_unpruned()
        outcomes: list[StageOutcome] = []
        for k, stage in enumerate(self.pipeline.stages):
            prefix = self.prefix(k)
            self._say(f"pipeline {self.pipeline.name}: stage {k + 1}/{len(self.pipeline.stages)} '{stage.name}' "
                      f"({stage.strategy}, {stage.budget})")
            frame = StageInput(network, bits, sparsity, self.reference, self.base.model, prefix)
            session = SearchSession(self.base.task, self.base.device, self.store, stage.space, self.progress, frame)
            outcome, network = self._stage(k, session)
            outcomes.append(outcome)
            resolved = session.space.resolve(session.space.canonical(_candidate(outcome.answer)))
            bits = {layer: b for layer, b in resolved.bits.items() if b < 32}
            sparsity = {layer: (p.name, d) for layer, (p, d) in resolved.sparsity.items()}
            outcome.network_candidate = self._on_unpruned(session, resolved, bits, sparsity)
        return PipelineOutcome(self.pipeline, self.seed, outcomes, network, unpruned)

    def _on_unpruned(self, session: SearchSession, resolved: Any, bits: dict[str, int],
                     sparsity: dict[str, tuple[str, float]]) -> dict[str, Any]:
        """A stage's output network as a candidate of the unpruned network (group names are kept
        by materialization; a density is of the weights the narrower layer has)."""
        from automlprune.space import Candidate

        full = self.base.space.group_by_name
        ratios = {g.name: int(kept) / full[g.name].channels for g, kept in zip(session.space.groups, resolved.kept)
                  if int(kept) < full[g.name].channels}
        return Candidate.make(ratios, bits, {l: d for l, (_, d) in sparsity.items()}, {l: p for l, (p, _) in sparsity.items()}).to_dict()

    def record(self, outcome: PipelineOutcome) -> str:
        """Store ``outcome`` as one search of a comparison (study ``pipeline:NAME|budget|seedS``, no
        trials of its own): its answer is the last stage's (weights source ``pipeline``: the network
        is the pipeline's, not a cut of the original), its evaluations those of every stage
        (:func:`~automlprune.report.collect.collect` reads them through ``summary.stage``), its search
        time their sum, its training seconds its stage strategies', its images trained those of
        every stage strategy and every fine-tune but the last, and its fine-tune the last stage's (``finetune.pipeline`` True: compare does not
        fine-tune it again). Returns the study name."""
        final, budget = outcome.final, self.budgets[-1]
        name = RunStore.study_name(outcome.strategy, budget.label, self.seed)
        study = self.store.study(name, {"task": self.base.task.spec.name, "strategy": outcome.strategy, "budget": budget.label,
                                        "seed": self.seed})
        stored = self.store.study(final.study_name)
        answer = {**final.answer, "candidate": final.network_candidate, "stage_candidate": final.answer["candidate"],
                  "weights": {"source": "pipeline", "pipeline": self.pipeline.name, "network": final.network_path}}
        fine_tunes = [s.finetune for s in outcome.stages if s.finetune]
        earlier_images = sum(float(f.get("images", 0)) for f in fine_tunes) - float((final.finetune or {}).get("images", 0))
        training = sum(s.training_images for s in outcome.stages) + earlier_images
        finetune = {"epochs": (final.finetune or {}).get("epochs", 0), "val_accuracy": final.val_accuracy,
                    "test_accuracy": final.test_accuracy, "images": float((final.finetune or {}).get("images", 0)),
                    "seconds": float((final.finetune or {}).get("seconds", 0.0)), "pipeline": True,
                    "stage_epochs": [int((s.finetune or {}).get("epochs", 0)) for s in outcome.stages]}
        self.store.update_summary(study, bound_budget=self.store.summary(stored).bound_budget, answer=answer,
                                  search_seconds=sum(s.seconds for s in outcome.stages), finetune=finetune,
                                  spent={"training_images": training, "training_seconds": sum(s.training_seconds for s in outcome.stages)},
                                  stage={"pipeline": self.pipeline.name, "stages": [s.study_name for s in outcome.stages]})
        return name

    def prefix(self, k: int) -> str:
        stage = self.pipeline.stages[k]
        return f"{self.pipeline.name}/stage{k + 1}-{stage.name}@{self.pipeline.digest(k, self.seed)}/"

    def _stage(self, k: int, session: SearchSession) -> tuple[StageOutcome, nn.Module]:
        stage, budget = self.pipeline.stages[k], self.budgets[k]
        input_costs = self._check_tighter(k, session)
        evals = stage.evals or self.evals
        result = session.run(stage.strategy, budget, self.seed, evals, None, stage.options)
        if result.answer is None:
            raise ConfigError(f"pipeline '{self.pipeline.name}' stage '{stage.name}' found no network within {stage.budget} in "
                              f"{result.evaluations} evaluations; give it more evals or a looser budget (what it evaluated is stored)")
        study = self.store.study(result.study_name)
        answer = result.answer.to_dict()
        proposal = self.store.proposal(answer, session.model)
        evaluator = session.evaluator_for(stage.strategy)
        name = f"pipeline/stage{k + 1}-{self.pipeline.digest(k, self.seed)}.pt"
        path = self.store.artifacts.path(name)
        summary = self.store.summary(study)
        saved = torch.load(path, map_location=session.device, weights_only=True) if path.is_file() else None
        if saved is not None and saved.get("answer_key") == result.answer.key and summary.finetune is not None:
            network = _restore(evaluator.network(proposal), saved)
            tuned = summary.finetune
        else:
            settings = self.finetunes[k]
            start = time.perf_counter()
            if settings.epochs:
                done = evaluator.finetune(proposal, settings, progress=self.progress)
                network, val, test, images = done.model, done.val_accuracy, done.test_accuracy, done.images
            else:
                network = evaluator.network(proposal)
                val, test, images = result.answer.accuracy, split_accuracy(network, session.task.data.test, session.task.data, session.device), 0
            tuned = {"epochs": settings.epochs, "val_accuracy": val, "test_accuracy": test, "images": images,
                     "seconds": time.perf_counter() - start}
            torch.save(_network_state(network, result.answer.key), path)
            self.store.update_summary(study, finetune=tuned, stage={"pipeline": self.pipeline.name, "index": k + 1, "name": stage.name,
                                                                    "network": name, "input": input_costs})
        stored = self.store.summary(study)
        spent = stored.spent or {}
        return StageOutcome(k + 1, stage.name, stage.strategy, budget.label, result.study_name, answer, result.evaluations,
                            float(stored.search_seconds or result.seconds), float(spent.get("training_images", 0.0)), input_costs,
                            tuned if tuned.get("epochs") else None, name, float(tuned["val_accuracy"]),
                            float(tuned["test_accuracy"]), result.budget.fraction,
                            training_seconds=float(spent.get("training_seconds", 0.0))), network

    def _say(self, text: str) -> None:
        if self.progress:
            print(text, file=sys.stderr, flush=True)


def _candidate(answer: dict[str, Any]) -> Any:
    from automlprune.space import Candidate

    return Candidate.from_dict(answer["candidate"])


def _network_state(network: nn.Module, answer_key: str) -> dict[str, Any]:
    """What a finished stage saves of the network it hands on (loads with ``weights_only=True``)."""
    return {"answer_key": answer_key, "state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()},
            "sparsity": sparsity_record(network), "quantization": getattr(network, RECORD_ATTRIBUTE, None)}


def _restore(network: nn.Module, saved: dict[str, Any]) -> nn.Module:
    """``network`` (the stage's answer materialized again: the right shapes) with the saved
    fine-tuned weights, masks and quantization record."""
    network.load_state_dict(saved["state_dict"])
    if saved.get("sparsity"):
        setattr(network, SPARSITY_ATTRIBUTE, saved["sparsity"])
    if saved.get("quantization") is not None:
        setattr(network, RECORD_ATTRIBUTE, saved["quantization"])
    return network.eval()
