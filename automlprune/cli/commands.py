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


def _overrides(args: argparse.Namespace) -> list[str]:
    criterion = getattr(args, "criterion", None)
    return list(args.overrides) + ([f"evaluation.criterion={criterion}"] if criterion else [])


def _task(args: argparse.Namespace):
    from automlprune.tasks import Task, TaskSpec

    return Task(TaskSpec.load(args.env, _overrides(args)))


def _costs_text(costs: Any, relative: dict[str, float]) -> str:
    """Every metric the costs hold (the registry's, in its order), with its fraction of the unpruned network."""
    from automlprune.cost.metrics import all_metrics

    return "   ".join(f"{m.unit} {_si(costs[m.name])} ({_pct(relative[m.name])})" for m in all_metrics()
                       if m.name in costs and m.name in relative)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def cmd_train(args: argparse.Namespace) -> int:
    from automlprune.baseline import train_baseline
    from automlprune.train import distributed

    if args.epochs is not None and args.epochs < 1:
        raise ConfigError("--epochs must be at least 1")
    launched = _on_processes(args)
    if launched is not None:
        return launched
    task = _task(args)
    meta = train_baseline(task, resolve_device(args.device), epochs=args.epochs, progress=not args.json)
    if not distributed.is_main():
        return 0
    _emit(args, {"checkpoint": str(task.spec.checkpoint), **meta},
          f"trained {task.spec.model} on {task.spec.dataset} for {meta['epochs']} epochs in {meta['train_seconds']:.0f}s: "
          f"val {_pct(meta['val_accuracy'])}, test {_pct(meta['test_accuracy'])}; saved {task.spec.checkpoint}")
    return 0


def _on_processes(args: argparse.Namespace) -> int | None:
    """``--nproc N`` > 1 outside ``torchrun``: run this command on N processes (torchrun) and
    return its exit code; inside one (started here or by ``torchrun`` directly): join its
    process group and return None, as with one process."""
    from automlprune.train import distributed

    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc} must be at least 1")
    if args.nproc > 1 and not distributed.init_from_environment():  # start the N processes, each running this command
        return distributed.launch(_without_option(args.argv, "--nproc"), args.nproc)
    distributed.init_from_environment()
    return None


def _without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option`` and its value (``--x V`` or ``--x=V``)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == option:
            skip = True
        elif not item.startswith(f"{option}="):
            out.append(item)
    return out


