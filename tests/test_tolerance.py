"""Accuracy tolerances (``accuracy_drop=...``): parsing and binding, the answer as the cheapest
accepted result, one-shot allocators by bisection over cost budgets, refusal for search
strategies, Play and Prune's controller, and the compare report's tolerance table."""

from __future__ import annotations

import pytest
import torch

from automlprune.errors import ConfigError
from automlprune.search import STRATEGIES
from automlprune.search.base import best_feasible
from automlprune.search.budget import BoundBudget, parse_budget, parse_budgets, parse_label
from automlprune.search.play_and_prune import PlayAndPruneStrategy

from conftest import crash_once, run_search, search_with

FAST = dict(epochs=3, batch_size=64)


def test_an_accuracy_tolerance_parses_binds_and_round_trips():
    budget = parse_budget("accuracy_drop=0.5")
    assert budget.tolerance and budget.metric == "macs" and budget.accuracy_drop == 0.5
    assert budget.label == "accuracy_drop=0.5" and budget.slug == "accuracy_drop0p5"
    other = parse_budget("accuracy_drop=2@params")
    assert other.metric == "params" and other.label == "accuracy_drop=2@params" and other.slug == "accuracy_drop2-params"
    assert parse_label(other.label) == other
    assert [b.label for b in parse_budgets("accuracy_drop=0.5,1")] == ["accuracy_drop=0.5", "accuracy_drop=1"]
    with pytest.raises(RuntimeError, match="not bound"):
        budget.min_accuracy
    bound = budget.with_reference(0.9).bind(1000.0)
    assert bound.min_accuracy == pytest.approx(0.895) and bound.limit == 1000.0
    assert BoundBudget.from_dict(bound.to_dict()) == bound
    assert parse_budget("macs=0.5").with_reference(0.9).reference_accuracy is None  # a cost budget keeps no reference
    for text, words in [("accuracy_drop=x", "needs a number of points"), ("accuracy_drop=1@watts", "unknown cost metric 'watts'"),
                        ("accuracy_drop=-1", "must be in \\[0, 100\\)")]:
        with pytest.raises(ConfigError, match=words):
            parse_budget(text)


def test_the_answer_to_a_tolerance_is_the_cheapest_accepted_result(digits_evaluator, digits_space):
    results = [digits_evaluator.evaluate(digits_space.uniform(r)) for r in (1.0, 0.75, 0.5, 0.25)]
    full = results[0].accuracy
    bound = parse_budget("accuracy_drop=3").with_reference(full).bind(digits_evaluator.cost_model.base)
    accepted = [r for r in results if r.accuracy >= full - 0.03]
    answer = best_feasible(results, bound)
    assert answer is min(accepted, key=lambda r: r.costs.macs)
    strict = parse_budget("accuracy_drop=0").with_reference(1.0).bind(digits_evaluator.cost_model.base)
    assert best_feasible(results, strict) is None  # nothing reaches 100 %


def test_a_one_shot_allocator_answers_a_tolerance_by_bisection(tmp_path, trained_digits_model, digits_space, digits):
    outcome, store, study, evaluator = run_search(tmp_path, trained_digits_model, digits_space, digits, "uniform",
                                                  budget="accuracy_drop=2", max_evals=12)
    budget = outcome.budget
    points = [r.result for r in store.records(study)]
    assert points[0].candidate == digits_space.canonical(digits_space.full())  # the unpruned network first: accepted by definition
    assert 4 <= outcome.evaluations <= 12 and outcome.answer.accuracy >= budget.min_accuracy
    accepted = [p for p in points if budget.accepts(p)]
    assert outcome.answer.costs.macs == min(p.costs.macs for p in accepted)
    assert outcome.answer.relative["macs"] < 0.95  # it pruned
    refused = [p for p in points if not budget.accepts(p)]
    assert refused and max(p.relative["macs"] for p in refused) < outcome.answer.relative["macs"] + 0.05  # bracketed
    again, *_ = run_search(tmp_path, trained_digits_model, digits_space, digits, "uniform", budget="accuracy_drop=2",
                           max_evals=12, run_name="again")
    assert again.answer.candidate == outcome.answer.candidate  # deterministic


