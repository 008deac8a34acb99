"""Budget-aware repair: black-box proposals are moved to the budget along their shape before they
are evaluated, and the store says which were repaired."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from automlprune.cost import CostModel
from automlprune.errors import ConfigError
from automlprune.models import build_model
from automlprune.search import STRATEGIES
from automlprune.search.budget import parse_budget
from automlprune.search.repair import repair_to_budget
from automlprune.search.store import RunStore
from automlprune.space import SearchSpace

from conftest import run_search


@pytest.fixture(scope="module")
def resnet20_space():
    model = build_model("resnet20", 10, 1).eval()
    space = SearchSpace(model, torch.zeros(1, 1, 28, 28))
    return space, CostModel(space, model)


@pytest.mark.parametrize("label", ["macs=0.7", "macs=0.3", "params=0.5"])
def test_repair_brings_every_proposal_just_below_the_budget_keeping_its_shape(resnet20_space, label):
    space, cost = resnet20_space
    budget = parse_budget(label).bind(cost.base)
    step = space.config.ratios[1] - space.config.ratios[0]
    rng = np.random.default_rng(0)
    for _ in range(30):
        proposed = space.decode(rng.uniform(-1, 1, space.ndim))
        repaired = repair_to_budget(proposed, space, cost, budget)
        before, after = budget.cost_fraction(cost(proposed)), budget.cost_fraction(cost(repaired))
        assert budget.met_by(cost(repaired))
        if before <= budget.fraction:
            assert after >= before - 1e-12  # an under-budget proposal only grows
        assert after >= 0.9 * budget.fraction  # and ends near the budget
        r0, r1 = proposed.ratio_map, repaired.ratio_map
        for a in space.prunable:  # one common scale: the allocation's order is kept (up to one fill step)
            for b in space.prunable:
                if r0.get(a, 1.0) < r0.get(b, 1.0):
                    assert r1.get(a, 1.0) <= r1.get(b, 1.0) + step + 1e-9


def test_a_proposal_over_the_budget_is_shrunk_into_it(resnet20_space):
    space, cost = resnet20_space
    budget = parse_budget("macs=0.4").bind(cost.base)
    repaired = repair_to_budget(space.uniform(0.875), space, cost, budget)
    assert budget.met_by(cost(repaired)) and budget.cost_fraction(cost(repaired)) > 0.36


@pytest.mark.parametrize("strategy", ["random", "optuna-tpe"])
def test_the_loop_evaluates_repaired_proposals_and_records_what_was_proposed(strategy, tmp_path, trained_digits_model,
                                                                             digits_space, digits):
    outcome, store, study, evaluator = run_search(tmp_path, trained_digits_model, digits_space, digits, strategy,
                                                  budget="macs=0.7", max_evals=6, seed=0, options={"warm_start": "none"})
    budget = outcome.budget
    evaluated = [t for t in study.trials if t.user_attrs.get("evaluated")]
    assert evaluated and all(budget.met_by(r.costs) and budget.cost_fraction(r.costs) > 0.6 for r in outcome.history)
    assert all("repaired" in t.user_attrs for t in evaluated)
    moved = [t for t in evaluated if t.user_attrs["repaired"]]
    assert moved and all(t.user_attrs["proposed"] != t.user_attrs["candidate"] for t in moved)


def test_repair_can_be_switched_off_and_is_refused_by_strategies_without_it(tmp_path, trained_digits_model, digits_space, digits):
    outcome, _, study, _ = run_search(tmp_path, trained_digits_model, digits_space, digits, "random", budget="macs=0.7",
                                      max_evals=4, options={"repair": False})
    assert not any("repaired" in t.user_attrs for t in study.trials)
    assert min(outcome.budget.cost_fraction(r.costs) for r in outcome.history) < 0.6  # raw samples fall far below
    with pytest.raises(ConfigError, match="strategy 'greedy' does not take the options \\['repair'\\]"):
        STRATEGIES.get("greedy").check_options({"repair": False})
    with pytest.raises(ConfigError, match="option repair='no' must be true or false"):
        STRATEGIES.get("random").check_options({"repair": "no"})


def test_random_search_starts_from_the_one_shot_allocators_answers(tmp_path, trained_digits_model, digits_space, digits):
    from automlprune.search.warm_start import warm_start_candidates

    outcome, _, study, evaluator = run_search(tmp_path, trained_digits_model, digits_space, digits, "random",
                                              budget="macs=0.5", max_evals=5)
    trials = sorted((t for t in study.trials if t.user_attrs.get("evaluated")), key=lambda t: t.number)
    proposed = [t.user_attrs.get("proposed") or t.user_attrs["candidate"] for t in trials]
    strategy = STRATEGIES.get("random")(_context(evaluator, study, trained_digits_model, digits), parse_budget("macs=0.5"))
    warm = [c.to_dict() for c in warm_start_candidates(strategy, ["uniform", "global", "prunenet"])]
    assert warm and proposed[:len(warm)] == warm  # evaluated first, as answered, counted in the evaluation budget
    assert not any("repaired" in t.user_attrs for t in trials[:len(warm)])
    assert outcome.evaluations == 5


@pytest.mark.parametrize("value,message", [
    ("prunenet,greedy", "warm_start names greedy, which is not a one-shot allocator; use some of uniform, global"),
    ("uniform:bitz=4", "strategy 'uniform' does not take the options \\['bitz'\\]"),
    ("uniform:bits", "warm_start entry 'uniform:bits' has an option 'bits' without a value"),
    ("uniform:bits=four", "strategy 'uniform' option bits='four' must be a whole number"),
])
def test_a_warm_start_naming_something_else_than_an_allocator_or_its_options_is_refused(value, message):
    with pytest.raises(ConfigError, match=message):
        STRATEGIES.get("optuna-tpe").check_options({"warm_start": value})


def test_a_search_over_bits_under_a_bytes_budget_starts_from_uniform_int8_and_int4(trained_digits_model, digits):
    from automlprune.search.base import SearchContext
    from automlprune.search.warm_start import default_for, warm_start_candidates
    from automlprune.space import SearchSpace
    from automlprune.space.config import SpaceConfig

    config = SpaceConfig(ratios=(0.25, 0.5, 0.75, 1.0), bit_choices=(2, 4, 8, 32), densities=(0.1, 0.5, 1.0),
                         patterns=("unstructured",), name="test-joint")
    space = SearchSpace(trained_digits_model, torch.zeros(1, 1, 8, 8), config)
    cost = CostModel(space, trained_digits_model)
    assert default_for(space, cost, "bytes") == ("uniform:bits=8,global-magnitude:bits=8,uniform:bits=4,global-magnitude:bits=4,"
                                                 "uniform,global,prunenet,global-magnitude")
    assert default_for(space, cost, "macs") == "uniform,global,prunenet,global-magnitude"  # bits do not change MACs
    context = SearchContext(space, cost, None, None, trained_digits_model, data=digits)
    strategy = STRATEGIES.get("random")(context, parse_budget("bytes=0.125"), warm_start="uniform:bits=4,uniform:bits=8")
    int4, int8 = warm_start_candidates(strategy, strategy.warm_start)
    assert set(space.weight_bits(int4)[l] for l in space.bit_searchable) == {4} and cost(int4).bytes <= strategy.limit
    assert set(space.weight_bits(int8)[l] for l in space.bit_searchable) == {8} and cost(int8).bytes <= strategy.limit
    assert min(int8.ratio_map.values(), default=1.0) < min(int4.ratio_map.values(), default=1.0)  # int8 pays in channels


def _context(evaluator, study, model, data):
    from automlprune.search.base import SearchContext

    return SearchContext(evaluator.space, evaluator.cost_model, study, evaluator.scores, model, data=data,
                         scores_under=evaluator.scores_under)


def test_optuna_evaluates_the_allocators_exact_answers_first(tmp_path, trained_digits_model, digits_space, digits):
    from automlprune.search.warm_start import warm_start_candidates

    outcome, _, study, evaluator = run_search(tmp_path, trained_digits_model, digits_space, digits, "optuna-tpe",
                                              budget="macs=0.5", max_evals=5)
    strategy = STRATEGIES.get("random")(_context(evaluator, study, trained_digits_model, digits), parse_budget("macs=0.5"))
    warm = [c.key for c in warm_start_candidates(strategy, ["uniform", "global", "prunenet"])]
    assert [r.candidate.key for r in outcome.history[:len(warm)]] == warm


def test_an_allocator_without_an_answer_is_skipped_and_the_search_starts_from_the_others(
        tmp_path, trained_digits_model, digits_space, digits, monkeypatch, capsys):
    from automlprune.search.warm_start import warm_start_candidates

    _, _, study, evaluator = run_search(tmp_path, trained_digits_model, digits_space, digits, "random",
                                        budget="macs=0.5", max_evals=1)
    strategy = STRATEGIES.get("random")(_context(evaluator, study, trained_digits_model, digits), parse_budget("macs=0.5"))
    both = warm_start_candidates(strategy, ["uniform", "prunenet"])
    assert len(both) == 2

    def no_answer(self):
        raise ConfigError("no single keep ratio fits")

    monkeypatch.setattr(STRATEGIES.get("uniform"), "propose", no_answer)
    capsys.readouterr()
    assert warm_start_candidates(strategy, ["uniform", "prunenet"]) == both[-1:]
    assert "warm start: uniform is skipped: no single keep ratio fits" in capsys.readouterr().err


def test_repair_scales_the_densities_of_a_sparse_proposal_by_one_factor_and_leaves_n_m_layers(resnet20_space):
    from automlprune.space import Candidate
    from automlprune.space.config import SpaceConfig

    model = build_model("resnet20", 10, 1).eval()
    space = SearchSpace(model, torch.zeros(1, 1, 28, 28),
                        SpaceConfig(ratios=(1.0,), densities=(0.05, 0.1, 0.2, 0.4, 0.7, 1.0), patterns=("unstructured", "2:4")))
    cost = CostModel(space, model)
    layers = list(space.layer_patterns)
    rng = np.random.default_rng(1)
    patterns = {l: ("2:4" if i % 4 == 0 else "unstructured") for i, l in enumerate(layers)}
    densities = {l: (0.5 if patterns[l] == "2:4" else float(rng.choice([0.1, 0.2, 0.4, 0.7]))) for l in layers}
    proposed = Candidate.make(None, None, densities, patterns)
    for label in ("bytes=0.3", "bytes=0.15"):
        budget = parse_budget(label).bind(cost.base)
        repaired = repair_to_budget(proposed, space, cost, budget)
        assert budget.met_by(cost(repaired)) and budget.cost_fraction(cost(repaired)) >= 0.9 * budget.fraction
        after = {l: repaired.density_map.get(l, 1.0) for l in layers}
        factors = {round(after[l] / densities[l], 2) for l in layers if patterns[l] == "unstructured" and 0 < after[l] < 1}
        assert len(factors) == 1  # one common factor keeps the proposal's shape
        assert all(after[l] == 0.5 and repaired.sparsity()[l][0] == "2:4" for l in layers if patterns[l] == "2:4")


def test_a_search_whose_proposals_all_repeat_stops_and_says_why(tmp_path, trained_digits_model, digits_space, digits,
                                                                monkeypatch):
    """Near a tight budget repair sends every proposal to the same few networks: the loop stops after
    MAX_REPEATED_ASKS repeats in a row, and the store, the outcome and the report's records say why."""
    from automlprune.evaluator import Evaluator
    from automlprune.report.collect import collect
    from automlprune.search import base
    from automlprune.settings import EvalSettings

    class SameNetwork(base.Strategy):
        name = "same-network"

        def ask(self):
            return self.space.uniform(0.5)

    monkeypatch.setattr(base, "MAX_REPEATED_ASKS", 3)
    evaluator = Evaluator(trained_digits_model, digits_space, digits, EvalSettings(bn_batches=2, bn_batch_size=64))
    store = RunStore(tmp_path / "run")
    budget = parse_budget("macs=0.9")
    study = store.study("same-network|macs=0.9|seed0", {"strategy": "same-network", "budget": budget.label, "seed": 0})
    context = base.SearchContext(digits_space, evaluator.cost_model, study, evaluator.scores, trained_digits_model,
                                 store.artifacts, digits)
    outcome = base.run_strategy(SameNetwork(context, budget), evaluator, store, study, max_evals=10)
    assert outcome.evaluations == 1 and outcome.answer is not None
    assert "last 3 proposals were all networks it had already evaluated" in outcome.stopped
    assert RunStore.summary(study).stopped == outcome.stopped
    (record,) = collect(store)
    assert record.stopped == outcome.stopped
    asks = []
    monkeypatch.setattr(SameNetwork, "ask", lambda self: asks.append(1) or self.space.uniform(0.5))
    resumed = base.run_strategy(SameNetwork(context, budget), evaluator, store, study, max_evals=10)
    assert not asks and resumed.stopped == outcome.stopped  # finished: resumed, it answers from the store without asking
    assert resumed.answer.key == outcome.answer.key and resumed.evaluations == 1
    again = base.run_strategy(SameNetwork(context, budget), evaluator, store, study, max_evals=10, run_settings="other options")
    assert len(asks) == 4 and again.stopped == outcome.stopped  # other settings: it searches again (and stops again)