def cmd_inspect(args: argparse.Namespace) -> int:
    from automlprune.cost import CostModel
    from automlprune.cost.metrics import all_metrics

    task = _task(args)
    model = task.build_model().to(resolve_device(args.device))
    space = task.search_space(model, args.space)
    cost = CostModel(space, model)
    info = {"task": task.spec.name, "model": task.spec.model, **space.describe(),
            "base": {**cost.base.to_dict(), "flops": cost.base.flops},
            "units": {**{m.name: m.unit for m in all_metrics()}, "flops": "2 x MACs"}}
    amounts = ", ".join(f"{_si(cost.base[m.name])} {m.unit}" for m in all_metrics() if m.name in cost.base)
    lines = [f"{task.spec.name}: {task.spec.model} on {task.spec.dataset}, {amounts}; {len(space.groups)} channel groups "
             f"({len(space.prunable)} prunable)"]
    width = max((len(g["name"]) for g in info["groups"]), default=0)
    for g in info["groups"]:
        flag = f" (pinned: {g['unprunable']})" if "unprunable" in g else " (pinned)" if g["pinned"] else ""
        unit = f" in units of {g['unit']}" if g["unit"] > 1 else ""
        lines.append(f"  {g['name']:<{width}} {g['channels']:>5} ch{unit}  {len(g['layers']):>3} layers{flag}")
    if info["sparsity_patterns"]:
        lines.append(f"{len(info['sparsity_patterns'])} layers searched for weight sparsity (densities "
                     f"{', '.join(f'{d:g}' for d in space.config.densities)}):")
        lines += [f"  {layer:<{width}} {', '.join(patterns)}" for layer, patterns in info["sparsity_patterns"].items()]
    _emit(args, info, "\n".join(lines))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from automlprune.baseline import ensure_baseline
    from automlprune.evaluator import Evaluator
    from automlprune.export import export_model
    from automlprune.space import Candidate

    task = _task(args)
    device = resolve_device(args.device)
    if args.finetune_epochs < 0:
        raise ConfigError("--finetune-epochs cannot be negative")
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
    human = [f"accuracy {_pct(result.accuracy)} (validation, BN re-estimated)   " + _costs_text(result.costs, result.relative)]
    if result.measured_latency_ms:
        human.append("latency " + ", ".join(f"batch {b}: {ms:.3f} ms" for b, ms in result.measured_latency_ms.items()))
    network = None
    if args.finetune_epochs > 0:
        from dataclasses import replace

        tuned = evaluator.finetune(candidate, replace(task.spec.finetune, epochs=args.finetune_epochs), progress=not args.json)
        network = tuned.model
        payload["finetune"] = {"epochs": tuned.epochs, "val_accuracy": tuned.val_accuracy,
                               "test_accuracy": tuned.test_accuracy, "seconds": tuned.seconds}
        human.append(f"after {tuned.epochs} fine-tune epochs: val {_pct(tuned.val_accuracy)}, test {_pct(tuned.test_accuracy)}")
    if args.int8:
        int8 = evaluator.int8(candidate, network)
        payload["int8"] = {k: v for k, v in int8.items() if k != "model"}
        for label in ("float32", "int8"):
            lat = ", ".join(f"batch {b}: {ms:.3f} ms" for b, ms in int8[label]["latency_ms"].items())
            human.append(f"{label:>7} (PyTorch x86, CPU): accuracy {_pct(int8[label]['accuracy'])}, latency {lat}")
    if args.export:
        network = network or evaluator.network(candidate)
        path = export_model(network.cpu(), task.data.example_input(), args.export, architecture=task.architecture())
        payload["export"] = str(path)
        human.append(f"saved {path}")
    _emit(args, payload, "\n".join(human))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from automlprune.data import DATASETS
    from automlprune.importance import CRITERIA
    from automlprune.models import MODELS
    from automlprune.tasks import list_configs

    from automlprune.search import STRATEGIES
    from automlprune.cost.formats import FORMATS
    from automlprune.sparsity.criteria import WEIGHT_CRITERIA

    if args.what in ("models", "datasets", "criteria", "weight-criteria", "formats", "strategies"):
        registry = {"models": MODELS, "datasets": DATASETS, "criteria": CRITERIA, "weight-criteria": WEIGHT_CRITERIA,
                    "formats": FORMATS, "strategies": STRATEGIES}[args.what]
        names = registry.ordered_names() if args.what == "formats" else registry.names()
        rows = {name: registry.metadata(name).get("description", "") for name in names}
        if args.what == "models":
            rows["torchvision:<name>"] = "any torchvision classification model, adapted to the task's channels and classes"
    elif args.what == "pipelines":
        from automlprune.config_files import read_yaml
        from automlprune.tasks import resolve_config

        rows = {name: str(read_yaml(resolve_config(name, "pipelines"), "pipeline").get("description", ""))
                for name in list_configs("pipelines")}
    else:
        rows = {name: "" for name in list_configs("envs" if args.what == "envs" else "search_spaces")}
    _emit(args, rows, "\n".join(f"{k:<22} {v}".rstrip() for k, v in rows.items()))
    return 0


