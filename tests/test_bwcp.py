"""BWCP on digits: the Newton whitening, the activation probability, an exact fold, the budget
met through the expected-cost term, and clear refusals."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from automlprune.errors import ConfigError
from automlprune.search.bwcp import BWCPSettings, BWCPStrategy, Whitening, newton_inverse_sqrt
from automlprune.search.resrep import fold_compactors_, give_batch_norms_statistics_

from conftest import search_with


def test_newton_iterations_approach_the_inverse_square_root_of_a_trace_normalized_covariance():
    torch.manual_seed(0)
    a = torch.randn(6, 40, dtype=torch.float64)
    sigma = a @ a.t()
    sigma = sigma / torch.trace(sigma)
    w = newton_inverse_sqrt(sigma, 10)  # the uncoupled iteration converges, then drifts in floating point if run far longer
    assert torch.allclose(w @ sigma @ w, torch.eye(6, dtype=torch.float64), atol=1e-9)
    few = newton_inverse_sqrt(sigma, 5)  # five steps (the default) already move towards it
    assert (few @ sigma @ few - torch.eye(6, dtype=torch.float64)).norm() < (sigma - torch.eye(6, dtype=torch.float64)).norm()


def _internal_norms(model, space):
    out = []
    for group in space.prunable:
        producers = [m for m in space.group_by_name[group].members if m.dim == "out" and space.layer_by_name[m.layer].has_weights]
        feature = space.feature_layers(space.group_by_name[group])[0].layer
        if len(producers) == 1 and isinstance(model.get_submodule(feature), torch.nn.BatchNorm2d):
            out.append((group, feature))
    return out


def test_the_activation_probability_is_the_paper_s_and_the_fold_is_exact(trained_digits_model, digits_space, digits):
    model = copy.deepcopy(trained_digits_model)
    settings = BWCPSettings(whitening_group=4)
    pairs = _internal_norms(model, digits_space)
    assert pairs
    whitenings = [Whitening(model.get_submodule(f), settings) for _, f in pairs]
    x = digits.example_input().repeat(32, 1, 1, 1) + 0.3 * torch.randn(32, *digits.example_input().shape[1:])
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)  # running whitening moves away from the identity
        model.eval()
        model(x)
    for w in whitenings:
        m = w.running_inverse_sqrt
        assert not torch.allclose(m, torch.eye(len(m)))
        gamma_hat, beta_hat = m @ w.norm.weight, m @ w.norm.bias
        expected = 0.5 * (1 + torch.erf((beta_hat - 0.05) / (math.sqrt(2) * gamma_hat.abs())))
        assert torch.allclose(w.probability, expected, atol=1e-6)
        w.hard = (torch.rand(len(m)) > 0.3).float()
    with torch.no_grad():
        before = model(x)
        for w in whitenings:
            w.remove()
        fold_compactors_(model, digits_space, [g for g, _ in pairs], [w.folded_matrix() for w in whitenings], [f for _, f in pairs])
        after = model(x)
        give_batch_norms_statistics_(model, [f for _, f in pairs], [(x, None)])
        with_statistics = model(x)
    assert torch.allclose(before, after, atol=1e-4) and torch.allclose(before, with_statistics, atol=1e-4)


@pytest.mark.parametrize("budget", ["macs=0.5", "params=0.4"])
def test_bwcp_meets_the_budget_with_its_folded_trained_network(budget, tmp_path, trained_digits_model, digits_space, digits):
    strategy, outcome, evaluator, store = search_with(tmp_path, BWCPStrategy, trained_digits_model, digits_space, digits, budget,
                                                      epochs=3, budget_penalty=10.0)
    metric, limit = budget.split("=")
    answer = outcome.answer
    assert answer.trained and answer.relative[metric] <= float(limit) + 1e-9
    assert set(answer.candidate.ratio_map) <= set(strategy.groups)
    assert strategy.history_log[-1]["expected_cost_fraction"] > 0
    trained = store.proposal(answer.to_dict(), trained_digits_model)
    x = digits.example_input().repeat(8, 1, 1, 1)
    with torch.no_grad():
        assert not torch.allclose(evaluator.network(trained)(x), evaluator.network(answer.candidate)(x))


def test_sharpened_probabilities_saturate_and_the_hard_phase_keeps_the_accuracy_the_paper_s_soft_training_loses(
        tmp_path, trained_digits_model, digits_space, digits):
    # without sharpening P stays near 0.5 in a short run from a trained network, and 1[P > 0.5] is a coin flip
    answers = {}
    for label, options in {"paper": dict(sharpness=1.0, hard_fraction=0.0), "defaults": {}}.items():
        strategy, outcome, _, _ = search_with(tmp_path / label, BWCPStrategy, trained_digits_model, digits_space, digits,
                                              "macs=0.5", epochs=4, **options)
        answers[label] = (strategy.history_log[0], outcome.answer)
    (paper_log, paper), (chosen, answer) = answers["paper"], answers["defaults"]
    assert paper_log["saturated"] < 0.1 and chosen["saturated"] > 0.6
    assert answer.trained and answer.relative["macs"] <= 0.5 and answer.accuracy > 0.9
    assert answer.accuracy > paper.accuracy + 0.2, (answer.accuracy, paper.accuracy)


def test_in_the_hard_phase_training_applies_the_fixed_masks(trained_digits_model, digits_space, digits):
    model = copy.deepcopy(trained_digits_model)
    (_, feature), *_ = _internal_norms(model, digits_space)
    w = Whitening(model.get_submodule(feature), BWCPSettings())
    model.train()
    x = digits.example_input().repeat(16, 1, 1, 1) + 0.3 * torch.randn(16, *digits.example_input().shape[1:])
    model(x)
    assert not set(w.mask.unique().tolist()) <= {0.0, 1.0}  # sampled soft masks
    w.hard = (torch.arange(w.norm.num_features) % 3 > 0).float()
    model(x)
    assert torch.equal(w.mask, w.hard)
    model.eval()
    with torch.no_grad():
        model(x)
        plain = w.probability.clone()
        w.sharpness = 30.0
        model(x)
    assert torch.allclose(w.probability, torch.sigmoid(30 * torch.logit(plain)), atol=1e-5)  # P' = sigmoid(k logit P)


def test_bwcp_refuses_what_it_cannot_do(tmp_path, trained_digits_model, digits_space, digits, monkeypatch):
    from automlprune.search import bwcp

    monkeypatch.setattr(bwcp, "differentiable_metrics", lambda: ["macs"])  # as latency is, in a real run
    with pytest.raises(ConfigError, match="bwcp's budget term needs a differentiable cost; a params budget is not one"):
        search_with(tmp_path / "a", BWCPStrategy, trained_digits_model, digits_space, digits, "params=0.5")
    with pytest.raises(ConfigError, match="budget_loss 'magic' is unknown"):
        search_with(tmp_path / "c", BWCPStrategy, trained_digits_model, digits_space, digits, "macs=0.5", budget_loss="magic")
    with pytest.raises(ConfigError, match=r"bwcp hard_fraction .* must be in \[0, 1\), got 1.0"):
        search_with(tmp_path / "d", BWCPStrategy, trained_digits_model, digits_space, digits, "macs=0.5", hard_fraction=1.0)
    with pytest.raises(ConfigError, match="bwcp sharpness .* must be at least 1, got 0.5"):
        search_with(tmp_path / "e", BWCPStrategy, trained_digits_model, digits_space, digits, "macs=0.5", sharpness=0.5)


@pytest.mark.parametrize("epochs", [3, 4], ids=["resumed-before-the-masks-are-fixed", "resumed-after"])
def test_a_crash_mid_training_resumes_and_ends_as_an_uninterrupted_run(epochs, tmp_path, trained_digits_model, digits_space, digits,
                                                                      monkeypatch):
    # (the hard phase starts three quarters in: with 4 epochs, at the last epoch's checkpoint)
    from automlprune.search import bwcp

    from conftest import crash_once

    options = dict(epochs=epochs, budget_penalty=10.0)
    whole, whole_outcome, _, _ = search_with(tmp_path / "whole", BWCPStrategy, trained_digits_model, digits_space, digits,
                                             "macs=0.5", **options)
    crash_once(monkeypatch, bwcp.BWCPTraining, "after_step", at_step=int(whole.spent["training_steps"]) - 3)
    with pytest.raises(KeyboardInterrupt):
        search_with(tmp_path / "crash", BWCPStrategy, trained_digits_model, digits_space, digits, "macs=0.5", **options)
    again, outcome, _, _ = search_with(tmp_path / "crash", BWCPStrategy, trained_digits_model, digits_space, digits,
                                       "macs=0.5", **options)
    assert again.spent["resumed_after_epoch"] >= 1 and again.spent["training_steps"] == whole.spent["training_steps"]
    assert outcome.answer.candidate == whole_outcome.answer.candidate
    assert again.history_log == whole.history_log and outcome.answer.accuracy == whole_outcome.answer.accuracy


def test_residual_groups_share_one_mask_and_the_materialized_network_computes_the_trained_one(tmp_path, digits):
    from automlprune.models import build_model
    from automlprune.nn.randomize import randomize_norms
    from automlprune.space import SearchSpace

    torch.manual_seed(0)
    model = randomize_norms(build_model("resnet20", 10, 1), 0)
    space = SearchSpace(model, digits.example_input())
    residual = [g for g in space.prunable
                if sum(m.dim == "out" and space.layer_by_name[m.layer].has_weights for m in space.group_by_name[g].members) > 1]
    assert residual  # the stem's and the downsampling blocks' streams
    strategy, outcome, evaluator, store = search_with(tmp_path, BWCPStrategy, model, space, digits, "macs=0.5", groups="all",
                                                  epochs=1, steps_per_epoch=15, budget_penalty=10.0, lr=0.05)
    assert set(residual) <= set(strategy.groups)
    members = {}
    for producer, feature, w in strategy.members:
        group = next(g for g in strategy.groups if any(m.layer == feature for m in space.group_by_name[g].members))
        members.setdefault(group, []).append(w)
    for group in residual:
        leader, *followers = members[group]
        assert followers and all(w.leader is leader for w in followers) and leader.leader is None
        assert all(torch.equal(w.hard_mask(), leader.hard_mask()) for w in followers)  # one mask per group
    answer = outcome.answer
    assert answer.trained and answer.relative["macs"] <= 0.5 + 1e-9
    assert any(answer.candidate.ratio_map.get(g, 1.0) < 1 for g in residual)  # a residual stream is narrower
    # the folded full-width network (removed channels exactly zero in every member) computes what the materialized one does
    trained = store.proposal(answer.to_dict(), model)
    x = digits.example_input().repeat(16, 1, 1, 1) + 0.5 * torch.randn(16, *digits.example_input().shape[1:])
    with torch.no_grad():
        folded = trained.weights.model.eval()(x)
        materialized = evaluator.network(trained)(x)
    assert torch.allclose(folded, materialized, atol=1e-4)
