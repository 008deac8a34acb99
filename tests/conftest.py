"""Shared fixtures: the digits task (embedded data) and a baseline trained for a few seconds."""

from __future__ import annotations

import pytest
import torch

from automlprune.data import load_dataset
from automlprune.models import build_model
from automlprune.space import SearchSpace
from automlprune.train import Recipe, fit

torch.set_num_threads(2)

# (model name, input size, kwargs): every zoo family plus the torchvision models the issue names.
ZOO_CASES = [
    ("digits_cnn", 8, {}),
    ("resnet20", 16, {}),
    ("resnet32", 16, {}),
    ("resnet56", 16, {}),
    ("vgg11_bn", 32, {}),
    ("vgg16_bn", 32, {}),
    ("mobilenet_v2", 32, {}),
    ("torchvision:resnet18", 32, {}),
    ("torchvision:mobilenet_v2", 32, {}),
]


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BN non-trivial statistics and affine parameters, so masking tests are real."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="session")
def trained_digits_model(digits):
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10, 1)
    fit(model, digits, torch.device("cpu"), Recipe(epochs=12, batch_size=64, lr=0.05), progress=False)
    return model.eval()


@pytest.fixture(scope="session")
def digits_space(trained_digits_model, digits):
    return SearchSpace(trained_digits_model, digits.example_input())


@pytest.fixture(scope="session")
def digits_evaluator(trained_digits_model, digits_space, digits):
    from automlprune.evaluator import Evaluator
    from automlprune.tasks import EvalSettings

    return Evaluator(trained_digits_model, digits_space, digits, EvalSettings(bn_batches=2, bn_batch_size=64))


def run_search(tmp_path, model, space, data, strategy, budget="macs=0.5", seed=0, max_evals=8, run_name="run", evaluator=None):
    """One search with a fresh evaluator (so its cache counts this search's evaluations only)."""
    from automlprune.evaluator import Evaluator
    from automlprune.search import STRATEGIES
    from automlprune.search.base import SearchContext, run_strategy
    from automlprune.search.budget import parse_budget
    from automlprune.search.store import RunStore
    from automlprune.tasks import EvalSettings

    if evaluator is None:
        settings = STRATEGIES.get(strategy).evaluation_settings(EvalSettings(bn_batches=2, bn_batch_size=64))
        evaluator = Evaluator(model, space, data, settings)
    store = RunStore(tmp_path / run_name)
    b = parse_budget(budget)
    study = store.study(RunStore.study_name(strategy, b.label, seed), {"strategy": strategy, "budget": b.label, "seed": seed})
    context = SearchContext(space, evaluator.cost_model, study, evaluator.scores, model, data=data)
    instance = STRATEGIES.get(strategy)(context, b, seed=seed, max_evals=max_evals)
    outcome = run_strategy(instance, evaluator, store, study, max_evals=max_evals)
    return outcome, store, study, evaluator