def test_a_one_shot_answer_is_not_reported_as_stopped_early(tmp_path, trained_digits_model, digits_space, digits):
    outcome, store, study, _ = run_search(tmp_path, trained_digits_model, digits_space, digits, "uniform", max_evals=10)
    assert outcome.evaluations == 1 and outcome.stopped is None and RunStore.summary(study).stopped is None


@pytest.mark.parametrize("strategy, task_settings, expected", [
    ("optuna-tpe", {}, ("prunenet", "least_squares")),  # a black-box search: the measured search signal
    ("random", {}, ("prunenet", "least_squares")),
    ("ddpg", {}, ("prunenet", "least_squares")),
    ("uniform", {}, ("l1", "none")),  # an anchor keeps what it stands for (uniform L1)
    ("global", {}, ("l1", "none")),
    ("tp-global", {}, ("tp_magnitude", "none")),  # a strategy's own criterion wins
    ("prunenet", {}, ("prunenet", "least_squares")),
    ("optuna-tpe", {"criterion": "l2"}, ("l2", "least_squares")),  # the task's choice wins, the rest is filled
    ("optuna-tpe", {"criterion": "l1", "reconstruction": "none"}, ("l1", "none")),
])
def test_the_search_signal_is_the_black_box_searches_default_and_the_task_can_override_it(strategy, task_settings, expected):
    from automlprune.settings import EvalSettings

    settings = STRATEGIES.get(strategy).evaluation_settings(EvalSettings(**task_settings))
    assert (settings.criterion, settings.reconstruction) == expected


def test_an_evaluator_on_its_own_evaluates_plainly(trained_digits_model, digits_space, digits):
    from automlprune.evaluator import Evaluator
    from automlprune.settings import EvalSettings

    evaluator = Evaluator(trained_digits_model, digits_space, digits, EvalSettings(bn_batches=1))
    assert (evaluator.settings.criterion, evaluator.settings.reconstruction) == ("l1", "none")
    assert evaluator.reconstruction is None
