"""Sparsity benchmark: at fixed fractions of the float32 size, the best network of each way to
shrink it (channels only, weight sparsity only in each pattern family, bits only, and all three
jointly), after the same fine-tune, with measured CPU latency and the packed file's size.

Each arm is an ordinary ``automlprune compare`` run in its own search space, one run directory
per (arm, size) under the report folder, so every figure has a command and a run store behind
it, and an interrupted benchmark resumes where it stopped: finished searches and fine-tunes are
served from the stores, and an (arm, size) whose report and exported answer are already in its
folder for the same strategies, evaluations and fine-tune is kept as it is (run stores are not
committed, so a benchmark resumed on another machine keeps the finished arms' committed reports). A size an arm cannot reach (2:4 sparsity alone cannot go below about
56 % of the float32 size) is reported as unreachable with the reason, not left out. Each arm's
answer for a size is its strategy with the best validation accuracy (the search-time score;
test accuracy is never used to choose), exported with ``automlprune export --format packed``:
the report gives that file's size beside the cost model's bytes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from automlprune.errors import ConfigError

SPARSE_DENSITIES = [0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
ARMS: dict[str, dict[str, Any]] = {
    "channels": {"space": "fine", "strategies": ["prunenet", "optuna-tpe"], "axes": "widths"},
    "bits": {"space": "bits-only", "strategies": ["haq", "optuna-tpe"], "axes": "bits"},
    "unstructured": {"space": {"ratios": [1.0], "sparsity": {"densities": SPARSE_DENSITIES, "patterns": ["unstructured"]}},
                     "strategies": ["global-magnitude", "optuna-tpe"], "axes": "densities (unstructured)"},
    "2:4": {"space": {"ratios": [1.0], "sparsity": {"densities": [0.5, 1.0], "patterns": ["2:4"]}},
            "strategies": ["optuna-tpe"], "axes": "densities (2:4)"},
    "block:1x4": {"space": {"ratios": [1.0], "sparsity": {"densities": SPARSE_DENSITIES, "patterns": ["block:1x4"]}},
                  "strategies": ["uniform", "optuna-tpe"], "axes": "densities (1x4 blocks)"},
    "pconv": {"space": {"ratios": [1.0], "sparsity": {"densities": [d for d in SPARSE_DENSITIES if d <= 0.4] + [4 / 9, 1.0],
                                                      "patterns": ["pconv"]}},
              "strategies": ["uniform", "optuna-tpe"], "axes": "densities (PCONV kernel patterns)"},
    "darb": {"space": {"ratios": [1.0], "sparsity": {"densities": SPARSE_DENSITIES, "patterns": ["darb"]}},
             "strategies": ["uniform", "optuna-tpe"], "axes": "densities (DARB blocks)"},
    "joint": {"space": "joint", "strategies": ["optuna-tpe", "ddpg"], "axes": "widths + densities + bits"},
}
"""Arm -> its search space (a shipped name, or the settings of a space file the benchmark writes),
the strategies run in it, and what it searches."""


def _cli(argv: list[str], progress: bool = False) -> tuple[int, dict[str, Any] | None, str]:
    """Run one automlprune command as its own process (exactly what a user would run): with
    ``--json`` unless ``progress``, when its progress lines are relayed instead; (exit code, its
    JSON output or None, its last line on stderr: the error sentence when it failed)."""
    process = subprocess.Popen([sys.executable, "-m", "automlprune", *argv, *([] if progress else ["--json"])],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = ""
    for line in process.stderr:
        if line.strip():
            last = line.strip()
        if progress:
            print(line, end="", file=sys.stderr, flush=True)
    text = process.stdout.read().strip()
    code = process.wait()
    return code, (json.loads(text) if code == 0 and text and not progress else None), last


def _space_argument(arm: str, spec: Any, out_dir: Path) -> str:
    if isinstance(spec, str):
        return spec
    import yaml

    path = out_dir / "spaces" / f"{arm.replace(':', '-')}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"description": f"sparsity benchmark arm {arm}", **spec}, sort_keys=False))
    return str(path)


def run_sparsity_benchmark(env: str, out_dir: Path, sizes: Sequence[float] = (0.25, 0.125, 0.0625),
                           arms: Sequence[str] | None = None, evals: int = 40, finetune_epochs: int = 1,
                           overrides: Sequence[str] = (), device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Run (resuming) every arm at every size, write ``report.md``, ``results.json`` and
    ``pareto.png`` in ``out_dir``; returns the report's data."""
    names = list(arms or ARMS)
    unknown = [a for a in names if a not in ARMS]
    if unknown:
        raise ConfigError(f"unknown sparsity-benchmark arms {', '.join(unknown)}; use some of {', '.join(ARMS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    sets = [x for o in overrides for x in ("--set", o)]
    rows = []
    for arm in names:
        spec = ARMS[arm]
        space = _space_argument(arm, spec["space"], out_dir)
        for size in sizes:
            budget = f"bytes={size:g}"
            run_dir = out_dir / arm.replace(":", "-") / budget.replace("=", "").replace(".", "p")
            if progress:
                print(f"sparsity benchmark: {arm} at {size:g} of the float32 size", flush=True)
            row: dict[str, Any] = {"arm": arm, "axes": spec["axes"], "size": size, "run_dir": str(run_dir)}
            if _finished(run_dir, spec["strategies"], evals, finetune_epochs):
                if progress:
                    print(f"  kept: {run_dir} holds this arm's report and exported answer", flush=True)
                rows.append(_row(row, json.loads((run_dir / "results.json").read_text())["rows"], run_dir / "answer.qpt", 0, None, ""))
                continue
            code, _, error = _cli(["compare", env, "--space", space, "--strategies", ",".join(spec["strategies"]),
                                   "--budgets", budget, "--evals", str(evals), "--finetune-epochs", str(finetune_epochs),
                                   "--run-dir", str(run_dir), "--device", device, *sets], progress)
            if code != 0:
                row["unreachable"] = error.removeprefix("automlprune: error: ") if error else f"compare exited {code}"
                rows.append(row)
                continue
            results = json.loads((run_dir / "results.json").read_text())["rows"]
            answered = [r for r in results if r.get("val_accuracy") is not None]
            if not answered:
                row["unreachable"] = "no strategy found a network within the budget"
                rows.append(row)
                continue
            best = max(answered, key=lambda r: r["val_accuracy"])
            answer = run_dir / "answer.qpt"
            answer.unlink(missing_ok=True)  # a stale export must not pass for this run's
            code, _, error = _cli(["export", str(run_dir), "--budget", budget, "--strategy", best["strategy"],
                                   "--format", "packed", "--out", str(answer)])
            rows.append(_row(row, results, answer, code, best, error))
    report = {"env": env, "sizes": list(sizes), "evals": evals, "finetune_epochs": finetune_epochs, "rows": rows}
    (out_dir / "results.json").write_text(json.dumps(report, indent=1))
    plot_arms(rows, out_dir / "pareto.png")
    (out_dir / "report.md").write_text(render(report))
    return report


def _finished(run_dir: Path, strategies: Sequence[str], evals: int, finetune_epochs: int) -> bool:
    """Whether ``run_dir`` already holds this (arm, size)'s compare report for the same strategies,
    evaluation budget and fine-tune, and the exported answer."""
    try:
        report = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return False
    config = report.get("config", {})
    rows = report.get("rows", [])
    return ((run_dir / "answer.qpt").is_file() and sorted(config.get("strategies", [])) == sorted(strategies)
            and config.get("max_evals") == evals and all(r.get("finetune_epochs") == finetune_epochs for r in rows)
            and {r["strategy"] for r in rows} == set(strategies))


def _row(row: dict[str, Any], results: list[dict[str, Any]], answer: Path, code: int, best: dict[str, Any] | None,
         error: str) -> dict[str, Any]:
    """The benchmark's row for one (arm, size): the answer with the best validation accuracy among
    ``results`` (``best`` when already chosen), the packed file ``answer`` (exported with exit code
    ``code``) and every strategy's answer as a point."""
    answered = [r for r in results if r.get("val_accuracy") is not None]
    best = best or max(answered, key=lambda r: r["val_accuracy"])
    row.update(strategy=best["strategy"], val_accuracy=best["val_accuracy"], test_accuracy=best["test_accuracy"],
               bytes_fraction=best["bytes_fraction"], bytes=best["bytes"], macs_fraction=best["macs_fraction"],
               macs_nnz_fraction=best.get("macs_nnz_fraction"), latency_ratio_b1=best.get("latency_ratio_b1"),
               latency_ratio_b64=best.get("latency_ratio_b64"),
               file_bytes=answer.stat().st_size if code == 0 and answer.is_file() else None, export_error=error if code else None,
               points=[{"strategy": r["strategy"], "bytes_fraction": r["bytes_fraction"], "test_accuracy": r["test_accuracy"]}
                       for r in answered])
    return row


def plot_arms(rows: list[dict[str, Any]], path: Path) -> Path:
    """Test accuracy after the fine-tune against the fraction of the float32 size, every answer of
    every arm (one colour per arm; the arm's chosen answer per size ringed)."""
    from automlprune.report.plots import figure

    fig, ax = figure(figsize=(7.5, 4.8))
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    colors = {a: f"C{i}" for i, a in enumerate(arms)}
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm and "unreachable" not in r]
        points = [p for r in mine for p in r["points"] if p["test_accuracy"] is not None]
        if points:
            ax.scatter([p["bytes_fraction"] for p in points], [100 * p["test_accuracy"] for p in points], s=14, alpha=0.4,
                       color=colors[arm])
        chosen = sorted(mine, key=lambda r: r["bytes_fraction"])
        ax.plot([r["bytes_fraction"] for r in chosen], [100 * r["test_accuracy"] for r in chosen], marker="o",
                color=colors[arm], label=arm)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("size (fraction of the float32 network's bytes)")
    ax.set_ylabel("test accuracy after fine-tune (%)")
    ax.set_title("best answer per arm and size (rings) and every strategy's answer (dots)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def render(report: dict[str, Any]) -> str:
    rows = report["rows"]
    lines = [f"# Channels, sparsity and bits at fixed sizes on {report['env']}", "",
             f"Command: `automlprune benchmark --suite sparsity --env {report['env']} --sizes "
             f"{','.join(f'{s:g}' for s in report['sizes'])} --evals {report['evals']} --finetune-epochs {report['finetune_epochs']}`. "
             "Each arm is a `compare` run in its own space (run directories beside this report); its answer per size is the strategy "
             "with the best validation accuracy, fine-tuned like every other answer "
             f"({report['finetune_epochs']} epoch(s)), and exported with `automlprune export --format packed`. Sizes are bytes of "
             "the parameters in their smallest honest format (dense, bitmask, CSR, N:M, block; quantization scales included), "
             "as fractions of the float32 network; the file column is the packed file on disk (plus batch-norm statistics and "
             "metadata). MACs are what PyTorch executes (sparse layers run dense); theoretical MACs count nonzero weights only. "
             "Latency: median CPU time of the exported network relative to the unpruned one measured in the same run "
             "(batch 1 / batch 64); sparse layers run dense, so sparsity alone does not change it.", ""]
    for size in report["sizes"]:
        lines += [f"## {size:g} of the float32 size", "",
                  "| arm | searches | strategy | val acc | test acc | bytes | packed file (B) | MACs | MACs (theoretical) | latency b1 / b64 |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["size"] == size):
            if "unreachable" in r:
                lines.append(f"| {r['arm']} | {r['axes']} | unreachable: {r['unreachable']} | | | | | | | |")
                continue
            latency = (f"{r['latency_ratio_b1']:.2f} / {r['latency_ratio_b64']:.2f}" if r.get("latency_ratio_b1") is not None else "")
            nnz = f"{r['macs_nnz_fraction']:.2%}" if r.get("macs_nnz_fraction") is not None else ""
            file_bytes = f"{r['file_bytes']:,}" if r.get("file_bytes") else "not exported"
            lines.append(f"| {r['arm']} | {r['axes']} | {r['strategy']} | {100 * r['val_accuracy']:.2f} | {100 * r['test_accuracy']:.2f} | "
                         f"{r['bytes_fraction']:.2%} ({r['bytes']:,.0f} B) | {file_bytes} | {r['macs_fraction']:.2%} | {nnz} | {latency} |")
        lines += ["", _verdict(rows, size), ""]
    lines += ["![Accuracy against size, every arm](pareto.png)", ""]
    return "\n".join(lines)


def _verdict(rows: list[dict[str, Any]], size: float) -> str:
    """Whether the joint arm's answer is at least as accurate (test, after fine-tune) as every
    single-axis arm's at this size."""
    mine = {r["arm"]: r for r in rows if r["size"] == size and "unreachable" not in r}
    if "joint" not in mine:
        return "The joint arm has no answer at this size."
    joint = mine["joint"]["test_accuracy"]
    behind = [f"{a} ({100 * r['test_accuracy']:.2f})" for a, r in mine.items() if a != "joint" and r["test_accuracy"] > joint]
    if behind:
        return f"The joint search ({100 * joint:.2f}) is behind: {', '.join(behind)}."
    return f"The joint search ({100 * joint:.2f}) is at least as accurate as every single-axis arm that reaches this size."
