"""The per-layer latency table and latency budgets."""

import json
import platform
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from torch import nn

from automlprune.cli.main import main
from automlprune.cost import CostModel
from automlprune.errors import ConfigError
from automlprune.latency import measure_latencies
from automlprune.latency_table import CALIBRATION, LatencyTable, calibration_candidates, fit_overhead, measure_latency_table
from automlprune.rl.env import LayerWidthEnv


@pytest.fixture(scope="module")
def table(trained_digits_model, digits_space):
    return measure_latency_table(trained_digits_model, digits_space, repeats=3, progress=False)


def test_table_fits_its_overhead_on_the_activations_of_the_networks_it_measured(table, trained_digits_model, digits_space):
    cost = CostModel(digits_space, trained_digits_model)
    assert "latency" not in cost.base
    cost.attach_latency_table(table)
    fixed, per_million = table.overhead_fit
    assert per_million >= 0
    full = cost.from_kept(digits_space.kept_channels(digits_space.full()).astype(float))
    layers = table.layer_sum(cost.layer_names, full["kept_in"], full["kept_out"])
    assert cost.base["latency"] == pytest.approx(max(0.0, fixed + per_million * cost.activations(full) / 1e6) + layers, rel=1e-9)
    measured = table.info["calibration_measured_ms"]
    predicted = [cost(c)["latency"] for c in calibration_candidates(digits_space)]
    assert len(predicted) == len(measured) == CALIBRATION
    # a least-squares line through the calibration networks: its errors average out (noise of a busy machine allowed)
    assert abs(sum(predicted) - sum(measured)) / sum(measured) < 0.15
    assert set(table.layers) == {l.name for l in digits_space.layers if l.kind != "bn"}
    assert cost.relative(digits_space.uniform(0.5))["latency"] > 0


def test_overhead_fit_recovers_a_line_and_never_shrinks_with_more_activations():
    fixed, slope = fit_overhead(np.array([1.0, 2.0, 3.0]), np.array([0.5, 0.7, 0.9]))
    assert fixed == pytest.approx(0.3) and slope == pytest.approx(0.2)
    assert fit_overhead(np.array([1.0, 2.0]), np.array([0.9, 0.5])) == (pytest.approx(0.7), 0.0)
    assert fit_overhead(np.array([1.0]), np.array([0.4])) == (pytest.approx(0.4), 0.0)


def test_tables_saved_before_the_fit_interpolate_in_macs(table, digits_space):
    old = replace(table, overhead_fit=None, small_overhead_ms=0.1, overhead_ms=0.3, small_macs_fraction=0.2)
    assert old.overhead(0.6, activations=123.0) == pytest.approx(0.2)
    data = json.loads(table.to_json())
    del data["overhead_fit"]
    assert LatencyTable.from_json(json.dumps(data)).overhead_fit is None


def test_table_round_trips_through_json(table, tmp_path, digits_space):
    table.save(tmp_path / "t.json")
    again = LatencyTable.load(tmp_path / "t.json")
    cost_a, cost_b = CostModel(digits_space), CostModel(digits_space)
    cost_a.attach_latency_table(table)
    cost_b.attach_latency_table(again)
    cand = digits_space.uniform(0.625)
    assert cost_a(cand)["latency"] == cost_b(cand)["latency"]
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="cannot be read"):
        LatencyTable.load(tmp_path / "bad.json")


def test_latency_costs_need_a_table(digits_evaluator):
    cost = CostModel(digits_evaluator.space)
    with pytest.raises(ConfigError, match="latency table"):
        cost(digits_evaluator.space.full())["latency"]
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
        assert "impossible" in err and "Traceback" not in err
        return
    answer = json.loads(out)["answers"][0]["answer"]
    assert answer["relative"]["latency"] <= 0.97 + 1e-9 and answer["latency"] > 0
    assert (run / "latency_table.json").is_file()
    code = main(["search", "digits-cnn", "--strategy", "random", "--budget", "latency=0.97", "--evals", "5", "--run-dir", str(run),
                 "--set", f"checkpoint={checkpoint}", "--no-export", "--json"])
    assert code == 0  # resumed with the saved table
    assert LatencyTable.load(run / "latency_table.json").batch_size == 1
    code = main(["search", "digits-cnn", "--strategy", "random", "--budget", "latency=0.97", "--evals", "3", "--run-dir", str(run),
                 "--set", f"checkpoint={checkpoint}", "--set", "evaluation.latency_batch=16", "--no-export", "--json"])
    assert code == 2 and "latency_batch" in capsys.readouterr().err  # another meaning of latency: another run directory
    other = tmp_path / "run16"
    code = main(["search", "digits-cnn", "--strategy", "random", "--budget", "latency=0.97", "--evals", "3", "--run-dir", str(other),
                 "--set", f"checkpoint={checkpoint}", "--set", "evaluation.latency_batch=16", "--no-export", "--json"])
    capsys.readouterr()
    assert code in (0, 2)  # 2: impossible at this batch on this machine, said clearly
    assert LatencyTable.load(other / "latency_table.json").batch_size == 16


def test_networks_are_timed_in_interleaved_rounds_and_keep_their_median(monkeypatch):
    import automlprune.latency as latency

    calls, fake = [], iter([5.0, 1.0, 7.0, 2.0, 6.0, 3.0])  # round 1: a, b; round 2: a, b; round 3: a, b

    def timed_once(model, input_shape, batch_sizes, device, warmup, repeats):
        calls.append(model)
        return {1: next(fake)}

    monkeypatch.setattr(latency, "measure_latency", timed_once)
    a, b = nn.Identity(), nn.Flatten()
    assert measure_latencies([a, b], (1, 4, 4), (1,), rounds=3, repeats=2) == [{1: 6.0}, {1: 2.0}]
    assert calls == [a, b, a, b, a, b]  # interleaved: a drift of the machine hits both alike


def test_interleaved_timing_measures_every_batch_size():
    timed = measure_latencies([nn.Conv2d(1, 4, 3), nn.Conv2d(1, 8, 3)], (1, 8, 8), (1, 4), rounds=2, repeats=2)
    assert len(timed) == 2 and all(sorted(t) == [1, 4] and min(t.values()) > 0 for t in timed)


_FREED_MEMORY_PROBE = """
import sys
from automlprune.latency import steady_allocator
applied = steady_allocator() if sys.argv[1] == "steady" else None
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
before = rss_mb()
block = b"x" * (20 << 20)  # 20 MiB, every page touched
held = rss_mb()
del block
print(applied, round(held - before), round(rss_mb() - before))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_steady_allocator_keeps_freed_memory_so_timings_do_not_pay_page_faults():
    def run(mode):
        out = subprocess.run([sys.executable, "-c", _FREED_MEMORY_PROBE, mode], capture_output=True, text=True, check=True)
        return out.stdout.split()

    applied, held, after_free = run("steady")
    assert applied == "True" and int(held) >= 19 and int(after_free) >= 19  # the 20 MiB stay with the process
    _, held, after_free = run("default")
    assert int(held) >= 19 and int(after_free) <= 2  # glibc's default hands a large block back at once


def test_every_measurement_holds_the_allocator_steady(monkeypatch):
    import automlprune.latency as latency

    calls = []
    monkeypatch.setattr(latency, "steady_allocator", lambda: calls.append(1) or True)
    latency.measure_latency(nn.Conv2d(1, 2, 3), (1, 6, 6), (1,), repeats=1, warmup=0)
    assert calls == [1]