def _fractions(text: str, option: str = "--macs", of: str = "of the unpruned MACs") -> tuple[float, ...]:
    """``--macs 0.5,0.3`` (or another ``option``) as fractions in (0, 1), or one sentence saying what is wrong."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or not all(0 < v < 1 for v in values):
        raise ConfigError(f"{option} {text!r} must list fractions {of} between 0 and 1, e.g. 0.5,0.3")
    return values


def cmd_benchmark(args: argparse.Namespace) -> int:
    out = Path(args.out or Path("results") / "runs" / f"benchmark-{args.suite}")  # never over the committed reports
    if args.finetune_steps is not None and args.finetune_steps < 0:
        raise ConfigError("--finetune-steps cannot be negative")
    targets = {"targets": _fractions(args.macs)} if args.macs else {}  # the suite's own default otherwise
    if args.suite == "chaos":
        from automlprune.benchmarks.chaos import STRATEGIES, run_chaos_benchmark
        from automlprune.search import STRATEGIES as REGISTERED

        strategies = [s.strip() for s in args.strategies.split(",") if s.strip()] if args.strategies else list(STRATEGIES)
        unknown = [s for s in strategies if s not in REGISTERED]
        if unknown:
            raise ConfigError(f"unknown strategies {', '.join(unknown)}; see 'automlprune list strategies'")
        if args.kills < 1 or (args.evals is not None and args.evals < 1):
            raise ConfigError("--kills and --evals must be at least 1")
        report = run_chaos_benchmark(args.env or "digits-cnn", out, strategies, args.kills, args.evals or 12, args.overrides,
                                     progress=not args.json)
        _emit(args, report, f"wrote {out / 'report.md'}: {'all strategies pass' if report['passed'] else 'some strategies FAIL'}")
        return 0 if report["passed"] else 1
    if args.suite == "workers":
        from automlprune.benchmarks.workers import run_workers_benchmark

        try:
            counts = [int(c) for c in (args.workers or "1,2,4").split(",") if c.strip()]
        except ValueError:
            counts = []
        if not counts or min(counts) < 1 or (args.evals is not None and args.evals < 1):
            raise ConfigError("--workers must list whole numbers of at least 1, e.g. 1,2,4, and --evals must be at least 1")
        report = run_workers_benchmark(args.env or "digits-cnn", out, counts, args.evals or 40, overrides=args.overrides,
                                       progress=not args.json)
        _emit(args, report, f"wrote {out / 'report.md'}")
        return 0
    args.env = args.env or "fmnist-resnet20"
    args.evals = 40 if args.evals is None else args.evals
    if args.suite == "criteria":
        from automlprune.benchmarks.criteria import run_criteria_benchmark

        names = [c.strip() for c in args.criteria.split(",") if c.strip()] if args.criteria else None
        steps = 50 if args.finetune_steps is None else args.finetune_steps
        report = run_criteria_benchmark(args.env, out, resolve_device(args.device), **targets, finetune_steps=steps,
                                        criteria=names, overrides=args.overrides, progress=not args.json)
        _emit(args, report, f"wrote {out / 'criteria.md'}")
        return 0
    if args.suite == "sparsity":
        from automlprune.benchmarks.sparsity import run_sparsity_benchmark

        if args.evals < 1 or args.finetune_epochs < 0:
            raise ConfigError("--evals must be at least 1 and --finetune-epochs cannot be negative")
        sizes = _fractions(args.sizes, "--sizes", "of the float32 size") if args.sizes else (0.25, 0.125, 0.0625)
        arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
        report = run_sparsity_benchmark(args.env, out, sizes, arms, args.evals, args.finetune_epochs, args.overrides,
                                        args.device, progress=not args.json)
        _emit(args, report, f"wrote {out / 'report.md'}")
        return 0
    if args.candidates is not None and args.candidates < 1:
        raise ConfigError("--candidates must be at least 1")
    if args.suite == "signals":
        from automlprune.benchmarks.signals import run_signals_benchmark

        names = [c.strip() for c in args.signals.split(",") if c.strip()] if args.signals else None
        steps = 300 if args.finetune_steps is None else args.finetune_steps
        if steps < 1:
            raise ConfigError("the signals suite fine-tunes every network: give --finetune-steps of at least 1")
        report = run_signals_benchmark(args.env, out, resolve_device(args.device), **targets, random=args.candidates or 8,
                                       finetune_steps=steps, settings=names,
                                       overrides=args.overrides, progress=not args.json)
        _emit(args, report, f"wrote {out / 'signals.md'}")
        return 0
    if args.suite == "latency":
        from automlprune.benchmarks.latency import ROUND_TO, SUBJECTS, TARGETS, run_latency_benchmark

        subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else list(SUBJECTS)
        try:
            steps = tuple(int(s) for s in args.round_to.split(",") if s.strip()) if args.round_to else ROUND_TO
        except ValueError:
            steps = ()
        if not steps or min(steps) < 2:
            raise ConfigError("--round-to must list whole numbers of channels of at least 2, e.g. 8,16")
        report = run_latency_benchmark(out, subjects, targets.get("targets", TARGETS), steps, random=args.candidates or 4,
                                       progress=not args.json)
        _emit(args, report, f"wrote {out / 'report.md'}")
        return 0
    if args.suite == "models":
        from automlprune.benchmarks.models import CANDIDATES, FAMILIES, run_models_benchmark

        names = [n.strip() for n in args.families.split(",") if n.strip()] if args.families else None
        from torchvision import models as tv

        unknown = sorted(set(names or []) - set(tv.list_models(module=tv)))
        if unknown:
            raise ConfigError(f"torchvision has no classification model {', '.join(unknown)}; the families measured by default are: "
                              f"{', '.join(FAMILIES)}")
        report = run_models_benchmark(out, names, candidates=args.candidates or CANDIDATES, progress=not args.json)
        _emit(args, report, f"wrote {out / 'report.md'}")
        return 0
    from automlprune.benchmarks.engine import run_engine_benchmark

    report = run_engine_benchmark(out, resolve_device(args.device), candidates=args.candidates or 30, quick=args.quick)
    _emit(args, report, f"wrote {out / 'report.md'}")
    return 0


# ---- search, compare, plot, export -----------------------------------------------------------------
def _budgets(args: argparse.Namespace):
    from automlprune.search.budget import parse_budget, parse_budgets

    if args.budgets:
        return parse_budgets(args.budgets)
    return [parse_budget(args.budget or "macs=0.5")]


def _options(items: list[str]) -> dict[str, Any]:
    from automlprune.search.warm_start import parse_option

    options = {}
    for item in items:
        parsed = parse_option(item)
        if parsed is None:
            raise ConfigError(f"strategy option '{item}' is not of the form key=value")
        options[parsed[0]] = parsed[1]
    return options


def _options_for(strategy: str, options: dict[str, Any], strategies: list[str]) -> dict[str, Any]:
    """Options for one strategy of a comparison: ``key`` applies to all, ``strategy.key`` to that one."""
    out = {}
    for key, value in options.items():
        target, dot, name = key.partition(".")
        if dot and target in strategies:
            if target == strategy:
                out[name] = value
        else:
            out[key] = value
    return out


def _check_search_args(args: argparse.Namespace) -> None:
    if args.evals < 1:
        raise ConfigError("--evals must be at least 1")
    if args.time_limit is not None and args.time_limit <= 0:
        raise ConfigError("--time-limit must be a positive number of seconds")
    if getattr(args, "finetune_epochs", None) is not None and args.finetune_epochs < 0:
        raise ConfigError("--finetune-epochs cannot be negative")
    if getattr(args, "seed", 0) < 0:
        raise ConfigError(f"--seed {args.seed} is negative; give a seed of 0 or more")


def _run_dir(args: argparse.Namespace, kind: str, name: str, task_name: str | None = None) -> Path:
    """``--run-dir``, or results/<kind>/<task>[/<name>]."""
    if args.run_dir:
        return Path(args.run_dir)
    if task_name is None:
        from automlprune.tasks import TaskSpec

        task_name = TaskSpec.load(args.env, _overrides(args)).name
    return Path("results", kind, task_name, name)


def _open_run(args: argparse.Namespace, kind: str, name: str, budgets: list) -> tuple[Any, Path]:
    """The search session of a ``search`` or ``compare`` run (default directory
    results/<kind>/<task>[/<name>]), with every budget checked before any search starts."""
    from automlprune.search.runner import SearchSession
    from automlprune.search.store import RunStore
    from automlprune.tasks import Task, TaskSpec
    from automlprune.train import distributed

    spec = TaskSpec.load(args.env, _overrides(args))
    run_dir = _run_dir(args, kind, name, spec.name)
    with distributed.main_first():  # several training processes: rank 0 makes the store, the others open it
        store = RunStore(run_dir, args.storage)  # opens (and checks) the storage before any work
        if distributed.is_main():
            store.refuse_conflict({"task": spec.to_dict()})  # before the baseline loads or trains
    session = SearchSession(Task(spec), resolve_device(args.device), store, args.space, progress=not args.json)
    session.check_budgets(budgets)
    return session, run_dir


def cmd_search(args: argparse.Namespace) -> int:
    from automlprune.search import STRATEGIES
    from automlprune.search.run_dir import removed_if_left_empty

    _check_search_args(args)
    budgets, options = _budgets(args), _options(args.options)
    STRATEGIES.get(args.strategy).check_options(options)
    STRATEGIES.get(args.strategy).check_budgets(budgets)
    refusal = STRATEGIES.get(args.strategy).ddp_refusal
    if args.nproc > 1 and refusal:
        raise ConfigError(f"strategy '{args.strategy}' cannot train on several processes (--nproc {args.nproc}): {refusal}; "
                          "run it without --nproc")
    launched = _on_processes(args)
    if launched is not None:
        return launched
    with removed_if_left_empty(_run_dir(args, "runs", args.strategy)):
        return _search(args, budgets, options)


def _search(args: argparse.Namespace, budgets: list, options: dict[str, Any]) -> int:
    from automlprune.report.collect import collect
    from automlprune.report.plots import plot_allocations, plot_pareto
    from automlprune.train import distributed

    session, run_dir = _open_run(args, "runs", args.strategy, budgets)
    main = distributed.is_main()  # several training processes: rank 0 writes, reports and exports
    if main:
        session.save_config([args.strategy], budgets, [args.seed], args.evals, args.time_limit, options)
    answers, lines = [], []
    for budget in budgets:
        outcome = session.run(args.strategy, budget, args.seed, args.evals, args.time_limit, options)
        entry = {"budget": budget.label, "strategy": args.strategy, "seed": args.seed, "evaluations": outcome.evaluations,
                 "seconds": outcome.seconds, "answer": outcome.answer.to_dict() if outcome.answer else None}
        if outcome.answer is None:
            lines.append(f"{budget.label}: no feasible candidate found in {outcome.evaluations} evaluations")
        else:
            a = outcome.answer
            lines.append(f"{budget.label}: accuracy {_pct(a.accuracy)} at {_pct(a.relative['macs'])} MACs, "
                         f"{_pct(a.relative['params'])} params ({outcome.evaluations} evaluations, {outcome.seconds:.1f}s)")
            if outcome.budget.tolerance:
                lines.append(f"  the cheapest in {outcome.budget.metric} within {outcome.budget.accuracy_drop:g} points of the unpruned "
                             f"network's {_pct(outcome.budget.reference_accuracy)} validation accuracy")
            proposal = session.store.proposal(a.to_dict(), session.model)  # a trained answer keeps its weights
            if args.finetune_epochs:
                from dataclasses import replace

                tuned = session.evaluator_for(args.strategy).finetune(proposal, replace(session.task.spec.finetune, epochs=args.finetune_epochs),
                                                                      progress=not args.json)  # on every training process
                entry["finetune"] = {"epochs": tuned.epochs, "val_accuracy": tuned.val_accuracy, "test_accuracy": tuned.test_accuracy}
                lines.append(f"  after {tuned.epochs} fine-tune epochs: test accuracy {_pct(tuned.test_accuracy)}")
                network = tuned.model
            else:
                network = session.evaluator_for(args.strategy).network(proposal)
            if not args.no_export and main:
                from automlprune.export import export_model

                path = export_model(network.cpu(), session.task.data.example_input(), run_dir / f"model-{budget.slug}.pt2")
                entry["export"] = str(path)
                lines.append(f"  saved {path}" + (" (dense tensors: its sparse layers are stored and run dense)" if a.candidate.densities else ""))
                if a.candidate.bits or a.candidate.densities:
                    packed = export_model(network, session.task.data.example_input(), run_dir / f"model-{budget.slug}.qpt",
                                          architecture=session.task.architecture())
                    entry["export_packed"] = str(packed)
                    lines.append(f"  saved {packed} ({packed.stat().st_size / 1024:.1f} KiB on disk, "
                                 f"{a.costs.bytes / 1024:.1f} KiB of parameters reported)")
        answers.append(entry)
    if not main:
        return 0
    session.store.update_answers(answers)
    records = collect(session.store)
    plot = plot_pareto(records, run_dir / "pareto.png", f"{session.task.spec.name}: {args.strategy}", session.store.unpruned_accuracy())
    plot_allocations(session.store.artifacts)
    lines.append(f"Pareto plot: {plot}; run store: {session.store.url}")
    _emit(args, {"run_dir": str(run_dir), "answers": answers, "pareto_plot": str(plot)}, "\n".join(lines))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from automlprune.search import STRATEGIES
    from automlprune.search.run_dir import removed_if_left_empty

    _check_search_args(args)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if not strategies:
        raise ConfigError("--strategies lists no strategy; give names like uniform,random")
    if args.seeds < 1:
        raise ConfigError("--seeds must be at least 1")
    if args.train_budget is not None and (args.train_budget <= 0 or args.finetune_epochs is not None):
        raise ConfigError("--train-budget takes a positive number of epochs and replaces --finetune-epochs; give one of them")
    budgets, options = _budgets(args), _options(args.options)
    notes = _read_notes(args.notes)
    per_strategy = {name: _options_for(name, options, strategies) for name in strategies}
    pipelines = _pipelines_of(strategies, budgets, options, args.train_budget)
    for name in (n for n in strategies if n not in pipelines):
        STRATEGIES.get(name).check_options(per_strategy[name])
        STRATEGIES.get(name).check_budgets(budgets)
    with removed_if_left_empty(_run_dir(args, "compare", "")):
        return _compare(args, strategies, budgets, options, per_strategy, notes, pipelines)


def _pipelines_of(strategies: list[str], budgets: list, options: dict[str, Any], train_budget: float | None) -> dict[str, Any]:
    """The pipelines among a comparison's strategies (``pipeline:NAME``): name -> its spec,
    checked with every budget as its last stage's (options for all strategies do not reach them)."""
    from automlprune.search.pipeline import PIPELINE_PREFIX
    from automlprune.search.pipeline_spec import PipelineSpec

    out = {}
    for name in (n for n in strategies if n.startswith(PIPELINE_PREFIX)):
        if any(key.startswith(f"{name}.") for key in options):
            raise ConfigError(f"{name} takes no --option: a pipeline's stages take their options from its file")
        if train_budget is not None:
            raise ConfigError(f"{name} fine-tunes as its file says, so --train-budget cannot equalize it; "
                              "give every strategy the same --finetune-epochs and the pipeline's file the same epochs in all")
        spec = PipelineSpec.load(name[len(PIPELINE_PREFIX):])
        for budget in budgets:
            spec.with_final_budget(budget.label)
        out[name] = spec
    return out


