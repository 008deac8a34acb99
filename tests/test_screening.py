"""Multi-fidelity search: screenings are cheap, recorded with their fidelity, promote the best
proposals to full evaluations, and never become answers."""

from __future__ import annotations

from dataclasses import replace

import pytest

from automlprune.evaluator import EvalResult, Evaluator
from automlprune.search.base import best_feasible
from automlprune.search.budget import parse_budget
from automlprune.search.screening import Screening
from automlprune.settings import EvalSettings

from conftest import run_search


def test_the_promotion_rule_keeps_the_top_fraction_of_screenings_after_a_warm_up():
    rule = Screening(fidelity=0.25, keep=1 / 3)
    assert [rule.promotes(a) for a in (0.5, 0.2, 0.1)] == [True, True, True]  # no ranking yet
    assert not rule.promotes(0.15)  # 4 screenings: the top ceil(4/3) = 2 promote; 0.15 ranks 3rd
    assert rule.promotes(0.3)  # 5 screenings: ranks 2nd of the top 2
    assert rule.promotes(0.9)  # best so far
    assert not rule.promotes(0.05)
    assert len(rule.scores) == 7


def test_the_rule_resumes_from_stored_screenings(digits_evaluator, digits_space):
    full = digits_evaluator.evaluate(digits_space.uniform(0.75))
    screened = replace(digits_evaluator.evaluate(digits_space.uniform(0.5)), fidelity=0.5, accuracy=0.6)
    rule = Screening.resumed(0.5, 0.5, [replace(full, screening=0.7), screened, digits_evaluator.evaluate(digits_space.uniform(1.0))])
    assert rule.scores == [0.7, 0.6]  # an unscreened full evaluation has no screening score


def test_a_screening_uses_a_fraction_of_the_batches_and_is_cached_apart(trained_digits_model, digits_space, digits):
    evaluator = Evaluator(trained_digits_model, digits_space, digits, EvalSettings(batch_size=64, bn_batches=4, bn_batch_size=32))
    val, bn = evaluator.batches(0.25)
    assert len(val) == max(1, -(-len(evaluator.val_batches) // 4)) < len(evaluator.val_batches) and len(bn) == 1
    candidate = digits_space.uniform(0.5)
    cheap = evaluator.evaluate(candidate, fidelity=0.25)
    assert cheap.fidelity == 0.25 and not cheap.full
    full = evaluator.evaluate(candidate)
    assert full.full and full.key == cheap.key and len(evaluator) == 2  # one network, two cached evaluations
    assert evaluator.evaluate(candidate, fidelity=0.25) is full  # a known full result serves a cheap request
    back = EvalResult.from_dict(replace(full, screening=0.5).to_dict())
    assert (back.fidelity, back.screening) == (1.0, 0.5) and EvalResult.from_dict(cheap.to_dict()).fidelity == 0.25


def test_screenings_never_answer_even_when_they_score_higher(digits_evaluator, digits_space):
    budget = parse_budget("macs=0.9").bind(digits_evaluator.cost_model.base)
    full = digits_evaluator.evaluate(digits_space.uniform(0.5))
    lucky = replace(digits_evaluator.evaluate(digits_space.uniform(0.75)), fidelity=0.5, accuracy=1.0)
    assert best_feasible([full, lucky], budget) is full
    assert best_feasible([lucky], budget) is None


@pytest.mark.parametrize("strategy", ["random", "optuna-tpe"])
def test_a_screening_search_stores_fidelities_promotes_the_best_and_resumes(strategy, tmp_path, trained_digits_model,
                                                                          digits_space, digits):
    settings = EvalSettings(bn_batches=2, bn_batch_size=64, batch_size=64, screening=0.5, screening_keep=0.34)
    evaluator = Evaluator(trained_digits_model, digits_space, digits, settings)
    outcome, store, study, _ = run_search(tmp_path, trained_digits_model, digits_space, digits, strategy, budget="macs=0.6",
                                          max_evals=12, evaluator=evaluator, options={"warm_start": "uniform"})
    results = [r.result for r in store.records(study)]
    assert len(results) == 12
    screened = [r for r in results if not r.full]
    promoted = [r for r in results if r.full and r.screening is not None]
    assert screened and promoted  # both happened
    assert all(r.fidelity == 0.5 for r in screened)
    assert results[0].full and results[0].screening is None  # the warm start is evaluated in full, unscreened
    assert outcome.answer is not None and outcome.answer.full
    for r in promoted:  # a promoted proposal ranked in the top third of the screenings before it
        earlier = [p.accuracy if not p.full else p.screening for p in results[:results.index(r)]
                   if (not p.full or p.screening is not None) and outcome.budget.met_by(p.costs)]
        if len(earlier) >= 3:
            assert sum(s > r.screening for s in earlier) < -(-0.34 * (len(earlier) + 1) // 1)

    fresh = Evaluator(trained_digits_model, digits_space, digits, settings)
    again, store, study, _ = run_search(tmp_path, trained_digits_model, digits_space, digits, strategy, budget="macs=0.6",
                                        max_evals=16, evaluator=fresh, options={"warm_start": "uniform"})
    stored = [r.result for r in store.records(study)]
    assert [r.key for r in stored[:12]] == [r.key for r in results] and len(stored) == 16  # the first 12 were served, not evaluated again
    assert again.answer.accuracy >= outcome.answer.accuracy


def test_screening_is_set_from_the_command_line_and_checked():
    from automlprune.errors import ConfigError
    from automlprune.tasks import TaskSpec

    spec = TaskSpec.load("digits-cnn", ["evaluation.screening=0.25", "evaluation.screening_keep=0.5"])
    assert (spec.evaluation.screening, spec.evaluation.screening_keep) == (0.25, 0.5)
    assert TaskSpec.load("digits-cnn", ["evaluation.screening=null"]).evaluation.screening is None
    with pytest.raises(ConfigError, match="evaluation.screening must be a fraction in \\(0, 1\\)"):
        TaskSpec.load("digits-cnn", ["evaluation.screening=1.5"])
