"""Chaos benchmark: searches killed with SIGKILL at random moments and rerun after each kill.

For every strategy, an uninterrupted search gives the reference; then the same search in another
run directory is started, killed at a random moment (drawn uniformly between 30 % and 95 % of the
reference's wall time, past the process's start; seeded), restarted, killed again, ..., and finally run to its end. After every kill the
study is read and checked:

* **lost**: a stored evaluation (its network and result) missing or changed after the kill;
* **repeated**: two stored evaluations of the same network;
* **budget**: the finished study holds exactly as many evaluations as the reference;
* **answer**: the final answer's network and validation accuracy against the reference's. For
  strategies that replay or restore their state on resume (random, greedy, the RL agents, DMCP
  and the training-time methods, which resume from their last epoch's checkpoint) it must be
  identical; an Optuna sampler restarts its random generator from the seed on resume, so its
  later proposals (and answer) legitimately differ from an uninterrupted run's: for it, only
  lost, repeated and the budget are required.

Every search is the ``automlprune search`` command a user runs, as its own process.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from automlprune.evaluator import EvalResult
from automlprune.search.store import Record, RunStore

STRATEGIES = ("random", "optuna-tpe", "greedy", "ppo", "dmcp", "l0-anneal")
RESTARTS_ITS_SAMPLER = {"optuna-tpe", "optuna-nsga2", "optuna-nsga3", "optuna-random", "optuna-qmc", "optuna-gp"}
"""Strategies whose answer after a resume may differ from an uninterrupted run's (see the module docstring)."""
BUDGET = "macs=0.5"


def _command(env: str, strategy: str, run_dir: Path, evals: int, overrides: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "automlprune", "search", env, "--strategy", strategy, "--budget", BUDGET, "--evals", str(evals),
            "--run-dir", str(run_dir), "--no-export", "--json", *[x for o in overrides for x in ("--set", o)]]


def _evaluations(run_dir: Path, strategy: str) -> tuple[list[Record], dict[str, Any] | None]:
    """The stored evaluations (in trial order) and the stored answer."""
    if not (run_dir / "study.db").is_file():
        return [], None
    store = RunStore(run_dir, create=False)
    study = store.find_study(f"{strategy}|{BUDGET}|seed0")
    if study is None:  # killed before the study was made
        return [], None
    return store.records(study), store.summary(study).answer


def _same(a: EvalResult, b: EvalResult) -> bool:
    return a.accuracy == b.accuracy and a.costs == b.costs


