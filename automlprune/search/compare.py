"""Comparing strategies on the same footing: same evaluator, evaluation budget, seeds and
fine-tune; a report with tables (Markdown, CSV, JSON) and plots."""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import optuna
from torch import nn

from automlprune.cost import METRICS, Costs, analytic_metrics
from automlprune.export import deployable
from automlprune.report.collect import SearchRecord, collect
from automlprune.report.pareto import hypervolume
from automlprune.report.plots import best_curve, plot_allocations, plot_finetuned, plot_pareto, plot_profiles, plot_progress
from automlprune.search.budget import Budget
from automlprune.search.pipeline import PIPELINE_PREFIX
from automlprune.search.runner import SearchSession
from automlprune.search.store import UNPRUNED_STUDY
from automlprune.settings import EvalSettings, FinetuneSettings


"""The run's study that holds the unpruned network's measured latency (no trials, no strategy)."""


def finetune_for_images(settings: FinetuneSettings, images: float, train_size: int) -> FinetuneSettings:
    """``settings`` cut to train on at most ``images`` images: ``images // batch_size`` steps spread
    over as few epochs of at most one pass over the ``train_size`` training images as they need,
    the same number each (rounded down: up to one step per epoch fewer); no fine-tune (0 epochs)
    when less than a batch is left."""
    steps = int(max(0.0, images) // settings.batch_size)
    if steps == 0:
        return replace(settings, epochs=0)
    per_pass = max(1, train_size // settings.batch_size)
    epochs = math.ceil(steps / per_pass)
    return replace(settings, epochs=epochs, steps_per_epoch=steps // epochs)


def finish_answers(session: SearchSession, finetune_epochs: int, progress: bool = True,
                   train_budget: float | None = None, networks: Mapping[str, nn.Module] | None = None) -> None:
    """Fine-tune every answer of the run identically, then time every answer and the unpruned
    network together in interleaved rounds (:meth:`Evaluator.latencies`; all again when one is
    missing). Results are stored on the studies, so a rerun skips what is done.

    With ``train_budget`` (epochs of the training split) every answer trains on the same number
    of images in all: what its strategy trained on (``spent["training_images"]``, 0 for
    strategies that do not train) plus a fine-tune of the rest (equal training compute).

    A pipeline's answer (:meth:`~automlprune.search.pipeline.PipelineRun.record`) was fine-tuned by
    its stages as its file says and is not fine-tuned again; ``networks`` (study name -> the
    pipeline's final network) lets it be timed with the others.

    The fine-tune is deterministic (its own seed, on the CPU), so answers that are the same network
    (same weights, same evaluation settings) under the same fine-tune settings share one: the
    first is trained, the others get its figures, with ``shared_with`` naming its study."""
    base = replace(session.task.spec.finetune, epochs=finetune_epochs)
    train_size = len(session.task.data.train)
    answered, pipelines = [], []
    tuned_once: dict[tuple, tuple[str, dict[str, Any]]] = {}
    """(evaluation settings, network key, fine-tune settings) -> (study name, its stored fine-tune)."""
    for record in collect(session.store):
        if not record.answer:
            continue
        study = optuna.load_study(study_name=record.study_name, storage=session.store.storage)
        if (record.finetune or {}).get("pipeline"):
            if networks and record.study_name in networks:
                pipelines.append((study, networks[record.study_name]))
            continue
        proposal = session.store.proposal(record.answer, session.model)  # trained answers start from their weights
        evaluator = session.evaluator_for(record.strategy)
        answered.append((evaluator, study, proposal))
        done = session.store.summary(study).finetune
        candidate = proposal.candidate.to_dict()
        strategy_images = float((record.spent or {}).get("training_images", 0.0))
        settings = base if train_budget is None else finetune_for_images(base, train_budget * train_size - strategy_images,
                                                                             train_size)
        wanted = {"epochs": finetune_epochs if train_budget is None else settings.epochs, "candidate": candidate,
                  "train_budget": train_budget}
        same = (evaluator.settings, evaluator.key_of(proposal), settings, str(session.device))
        if not done or any(done.get(k) != v for k, v in wanted.items()):
            if same in tuned_once and session.device.type == "cpu":
                first, figures = tuned_once[same]
                done = {**figures, **wanted, "strategy_images": strategy_images, "shared_with": first}
            else:
                tuned = evaluator.finetune(proposal, settings, progress=progress)
                done = {**wanted, "val_accuracy": tuned.val_accuracy, "test_accuracy": tuned.test_accuracy,
                        "seconds": tuned.seconds, "steps": tuned.steps, "images": tuned.images, "strategy_images": strategy_images}
            session.store.update_summary(study, finetune=done)
        if not done.get("shared_with"):
            tuned_once.setdefault(same, (record.study_name, {k: done[k] for k in FINETUNE_FIGURES if k in done}))
    answered.append((session.evaluator, session.store.study(UNPRUNED_STUDY), session.space.full()))
    summaries = [session.store.summary(study) for _, study, _ in answered] + [session.store.summary(study) for study, _ in pipelines]
    if all(s.latency_ms and s.latency_of == TIMED for s in summaries):
        return
    # All at once, or the ratios would mix timings from different moments of a drifting machine.
    if progress:
        print(f"timing {len(answered) + len(pipelines)} networks (the answers and the unpruned one) in interleaved rounds",
              file=sys.stderr, flush=True)
    nets = [deployable(evaluator.network(proposal)) for evaluator, _, proposal in answered]
    nets += [deployable(network) for _, network in pipelines]
    studies = [study for _, study, _ in answered] + [study for study, _ in pipelines]
    for study, lat in zip(studies, session.evaluator.latencies(nets)):
        session.store.update_summary(study, latency_ms={str(b): ms for b, ms in lat.items()}, latency_of=TIMED)


FINETUNE_FIGURES = ("val_accuracy", "test_accuracy", "seconds", "steps", "images")
"""What a shared fine-tune copies from the one that was trained."""

TIMED = "deployable, steady allocator"
"""What the latency columns time: the network as exported (materialized, batch norms folded into
the convolutions before them, channels-last: :func:`automlprune.export.deployable`), with the
allocator held steady (:func:`automlprune.latency.steady_allocator`). Runs timed before this was
recorded (``exported``: folded, NCHW; ``deployable``: the allocator's history could slow the
larger networks) are timed again."""


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(records: list[SearchRecord], latency_batch_sizes: Sequence[int] = EvalSettings().latency_batch_sizes) -> list[dict[str, Any]]:
    """One row per (strategy, budget): means (and spreads) over seeds; a cost column per analytic
    metric of the registry, a latency column per batch size."""
    rows = []
    keys = list(dict.fromkeys((r.strategy, r.budget.label) for r in records))
    for strategy, label in keys:
        mine = [r for r in records if r.strategy == strategy and r.budget.label == label]
        answered = [r for r in mine if r.answer]
        val = _mean_sd([r.answer["accuracy"] for r in answered])
        test = _mean_sd([r.finetune["test_accuracy"] for r in answered if r.finetune])
        row = {"strategy": strategy, "budget": label, "seeds": len(mine), "answered": len(answered),
               "val_accuracy": val[0], "val_accuracy_sd": val[1], "test_accuracy": test[0], "test_accuracy_sd": test[1],
               "finetune_epochs": answered[0].finetune["epochs"] if answered and answered[0].finetune else None,
               "train_budget": answered[0].finetune.get("train_budget") if answered and answered[0].finetune else None,
               "hypervolume": statistics.fmean([hypervolume(r.cost_fractions(True), r.accuracies(True)) for r in mine]) if mine else 0,
               "evaluations": statistics.fmean([r.evaluations for r in mine]) if mine else 0,
               "full_evaluations": statistics.fmean([sum(p.full for p in r.points) for r in mine]) if mine else 0,
               "search_seconds": statistics.fmean([r.seconds for r in mine]) if mine else 0,
               "scoring_seconds": max((r.scoring_seconds or 0.0 for r in mine), default=0.0),
               "training_seconds": statistics.fmean([(r.spent or {}).get("training_seconds", 0.0) for r in mine]) if mine else 0,
               "training_images": statistics.fmean([(r.spent or {}).get("training_images", 0.0) for r in mine]) if mine else 0,
               "finetune_images": statistics.fmean([r.finetune.get("images", 0) for r in answered if r.finetune]) if any(r.finetune for r in answered) else 0}
        for metric in analytic_metrics():
            row[metric] = statistics.fmean([_amount(r.answer, metric) for r in answered]) if answered else float("nan")
            row[f"{metric}_fraction"] = statistics.fmean([_amount(r.answer["relative"], metric) for r in answered]) if answered else float("nan")
        for b in map(str, latency_batch_sizes):
            lats = [r.latency_ms[b] for r in answered if r.latency_ms and b in r.latency_ms]
            row[f"latency_ms_b{b}"] = statistics.fmean(lats) if lats else float("nan")
        rows.append(row)
    return rows


def _amount(costs: dict[str, Any], metric: str) -> float:
    """``metric`` of a stored answer's costs (absolute or relative), read as :meth:`Costs.from_dict`
    reads stored costs (its rules for results stored by older versions); NaN when absent."""
    return Costs.from_dict(costs).to_dict().get(metric, float("nan"))


def _evaluations_text(row: dict[str, Any]) -> str:
    full = row["full_evaluations"]
    return f"{row['evaluations']:.0f}" if full == row["evaluations"] else f"{row['evaluations']:.0f} ({full:.0f} full)"


def _per_minute(row: dict[str, Any]) -> str:
    return f"{60 * row['evaluations'] / row['search_seconds']:.1f}" if row["search_seconds"] > 0 else "–"


def write_report(session: SearchSession, budgets: Sequence[Budget], out_dir: Path, command: str,
                 notes: str | None = None) -> Path:
    """report.md, results.csv, results.json and the plots in ``out_dir``; ``notes`` (Markdown,
    the reader's commentary on the results) closes the report under a "Notes" heading."""
    records = collect(session.store)
    batches = [str(b) for b in session.evaluator.settings.latency_batch_sizes]
    rows = summarize(records, session.evaluator.settings.latency_batch_sizes)
    unpruned_ms = _unpruned_latency(session)
    for row in rows:
        for b in batches:
            row[f"latency_ratio_b{b}"] = row[f"latency_ms_b{b}"] / unpruned_ms[b] if b in unpruned_ms else float("nan")
    (out_dir / "results.json").write_text(json.dumps({"rows": rows, "config": session.store.load_config()}, indent=2, default=str))
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["strategy"])
        writer.writeheader()
        writer.writerows(rows)
    if records:
        unpruned = session.store.unpruned_accuracy()
        plot_pareto(records, out_dir / "pareto.png", f"{session.task.spec.name}: accuracy vs cost", unpruned)
        plot_progress(records, out_dir / "progress.png", unpruned)
        plot_profiles(records, session.space, out_dir / "profiles.png")
    plot_allocations(session.store.artifacts)
    base = session.cost_model.base
    baseline = _baseline(session)
    tuned = any(r["test_accuracy"] == r["test_accuracy"] for r in rows)
    if tuned:
        plot_finetuned(rows, out_dir / "finetuned.png", baseline.get("test_accuracy"))
    epochs = {r["finetune_epochs"] for r in rows if r["finetune_epochs"] is not None and not r["strategy"].startswith(PIPELINE_PREFIX)}
    budgets_used = {r["train_budget"] for r in rows if r["train_budget"] is not None}
    if budgets_used:
        images = max(budgets_used) * len(session.task.data.train)
        test_meaning = (f"test accuracy after equal training compute: every answer trained on {images:,.0f} images in all "
                        f"({max(budgets_used):g} epochs of the training split), its strategy's own training plus a fine-tune "
                        f"of the rest ({_optimizer_text(session.task.spec.finetune)}); "
                        "an answer whose strategy trained on more gets no fine-tune and is over the budget by that much")
    elif epochs == {0}:
        test_meaning = "test accuracy of the answer without fine-tuning (BN re-estimated)"
    else:
        test_meaning = f"test accuracy after the identical fine-tune ({_finetune_text(session.task.spec.finetune, epochs)})"
    pct = lambda x: f"{100 * x:.2f}" if x == x else "–"  # noqa: E731  (NaN -> dash)
    spread = lambda m, s: f"{pct(m)} ± {100 * s:.2f}" if s == s and s > 0 else pct(m)  # noqa: E731
    latency = lambda ms, ratio: f"{ms:.3f} ({ratio:.2f})" if ratio == ratio else f"{ms:.3f}"  # noqa: E731
    metrics = [METRICS.get(m) for m in analytic_metrics()
               if m != "macs_nnz" or any(r.get("macs_nnz_fraction") != r.get("macs_fraction") for r in rows)]  # sparse answers only
    header = (["strategy", "budget", "val acc", "test acc"] + [m.unit for m in metrics]
              + [f"latency b{b} (ms)" for b in batches] + ["hypervolume", "evals", "evals/min", "search time (s)", "training (s)",
                 "images trained (k)", "scoring (s)"])
    lines = [f"# Strategy comparison: {session.task.spec.name}", "",
             f"Command: `{command}`", "",
             f"Baseline: {session.task.spec.model} on {session.task.spec.dataset}, {base.macs / 1e6:.2f}M MACs, "
             f"{base.params / 1e3:.1f}k params{_baseline_text(baseline)}. Accuracies in %; validation accuracy is the search-time score "
             f"(BN re-estimated); {test_meaning}; mean ± sd over seeds.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = ([r["strategy"], r["budget"], spread(r["val_accuracy"], r["val_accuracy_sd"]), spread(r["test_accuracy"], r["test_accuracy_sd"])]
                 + [f"{pct(r[f'{m.name}_fraction'])}%" for m in metrics]
                 + [latency(r[f"latency_ms_b{b}"], r[f"latency_ratio_b{b}"]) for b in batches]
                 + [f"{r['hypervolume']:.4f}", _evaluations_text(r), _per_minute(r), f"{r['search_seconds']:.1f}",
                    f"{r['training_seconds']:.1f}", f"{(r['training_images'] + r['finetune_images']) / 1e3:.0f}",
                    f"{r['scoring_seconds']:.1f}"])
        lines.append("| " + " | ".join(cells) + " |")
    unpruned_text = " and ".join(f"{unpruned_ms[b]:.3f} ms (batch {b})" for b in batches if b in unpruned_ms)
    lines += ["", "Costs are fractions of the unpruned network"
              + (f"; latency is the median CPU time of the exported network (materialized, batch norms folded into the "
                 f"convolutions, channels-last memory format), in brackets its ratio to the unpruned "
                 f"network's {unpruned_text}, measured in the same run "
                 "(the MACs fraction is the ideal)" if set(batches) <= set(unpruned_ms) else "") + ". An empty accuracy means no feasible answer was found. "
              "Evals: evaluations spent (in brackets the full ones, when screenings ran: multi-fidelity search); "
              "evals/min: evaluations per minute of search time. "
              "Hypervolume: area dominated by the search's evaluated points in the (cost fraction, validation accuracy) "
              "plane, reference (1, 0); mean over seeds. Training: wall time a strategy spent training networks (DMCP's "
              "supernet, the training-time methods), part of its search time; images trained: the images the strategy "
              "trained on plus those of the fine-tune, the training compute behind each answer. Scoring: the one-off channel-importance scoring of the "
              "strategy's evaluator (shared by its budgets and seeds, not counted in the search time)."
              + (" A pipeline (pipeline:NAME) is fine-tuned by its own stages as its file says, not by the comparison's "
                 "fine-tune; its evaluations, search time and images trained are all its stages' together, its costs those of "
                 "its final network against the unpruned one; its stages are in pipeline-NAME-BUDGET-seedS.md." if any(r["strategy"].startswith(PIPELINE_PREFIX) for r in rows) else "")
              + (f" {sum(bool((r.finetune or {}).get('shared_with')) for r in records)} answers were the same network as an answer "
                 "before them and share its fine-tune (deterministic on the CPU: the figures it would give again)."
                 if any((r.finetune or {}).get("shared_with") for r in records) else ""), ""]
    if tuned and baseline.get("test_accuracy") is not None and any(not r.budget.tolerance for r in records):
        tolerances = {r.budget.label for r in records if r.budget.tolerance}
        lines += _best_per_budget([r for r in rows if r["budget"] not in tolerances], baseline["test_accuracy"]) + [""]
    if any(r.budget.tolerance for r in records):
        lines += _cheapest_per_tolerance(rows, records) + [""]
    stopped = [r for r in records if r.stopped]
    if stopped:
        lines += ["Searches that stopped before their evaluation budget:", ""]
        lines += [f"- {r.strategy} {r.budget.label} seed {r.seed}, after {r.evaluations} evaluations: {r.stopped}." for r in stopped]
        lines += [""]
    searched = [r for r in records if not r.budget.tolerance]
    lines += _progress_table(searched) if searched else []  # tolerances only: their cheapest answers are above
    lines += ["", *(["![Test accuracy after fine-tune vs cost and vs search time](finetuned.png)", ""] if tuned else []),
              "![Pareto fronts](pareto.png)", "", "![Best feasible accuracy vs evaluations and time](progress.png)", "",
              "![Per-group widths of the answers](profiles.png)", ""]
    if notes:
        lines += ["## Notes", "", notes.strip(), ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


ANCHORS = ("uniform", "tp-local", "tp-global")
"""Strategies that stand for what a user gets without a search: uniform L1 (Li et al.) and Torch-Pruning's pruner."""


def _unpruned_latency(session: SearchSession) -> dict[str, float]:
    """The unpruned network's measured latency, {batch size: ms}, or {} when the run has none."""
    if UNPRUNED_STUDY not in session.store.study_names():
        return {}
    return session.store.summary(session.store.study(UNPRUNED_STUDY)).latency_ms or {}


def _baseline(session: SearchSession) -> dict[str, Any]:
    """The checkpoint's metadata (epochs, test accuracy, ...), or {} when it cannot be read."""
    from automlprune.errors import CheckpointError
    from automlprune.models.checkpoint import read_checkpoint

    try:
        return read_checkpoint(session.task.spec.checkpoint)[1]
    except CheckpointError:  # a report never fails over the baseline's description
        return {}


def _finetune_text(settings: FinetuneSettings, epochs: set[int]) -> str:
    """The fine-tune every answer got, in words: epochs, steps, optimizer and distillation."""
    steps = f" x {settings.steps_per_epoch} steps" if settings.steps_per_epoch else ""
    return f"{', '.join(map(str, sorted(epochs)))} epochs{steps} of {_optimizer_text(settings)}"


def _optimizer_text(settings: FinetuneSettings) -> str:
    """A fine-tune's batch, optimizer and distillation, in words."""
    if settings.method == "snapshot_ensemble":
        return (f"snapshot-ensemble distillation: batch {settings.batch_size}, {settings.snapshot_rounds} rounds of pruning "
                f"towards the answer, each retrained with a one-cycle schedule up to SGD lr {settings.snapshot_lr:g}, then "
                f"the answer distilled from the snapshots and the unpruned network (Adam up to lr "
                f"{settings.snapshot_distill_lr:g}, T {settings.snapshot_temperature:g}), the epochs split evenly over the "
                "rounds and the distillation")
    distill = (f", distilled from the unpruned network (alpha {settings.distill_alpha:g}, T {settings.distill_temperature:g})"
               if settings.distill else "")
    return f"batch {settings.batch_size}, SGD lr {settings.lr:g} with cosine decay{distill}"


def _baseline_text(meta: dict[str, Any]) -> str:
    if meta.get("test_accuracy") is None:
        return ""
    epochs = f", trained {meta['epochs']} epochs" if meta.get("epochs") else ""
    return f"{epochs}, {100 * meta['test_accuracy']:.2f}% test accuracy"


def _best_per_budget(rows: list[dict[str, Any]], baseline_test: float) -> list[str]:
    """Per budget: the most accurate answer after fine-tune against the unpruned network and the anchors."""
    lines = ["Best answer per budget after the identical fine-tune, against the unpruned network and the anchors "
             f"({', '.join(ANCHORS)}):", "",
             "| budget | best strategy | test acc | vs unpruned (points) | best anchor | anchor test acc | best minus anchor |",
             "|---|---|---|---|---|---|---|"]
    for label in dict.fromkeys(r["budget"] for r in rows):
        mine = [r for r in rows if r["budget"] == label and r["test_accuracy"] == r["test_accuracy"]]
        if not mine:
            continue
        best = max(mine, key=lambda r: r["test_accuracy"])
        anchors = [r for r in mine if r["strategy"] in ANCHORS]
        anchor = max(anchors, key=lambda r: r["test_accuracy"]) if anchors else None
        cells = [f"{anchor['strategy']}", f"{100 * anchor['test_accuracy']:.2f}",
                 f"{100 * (best['test_accuracy'] - anchor['test_accuracy']):+.2f}"] if anchor else ["–", "–", "–"]
        lines.append(f"| {label} | {best['strategy']} | {100 * best['test_accuracy']:.2f} | "
                     f"{100 * (best['test_accuracy'] - baseline_test):+.2f} | " + " | ".join(cells) + " |")
    return lines


def _cheapest_per_tolerance(rows: list[dict[str, Any]], records: list[SearchRecord]) -> list[str]:
    """Per accuracy tolerance: the cheapest answer (in the tolerance's metric) that kept the
    validation accuracy within it, against the cheapest anchor's."""
    bound = {r.budget.label: r.budget for r in records if r.budget.tolerance}
    lines = ["Cheapest answer per accuracy tolerance (validation accuracy within the tolerance of the unpruned network's, "
             f"measured before any fine-tune), against the cheapest anchor ({', '.join(ANCHORS)}):", "",
             "| budget | accuracy floor | cheapest strategy | cost | val acc | test acc | cheapest anchor | anchor cost | cost ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, budget in bound.items():
        key = f"{budget.metric}_fraction"
        mine = [r for r in rows if r["budget"] == label and r.get(key) == r.get(key) and r.get(key) is not None]
        if not mine:
            lines.append(f"| {label} | {100 * budget.min_accuracy:.2f} | none accepted | – | – | – | – | – | – |")
            continue
        best = min(mine, key=lambda r: r[key])
        anchors = [r for r in mine if r["strategy"] in ANCHORS]
        anchor = min(anchors, key=lambda r: r[key]) if anchors else None
        test = lambda r: f"{100 * r['test_accuracy']:.2f}" if r["test_accuracy"] == r["test_accuracy"] else "–"  # noqa: E731
        cells = ([anchor["strategy"], f"{100 * anchor[key]:.2f}% {budget.metric}", f"{best[key] / anchor[key]:.2f}"]
                 if anchor else ["–", "–", "–"])
        lines.append(f"| {label} | {100 * budget.min_accuracy:.2f} | {best['strategy']} | {100 * best[key]:.2f}% {budget.metric} | "
                     f"{100 * best['val_accuracy']:.2f} | {test(best)} | " + " | ".join(cells) + " |")
    return lines


def _progress_table(records: list[SearchRecord]) -> list[str]:
    """Best feasible validation accuracy after k evaluations, mean ± sd over seeds (a search
    that stopped early, like uniform's single evaluation, keeps its last value)."""
    longest = max((r.evaluations for r in records), default=0)
    marks = [k for k in (1, 5, 10, 25, 50, 100, 200, 500) if k < longest] + [longest]
    lines = ["Best feasible validation accuracy (%) after k evaluations, mean ± sd over seeds:", "",
             "| strategy | budget | " + " | ".join(f"k={k}" for k in marks) + " |", "|---|---|" + "---|" * len(marks)]
    for strategy, label in dict.fromkeys((r.strategy, r.budget.label) for r in records):
        runs = [r for r in records if r.strategy == strategy and r.budget.label == label]
        curve = best_curve(runs, longest) * 100
        cells = []
        for k in marks:
            column = curve[:, k - 1]
            column = column[~np.isnan(column)]
            if len(column) == 0:
                cells.append("–")
            else:
                cells.append(f"{column.mean():.2f} ± {column.std(ddof=1):.2f}" if len(column) > 1 else f"{column.mean():.2f}")
        lines.append(f"| {strategy} | {label} | " + " | ".join(cells) + " |")
    return lines
