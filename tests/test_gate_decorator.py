"""Gate Decorator on digits: gates preserve the function, the melt is exact, Tick-Tock prunes
until the budget is met, answers are judged on the trained weights."""

from __future__ import annotations

import copy

import pytest
import torch

from automlprune.errors import ConfigError
from automlprune.search.gate_decorator import GateDecoratorStrategy, Gates, melt_gates_

from conftest import search_with

FAST = dict(batch_size=64, p=0.08, tock_epochs=1, tock_every=3, tick_steps=6, tock_steps=10, sparse_lambda=1e-3)


def test_gates_preserve_the_function_and_melting_them_is_exact(trained_digits_model, digits_space):
    model = copy.deepcopy(trained_digits_model).eval()
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(x)
        gates = Gates(model, digits_space, list(digits_space.prunable))
        torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=1e-5)  # extract_from_bn is function-preserving
        for gate in gates.gates:
            gate.mul_(torch.rand(gate.shape, generator=torch.Generator().manual_seed(1)) + 0.5)
        gates.masks["features.3"][::3] = False
        gated = model(x)
        gates.remove()
        melt_gates_(model, gates)
        torch.testing.assert_close(model(x), gated, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(gated, reference, atol=1e-3)


def _search(tmp_path, model, space, data, budget, **options):
    return search_with(tmp_path / "gd", GateDecoratorStrategy, model, space, data, budget, **{**FAST, **options})


@pytest.mark.parametrize("budget", ["macs=0.5", "params=0.4"])
def test_tick_tock_prunes_to_the_budget_on_trained_weights(budget, tmp_path, trained_digits_model, digits_space, digits):
    strategy, outcome, evaluator, store = _search(tmp_path, trained_digits_model, digits_space, digits, budget)
    answer = outcome.answer
    metric, limit = budget.split("=")
    assert outcome.evaluations == 1 and answer.relative[metric] <= float(limit) + 1e-9 and answer.trained
    log = strategy.history_log
    assert strategy.spent["ticks"] == len(log) >= 2 and all(e["removed"] >= 1 for e in log)
    assert [e["cost_fraction"] for e in log] == sorted((e["cost_fraction"] for e in log), reverse=True)  # masks only shrink
    for group, mask in strategy.gates.masks.items():
        assert mask.sum() >= max(1, int(0.1 * len(mask)))  # each gate keeps its top tenth
    proposal = store.proposal(answer.to_dict(), trained_digits_model)
    x = digits.example_input().repeat(8, 1, 1, 1)
    with torch.no_grad():
        assert not torch.allclose(evaluator.network(proposal)(x), evaluator.network(answer.candidate)(x))


def test_the_method_s_own_finetune_keeps_removed_channels_removed(tmp_path, trained_digits_model, digits_space, digits):
    strategy, outcome, _, store = _search(tmp_path, trained_digits_model, digits_space, digits, "macs=0.5",
                                          finetune_epochs=1, finetune_steps=5)
    net = store.proposal(outcome.answer.to_dict(), trained_digits_model).weights.model
    for group, mask in strategy.gates.masks.items():
        producer = net.get_submodule(group)
        assert torch.all(producer.weight[~mask] == 0)


def test_gate_decorator_refuses_bad_settings(tmp_path, trained_digits_model, digits_space, digits):
    with pytest.raises(ConfigError, match=r"p=1.5 must be in \(0, 1\)"):
        _search(tmp_path, trained_digits_model, digits_space, digits, "macs=0.5", p=1.5)


def test_an_interrupted_search_resumes_after_its_last_finished_phase(tmp_path, trained_digits_model, digits_space, digits,
                                                                    monkeypatch):
    from automlprune.search import gate_decorator

    whole, whole_outcome, _, _ = _search(tmp_path / "whole", trained_digits_model, digits_space, digits, "macs=0.5")
    original, ticks_started = gate_decorator.Tick.on_start, []

    def crash_at_third_tick(self, trainer):
        ticks_started.append(1)
        if len(ticks_started) == 3:
            raise KeyboardInterrupt("the machine went down")
        return original(self, trainer)

    monkeypatch.setattr(gate_decorator.Tick, "on_start", crash_at_third_tick)
    with pytest.raises(KeyboardInterrupt):
        _search(tmp_path / "crash", trained_digits_model, digits_space, digits, "macs=0.5")
    started = len(ticks_started)
    again, outcome, _, _ = _search(tmp_path / "crash", trained_digits_model, digits_space, digits, "macs=0.5")
    assert again.spent["resumed_after_phase"] >= 3  # the first Tock and two Ticks were not repeated
    assert len(ticks_started) - started == whole.ticks - 2
    assert again.history_log == whole.history_log
    assert outcome.answer.candidate == whole_outcome.answer.candidate
    assert outcome.answer.accuracy == whole_outcome.answer.accuracy
    assert again.spent["training_steps"] == whole.spent["training_steps"]
    assert not again.checkpoint_path().exists()
