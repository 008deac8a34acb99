"""Contract test: every registered strategy, on the digits task."""

import pytest

from automlprune.search import STRATEGIES
from automlprune.search.budget import parse_budget

from conftest import run_search

STRATEGY_NAMES = STRATEGIES.names()
AGENT_TRAINING = {"td3", "sac", "ppo"}
"""SB3 agents beyond DDPG (the fast one, with HAQ's bits mode) train in the slow set."""
SHORT_TRAINING = {**{name: dict(batch_size=64, update_interval=2, reg_steps=40, pick_steps=10, stabilize_steps=4, max_epochs=3)
                    for name in ("greg1", "greg2")},
                  "resrep": dict(epochs=3, batch_size=64, mask_interval=4, before_mask_steps=8, granularity=16),
                  "gate-decorator": dict(batch_size=64, p=0.1, tock_epochs=1, tock_steps=4, tick_steps=3),
                  "movement": dict(epochs=2, batch_size=64), **dict.fromkeys(("l0-anneal", "prune-while-training"), dict(epochs=2, batch_size=64)),
                  "gradual-frs": dict(epochs=2, batch_size=64, score_samples=128), "play-and-prune": dict(epochs=2, batch_size=64),
                  "bwcp": dict(epochs=1, batch_size=64, budget_penalty=10.0), "pconv-admm": dict(epochs=1, retrain_epochs=1, batch_size=64, admm_steps=3, steps_per_epoch=8),
                  "information-dropout": dict(epochs=1, retrain_epochs=1, batch_size=64, steps_per_epoch=8)}
"""Training-time methods run the contract with a few dozen steps (tests/test_greg.py trains them longer)."""
CONTRACT_CASES = [pytest.param(s, marks=pytest.mark.slow) if s in AGENT_TRAINING else s for s in STRATEGY_NAMES]
BITS_ONLY = {"haq": {"macs=0.5": "bytes=0.3", "params=0.3": "bytes=0.15"}}  # channels stay whole: budgets in bytes
SPARSE_ONLY = {**dict.fromkeys(("global-magnitude", "movement"), {"macs=0.5": "bytes=0.4", "params=0.3": "bytes=0.2"}),
               "pconv-admm": {"macs=0.5": "bytes=0.7", "params=0.3": "bytes=0.55", "bytes=0.2": "bytes=0.5"},  # PCONV reaches only the two 3x3 inner convs
               "information-dropout": {"macs=0.5": "bytes=0.7", "params=0.3": "bytes=0.6", "bytes=0.2": "bytes=0.5"}}  # whole kernels of the two 3x3 inner convs (at least 42 %)
"""Weight-sparsity methods: on a densities space, budgets in bytes."""


@pytest.fixture(scope="module")
def sparse_space(trained_digits_model, digits):
    from automlprune.space import SearchSpace
    from automlprune.space.config import SpaceConfig

    config = SpaceConfig(ratios=(1.0,), densities=(0.05, 0.1, 0.2, 0.4, 0.7, 1.0), patterns=("unstructured", "block:1x4", "pconv", "kernel"),
                         bit_choices=(4, 8, 32), pin_first_last_bits=8)
    return SearchSpace(trained_digits_model, digits.example_input(), config)


@pytest.fixture(scope="module")
def mixed_space(trained_digits_model, digits):
    from automlprune.space import SearchSpace
    from automlprune.space.config import SpaceConfig

    return SearchSpace(trained_digits_model, digits.example_input(), SpaceConfig(bit_choices=(2, 4, 8, 32), pin_first_last_bits=8))


@pytest.mark.parametrize("strategy", CONTRACT_CASES)
@pytest.mark.parametrize("budget", ["macs=0.5", "params=0.3", "bytes=0.2 mixed"])
def test_strategy_contract(strategy, budget, tmp_path, trained_digits_model, digits_space, mixed_space, sparse_space, digits):
    """Every strategy, on the channel space (macs, params) and on a channels-and-bits space (bytes);
    the weight-sparsity allocators on a densities-and-bits space."""
    max_evals = 8
    first_case = budget == "macs=0.5"
    budget, _, mixed = budget.partition(" ")
    budget = {**BITS_ONLY, **SPARSE_ONLY}.get(strategy, {}).get(budget, budget)
    space = sparse_space if strategy in SPARSE_ONLY else mixed_space if mixed or strategy in BITS_ONLY else digits_space
    options = SHORT_TRAINING.get(strategy, {})
    outcome, store, study, evaluator = run_search(tmp_path, trained_digits_model, space, digits, strategy,
                                                  budget=budget, max_evals=max_evals, seed=1, options=options)
    b = parse_budget(budget)
    base = evaluator.cost_model.base
    # answers meet the budget
    assert outcome.answer is not None, f"{strategy} found no feasible candidate"
    assert b.bind(base).met_by(outcome.answer.costs)
    assert evaluator.cost_model(outcome.answer.candidate)[b.metric] <= b.bind(base).limit * (1 + 1e-9)
    # respects the evaluation budget and records every evaluation, once
    records = store.records(study)
    assert 1 <= outcome.evaluations <= max_evals
    assert len(records) == outcome.evaluations == len(evaluator)
    assert len({r.result.candidate.key for r in records}) == len(records)
    # deterministic under a seed (checked once per strategy: the search runs twice)
    if not first_case:
        return
    again, *_ = run_search(tmp_path, trained_digits_model, space, digits, strategy, budget=budget,
                           max_evals=max_evals, seed=1, run_name="again", options=options)
    assert again.answer.candidate == outcome.answer.candidate
    assert [r.candidate for r in again.history] == [r.candidate for r in outcome.history]


