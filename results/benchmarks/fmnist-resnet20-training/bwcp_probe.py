"""Where BWCP's activation probabilities P end after training (digits, 4 epochs): saturated, or near 0.5, where
the hard mask 1[P > 0.5] is a coin flip. Run from the repository root: python results/benchmarks/fmnist-resnet20-training/bwcp_probe.py (about 30 s)."""
import sys, tempfile
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
import conftest
from conftest import search_with
from automlprune.search.bwcp import BWCPStrategy
from automlprune.space import SearchSpace

digits = conftest.load_dataset("digits")
torch.manual_seed(0)
model = conftest.build_model("digits_cnn", 10, 1)
conftest.fit(model, digits, torch.device("cpu"), conftest.Recipe(epochs=12, batch_size=64, lr=0.05), progress=False)
model.eval()
space = SearchSpace(model, digits.example_input())
for budget in ("macs=0.5", "macs=0.3"):
    strategy, outcome, evaluator, store = search_with(Path(tempfile.mkdtemp()), BWCPStrategy, model, space, digits, budget,
                                                      epochs=4, batch_size=64)
    ps = torch.cat([w.probability.detach().flatten() for w in strategy.whitenings])
    hist = torch.histc(ps, bins=10, min=0, max=1).int().tolist()
    print(budget, "val", outcome.answer.accuracy, "P histogram (0..1, 10 bins)", hist, "log", strategy.history_log[-1])
