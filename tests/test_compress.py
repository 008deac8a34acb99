"""compress(): a user's own model class and DataLoader, searched through the same store and
strategies as the command line; bad input in one sentence."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from automlprune import compress
from automlprune.errors import ConfigError


class UserNet(nn.Module):
    """A model automlprune has never seen: two conv blocks and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(12, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        x = self.block2(self.block1(x))
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="module")
def user_data_and_model():
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = UserNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(15):  # the user's own training, a few seconds
        for i in range(0, 1500, 100):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 100]), y[i:i + 100]).backward()
            optimizer.step()
    return model.eval(), x, y


def test_compress_searches_a_user_model_with_a_dataloader(user_data_and_model, tmp_path):
    model, x, y = user_data_and_model
    loader = DataLoader(TensorDataset(x[:1500], y[:1500]), batch_size=64, shuffle=True)
    result = compress(model, x[:1], train=loader, test=(x[1500:], y[1500:]), budget="macs=0.5", strategy="prunenet",
                      run_dir=tmp_path / "run", progress=False, finetune_epochs=1)
    assert result.relative["macs"] <= 0.5 and result.accuracy > 0.5 and 0 <= result.test_accuracy <= 1
    assert sum(p.numel() for p in result.network.parameters()) < sum(p.numel() for p in model.parameters())
    assert result.network(x[:7]).shape == (7, 10)
    assert result.pareto and result.unpruned_accuracy > result.accuracy - 0.2
    report = result.report()
    assert report.is_file() and (tmp_path / "run" / "pareto.png").is_file()
    assert model.block1[0].out_channels == 12  # the user's model is not changed
    again = compress(model, x[:1], train=loader, test=(x[1500:], y[1500:]), budget="macs=0.5", strategy="prunenet",
                     run_dir=tmp_path / "run", progress=False)
    assert again.answer.candidate == result.answer.candidate  # resumed from the store


class RaisesInForward(UserNet):
    def forward(self, x):
        raise RuntimeError("the user's bug")


@pytest.mark.parametrize("case,message", [
    ("model raises", "raises in forward"),
    ("labels beyond the outputs", "has label 12, but the model outputs 10 classes"),
    ("example input of the wrong shape", "has an input of shape (1, 8, 8), but the example input's is (1, 9, 9)"),
    ("nothing to lower", "impossible"),
])
def test_bad_input_to_compress_is_one_sentence(case, message, user_data_and_model, tmp_path):
    model, x, y = user_data_and_model
    example, train = x[:1], (x[:200], y[:200])
    if case == "model raises":
        model = RaisesInForward()
    elif case == "labels beyond the outputs":
        train = (x[:200], torch.full((200,), 12))
    elif case == "example input of the wrong shape":
        example = torch.zeros(1, 1, 9, 9)
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    else:
        budget_model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
        model = budget_model
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compress(model, example, train=train, budget="macs=0.05" if case == "nothing to lower" else "macs=0.5",
                 run_dir=tmp_path / "run", progress=False, evals=2)
    assert not (tmp_path / "run").exists()  # nothing left behind


def test_compare_puts_strategies_side_by_side_on_a_user_model(user_data_and_model, tmp_path):
    import csv

    from automlprune import compare

    model, x, y = user_data_and_model
    report = compare(model, x[:1], train=(x[:1500], y[:1500]), test=(x[1500:], y[1500:]), budgets=["macs=0.5", "macs=0.3"],
                     strategies=["uniform", "prunenet"], evals=2, run_dir=tmp_path / "cmp", progress=False)
    assert report.is_file() and "prunenet" in report.read_text()
    with open(tmp_path / "cmp" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["strategy"], r["budget"]) for r in rows} == {(s, b) for s in ("uniform", "prunenet") for b in ("macs=0.5", "macs=0.3")}
    assert all(float(r["macs_fraction"]) <= float(r["budget"].split("=")[1]) + 1e-9 for r in rows)


class GroupedNet(nn.Module):
    """A ResNeXt-like user model: its middle conv is grouped."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        return self.head(self.c(self.b(self.a(x))).mean((2, 3)))


def test_a_training_strategy_refusing_grouped_units_works_once_its_advice_is_followed(user_data_and_model, tmp_path):
    _, x, y = user_data_and_model
    model = GroupedNet().eval()
    kwargs = dict(train=(x[:300], y[:300]), budget="macs=0.7", strategy="greg1", max_epochs=1, progress=False, evals=1)
    with pytest.raises(ConfigError, match="cannot yet shrink groups that feed or leave grouped convolutions \\(a.0, b.0\\); list them under 'pinned'"):
        compress(model, x[:1], run_dir=tmp_path / "refused", groups="all", **kwargs)
    space = tmp_path / "pinned.yaml"
    space.write_text("pinned: ['a.0', 'b.0']\n")
    result = compress(model, x[:1], run_dir=tmp_path / "run", space=str(space), groups="all", **kwargs)
    assert result.relative["macs"] <= 0.7 and result.network.b[0].groups == 4
