"""The metric registry: a new metric is one registration, and the cost model, budgets,
strategies and compare tables enumerate it."""

from __future__ import annotations

import pytest
import torch

from automlprune.cost import CostModel, budget_metrics
from automlprune.cost.metrics import METRICS, Metric, register
from automlprune.errors import ConfigError
from automlprune.search.budget import parse_budget
from automlprune.search.compare import summarize


def _activation_bytes(q):
    """Toy metric: bytes of the activations a multiply-accumulate layer writes per sample at 8 bits."""
    return (q.weights > 0) * q.outputs * q.positions * 8 / 8


@pytest.fixture
def activation_metric():
    register(Metric("activation_bytes", "bytes (activations)", _activation_bytes, differentiable=True))
    yield "activation_bytes"
    METRICS.unregister("activation_bytes")


def test_a_registered_metric_is_costed_budgeted_searched_and_reported(activation_metric, digits_space, trained_digits_model,
                                                                       tmp_path, digits):
    cost = CostModel(digits_space, trained_digits_model)
    full, half = cost(digits_space.full()), cost(digits_space.uniform(0.5))
    by_hand = sum(l.out_channels * l.positions for l in digits_space.layers if l.has_weights)
    assert full["activation_bytes"] == by_hand and half["activation_bytes"] < full["activation_bytes"]
    assert half.activation_bytes == half["activation_bytes"]
    kept = torch.tensor(digits_space.kept_channels(digits_space.uniform(0.5)), dtype=torch.float64, requires_grad=True)
    cost.from_kept(kept)["activation_bytes"].backward()
    assert torch.all(kept.grad >= 0) and kept.grad.sum() > 0  # differentiable in the widths
    assert activation_metric in budget_metrics()
    from conftest import run_search

    outcome, store, _, _ = run_search(tmp_path, trained_digits_model, digits_space, digits, "uniform",
                                      budget="activation_bytes=0.5", max_evals=1)
    assert outcome.answer.relative["activation_bytes"] <= 0.5 + 1e-9
    from automlprune.report.collect import collect

    row = summarize(collect(store))[0]
    assert row["activation_bytes_fraction"] == pytest.approx(outcome.answer.relative["activation_bytes"])


def test_unknown_and_duplicate_metrics_are_refused():
    with pytest.raises(ConfigError, match="unknown budget metric 'energy'"):
        parse_budget("energy=0.5")
    with pytest.raises(ValueError, match="already registered"):
        register(Metric("macs", "MACs", lambda q: q.weights, differentiable=True))
