# Run from the repository root: python results/benchmarks/fmnist-latency/weights_probe.py (about 1 minute, idle machine).
"""Why compare's trained answers at 50% MACs measure 0.76 at batch 64 while the latency suite's random-weight uniform
prunings measure 0.48-0.52: time the same widths with trained and random weights, with and without denormals flushed."""
import copy, torch, optuna
from automlprune.tasks import Task, TaskSpec
from automlprune.baseline import ensure_baseline
from automlprune.evaluator import Evaluator
from automlprune.export import deployable
from automlprune.latency import measure_latencies
from automlprune.nn.randomize import randomize_norms
from automlprune.search.store import RunStore
from automlprune.space import Candidate
from automlprune.materialize import materialize
torch.set_num_threads(2)
run = "results/benchmarks/fmnist-latency/fmnist-resnet20-b1"
spec = TaskSpec.load("fmnist-resnet20", ["checkpoint=results/benchmarks/fmnist-resnet20-training/baseline.pt",
                                        "evaluation.criterion=prunenet", "evaluation.reconstruction=least_squares"])
task = Task(spec)
model = ensure_baseline(task, "cpu", progress=False)
space = task.search_space(model, "hw-friendly")
ev = Evaluator(model, space, task.data, spec.evaluation)
store = RunStore(run)
name = [n for n in store.study_names() if n.startswith("optuna-tpe|macs=0.5")][0]
ans = store.summary(optuna.load_study(study_name=name, storage=store.storage)).answer
cand = Candidate.from_dict(ans["candidate"])
print("answer MACs", ans["relative"]["macs"])
trained_full = model
trained_pruned = ev.network(cand)
rand = randomize_norms(copy.deepcopy(model), 0)
for m in rand.modules():
    if hasattr(m, "reset_parameters") and not isinstance(m, torch.nn.BatchNorm2d):
        m.reset_parameters()
rand_pruned = materialize(rand, cand, space)
def denormals(net):
    n = tot = 0
    for p in net.state_dict().values():
        if p.is_floating_point():
            n += int(((p != 0) & (p.abs() < torch.finfo(torch.float32).tiny)).sum()); tot += p.numel()
    return n, tot
nets = {"trained unpruned": trained_full, "trained answer": trained_pruned, "random unpruned": rand, "random answer": rand_pruned}
dep = {k: deployable(v) for k, v in nets.items()}
for k, v in dep.items():
    print(k, "denormal weights", denormals(v))
shape = task.data.example_input().shape[1:]
for flush in (False, True):
    torch.set_flush_denormal(flush)
    lat = measure_latencies(list(dep.values()), shape, (1, 64))
    print("flush_denormal", flush)
    for (k, _), l in zip(dep.items(), lat):
        print(f"  {k:18s} b1 {l[1]:.3f} ms  b64 {l[64]:.3f} ms")
