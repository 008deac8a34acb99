"""Signals benchmark: which search score predicts the accuracy a user keeps after fine-tuning.

A search ranks networks by a cheap score; the user keeps the network after a fine-tune. For a
set of allocations meeting each MACs target (the one-shot allocators' answers plus random
proposals moved to the budget, :func:`automlprune.search.repair.repair_to_budget`) and for each
evaluation *setting* (which channels survive and whether the least-squares fold runs:
:data:`SETTINGS`), this measures:

* the search signal: validation accuracy right after pruning (the evaluator's score: BN
  re-estimated, on the evaluation subset of the validation split);
* the target: accuracy of the same network (same setting) after an identical short fine-tune
  (``finetune_steps`` SGD steps, no distillation), on the whole validation split and on the
  test split.

The report gives, per setting and target, Spearman's rank correlation between signal and
fine-tuned validation accuracy over the allocations, and the fine-tuned accuracy of the
allocation the signal ranks first next to the best one's: how good a search driven by that
signal would be. The default signal is chosen on validation figures, never on test ones.
Resumable: finished measurements are kept in ``signals.json`` and skipped on a rerun.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy import stats  # a dependency of scikit-learn

from automlprune.cost import CostModel
from automlprune.evaluator import Evaluator
from automlprune.search.base import SearchContext
from automlprune.search.budget import parse_budget
from automlprune.search.repair import repair_to_budget
from automlprune.search.warm_start import one_shot_answers
from automlprune.space import Candidate
from automlprune.tasks import Task, TaskSpec

SETTINGS: dict[str, dict[str, str]] = {
    "l1": {"criterion": "l1", "reconstruction": "none"},
    "l1+ls": {"criterion": "l1", "reconstruction": "least_squares"},
    "hessian": {"criterion": "hessian", "reconstruction": "none"},
    "prunenet+ls": {"criterion": "prunenet", "reconstruction": "least_squares"},
}
"""Evaluation settings compared: name -> EvalSettings fields (criterion, reconstruction)."""

ALLOCATORS = ("uniform", "global", "prunenet")


def allocations(task: Task, model: torch.nn.Module, evaluator: Evaluator, target: float, random: int,
                seed: int = 0) -> list[tuple[str, Candidate]]:
    """(label, candidate) pairs meeting ``target`` of the MACs: the one-shot allocators' answers
    (each by its own criterion) and ``random`` random proposals repaired to the budget."""
    space, cost = evaluator.space, evaluator.cost_model
    budget = parse_budget(f"macs={target}")
    bound = budget.bind(cost.base)
    context = SearchContext(space, cost, None, evaluator.scores, model, data=task.data, scores_under=evaluator.scores_under)
    out = one_shot_answers(context, budget, seed, list(ALLOCATORS))
    rng = np.random.default_rng(seed)
    for i in range(random):
        proposed = space.decode(rng.uniform(-1, 1, space.ndim))
        out.append((f"random-{i}", space.canonical(repair_to_budget(proposed, space, cost, bound))))
    return out


def run_signals_benchmark(env: str, out_dir: Path, device: torch.device, targets: Sequence[float] = (0.5, 0.3),
                          random: int = 8, finetune_steps: int = 300, settings: Sequence[str] | None = None,
                          overrides: Sequence[str] = (), progress: bool = True) -> dict[str, Any]:
    """Measure (resuming from ``out_dir/signals.json``), write ``signals.md``; returns the report's data."""
    names = list(settings or SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        from automlprune.errors import ConfigError

        raise ConfigError(f"unknown signal settings {', '.join(unknown)}; use some of {', '.join(SETTINGS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "signals.json"
    task = Task(TaskSpec.load(env, overrides))
    model = task.load_model().to(device)
    space = task.search_space(model)
    cost = CostModel(space, model)
    tune = replace(task.spec.finetune, epochs=1, steps_per_epoch=finetune_steps, distill=False)
    report = json.loads(path.read_text()) if path.is_file() else {"env": env, "finetune_steps": finetune_steps, "rows": []}
    done = {(r["target"], r["allocation"], r["setting"]) for r in report["rows"]}
    evaluators = {n: Evaluator(model, space, task.data, replace(task.spec.evaluation, **SETTINGS[n]), device, cost_model=cost)
                  for n in names}
    for target in targets:
        pairs = allocations(task, model, evaluators[names[0]], target, random)
        for label, candidate in pairs:
            for name in names:
                if (target, label, name) in done:
                    continue
                start = time.perf_counter()
                evaluator = evaluators[name]
                pruned = evaluator.evaluate(candidate)
                tuned = evaluator.finetune(candidate, tune, progress=False)
                report["rows"].append({"target": target, "allocation": label, "setting": name,
                                       "macs_fraction": pruned.relative["macs"], "signal": pruned.accuracy,
                                       "finetuned_val": tuned.val_accuracy, "finetuned_test": tuned.test_accuracy,
                                       "candidate": candidate.to_dict()})
                path.write_text(json.dumps(report, indent=1))  # written as it goes: a rerun resumes
                if progress:
                    print(f"signals {target:.0%} {label} {name}: pruned {100 * pruned.accuracy:.2f}, fine-tuned "
                          f"{100 * tuned.val_accuracy:.2f} val ({time.perf_counter() - start:.0f}s)", flush=True)
    (out_dir / "signals.md").write_text(render(report))
    return report


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (target, setting): Spearman's rho of signal vs fine-tuned validation accuracy, the
    fine-tuned accuracies of the signal's first pick and of the best allocation."""
    out = []
    for target in sorted({r["target"] for r in rows}, reverse=True):
        for setting in dict.fromkeys(r["setting"] for r in rows):
            mine = [r for r in rows if r["target"] == target and r["setting"] == setting]
            if len(mine) < 3:
                continue
            signal = [r["signal"] for r in mine]
            tuned = [r["finetuned_val"] for r in mine]
            pick = max(mine, key=lambda r: r["signal"])
            best = max(mine, key=lambda r: r["finetuned_val"])
            out.append({"target": target, "setting": setting, "n": len(mine),
                        "spearman": float(stats.spearmanr(signal, tuned).statistic),
                        "signal_mean": float(np.mean(signal)), "finetuned_mean": float(np.mean(tuned)),
                        "pick": pick["allocation"], "pick_finetuned_val": pick["finetuned_val"],
                        "pick_finetuned_test": pick["finetuned_test"], "best_finetuned_val": best["finetuned_val"]})
    return out


def render(report: dict[str, Any]) -> str:
    rows = summary(report["rows"])
    lines = [f"# Search signals against fine-tuned accuracy on {report['env']}", "",
             f"Command: `automlprune benchmark --suite signals --env {report['env']} --finetune-steps {report['finetune_steps']}`. "
             "For each MACs target, allocations meeting it (the one-shot allocators' answers and random proposals repaired "
             "to the budget); for each evaluation setting (channel criterion, least-squares fold or not) the search signal "
             "(validation accuracy right after pruning, BN re-estimated) and the accuracy after the identical fine-tune "
             f"({report['finetune_steps']} SGD steps, no distillation) of the same network. Accuracies in %.", "",
             "| MACs | setting | n | Spearman rho (signal vs fine-tuned val) | mean signal | mean fine-tuned val | "
             "signal's pick | its fine-tuned val / test | best fine-tuned val |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']:.0%} | {r['setting']} | {r['n']} | {r['spearman']:+.2f} | {100 * r['signal_mean']:.2f} | "
                     f"{100 * r['finetuned_mean']:.2f} | {r['pick']} | {100 * r['pick_finetuned_val']:.2f} / "
                     f"{100 * r['pick_finetuned_test']:.2f} | {100 * r['best_finetuned_val']:.2f} |")
    settings = list(dict.fromkeys(r["setting"] for r in report["rows"]))
    by_key = {(r["target"], r["allocation"], r["setting"]): r for r in report["rows"]}
    lines += ["", "Per allocation (pruned / fine-tuned val):", "",
              "| MACs | allocation | " + " | ".join(settings) + " |", "|---|---|" + "---|" * len(settings)]
    for target in sorted({r["target"] for r in report["rows"]}, reverse=True):
        for label in dict.fromkeys(r["allocation"] for r in report["rows"] if r["target"] == target):
            rows_of = [by_key.get((target, label, s)) for s in settings]
            cells = [f"{100 * row['signal']:.2f} / {100 * row['finetuned_val']:.2f}" if row else "–" for row in rows_of]
            lines.append(f"| {target:.0%} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
