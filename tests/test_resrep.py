"""ResRep on digits: the fold is exact, budgets are met, masked rows decay, answers are judged
on the folded trained weights without BN re-estimation."""

from __future__ import annotations

import copy

import pytest
import torch

from automlprune.errors import ConfigError
from automlprune.search.resrep import Compactors, ResRepStrategy, fold_compactors_, give_batch_norms_statistics_
from automlprune.space import SearchSpace
from automlprune.space.config import SpaceConfig

from conftest import crash_once, search_with

FAST = dict(epochs=30, batch_size=64, lr=0.02, mask_interval=10, before_mask_steps=20, granularity=8, lasso=0.005)


def test_folding_compactors_and_batch_norm_is_exact(trained_digits_model, digits_space, digits):
    model = copy.deepcopy(trained_digits_model).eval()
    groups = list(digits_space.prunable)
    compactors = Compactors(model, digits_space, groups)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for q in compactors.weights:
            q.copy_(torch.eye(len(q)) + 0.3 * torch.randn(q.shape, generator=g))
    x = torch.randn(16, 1, 8, 8, generator=g)
    with torch.no_grad():
        before = model(x)
        compactors.remove()
        plain = model(x)
        fold_compactors_(model, digits_space, compactors.groups, list(compactors.weights), compactors.feature_layers)
        after = model(x)
    assert not torch.allclose(before, plain, atol=1e-3)  # the compactors changed the function
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    bn = model.features[1]
    assert torch.all(bn.weight == 1) and torch.all(bn.running_mean == 0)
    # real statistics for the folded batch norms: same function in eval mode, and in train mode
    # (batch statistics) close to it, so a fine-tune starts from the trained function
    batches = [(x, None)]
    give_batch_norms_statistics_(model, compactors.feature_layers, batches)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-4, rtol=1e-4)
        model.train()
        train_mode = model(x)
        model.eval()
    torch.testing.assert_close(train_mode, before, atol=1e-3, rtol=1e-3)


def _search(tmp_path, model, space, data, budget, **options):
    return search_with(tmp_path / "resrep", ResRepStrategy, model, space, data, budget, **{**FAST, **options})


@pytest.mark.parametrize("budget", ["macs=0.5", "params=0.4"])
def test_resrep_meets_the_budget_with_decayed_rows_and_trained_weights(budget, tmp_path, trained_digits_model,
                                                                       digits_space, digits):
    strategy, outcome, evaluator, store = _search(tmp_path, trained_digits_model, digits_space, digits, budget)
    answer = outcome.answer
    metric, limit = budget.split("=")
    assert outcome.evaluations == 1 and answer.relative[metric] <= float(limit) + 1e-9
    assert answer.trained and answer.weights["bn_recalibration"] is False
    assert strategy.spent["forced_mask"] == 0.0  # the masks met the budget during training
    norms, masks = strategy.compactors.row_norms(), strategy.compactors.masks
    kept_median = float(torch.cat([n[m] for n, m in zip(norms, masks)]).median())
    assert strategy.spent["max_removed_row_norm"] < 0.1 * kept_median  # the lasso drove masked rows towards zero
    assert answer.accuracy > 0.9  # so removing them loses little (the unpruned network: about 97%)
    proposal = store.proposal(answer.to_dict(), trained_digits_model)
    x = digits.example_input().repeat(8, 1, 1, 1)
    with torch.no_grad():
        assert not torch.allclose(evaluator.network(proposal)(x), evaluator.network(answer.candidate)(x))


def test_resrep_refuses_residual_groups_and_rounded_widths(tmp_path, trained_digits_model, digits_space, digits):
    with pytest.raises(ConfigError, match="internal groups only"):
        _search(tmp_path, trained_digits_model, digits_space, digits, "macs=0.5", groups="all")
    with pytest.raises(ConfigError, match="chooses its widths"):
        _search(tmp_path, trained_digits_model, digits_space, digits, "macs=0.5", widths="prunenet")
    rounded = SearchSpace(trained_digits_model, digits.example_input(), SpaceConfig(round_to=4))
    with pytest.raises(ConfigError, match="round_to 1"):
        _search(tmp_path, trained_digits_model, rounded, digits, "macs=0.5")


def test_an_interrupted_resrep_resumes_with_its_compactors_and_masks(tmp_path, trained_digits_model, digits_space, digits,
                                                                    monkeypatch):
    from automlprune.search import resrep

    short = dict(epochs=4, mask_interval=4, before_mask_steps=4, granularity=16)
    whole, whole_outcome, _, _ = _search(tmp_path / "whole", trained_digits_model, digits_space, digits, "macs=0.5", **short)
    crash_once(monkeypatch, resrep.ResRepTraining, "after_step", at_step=60)
    with pytest.raises(KeyboardInterrupt):
        _search(tmp_path / "crash", trained_digits_model, digits_space, digits, "macs=0.5", **short)
    again, outcome, _, _ = _search(tmp_path / "crash", trained_digits_model, digits_space, digits, "macs=0.5", **short)
    assert again.spent["resumed_after_epoch"] >= 1
    assert outcome.answer.candidate == whole_outcome.answer.candidate
    assert outcome.answer.accuracy == whole_outcome.answer.accuracy
    for a, b in zip(again.compactors.weights, whole.compactors.weights):
        assert torch.equal(a, b)
