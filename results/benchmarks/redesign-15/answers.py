"""Answers of six strategies on digits, for the behaviour-preservation check of issue 15."""
import json, sys, shutil, pathlib, torch
from automlprune.tasks import Task, TaskSpec
from automlprune.search.budget import parse_budget
from automlprune.search.runner import SearchSession
from automlprune.search.store import RunStore
out = pathlib.Path(sys.argv[1]); run = pathlib.Path(sys.argv[2])
shutil.rmtree(run, ignore_errors=True)
task = Task(TaskSpec.load("digits-cnn"))
session = SearchSession(task, torch.device("cpu"), RunStore(run), progress=False)
rows = {}
for strategy in ["uniform", "global", "greedy", "prunenet", "dmcp", "optuna-tpe"]:
    for b in ["macs=0.5", "macs=0.3"]:
        o = session.run(strategy, parse_budget(b), seed=0, max_evals=20)
        rows[f"{strategy} {b}"] = {"candidate": o.answer.candidate.to_dict(), "accuracy": o.answer.accuracy,
                                   "macs": o.answer.relative["macs"], "evaluations": o.evaluations}
        print(strategy, b, o.answer.accuracy, o.evaluations, flush=True)
out.write_text(json.dumps(rows, indent=1, sort_keys=True))
