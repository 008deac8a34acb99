"""Criteria benchmark: every importance criterion at the same uniform widths.

For each criterion: channel scoring time; validation accuracy right after pruning to the
uniform width meeting 70/50/30% of the MACs (BN re-estimated); test accuracy after the same
short fine-tune (fixed number of SGD steps, no distillation). Same widths, same batches, same
fine-tune for every criterion: only which channels survive differs.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from automlprune.cost import CostModel, uniform_ratio_for_budget
from automlprune.evaluator import Evaluator
from automlprune.importance import CRITERIA
from automlprune.tasks import Task, TaskSpec


def run_criteria_benchmark(env: str, out_dir: Path, device: torch.device, targets: Sequence[float] = (0.7, 0.5, 0.3),
                           finetune_steps: int = 50, criteria: Sequence[str] | None = None,
                           overrides: Sequence[str] = (), progress: bool = True) -> dict[str, Any]:
    from automlprune.importance import CRITERIA as registry

    for name in criteria or []:
        registry.get(name)  # unknown names fail before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    task = Task(TaskSpec.load(env, overrides))
    model = task.load_model().to(device)
    space = task.search_space(model)
    cost = CostModel(space, model)
    candidates = {t: space.uniform(uniform_ratio_for_budget(cost, "macs", t * cost.base.macs)) for t in targets}
    tune = replace(task.spec.finetune, epochs=1 if finetune_steps else 0, steps_per_epoch=finetune_steps or None, distill=False)
    rows = []
    for name in criteria or CRITERIA.names():
        start = time.perf_counter()
        evaluator = Evaluator(model, space, task.data, replace(task.spec.evaluation, criterion=name), device, cost_model=cost)
        scoring = evaluator.scoring_seconds
        for target, cand in candidates.items():
            pruned = evaluator.evaluate(cand)
            tuned = evaluator.finetune(cand, tune, progress=False)
            rows.append({"criterion": name, "target_macs": target, "macs_fraction": pruned.relative["macs"],
                         "val_accuracy_pruned": pruned.accuracy, "test_accuracy_finetuned": tuned.test_accuracy,
                         "scoring_seconds": scoring})
        if progress:
            print(f"criteria benchmark: {name} done in {time.perf_counter() - start:.0f}s", flush=True)
        report = {"env": env, "finetune_steps": finetune_steps, "batch_size": tune.batch_size, "lr": tune.lr, "rows": rows}
        (out_dir / "criteria.json").write_text(json.dumps(report, indent=2))  # written as it goes
        (out_dir / "criteria.md").write_text(_markdown(report, targets))
    return report


def _markdown(report: dict[str, Any], targets: Sequence[float]) -> str:
    lines = [f"# Importance criteria on {report['env']}", "",
             f"Command: `automlprune benchmark --suite criteria --env {report['env']} --finetune-steps {report['finetune_steps']}`. "
             f"Uniform widths meeting each MACs target; validation accuracy right after pruning (BN re-estimated), "
             f"test accuracy after the same fine-tune ({report['finetune_steps']} SGD steps of batch {report['batch_size']}, "
             f"lr {report['lr']}, no distillation). Accuracies in %.", "",
             "| criterion | scoring (s) | " + " | ".join(f"{t:.0%} MACs: pruned / fine-tuned" for t in targets) + " |",
             "|---|---|" + "---|" * len(targets)]
    for name in dict.fromkeys(r["criterion"] for r in report["rows"]):
        mine = {r["target_macs"]: r for r in report["rows"] if r["criterion"] == name}
        cells = [f"{100 * mine[t]['val_accuracy_pruned']:.2f} / {100 * mine[t]['test_accuracy_finetuned']:.2f}" if t in mine else "–"
                 for t in targets]
        lines.append(f"| {name} | {next(iter(mine.values()))['scoring_seconds']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
