"""Where BWCP's activation probabilities P' stand when its masks are chosen (digits, 4 epochs): saturated, or near
0.5, where the hard mask 1[P' > 0.5] is a coin flip; and what the folded network scores. Three settings: the paper's
(no sharpening, soft masks to the end), sharpening alone, and automlprune's defaults (sharpening and a hard phase). Run from the repository root: python results/benchmarks/fmnist-resnet20-training/bwcp_probe.py (about 30 s)."""
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
SETTINGS = {"paper (sharpness 1, no hard phase)": dict(sharpness=1.0, hard_fraction=0.0),
            "sharpness 30, no hard phase": dict(sharpness=30.0, hard_fraction=0.0),
            "defaults (sharpness 30, last quarter hard)": {}}
for label, options in SETTINGS.items():
    for budget in ("macs=0.5", "macs=0.3"):
        strategy, outcome, evaluator, store = search_with(Path(tempfile.mkdtemp()), BWCPStrategy, model, space, digits, budget,
                                                          epochs=4, batch_size=64, **options)
        chosen = strategy.history_log[0]  # when the masks were fixed
        print(f"{label:45s} {budget}: val {outcome.answer.accuracy:.3f}, cost {chosen['cost_fraction']:.3f}, "
              f"P' saturated (<0.1 or >0.9) {chosen['saturated']:.0%}, forced {chosen['forced']}", flush=True)
