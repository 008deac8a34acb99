"""The per-layer latency table and latency budgets."""

import json

import numpy as np
import pytest
from torch import nn

from automlprune.cli.main import main
from automlprune.cost import CostModel
from automlprune.errors import ConfigError
from automlprune.latency import measure_latencies
from automlprune.latency_table import LatencyTable, measure_latency_table
from automlprune.rl.env import LayerWidthEnv


@pytest.fixture(scope="module")
def table(trained_digits_model, digits_space):
    return measure_latency_table(trained_digits_model, digits_space, repeats=3, progress=False)


def test_table_reproduces_its_two_anchor_measurements(table, trained_digits_model, digits_space):
    cost = CostModel(digits_space, trained_digits_model)
    assert np.isnan(cost.base.latency_ms)
    cost.attach_latency_table(table)
    assert cost.base.latency_ms == pytest.approx(table.info["full_measured_ms"], rel=1e-9)
    smallest = cost(digits_space.smallest()).latency_ms
    if table.small_overhead_ms > 0:
        assert smallest == pytest.approx(table.info["smallest_measured_ms"], rel=1e-9)
    else:  # on a loaded machine the layers timed alone can add up to more than the whole: overhead clamped at 0
        assert smallest >= table.info["smallest_measured_ms"]
    assert set(table.layers) == {l.name for l in digits_space.layers if l.kind != "bn"}
    assert cost.relative(digits_space.uniform(0.5))["latency"] > 0


def test_table_round_trips_through_json(table, tmp_path, digits_space):
    table.save(tmp_path / "t.json")
    again = LatencyTable.load(tmp_path / "t.json")
    cost_a, cost_b = CostModel(digits_space), CostModel(digits_space)
    cost_a.attach_latency_table(table)
    cost_b.attach_latency_table(again)
    cand = digits_space.uniform(0.625)
    assert cost_a(cand).latency_ms == cost_b(cand).latency_ms
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="cannot be read"):
        LatencyTable.load(tmp_path / "bad.json")


def test_latency_costs_need_a_table(digits_evaluator):
    cost = CostModel(digits_evaluator.space)
    with pytest.raises(ConfigError, match="latency table"):
        cost(digits_evaluator.space.full()).get("latency")
    with pytest.raises(ConfigError, match="latency table"):
        LayerWidthEnv(digits_evaluator, "latency=0.9")


def test_latency_budget_search_answers_within_the_predicted_budget(tmp_path, capsys):
    checkpoint = tmp_path / "c.pt"
    assert main(["train", "digits-cnn", "--set", f"checkpoint={checkpoint}", "--set", "train.epochs=2", "--json"]) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    code = main(["search", "digits-cnn", "--strategy", "random", "--budget", "latency=0.97", "--evals", "5", "--run-dir", str(run),
                 "--set", f"checkpoint={checkpoint}", "--no-export", "--json"])
    out, err = capsys.readouterr()
    if code == 2:  # on a machine where dispatch dominates even more, the budget may be impossible: said clearly
        assert "impossible" in err
        return
    answer = json.loads(out)["answers"][0]["answer"]
    assert answer["relative"]["latency"] <= 0.97 + 1e-9 and answer["latency_ms"] > 0
    assert (run / "latency_table.json").is_file()
    code = main(["search", "digits-cnn", "--strategy", "random", "--budget", "latency=0.97", "--evals", "5", "--run-dir", str(run),
                 "--set", f"checkpoint={checkpoint}", "--no-export", "--json"])
    assert code == 0  # resumed with the saved table


def test_interleaved_timing_orders_networks_by_their_work():
    small = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())
    large = nn.Sequential(nn.Conv2d(1, 256, 3), nn.Conv2d(256, 256, 3), nn.Flatten())
    timed = measure_latencies([small, large, small], (1, 16, 16), (1, 8), rounds=3, repeats=3)
    assert [sorted(t) for t in timed] == [[1, 8]] * 3
    assert all(t[b] > 0 for t in timed for b in (1, 8))
    assert timed[1][8] > 10 * timed[0][8] and timed[1][8] > 10 * timed[2][8]  # ~1,000x the MACs
