import json, statistics, sys, time, numpy as np, torch
from automlprune.materialize import materialize
from automlprune.models import build_model
from automlprune.space import Candidate, SearchSpace
torch.set_num_threads(2)
out = {}
for name, size in [("resnet56", 28), ("mobilenet_v2", 32)]:
    model = build_model(name, 10, 1).eval()
    space = SearchSpace(model, torch.zeros(1, 1, size, size))
    rng = np.random.default_rng(1)
    cands = [Candidate.make({g: float(rng.choice(space.config.ratios)) for g in space.prunable}) for _ in range(9)]
    from automlprune.importance import channel_order
    order = channel_order(model, space, "l1")
    materialize(model, cands[0], space, order)
    times = []
    for c in cands[1:]:
        t = time.perf_counter(); materialize(model, c, space, order); times.append(time.perf_counter() - t)
    out[name] = statistics.median(times)
print(json.dumps(out))
