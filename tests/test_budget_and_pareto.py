import numpy as np
import pytest

from automlprune.errors import ConfigError
from automlprune.report.pareto import best_within, hypervolume, pareto_front
from automlprune.search.budget import check_achievable, parse_budget, parse_budgets


def test_budget_parsing():
    b = parse_budget("macs=0.5")
    assert (b.metric, b.value, b.relative, b.label) == ("macs", 0.5, True, "macs=0.5")
    assert parse_budget("params=1.2M").value == pytest.approx(1.2e6) and not parse_budget("params=1.2M").relative
    assert parse_budget("bytes=250k").value == 250e3
    assert [x.label for x in parse_budgets("macs=0.3,0.5,params=0.7")] == ["macs=0.3", "macs=0.5", "params=0.7"]
    assert parse_budget("latency=0.6").relative and parse_budget("latency=0.6").label == "latency=0.6"
    ms = parse_budget("latency=2.5ms")
    assert (ms.value, ms.relative, ms.label) == (2.5, False, "latency=2.5ms") and parse_budget(ms.label) == ms


@pytest.mark.parametrize("text,message", [
    ("macs", "metric=value"), ("flops=0.5", "unknown budget metric"), ("macs=half", "not a number"),
    ("macs=0", "must be positive"), ("macs=-1", "must be positive"), ("macs=5ms", "unit of latency budgets only"),
    ("macs=1.5", "is above 1: write a fraction"), ("latency=3", "like latency=3ms"),
])
def test_malformed_budgets_are_refused(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_budget(text)


def test_duplicate_budgets_are_refused():
    with pytest.raises(ConfigError, match="twice"):
        parse_budgets("macs=0.5,0.5")


def test_impossible_budget_names_the_smallest_achievable(digits_evaluator):
    with pytest.raises(ConfigError) as err:
        check_achievable(parse_budget("macs=0.001"), digits_evaluator.cost_model)
    smallest = digits_evaluator.cost_model(digits_evaluator.space.smallest()).macs
    assert f"{smallest:.4g}" in str(err.value) and "impossible" in str(err.value)
    check_achievable(parse_budget("macs=0.5"), digits_evaluator.cost_model)


def test_pareto_front_and_hypervolume():
    costs = [0.2, 0.5, 0.4, 0.9, 0.5, 0.3]
    accs = [0.6, 0.8, 0.85, 0.9, 0.7, 0.55]
    front = pareto_front(costs, accs)
    assert front.tolist() == [0, 2, 3]  # (0.2,.6) (0.4,.85) (0.9,.9); (0.5,.8) is dominated by (0.4,.85)
    expected = (0.4 - 0.2) * 0.6 + (0.9 - 0.4) * 0.85 + (1.0 - 0.9) * 0.9
    assert hypervolume(costs, accs) == pytest.approx(expected)
    assert hypervolume([1.5], [0.9]) == 0.0
    assert best_within(costs, accs, 0.45) == 2 and best_within(costs, accs, 0.1) is None


def test_pareto_front_on_random_points_is_non_dominated():
    rng = np.random.default_rng(0)
    c, a = rng.random(200), rng.random(200)
    front = pareto_front(c, a)
    for i in front:
        assert not np.any((c <= c[i]) & (a >= a[i]) & ((c < c[i]) | (a > a[i])))
    for j in set(range(200)) - set(front.tolist()):
        assert np.any((c <= c[j]) & (a >= a[j]) & ((c < c[j]) | (a > a[j])))


def test_best_so_far_counts_only_points_within_absolute_and_relative_budgets():
    from automlprune.cost import Costs
    from automlprune.evaluator import EvalResult
    from automlprune.report.collect import SearchRecord
    from automlprune.report.plots import best_so_far
    from automlprune.space import Candidate

    def point(acc, params):  # unpruned network: 1000 parameters
        costs = Costs(macs=params, params=params, bytes=4 * params, bitops=params)
        return EvalResult(Candidate(), acc, None, costs, {"macs": params / 1000, "params": params / 1000,
                                                          "bytes": params / 1000, "bitops": params / 1000}, 0.1)

    points = [point(0.9, 800), point(0.5, 400), point(0.7, 450), point(0.95, 900)]
    absolute = SearchRecord("s", "random", parse_budget("params=0.5k").bind(1000), 0, points, [1, 2, 3, 4], None)
    assert absolute.feasible() == [False, True, True, False]
    assert best_so_far(absolute)[0] != best_so_far(absolute)[0]  # NaN: nothing within 500 parameters yet
    assert best_so_far(absolute)[1:] == [0.5, 0.7, 0.7]
    relative = SearchRecord("s", "random", parse_budget("params=0.85").bind(1000), 0, points, [1, 2, 3, 4], None)
    assert best_so_far(relative) == [0.9, 0.9, 0.9, 0.9]