def test_registry_lists_the_issue_strategies():
    assert {"uniform", "random", "greedy", "global", "optuna-tpe", "optuna-nsga2"} <= set(STRATEGY_NAMES)
    with pytest.raises(ValueError):
        STRATEGIES.register("uniform", object)


def test_uniform_is_the_largest_uniform_ratio_within_budget(tmp_path, trained_digits_model, digits_space, digits):
    from automlprune.cost import uniform_ratio_for_budget

    outcome, _, _, evaluator = run_search(tmp_path, trained_digits_model, digits_space, digits, "uniform", "macs=0.4")
    cost = evaluator.cost_model
    ratio = uniform_ratio_for_budget(cost, "macs", 0.4 * cost.base.macs)
    answer = outcome.answer.candidate  # canonical: exact kept fractions of the same network
    assert (digits_space.kept_channels(answer) == digits_space.kept_channels(digits_space.uniform(ratio))).all()
    assert cost(answer).macs <= 0.4 * cost.base.macs
    assert cost(digits_space.uniform(min(1.0, ratio + 0.01))).macs > 0.4 * cost.base.macs


def test_global_removes_the_globally_least_important_channels(tmp_path, trained_digits_model, digits_space, digits):
    outcome, *_ = run_search(tmp_path, trained_digits_model, digits_space, digits, "global", "macs=0.5")
    ratios = outcome.answer.candidate.ratio_map
    assert len(set(ratios.values())) > 1  # non-uniform widths


def test_greedy_probes_each_group_then_allocates(tmp_path, trained_digits_model, digits_space, digits):
    outcome, *_ = run_search(tmp_path, trained_digits_model, digits_space, digits, "greedy", "macs=0.5", max_evals=20)
    probes = [r.candidate for r in outcome.history[1:-1]]
    assert outcome.history[0].candidate.ratios == ()  # the unpruned reference first
    assert all(len(c.ratios) == 1 for c in probes)
    assert {g for c in probes for g in c.ratio_map} == set(digits_space.prunable)


@pytest.mark.parametrize("strategy,options", [("uniform", {}), ("random", {}), ("optuna-tpe", {}), ("ddpg", {"mode": "density", "warmup": 3}),
                                              ("global-magnitude", {})])
def test_searches_over_weight_densities_meet_a_bytes_budget(strategy, options, tmp_path, trained_digits_model, sparse_space, digits):
    outcome, store, study, evaluator = run_search(tmp_path, trained_digits_model, sparse_space, digits, strategy,
                                                  budget="bytes=0.25", max_evals=6, seed=0, options=options)
    answer = outcome.answer.candidate
    assert not answer.ratios and any(r.candidate.densities for r in outcome.history)  # densities searched (bits too)
    assert evaluator.cost_model(answer)["bytes"] <= 0.25 * evaluator.cost_model.base["bytes"] * (1 + 1e-9)
    assert evaluator.cost_model(answer)["macs"] == evaluator.cost_model.base["macs"]  # PyTorch still runs every weight


def test_uniform_keeps_the_widths_a_space_fixes(tmp_path, trained_digits_model, digits):
    from automlprune.space import SearchSpace
    from automlprune.space.config import SpaceConfig

    space = SearchSpace(trained_digits_model, digits.example_input(), SpaceConfig(ratios=(1.0,), bit_choices=(2, 4, 8, 32)))
    outcome, _, _, evaluator = run_search(tmp_path, trained_digits_model, space, digits, "uniform", "bytes=0.2")
    answer = outcome.answer.candidate
    assert not answer.ratios and set(answer.bit_map.values()) == {4}  # 8 bits: 25 % of float32 plus scales; 4 bits fits
    assert evaluator.cost_model(answer)["bytes"] <= 0.2 * evaluator.cost_model.base["bytes"]
