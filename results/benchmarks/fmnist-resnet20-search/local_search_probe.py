# Run from the repository root after run.sh: python results/benchmarks/fmnist-resnet20-search/local_search_probe.py (about 3 minutes).
"""Can any allocation near prunenet's beat it at 30% / 50% MACs under the default search signal (prunenet order +
least-squares fold)? Hill-climbing from prunenet's answer: each step moves 1-3 groups by 1-2 grid steps (1/32),
repairs to the budget, evaluates, keeps the better. 40 evaluations per budget, seed 0."""
import sys, time
import numpy as np, optuna, torch
from automlprune.tasks import Task, TaskSpec
from automlprune.baseline import ensure_baseline
from automlprune.evaluator import Evaluator
from automlprune.search.budget import parse_budget
from automlprune.search.repair import repair_to_budget
from automlprune.search.store import RunStore
from automlprune.settings import SEARCH_SIGNAL
from automlprune.space import Candidate
torch.set_num_threads(2)
spec = TaskSpec.load("fmnist-resnet20", ["checkpoint=results/benchmarks/fmnist-resnet20-training/baseline.pt"])
task = Task(spec)
model = ensure_baseline(task, "cpu", progress=False)
space = task.search_space(model, "fine")
ev = Evaluator(model, space, task.data, spec.evaluation.with_defaults(SEARCH_SIGNAL))
store = RunStore("results/benchmarks/fmnist-resnet20-search")
grid = list(space.config.ratios)
for label in sys.argv[1:] or ["macs=0.3", "macs=0.5"]:
    budget = parse_budget(label).bind(ev.cost_model.base)
    name = RunStore.study_name("prunenet", label, 0)
    start = Candidate.from_dict(store.summary(optuna.load_study(study_name=name, storage=store.storage)).answer["candidate"])
    best, best_acc = start, ev.evaluate(start).accuracy
    rng = np.random.default_rng(0)
    seen, t0 = {start.key}, time.time()
    for i in range(40):
        ratios = dict(best.ratio_map)
        for g in rng.choice(space.prunable, size=int(rng.integers(1, 4)), replace=False):
            r = ratios.get(g, 1.0)
            j = min(range(len(grid)), key=lambda k: abs(grid[k] - r)) + int(rng.choice([-2, -1, 1, 2]))
            ratios[g] = grid[min(max(j, 0), len(grid) - 1)]
        cand = space.canonical(repair_to_budget(Candidate.make(ratios), space, ev.cost_model, budget))
        if cand.key in seen or not budget.met_by(ev.cost_model(cand)):
            continue
        seen.add(cand.key)
        acc = ev.evaluate(cand).accuracy
        if acc > best_acc:
            best, best_acc = cand, acc
            print(f"  {label} step {i}: {100 * acc:.2f}", flush=True)
    print(f"{label}: prunenet {100 * ev.evaluate(start).accuracy:.2f} -> local search best {100 * best_acc:.2f} "
          f"({len(seen) - 1} evaluations, {time.time() - t0:.0f}s)", flush=True)
