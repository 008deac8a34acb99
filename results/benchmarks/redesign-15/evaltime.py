import json, sys, torch
from automlprune.benchmarks.engine import bench_evaluator
from automlprune.tasks import EvalSettings
torch.set_num_threads(2)
s = EvalSettings(batch_size=500, val_samples=1000, bn_batches=5, bn_batch_size=128)
rows = [bench_evaluator(m, size, 9, s, torch.device("cpu")) for m, size in [("resnet56", 28), ("mobilenet_v2", 32)]]
print(json.dumps(rows, indent=1)); open(sys.argv[1], "w").write(json.dumps(rows, indent=1))
