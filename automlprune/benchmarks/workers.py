"""Workers benchmark: evaluations per minute of one search run by 1, 2, 4, ... worker processes on
this machine (the same ``automlprune search`` command started N times against one run
directory), with the check that together they stored exactly the evaluation budget.

On one machine the workers share its cores, so the figure measures how much of the search's
time is spent outside the evaluations' arithmetic (process start, data loading, the store's
claims): with as many workers as cores it approaches the core count; beyond, it flattens. On N
machines each worker has its own cores and the evaluations per minute grow with N until the
shared database (claims are a few reads and writes per evaluation) becomes the limit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from automlprune.search.store import RunStore

BUDGET = "macs=0.5"


def _workers_run(env: str, strategy: str, run_dir: Path, evals: int, workers: int, overrides: Sequence[str]) -> dict[str, Any]:
    command = [sys.executable, "-m", "automlprune", "search", env, "--strategy", strategy, "--budget", BUDGET, "--evals", str(evals),
               "--run-dir", str(run_dir), "--no-export", "--json", *[x for o in overrides for x in ("--set", o)]]
    threads = str(max(1, (os.cpu_count() or 1) // workers))  # the cores shared out, as torchrun does
    start = time.perf_counter()
    processes = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": threads}) for _ in range(workers)]
    errors = [p.communicate()[1] for p in processes]
    seconds = time.perf_counter() - start
    failed = [e.strip().splitlines()[-1] for p, e in zip(processes, errors) if p.returncode != 0 and e.strip()]
    store = RunStore(run_dir, create=False)
    study = store.find_study(f"{strategy}|{BUDGET}|seed0")
    stored = store.records(study) if study is not None else []
    keys = [r.result.key for r in stored]
    searching = (max(r.finished for r in stored) - min(r.started for r in stored)).total_seconds() if stored else 0.0
    return {"workers": workers, "seconds": seconds, "evaluations": len(keys), "distinct": len(set(keys)),
            "per_minute": 60.0 * len(keys) / seconds, "search_seconds": searching,
            "per_minute_searching": 60.0 * len(keys) / searching if searching else 0.0, "errors": failed}


def run_workers_benchmark(env: str, out_dir: Path, counts: Sequence[int] = (1, 2, 4), evals: int = 40,
                          strategy: str = "optuna-random", overrides: Sequence[str] = (), progress: bool = True) -> dict[str, Any]:
    """One search per worker count (a fresh run directory each); writes ``report.md``,
    ``results.json`` and ``scaling.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "automlprune", "evaluate", env, "--uniform", "1.0", "--json",  # the baseline, trained once
                    *[x for o in overrides for x in ("--set", o)]], check=True, capture_output=True)
    rows = []
    for workers in counts:
        run_dir = out_dir / "runs" / f"workers{workers}"
        shutil.rmtree(run_dir, ignore_errors=True)
        row = _workers_run(env, strategy, run_dir, evals, workers, overrides)
        rows.append(row)
        if progress:
            print(f"workers: {workers} -> {row['evaluations']} evaluations in {row['seconds']:.1f}s "
                  f"({row['per_minute']:.1f}/min)", file=sys.stderr, flush=True)
    report = {"env": env, "strategy": strategy, "evals": evals, "cpus": os.cpu_count(), "rows": rows}
    (out_dir / "results.json").write_text(json.dumps(report, indent=1))
    _plot(rows, out_dir / "scaling.png")
    (out_dir / "report.md").write_text(render(report))
    return report


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    from automlprune.report.plots import figure

    fig, ax = figure(figsize=(6, 4))
    ax.plot([r["workers"] for r in rows], [r["per_minute"] for r in rows], marker="o", label="wall time (process start included)")
    ax.plot([r["workers"] for r in rows], [r["per_minute_searching"] for r in rows], marker="s", label="first to last evaluation")
    base = rows[0]["per_minute_searching"] / rows[0]["workers"]
    ax.plot([r["workers"] for r in rows], [base * r["workers"] for r in rows], ls="--", color="grey", label="linear")
    ax.set_xlabel("worker processes on one machine")
    ax.set_ylabel("evaluations per minute")
    ax.set_xticks([r["workers"] for r in rows])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def render(report: dict[str, Any]) -> str:
    lines = [f"# Workers on one search ({report['env']}, {report['strategy']}, {report['evals']} evaluations, {report['cpus']} CPUs)", "",
             f"Command: `automlprune benchmark --suite workers --env {report['env']} --evals {report['evals']}`. Each row starts "
             "the same `automlprune search` command N times against a fresh run directory and times them until the last ends "
             "(process start and model loading included), and from the first evaluation's start to the last one's end "
             "(the search itself, from the store's trial times).", "",
             "| workers | wall time (s) | evaluations stored (distinct) | per minute, wall | first to last evaluation (s) | "
             "per minute, searching | speed-up, searching |", "|---|---|---|---|---|---|---|"]
    base = report["rows"][0]["per_minute_searching"] or 1.0
    for r in report["rows"]:
        lines.append(f"| {r['workers']} | {r['seconds']:.1f} | {r['evaluations']} ({r['distinct']}) | {r['per_minute']:.1f} | "
                     f"{r['search_seconds']:.1f} | {r['per_minute_searching']:.1f} | {r['per_minute_searching'] / base:.2f} |"
                     + (f" errors: {'; '.join(r['errors'])}" if r["errors"] else ""))
    lines += ["", "![evaluations per minute against workers](scaling.png)", ""]
    return "\n".join(lines)