def test_search_strategies_refuse_a_tolerance_in_one_sentence():
    with pytest.raises(ConfigError, match="strategy 'random' maximizes accuracy under a cost budget and cannot answer "
                                          "accuracy_drop=1; use play-and-prune or a one-shot allocator"):
        STRATEGIES.get("random").check_budgets([parse_budget("macs=0.5"), parse_budget("accuracy_drop=1")])
    for name in ("uniform", "prunenet", "tp-global", "play-and-prune"):
        STRATEGIES.get(name).check_budgets([parse_budget("accuracy_drop=1")])
    STRATEGIES.get("random").check_budgets([parse_budget("macs=0.5")])


def test_play_and_prune_keeps_the_cheapest_state_within_the_tolerance_on_trained_weights(tmp_path, trained_digits_model,
                                                                                       digits_space, digits):
    strategy, outcome, evaluator, store = search_with(tmp_path, PlayAndPruneStrategy, trained_digits_model, digits_space,
                                                      digits, "accuracy_drop=2", **FAST)
    answer, budget = outcome.answer, outcome.budget
    assert answer is not None and answer.trained and answer.accuracy >= budget.min_accuracy
    assert answer.relative["macs"] < 0.95 and strategy.spent["pruning_events"] >= 2
    # judged as the controller measured it: the materialized answer computes what the trained, masked network does
    proposal = store.proposal(answer.to_dict(), trained_digits_model)
    assert evaluator.validation_accuracy(proposal.weights.model) == pytest.approx(answer.accuracy)
    x = digits.example_input().repeat(8, 1, 1, 1)
    with torch.no_grad():
        assert torch.allclose(evaluator.network(proposal)(x), proposal.weights.model.eval()(x), atol=1e-4)
    iterations = [e for e in strategy.history_log if "within" in e and e["step"] != "end"]
    assert len(iterations) >= 10 and all(e["removed_now"] == 0 for e in iterations if not e["within"])


def test_play_and_prune_s_controller_speeds_up_within_the_tolerance_and_backs_off_outside(tmp_path, trained_digits_model,
                                                                                        digits_space, digits):
    strategy, *_ = search_with(tmp_path, PlayAndPruneStrategy, trained_digits_model, digits_space, digits, "accuracy_drop=2",
                               max_evals=1, **FAST)
    kept, model = dict(strategy.pruning.kept), trained_digits_model
    strategy.floor_accuracy, strategy.lam, strategy.threshold = 0.9, 0.1, 0.1
    strategy.choose_unimportant(model, kept)
    strategy.context.validation = lambda m: 0.85  # outside: nothing removed, the pull and threshold halve
    assert strategy.select(model, kept, 1.0) is kept and (strategy.lam, strategy.threshold) == (0.05, 0.05)
    strategy.context.validation = lambda m: 0.9 + 0.02  # the whole tolerance left: both double
    strategy.select(model, kept, 1.0)
    assert (strategy.lam, strategy.threshold) == pytest.approx((0.1, 0.1))
    assert {g: k.tolist() for g, k in strategy.accepted["kept"].items()} == {g: k.tolist() for g, k in kept.items()}


@pytest.mark.parametrize("budget", ["macs=0.5", "params=0.4"])
def test_play_and_prune_meets_a_cost_budget(budget, tmp_path, trained_digits_model, digits_space, digits):
    strategy, outcome, *_ = search_with(tmp_path, PlayAndPruneStrategy, trained_digits_model, digits_space, digits, budget, **FAST)
    metric, limit = budget.split("=")
    assert outcome.answer.trained and outcome.answer.relative[metric] <= float(limit) + 1e-9


def test_play_and_prune_resumes_after_a_crash_mid_training(tmp_path, trained_digits_model, digits_space, digits, monkeypatch):
    from automlprune.search import gradual

    whole, whole_outcome, _, _ = search_with(tmp_path / "whole", PlayAndPruneStrategy, trained_digits_model, digits_space,
                                             digits, "accuracy_drop=2", **FAST)
    crash_once(monkeypatch, gradual.GradualPruning, "after_step", at_step=int(whole.spent["training_steps"]) - 3)
    with pytest.raises(KeyboardInterrupt):
        search_with(tmp_path / "crash", PlayAndPruneStrategy, trained_digits_model, digits_space, digits, "accuracy_drop=2", **FAST)
    again, outcome, _, _ = search_with(tmp_path / "crash", PlayAndPruneStrategy, trained_digits_model, digits_space, digits,
                                       "accuracy_drop=2", **FAST)
    assert again.spent["resumed_after_epoch"] >= 1 and again.history_log == whole.history_log
    assert outcome.answer.accuracy == whole_outcome.answer.accuracy and outcome.answer.candidate == whole_outcome.answer.candidate