def _compare(args: argparse.Namespace, strategies: list[str], budgets: list, options: dict[str, Any],
             per_strategy: dict[str, dict[str, Any]], notes: str | None, pipelines: dict[str, Any]) -> int:
    from automlprune.search import STRATEGIES
    from automlprune.report.pipeline import write_pipeline_report
    from automlprune.search.compare import finish_answers, write_report
    from automlprune.search.pipeline import PipelineRun

    session, run_dir = _open_run(args, "compare", "", budgets)
    seeds = list(range(args.seeds))
    session.save_config(strategies, budgets, seeds, args.evals, args.time_limit, options)
    networks = {}  # a pipeline's final network, to be timed with the other answers
    for name in strategies:
        for seed in seeds if name in pipelines or STRATEGIES.get(name).uses_seed else seeds[:1]:
            for budget in budgets:
                if name in pipelines:
                    run = PipelineRun(session, pipelines[name].with_final_budget(budget.label), seed, args.evals, progress=not args.json)
                    outcome = run.run()
                    networks[run.record(outcome)] = outcome.network
                    write_pipeline_report(session, outcome, run_dir)  # its stages, path plot and packed network
                else:
                    session.run(name, budget, seed, args.evals, args.time_limit, per_strategy[name])
    epochs = session.task.spec.finetune.epochs if args.finetune_epochs is None else args.finetune_epochs
    finish_answers(session, epochs, progress=not args.json, train_budget=args.train_budget, networks=networks)
    command = "automlprune " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("automlprune") else f"automlprune compare {args.env} ..."
    report = write_report(session, budgets, run_dir, command, notes)
    _emit(args, {"run_dir": str(run_dir), "report": str(report)}, f"wrote {report}")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from automlprune.search.pipeline_spec import PipelineSpec
    from automlprune.search.run_dir import removed_if_left_empty

    if args.evals < 1:
        raise ConfigError("--evals must be at least 1")
    if args.seed < 0:
        raise ConfigError(f"--seed {args.seed} is negative; give a seed of 0 or more")
    spec = PipelineSpec.load(args.pipeline).with_final_budget(args.budget)
    with removed_if_left_empty(_run_dir(args, "pipelines", spec.name)):
        return _pipeline(args, spec)


