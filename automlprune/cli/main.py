"""The ``automlprune`` command line. Errors a user can fix print one sentence and exit 2."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from automlprune.errors import AutomlpruneError


def _common(parser: argparse.ArgumentParser, env: bool = True) -> None:
    if env:
        parser.add_argument("env", metavar="ENV", help="task spec: a name from envs/ (e.g. digits-cnn) or a YAML path")
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help="override a task setting, e.g. --set train.epochs=5 (repeatable)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (auto takes CUDA when present)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def build_parser() -> argparse.ArgumentParser:
    from automlprune import __version__

    parser = argparse.ArgumentParser(prog="automlprune", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"automlprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a task's baseline network and save its checkpoint")
    _common(p)
    p.add_argument("--epochs", type=int, help="override train.epochs")

    p = sub.add_parser("inspect", help="list a task's channel groups and the full network's costs")
    _common(p)
    p.add_argument("--space", help="search space name from search_spaces/ or a YAML path (default: the task's)")

    p = sub.add_parser("evaluate", help="accuracy and costs of one candidate; optionally export its network")
    _common(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--candidate", metavar="FILE.json", help='candidate file {"ratios": {...}, "bits": {...}}')
    which.add_argument("--uniform", type=float, metavar="RATIO", help="keep this fraction of every prunable group")
    p.add_argument("--space", help="search space name or YAML path (default: the task's)")
    p.add_argument("--latency", action="store_true", help="also measure CPU/GPU latency of the materialized network")
    p.add_argument("--finetune-epochs", type=int, default=0, metavar="E", help="fine-tune for E epochs and report test accuracy")
    p.add_argument("--export", metavar="OUT", help="save the network (.pt, .pt2 torch.export, .ts TorchScript, .onnx)")

    p = sub.add_parser("list", help="list models, datasets, criteria, envs or spaces")
    p.add_argument("what", choices=["models", "datasets", "criteria", "envs", "spaces"])
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")

    p = sub.add_parser("benchmark", help="engine benchmark: cost model, evaluator overhead, latency vs MACs; writes a report")
    _common(p, env=False)
    p.add_argument("--out", default="results/benchmarks/engine", help="report folder (default: %(default)s)")
    p.add_argument("--candidates", type=int, default=30, help="random candidates timed per measurement")
    p.add_argument("--quick", action="store_true", help="a small model and few repeats (for smoke tests)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from automlprune.cli import commands

    try:
        return getattr(commands, f"cmd_{args.command}")(args) or 0
    except AutomlpruneError as exc:
        print(f"automlprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("automlprune: interrupted; files already written are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
