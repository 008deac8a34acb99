# Run from the repository root: python results/benchmarks/fmnist-latency/discrepancy_probe.py (about 3 minutes, idle machine).
"""The open discrepancy: the latency suite's "uniform 50% (irregular)" ResNet-20 measured 0.52 of the unpruned network at
batch 64, compare's uniform L1 answer at 50% MACs in space `fine` (3-seed search benchmark) 0.77. Both keep 49.4% of
the MACs. Build both on the trained checkpoint, print their widths, and time them (deployed form) alone and among the
search benchmark's 54 other answers' widths, as compare times them."""
import optuna, torch
from automlprune.tasks import Task, TaskSpec
from automlprune.baseline import ensure_baseline
from automlprune.evaluator import Evaluator
from automlprune.export import deployable
from automlprune.latency import measure_latencies
from automlprune.search.store import RunStore
from automlprune.space import Candidate
from automlprune.benchmarks.latency import uniform_at
from automlprune.materialize import materialize
torch.set_num_threads(2)
spec = TaskSpec.load("fmnist-resnet20", ["checkpoint=results/benchmarks/fmnist-resnet20-training/baseline.pt"])
task = Task(spec)
model = ensure_baseline(task, "cpu", progress=False).eval()
x = task.data.example_input()
space = task.search_space(model, "fine")
ev = Evaluator(model, space, task.data, spec.evaluation)
store = RunStore("results/benchmarks/fmnist-resnet20-search")
answers = {}
for name in sorted(store.study_names()):
    summary = store.summary(optuna.load_study(study_name=name, storage=store.storage))
    if summary.answer:
        answers[name] = Candidate.from_dict(summary.answer["candidate"])
compare_uniform = next(c for n, c in answers.items() if n.startswith("uniform|macs=0.5"))
suite_space, suite_candidate, fraction = uniform_at(model, x, 0.5, 1)
suite_net = materialize(model, suite_candidate, suite_space).eval()
compare_net = ev.network(compare_uniform).eval()

def widths(net):
    return [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)]

print("suite uniform 50%  MACs", f"{fraction:.1%}", widths(suite_net))
print("compare uniform 50% MACs", f"{ev.cost_model(compare_uniform).macs / ev.cost_model.base['macs']:.1%}", widths(compare_net))
trio = [deployable(model), deployable(suite_net), deployable(compare_net)]
alone = measure_latencies(trio, tuple(x.shape[1:]), (1, 64), rounds=7)
print("alone (unpruned, suite, compare):", [(round(l[1] / alone[0][1], 3), round(l[64] / alone[0][64], 3)) for l in alone])
others = [deployable(ev.network(c)) for n, c in answers.items()]
crowd = measure_latencies(trio + others, tuple(x.shape[1:]), (1, 64), rounds=5)
print(f"among {len(crowd)} networks:", [(round(l[1] / crowd[0][1], 3), round(l[64] / crowd[0][64], 3)) for l in crowd[:3]])
print("ms b64 unpruned alone / crowd:", round(alone[0][64], 2), round(crowd[0][64], 2))