def _pipeline(args: argparse.Namespace, spec: Any) -> int:
    from automlprune.report.pipeline import write_pipeline_report
    from automlprune.search.pipeline import PipelineRun

    session, run_dir = _open_run(args, "pipelines", spec.name, [])
    final = spec.budget(len(spec.stages) - 1)
    session.save_config([f"pipeline:{spec.name}"], [final], [args.seed], args.evals, None, {"pipeline": spec.to_dict()})
    outcome = PipelineRun(session, spec, args.seed, args.evals, progress=not args.json).run()
    payload = write_pipeline_report(session, outcome, run_dir, export=not args.no_export)
    lines = [f"{s.index}. {s.name} ({s.strategy}, {s.budget}): validation {_pct(s.answer['accuracy'])}"
             + (f", after {s.finetune['epochs']} fine-tune epochs {_pct(s.val_accuracy)}" if s.finetune else "")
             + f"; {_pct(s.answer['relative']['macs'])} MACs, {_pct(s.answer['relative']['bytes'])} bytes" for s in outcome.stages]
    lines.append(f"final network: test accuracy {_pct(outcome.final.test_accuracy)}; report {payload['report']}")
    export = payload.get("export") or {}
    if "packed" in export:
        lines.append(f"  saved {export['packed']} ({export['file_bytes']:,} bytes on disk, {export['reported_bytes']:,.0f} bytes of parameters reported)")
    _emit(args, payload, "\n".join(lines))
    return 0


