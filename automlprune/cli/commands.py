"""Implementations of the CLI subcommands (argument parsing lives in :mod:`automlprune.cli.main`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from automlprune.device import resolve_device
from automlprune.errors import ConfigError


def _emit(args: argparse.Namespace, payload: Any, human: str) -> None:
    print(json.dumps(payload, indent=2, default=str) if args.json else human)


def _progress(args: argparse.Namespace) -> bool:
    return not args.json and sys.stderr.isatty()


def _task(args: argparse.Namespace):
    from automlprune.tasks import Task, TaskSpec

    return Task(TaskSpec.load(args.env, args.overrides))


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def cmd_train(args: argparse.Namespace) -> int:
    from automlprune.baseline import train_baseline

    task = _task(args)
    if args.epochs is not None and args.epochs < 1:
        raise ConfigError("--epochs must be at least 1")
    meta = train_baseline(task, resolve_device(args.device), epochs=args.epochs, progress=not args.json)
    _emit(args, {"checkpoint": str(task.spec.checkpoint), **meta},
          f"trained {task.spec.model} on {task.spec.dataset} for {meta['epochs']} epochs in {meta['train_seconds']:.0f}s: "
          f"val {_pct(meta['val_accuracy'])}, test {_pct(meta['test_accuracy'])}; saved {task.spec.checkpoint}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from automlprune.cost import CostModel

    task = _task(args)
    model = task.build_model().to(resolve_device(args.device))
    space = task.search_space(model, args.space)
    cost = CostModel(space, model)
    info = {"task": task.spec.name, "model": task.spec.model, **space.describe(),
            "base": {**cost.base.to_dict(), "flops": cost.base.flops},
            "units": "macs: multiply-accumulates per sample (flops = 2 x macs); bytes: parameter storage"}
    lines = [f"{task.spec.name}: {task.spec.model} on {task.spec.dataset}, {_si(cost.base.macs)} MACs, "
             f"{_si(cost.base.params)} params, {_si(cost.base.bytes)}B; {len(space.groups)} channel groups "
             f"({len(space.prunable)} prunable)"]
    for g in info["groups"]:
        flag = " (pinned)" if g["pinned"] else ""
        lines.append(f"  {g['name']:<32} {g['channels']:>5} ch  {len(g['layers']):>3} layers{flag}")
    _emit(args, info, "\n".join(lines))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from automlprune.baseline import ensure_baseline
    from automlprune.evaluator import Evaluator
    from automlprune.export import export_model
    from automlprune.space import Candidate

    task = _task(args)
    device = resolve_device(args.device)
    if args.uniform is not None and not 0 < args.uniform <= 1:
        raise ConfigError(f"--uniform {args.uniform} is outside (0, 1]; give the fraction of channels to keep, e.g. 0.5")
    candidate = Candidate.load(args.candidate) if args.candidate else None
    model = ensure_baseline(task, device, progress=not args.json)
    space = task.search_space(model, args.space)
    candidate = candidate or space.uniform(args.uniform)
    space.validate(candidate)
    evaluator = Evaluator(model, space, task.data, task.spec.evaluation, device)
    result = evaluator.evaluate(candidate, latency=args.latency)
    payload = result.to_dict()
    rel = result.relative
    human = [f"accuracy {_pct(result.accuracy)} (validation, BN re-estimated)   "
             f"MACs {_si(result.costs.macs)} ({_pct(rel['macs'])})   params {_si(result.costs.params)} ({_pct(rel['params'])})   "
             f"bytes {_si(result.costs.bytes)} ({_pct(rel['bytes'])})"]
    if result.latency_ms:
        human.append("latency " + ", ".join(f"batch {b}: {ms:.3f} ms" for b, ms in result.latency_ms.items()))
    network = None
    if args.finetune_epochs > 0:
        from dataclasses import replace

        tuned = evaluator.finetune(candidate, replace(task.spec.finetune, epochs=args.finetune_epochs), progress=not args.json)
        network = tuned.model
        payload["finetune"] = {"epochs": tuned.epochs, "val_accuracy": tuned.val_accuracy,
                               "test_accuracy": tuned.test_accuracy, "seconds": tuned.seconds}
        human.append(f"after {tuned.epochs} fine-tune epochs: val {_pct(tuned.val_accuracy)}, test {_pct(tuned.test_accuracy)}")
    if args.export:
        network = network or evaluator.network(candidate)
        path = export_model(network.cpu(), task.data.example_input(), args.export)
        payload["export"] = str(path)
        human.append(f"saved {path}")
    _emit(args, payload, "\n".join(human))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from automlprune.data import DATASETS
    from automlprune.importance import CRITERIA
    from automlprune.models import MODELS
    from automlprune.tasks import list_configs

    if args.what in ("models", "datasets", "criteria"):
        registry = {"models": MODELS, "datasets": DATASETS, "criteria": CRITERIA}[args.what]
        rows = {name: registry.metadata(name).get("description", "") for name in registry.names()}
        if args.what == "models":
            rows["torchvision:<name>"] = "any torchvision classification model, adapted to the task's channels and classes"
    else:
        rows = {name: "" for name in list_configs("envs" if args.what == "envs" else "search_spaces")}
    _emit(args, rows, "\n".join(f"{k:<22} {v}".rstrip() for k, v in rows.items()))
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from automlprune.benchmarks.engine import run_engine_benchmark

    report = run_engine_benchmark(Path(args.out), resolve_device(args.device), candidates=args.candidates, quick=args.quick)
    _emit(args, report, f"wrote {Path(args.out) / 'report.md'}")
    return 0
