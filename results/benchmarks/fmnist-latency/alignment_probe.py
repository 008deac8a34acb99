# Run from the repository root: python results/benchmarks/fmnist-latency/alignment_probe.py (about 1 minute, idle machine).
"""ResNet-20 (trained), hw-friendly space: networks near 50% MACs whose stage-2/3 widths are multiples of 16 or only of 8,
timed together at batch 1 and 64 in the deployed form."""
import torch
from automlprune.tasks import Task, TaskSpec
from automlprune.baseline import ensure_baseline
from automlprune.evaluator import Evaluator
from automlprune.export import deployable
from automlprune.latency import measure_latencies
from automlprune.space import Candidate
torch.set_num_threads(2)
spec = TaskSpec.load("fmnist-resnet20", ["checkpoint=results/benchmarks/fmnist-resnet20-training/baseline.pt"])
task = Task(spec)
model = ensure_baseline(task, "cpu", progress=False)
space = task.search_space(model, "hw-friendly")
ev = Evaluator(model, space, task.data, spec.evaluation)
s1 = ["layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1"]
s2 = ["layer2.0.conv1", "layer2.0.conv2", "layer2.1.conv1", "layer2.2.conv1"]
s3 = ["layer3.0.conv1", "layer3.0.conv2", "layer3.1.conv1", "layer3.2.conv1"]
def cand(r1, r2, r3):
    return Candidate.from_dict({"ratios": {**{g: r1 for g in s1}, **{g: r2 for g in s2}, **{g: r3 for g in s3}}})
variants = {"stage widths 8/24/40 (hw-friendly uniform 50%)": cand(.5, .75, .625),
            "8/16/48": cand(.5, .5, .75), "8/32/32": cand(.5, 1.0, .5), "8/16/32": cand(.5, .5, .5),
            "8/24/48": cand(.5, .75, .75), "16/16/48": cand(1.0, .5, .75)}
nets = [deployable(model)] + [deployable(ev.network(c)) for c in variants.values()]
macs = [1.0] + [ev.cost_model(c).macs / ev.cost_model.base["macs"] for c in variants.values()]
lat = measure_latencies(nets, task.data.example_input().shape[1:], (1, 64), rounds=7)
for name, m, l in zip(["unpruned"] + list(variants), macs, lat):
    print(f"| {name} | {m:.1%} | {l[1]:.3f} ({l[1] / lat[0][1]:.2f}) | {l[64]:.3f} ({l[64] / lat[0][64]:.2f}) |")