def chaos_one(env: str, strategy: str, out_dir: Path, evals: int, kills: int, rng: np.random.Generator,
              overrides: Sequence[str] = (), progress: bool = True) -> dict[str, Any]:
    """The reference run and ``kills`` killed runs of one strategy, then the run to its end."""
    reference_dir, chaos_dir = out_dir / "runs" / strategy / "reference", out_dir / "runs" / strategy / "killed"
    start = time.perf_counter()
    subprocess.run(_command(env, strategy, reference_dir, evals, overrides), check=True, capture_output=True)
    reference_seconds = time.perf_counter() - start
    reference, reference_answer = _evaluations(reference_dir, strategy)
    row: dict[str, Any] = {"strategy": strategy, "reference_seconds": reference_seconds, "reference_evaluations": len(reference),
                           "kills": [], "lost": 0, "repeated": 0}
    before: list[Record] = []
    for k in range(kills):
        moment = float(rng.uniform(0.3, 0.95) * reference_seconds)  # past the process's start (imports, data, model)
        process = subprocess.Popen(_command(env, strategy, chaos_dir, evals, overrides), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            process.wait(timeout=moment)
            killed = False
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            killed = True
        after, _ = _evaluations(chaos_dir, strategy)
        training = list(chaos_dir.rglob("*.pt"))  # an epoch checkpoint (or DMCP's warm-up) the rerun resumes from
        lost = _lost(before, after)
        row["lost"] += lost
        row["kills"].append({"moment_s": round(moment, 2), "killed": killed, "stored_before": len(before), "stored_after": len(after),
                             "lost": lost, "training_checkpoint": bool(training)})
        if progress:
            print(f"chaos: {strategy} kill {k + 1}/{kills} at {moment:.1f}s: "
                  f"{'killed' if killed else 'had finished'}, {len(after)} evaluations stored, {lost} lost", file=sys.stderr, flush=True)
        before = after
    finished = subprocess.run(_command(env, strategy, chaos_dir, evals, overrides), capture_output=True, text=True)
    final, answer = _evaluations(chaos_dir, strategy)
    keys = [r.result.key for r in final]
    row.update(finished=finished.returncode == 0, error=finished.stderr.strip().splitlines()[-1:] if finished.returncode else [],
               lost=row["lost"] + _lost(before, final), repeated=len(keys) - len(set(keys)), evaluations=len(final),
               budget_exact=len(final) == len(reference),
               answer_key=(answer or {}).get("key"), reference_answer_key=(reference_answer or {}).get("key"),
               answer_accuracy=(answer or {}).get("accuracy"), reference_answer_accuracy=(reference_answer or {}).get("accuracy"),
               answer_required=strategy not in RESTARTS_ITS_SAMPLER)
    row["answer_identical"] = (answer is not None and reference_answer is not None and answer.get("key") == reference_answer.get("key")
                               and answer.get("accuracy") == reference_answer.get("accuracy"))
    row["passed"] = (row["finished"] and row["lost"] == 0 and row["repeated"] == 0 and row["budget_exact"]
                     and (row["answer_identical"] or not row["answer_required"]))
    return row


def _lost(before: list[Record], after: list[Record]) -> int:
    """Evaluations stored before that are missing or changed after."""
    now = {r.result.key: r.result for r in after}
    return sum(1 for r in before if r.result.key not in now or not _same(now[r.result.key], r.result))


def run_chaos_benchmark(env: str, out_dir: Path, strategies: Sequence[str] = STRATEGIES, kills: int = 20, evals: int = 12,
                        overrides: Sequence[str] = (), seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """``kills`` kills spread evenly over ``strategies``; writes ``report.md`` and ``results.json``
    (the run directories under ``runs/``, replaced on every run)."""
    rng = np.random.default_rng(seed)
    shutil.rmtree(out_dir / "runs", ignore_errors=True)  # a fresh reference and a fresh killed run each time
    out_dir.mkdir(parents=True, exist_ok=True)
    shares = [kills // len(strategies) + (1 if i < kills % len(strategies) else 0) for i in range(len(strategies))]
    rows = [chaos_one(env, s, out_dir, evals, n, rng, overrides, progress) for s, n in zip(strategies, shares)]
    report = {"env": env, "budget": BUDGET, "evals": evals, "kills": kills, "seed": seed, "rows": rows,
              "passed": all(r["passed"] for r in rows)}
    (out_dir / "results.json").write_text(json.dumps(report, indent=1))
    (out_dir / "report.md").write_text(render(report))
    return report


def render(report: dict[str, Any]) -> str:
    lines = [f"# Chaos: searches killed with SIGKILL and rerun ({report['env']}, {report['budget']}, {report['evals']} evaluations)", "",
             f"Command: `automlprune benchmark --suite chaos --env {report['env']} --kills {report['kills']} --evals {report['evals']}`. "
             "Each strategy's search runs once uninterrupted (the reference), then in another run directory it is killed "
             "(SIGKILL) at moments drawn uniformly between 30 % and 95 % of the reference's wall time, rerun after each kill, and finally run to its "
             "end. Lost: a stored evaluation missing or changed after a kill. Repeated: one network stored twice. Answer: "
             "the final answer's network and validation accuracy against the reference's (required identical except for the "
             "Optuna samplers, whose random generator restarts from the seed on resume).", "",
             "| strategy | kills (moment s: stored after) | lost | repeated | evaluations (reference) | answer | verdict |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        kills = ", ".join(f"{k['moment_s']:g}: {k['stored_after']}" + ("" if k["killed"] else " (had finished)")
                          + (" (mid-training: resumed from its checkpoint)" if k.get("training_checkpoint") and k["killed"] else "")
                          for k in r["kills"])
        if r["answer_identical"]:
            answer = f"identical ({100 * r['answer_accuracy']:.2f})"
        elif r["answer_accuracy"] is not None and r["reference_answer_accuracy"] is not None:
            answer = f"{100 * r['answer_accuracy']:.2f} vs {100 * r['reference_answer_accuracy']:.2f}" + (
                "" if r["answer_required"] else " (sampler restarted; not required)")
        else:
            answer = "none"
        lines.append(f"| {r['strategy']} | {kills} | {r['lost']} | {r['repeated']} | {r['evaluations']} ({r['reference_evaluations']}) | "
                     f"{answer} | {'pass' if r['passed'] else 'FAIL'} |")
    lines += ["", "All strategies pass." if report["passed"] else "Some strategies FAIL: see the rows marked FAIL.", ""]
    return "\n".join(lines)
