"""The ``automlprune`` command line. Errors a user can fix print one sentence and exit 2."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Sequence

from automlprune.errors import AutomlpruneError


def _common(parser: argparse.ArgumentParser, env: bool = True) -> None:
    if env:
        parser.add_argument("env", metavar="ENV", help="task spec: a shipped task name (automlprune list envs; e.g. digits-cnn) or a YAML path")
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help="override a task setting, e.g. --set train.epochs=5 (repeatable)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (auto takes CUDA when present)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def _search_args(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--budget", help="one budget, e.g. macs=0.5 (fraction) or params=1.2M (absolute); default macs=0.5")
    which.add_argument("--budgets", help="several budgets, e.g. macs=0.3,0.5,0.7")
    parser.add_argument("--space", help="search space name (automlprune list spaces) or a YAML path (default: the task's)")
    parser.add_argument("--evals", type=int, default=50, help="evaluations per search (default %(default)s)")
    parser.add_argument("--time-limit", type=float, metavar="S", help="seconds of search per strategy, budget and seed")
    parser.add_argument("--storage", help="Optuna storage URL (default: SQLite file in the run directory; journal:PATH for a journal file)")
    parser.add_argument("--run-dir", help="run directory (default: results/runs/<task>/<strategy> or results/compare/<task>)")
    parser.add_argument("--criterion", help="channel importance criterion (see 'automlprune list criteria'; default: the task's)")
    parser.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                        help="strategy option, e.g. --option probes=3; in compare, --option greedy.probes=3 targets one strategy (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    from automlprune import __version__

    parser = argparse.ArgumentParser(prog="automlprune", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"automlprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a task's baseline network and save its checkpoint")
    _common(p)
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train on N processes of this machine (torch.distributed through torchrun: gloo on CPU, one GPU each "
                        "with NCCL); each takes 1/N of every batch and the gradients are averaged (default 1)")

    p = sub.add_parser("inspect", help="list a task's channel groups and the full network's costs")
    _common(p)
    p.add_argument("--space", help="search space name (automlprune list spaces) or a YAML path (default: the task's)")

    p = sub.add_parser("evaluate", help="accuracy and costs of one candidate; optionally export its network")
    _common(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--candidate", metavar="FILE.json", help='candidate file {"ratios": {...}, "bits": {...}}')
    which.add_argument("--uniform", type=float, metavar="RATIO", help="keep this fraction of every prunable group")
    p.add_argument("--space", help="search space name or YAML path (default: the task's)")
    p.add_argument("--latency", action="store_true", help="also measure CPU/GPU latency of the materialized network")
    p.add_argument("--int8", action="store_true",
                   help="candidate at 8 bits everywhere: also build PyTorch's int8 network (x86) and report its accuracy and CPU latency next to float32")
    p.add_argument("--criterion", help="channel importance criterion (see 'automlprune list criteria'; default: the task's)")
    p.add_argument("--finetune-epochs", type=int, default=0, metavar="E", help="fine-tune for E epochs and report test accuracy")
    p.add_argument("--export", metavar="OUT", help="save the network (.pt, .pt2 torch.export, .ts TorchScript, .onnx, .qpt packed quantized weights and sparse layers)")

    p = sub.add_parser("search", help="search widths under one or several budgets with one strategy")
    _common(p)
    _search_args(p)
    p.add_argument("--strategy", default="optuna-tpe", help="strategy name (see 'automlprune list strategies'; default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="strategy seed (default %(default)s)")
    p.add_argument("--finetune-epochs", type=int, default=0, metavar="E", help="fine-tune each answer for E epochs and report test accuracy")
    p.add_argument("--no-export", action="store_true", help="do not save the answers' networks")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train on N processes of this machine (torchrun, as train --nproc): for the training strategies "
                        "whose decisions agree across processes (resrep, greg1, greg2, l0-anneal, dmcp); rank 0 runs the "
                        "search loop and the store, and the fine-tune runs on all N (default 1)")

    p = sub.add_parser("compare", help="run several strategies under the same budgets, seeds and fine-tune; write a report")
    _common(p)
    _search_args(p)
    p.add_argument("--strategies", required=True, help="comma-separated strategy names, e.g. uniform,random,optuna-tpe")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds per strategy (0..K-1; default %(default)s)")
    p.add_argument("--finetune-epochs", type=int, default=None, metavar="E", help="identical fine-tune of every answer (default: the task's finetune.epochs)")
    p.add_argument("--train-budget", type=float, default=None, metavar="E",
                   help="equal training compute: every answer trains on E epochs of images in all, its strategy's training plus a fine-tune of the rest")
    p.add_argument("--notes", metavar="FILE", help="Markdown commentary added to the report under 'Notes' (e.g. why a strategy fell short)")

    p = sub.add_parser("pipeline", help="run a compression pipeline: stages (prune, fine-tune, sparsify, quantize) of one run, "
                                         "each searched on the network the stage before handed on")
    _common(p)
    p.add_argument("pipeline", metavar="PIPELINE", help="a shipped pipeline name (automlprune list pipelines) or a YAML path")
    p.add_argument("--budget", help="the last stage's budget (replaces the file's), e.g. bytes=0.125")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage's strategy (default %(default)s)")
    p.add_argument("--evals", type=int, default=50, help="evaluations of a stage whose file gives none (default %(default)s)")
    p.add_argument("--storage", help="Optuna storage URL (default: SQLite file in the run directory)")
    p.add_argument("--run-dir", help="run directory (default: results/pipelines/<task>/<pipeline>)")
    p.add_argument("--no-export", action="store_true", help="do not save the final network")
    p.set_defaults(space=None)

    p = sub.add_parser("plot", help="redraw a run's Pareto, progress and width-profile plots from its store")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--storage", help="the run's Optuna storage URL, if not the SQLite file in RUN_DIR")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")

    p = sub.add_parser("export", help="save the network a run found for a budget")
    _common(p, env=False)
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--budget", required=True, help="one of the run's budgets, e.g. macs=0.5")
    p.add_argument("--strategy", help="only this strategy's answers (default: the most accurate of all)")
    p.add_argument("--format", choices=["pt", "pt2", "torchscript", "onnx", "packed"], default="pt2",
                   help="default %(default)s (torch.export); packed: bit-packed quantized weights and sparse layers in their storage formats (.qpt)")
    p.add_argument("--out", help="output file (default RUN_DIR/model-<budget>.<ext>)")
    p.add_argument("--storage", help="the run's Optuna storage URL, if not the SQLite file in RUN_DIR")

    p = sub.add_parser("list", help="list models, datasets, criteria, strategies, envs, spaces or pipelines")
    p.add_argument("what", choices=["models", "datasets", "criteria", "weight-criteria", "formats", "strategies", "envs", "spaces",
                                    "pipelines"])
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")

    p = sub.add_parser("benchmark", help="benchmarks that write reports: the engine (cost model, evaluator, latency), "
                                         "the importance criteria, the coverage of torchvision CNN families, where pruned "
                                         "networks spend their CPU time, ...")
    _common(p, env=False)
    p.add_argument("--suite", choices=["engine", "criteria", "models", "signals", "sparsity", "chaos", "workers", "latency"],
                   default="engine",
                   help="which benchmark (default %(default)s)")
    p.add_argument("--families", help="models suite: comma-separated torchvision model names (default: one per family)")
    p.add_argument("--env", default=None, help="task of the criteria, signals, sparsity and chaos suites (default fmnist-resnet20; chaos: digits-cnn)")
    p.add_argument("--signals", help="signals suite: comma-separated evaluation settings (default: all)")
    p.add_argument("--finetune-steps", type=int, default=None,
                   help="criteria and signals suites: SGD steps of the identical fine-tune (default 50 and 300)")
    p.add_argument("--criteria", help="criteria suite: comma-separated criteria (default: all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="criteria, signals and sparsity suites: override a task setting, e.g. --set evaluation.bn_batches=40")
    p.add_argument("--out", help="report folder (default: results/runs/benchmark-<suite>)")
    p.add_argument("--candidates", type=int, default=None,
                   help="random candidates per measurement (engine suite: timed, default 30; models suite: checked, default 3; "
                        "signals suite: random allocations per budget beside the allocators', default 8; "
                        "latency suite: random allocations whose latency the table predicts, default 4)")
    p.add_argument("--quick", action="store_true", help="a small model and few repeats (for smoke tests)")
    p.add_argument("--sizes", help="sparsity suite: comma-separated fractions of the float32 size (default 0.25,0.125,0.0625)")
    p.add_argument("--arms", help="sparsity suite: comma-separated arms (default: all: channels, bits, unstructured, 2:4, block:1x4, pconv, darb, joint)")
    p.add_argument("--evals", type=int, default=None, help="sparsity, chaos and workers suites: evaluations per search (default 40, 12 and 40)")
    p.add_argument("--workers", help="workers suite: comma-separated worker counts (default 1,2,4)")
    p.add_argument("--kills", type=int, default=20, help="chaos suite: SIGKILLs spread over the strategies (default %(default)s)")
    p.add_argument("--strategies", help="chaos suite: comma-separated strategies (default random, optuna-tpe, greedy, ppo, dmcp, l0-anneal)")
    p.add_argument("--finetune-epochs", type=int, default=1, help="sparsity suite: epochs of the identical fine-tune (default %(default)s)")
    p.add_argument("--macs", help="criteria, signals and latency suites: comma-separated MACs fractions to prune to "
                                  "(default 0.7,0.5,0.3; 0.5,0.3; 0.5)")
    p.add_argument("--subjects", help="latency suite: comma-separated tasks or torchvision:NAME@PIXELS "
                                      "(default fmnist-resnet20,fmnist-mobilenetv2,fmnist-vgg11)")
    p.add_argument("--round-to", help="latency suite: comma-separated channel alignments of the rounded prunings (default 8,16)")
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """automlprune's own warnings (groups pinned automatically) as one line; others as Python prints them."""
    from automlprune.space.search_space import AutoPinned

    if issubclass(category, AutoPinned):
        print(f"automlprune: warning: {message}", file=file or sys.stderr)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    from automlprune.cli import commands

    warnings.showwarning = _show_warning
    try:
        return getattr(commands, f"cmd_{args.command}")(args) or 0
    except AutomlpruneError as exc:
        if os.environ.get("RANK", "0") == "0":  # several training processes: the same sentence once, from rank 0
            print(f"automlprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("automlprune: interrupted; files already written are kept", file=sys.stderr)
        return 130
    except OSError as exc:  # a file the command reads or writes: permissions, a full disk, a missing folder
        where = exc.filename or "a file"
        print(f"automlprune: error: {exc.strerror or exc} ({where}); fix the path's permissions or free disk space and rerun: "
              "what was stored before is kept", file=sys.stderr)
        return 2
    except Exception as exc:
        from automlprune.search.store import storage_write_problem

        problem = storage_write_problem(exc)
        if problem is None:
            raise
        print(f"automlprune: error: {problem}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