def _read_notes(path: str | None) -> str | None:
    """The text of ``compare --notes``, read before the run starts so a wrong path fails at once."""
    if path is None:
        return None
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the notes file {path} ({exc.strerror or exc}); give a readable Markdown file") from None


def _run_context(run_dir: Path, storage: str | None):
    """The store (opened, never created), saved config and task of a finished run directory."""
    from automlprune.search.run_dir import is_own_storage
    from automlprune.search.store import RunStore
    from automlprune.tasks import Task, TaskSpec

    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.json); give the folder a search or compare wrote")
    config = json.loads((run_dir / "config.json").read_text())
    saved = config.get("storage")
    store = RunStore(run_dir, storage or (None if is_own_storage(saved) else saved), create=False)
    return store, config, Task(TaskSpec.from_saved(store.saved_task(config)))


def _saved_space(task, config: dict, model=None):
    from automlprune.space import SearchSpace, SpaceConfig

    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in config["space"].items()}
    model = model if model is not None else task.build_model()
    return SearchSpace(model, task.data.example_input().to(next(model.parameters()).device), SpaceConfig(**cfg))


def cmd_plot(args: argparse.Namespace) -> int:
    from automlprune.report.collect import collect
    from automlprune.report.plots import plot_allocations, plot_pareto, plot_profiles, plot_progress

    run_dir = Path(args.run_dir)
    store, config, task = _run_context(run_dir, args.storage)
    records = collect(store)
    if not records:
        raise ConfigError(f"the run in {run_dir} holds no searches yet; run a search first")
    unpruned = store.unpruned_accuracy()
    paths = [plot_pareto(records, run_dir / "pareto.png", task.spec.name, unpruned), plot_progress(records, run_dir / "progress.png", unpruned),
             plot_profiles(records, _saved_space(task, config), run_dir / "profiles.png"), *plot_allocations(store.artifacts)]
    _emit(args, {"plots": [str(p) for p in paths]}, "wrote " + ", ".join(str(p) for p in paths))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from automlprune.evaluator import Evaluator
    from automlprune.export import export_model
    from automlprune.report.collect import collect
    from automlprune.search import STRATEGIES
    from automlprune.search.budget import parse_budget
    from automlprune.sparsity.masks import realized_masks, sparsity_record

    run_dir = Path(args.run_dir)
    store, config, task = _run_context(run_dir, args.storage)
    budget = parse_budget(args.budget)
    label = budget.label
    records = [r for r in collect(store) if r.budget.label == label and (args.strategy is None or r.strategy == args.strategy)]
    answered = [r for r in records if r.answer]
    if not answered:
        known = sorted({r.budget.label for r in collect(store)})
        raise ConfigError(f"the run in {run_dir} has no feasible candidate for budget {label}"
                          + (f" from strategy {args.strategy}" if args.strategy else "") + f"; its budgets are: {', '.join(known) or 'none'}")
    best = max(answered, key=lambda r: r.answer["accuracy"])
    device = resolve_device(args.device)
    model = task.load_model().to(device)
    space = _saved_space(task, config, model)
    settings = STRATEGIES.get(best.strategy).evaluation_settings(task.spec.evaluation)
    evaluator = Evaluator(model, space, task.data, settings, device)
    proposal = store.proposal(best.answer, model)  # a trained answer is exported from its weights
    ext = {"pt": ".pt", "pt2": ".pt2", "torchscript": ".ts", "onnx": ".onnx", "packed": ".qpt"}[args.format]
    out = Path(args.out) if args.out else run_dir / f"model-{budget.slug}{ext}"
    fmt = {"pt": "pt", "pt2": "torch.export", "torchscript": "torchscript", "onnx": "onnx", "packed": "packed"}[args.format]
    network = evaluator.network(proposal).cpu().eval()
    path = export_model(network, task.data.example_input(), out, fmt, task.architecture())
    payload = {"export": str(path), "strategy": best.strategy, "seed": best.seed, "answer": best.answer}
    human = [f"saved {path} ({best.strategy}, seed {best.seed}: validation accuracy {_pct(best.answer['accuracy'])}, "
             f"{_pct(best.answer['relative']['macs'])} MACs)"]
    sparse = sparsity_record(network)
    if fmt == "packed":
        reported = evaluator.cost_model(proposal.candidate, realized_masks(network))["bytes"]
        payload.update(file_bytes=path.stat().st_size, reported_bytes=reported)
        human.append(f"  the file holds {path.stat().st_size:,} bytes: the reported {reported:,.0f} bytes of parameters plus "
                     "batch-norm statistics and metadata")
    elif sparse:
        human.append(f"  this format holds dense tensors: the {len(sparse)} sparse layers are stored and run dense "
                     "(export --format packed for the sparse size; no PyTorch kernel runs a sparse convolution faster)")
    check = _check_exported(network, path, task.data.example_input(), evaluator.settings.latency_batch_sizes)
    if check:
        payload.update(check)
        lat = check["latency_ms"]
        human.append(f"  the exported file computes what the module does (max |difference| {check['max_abs_difference']:.2g}); latency "
                     + ", ".join(f"batch {b}: {lat['module'][b]:.3f} ms as a module, {lat['exported'][b]:.3f} ms from the file"
                                 for b in lat["module"]))
    _emit(args, payload, "\n".join(human))
    return 0


def _check_exported(network: Any, path: Path, example_input: Any, batch_sizes: Any) -> dict[str, Any] | None:
    """Load the exported file back, compare its output with the module's on a batch of 7 and time
    both together (:func:`automlprune.latency.measure_latencies`, CPU); None for formats that do
    not load as a module (.pt, .qpt) or ONNX without onnxruntime."""
    import torch

    from automlprune.export import load_exported
    from automlprune.latency import measure_latencies

    exported = load_exported(path)
    if exported is None:
        return None
    x = torch.randn(7, *example_input.shape[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = float((exported(x) - network(x)).abs().max())
    module_ms, exported_ms = measure_latencies([network, exported], tuple(example_input.shape[1:]), batch_sizes, "cpu",
                                               rounds=3, repeats=10)
    return {"max_abs_difference": difference,
            "latency_ms": {"module": {str(b): v for b, v in module_ms.items()}, "exported": {str(b): v for b, v in exported_ms.items()}}}
