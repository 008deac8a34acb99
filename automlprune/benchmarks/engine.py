"""Engine benchmark: the cost of the core engine's own work, measured side by side in one run.

1. Cost model vs ``FlopCounterMode``: time to cost one candidate analytically vs materializing
   it and counting with PyTorch's FLOP counter (and the counter alone on a ready network).
2. Evaluator overhead: wall time of ``Evaluator.evaluate`` per candidate vs the bare forward
   passes it cannot avoid (BN re-estimation batches + validation batches on the materialized net).
3. Latency vs MACs: measured CPU latency of materialized networks at 70/50/30% of the MACs,
   as ratios to the unpruned network, next to the MACs ratio.
4. Latency table: time to build it, and its predictions against the measured latency of
   materialized networks (uniform and random candidates, batch 1).

The networks have random weights and the data is random tensors of Fashion-MNIST's shape:
none of these timings depends on the values, and nothing is downloaded.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from automlprune.cost import CostModel, count_macs, uniform_ratio_for_budget
from automlprune.data import DataSplits, ImageTensors
from automlprune.evaluator import Evaluator, recalibrate_batchnorm
from automlprune.latency import measure_latencies, measure_latency
from automlprune.materialize import materialize
from automlprune.models import build_model
from automlprune.space import Candidate, SearchSpace
from automlprune.settings import EvalSettings
from automlprune.accuracy import accuracy


def _synthetic_data(n_train: int, n_val: int, size: int) -> DataSplits:
    g = torch.Generator().manual_seed(0)
    make = lambda n: ImageTensors(torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g),  # noqa: E731
                                  torch.randint(0, 10, (n,), generator=g))
    return DataSplits("synthetic-fmnist", make(n_train), make(n_val), make(n_val), 10, 1, (size, size), (0.286,), (0.353,))


def _timeit(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _random_candidates(space: SearchSpace, n: int, seed: int = 0) -> list[Candidate]:
    rng = np.random.default_rng(seed)
    return [Candidate.make({g: float(rng.choice(space.config.ratios)) for g in space.prunable}) for _ in range(n)]


def bench_cost_model(model_name: str, size: int, n: int) -> dict[str, Any]:
    model = build_model(model_name, 10, 1).eval()
    x = torch.zeros(1, 1, size, size)
    space = SearchSpace(model, x)
    cost = CostModel(space, model)
    cands = _random_candidates(space, n)
    cost_us = statistics.median(_timeit(lambda c=c: cost(c), 20) for c in cands) * 1e6
    nets = [materialize(model, c, space) for c in cands[: max(3, n // 5)]]
    counter_ms = statistics.median(_timeit(lambda m=m: count_macs(m, x), 3) for m in nets) * 1e3
    mat_counter_ms = statistics.median(_timeit(lambda c=c: count_macs(materialize(model, c, space), x), 1) for c in cands[:len(nets)]) * 1e3
    exact = all(cost(c).macs == count_macs(m, x) for c, m in zip(cands, nets))
    return {"model": model_name, "input": [1, size, size], "candidates": n, "cost_model_us": cost_us,
            "flop_counter_ms": counter_ms, "materialize_plus_counter_ms": mat_counter_ms,
            "speedup_vs_counter": counter_ms * 1e3 / cost_us, "speedup_vs_materialize_plus_counter": mat_counter_ms * 1e3 / cost_us,
            "exact": exact}


def bench_evaluator(model_name: str, size: int, n: int, settings: EvalSettings, device: torch.device) -> dict[str, Any]:
    data = _synthetic_data(4000, settings.val_samples or 1000, size)
    model = build_model(model_name, 10, 1).to(device).eval()
    space = SearchSpace(model, data.example_input().to(device))
    evaluator = Evaluator(model, space, data, settings, device)
    cands = _random_candidates(space, n, seed=1)
    evaluator.evaluate(cands[0])  # warm-up (allocator, first-call overheads)
    eval_s, floor_s, materialize_s = [], [], []
    for cand in cands[1:]:
        start = time.perf_counter()
        evaluator.evaluate(cand)
        eval_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        net = materialize(model, cand, space, evaluator.order)
        materialize_s.append(time.perf_counter() - start)
        start = time.perf_counter()  # the physical floor: the same forward passes, nothing else
        recalibrate_batchnorm(net, evaluator.bn_batches)
        accuracy(net, evaluator.val_batches)
        floor_s.append(time.perf_counter() - start)
    images = sum(len(y) for _, y in evaluator.val_batches) + sum(len(y) for _, y in evaluator.bn_batches)
    return {"model": model_name, "input": [1, size, size], "candidates": len(eval_s), "images_per_evaluation": images,
            "evaluate_s": statistics.median(eval_s), "forward_floor_s": statistics.median(floor_s),
            "materialize_s": statistics.median(materialize_s),
            "overhead_ratio": statistics.median(e / f for e, f in zip(eval_s, floor_s))}


def bench_latency(model_name: str, size: int, targets: tuple[float, ...], device: torch.device, repeats: int,
                  batch_sizes: tuple[int, ...], rounds: int = 5) -> list[dict[str, Any]]:
    """Latency of the unpruned net and of uniform nets at each MACs target. The networks are
    timed in interleaved rounds (full, 70%, 50%, 30%, full, ...) and the median per network
    is kept, so slow drifts of machine load hit all of them alike."""
    model = build_model(model_name, 10, 1).eval()
    space = SearchSpace(model, torch.zeros(1, 1, size, size))
    cost = CostModel(space, model)
    cands = [space.full()] + [space.uniform(uniform_ratio_for_budget(cost, "macs", t * cost.base.macs)) for t in targets]
    nets = [model] + [materialize(model, c, space) for c in cands[1:]]
    lat = measure_latencies(nets, (1, size, size), batch_sizes, device, rounds=rounds, repeats=repeats)
    rows = []
    for target, cand, measured in zip(targets, cands[1:], lat[1:]):
        rows.append({"model": model_name, "target_macs": target, "keep_ratio": cand.ratios[0][1],
                     "macs_ratio": cost(cand).macs / cost.base.macs, "params_ratio": cost(cand).params / cost.base.params,
                     **{f"latency_ms_b{b}": measured[b] for b in batch_sizes},
                     **{f"latency_ratio_b{b}": measured[b] / lat[0][b] for b in batch_sizes},
                     **{f"base_latency_ms_b{b}": lat[0][b] for b in batch_sizes}})
    return rows


def bench_latency_table(model_name: str, size: int, device: torch.device, n_random: int) -> dict[str, Any]:
    from automlprune.latency_table import measure_latency_table

    model = build_model(model_name, 10, 1).eval()
    space = SearchSpace(model, torch.zeros(1, 1, size, size))
    cost = CostModel(space, model)
    start = time.perf_counter()
    cost.attach_latency_table(measure_latency_table(model, space, device, progress=False))
    build_s = time.perf_counter() - start
    cands = [space.uniform(r) for r in (0.875, 0.625, 0.375)] + _random_candidates(space, n_random, seed=2)
    rows = []
    for cand in cands:
        net = materialize(model, cand, space)
        measured = statistics.median(measure_latency(net, (1, size, size), (1,), device, repeats=20)[1] for _ in range(3))
        rows.append({"macs_ratio": cost(cand).macs / cost.base.macs, "predicted_ms": cost(cand)["latency"], "measured_ms": measured})
    errors = [abs(r["predicted_ms"] / r["measured_ms"] - 1) for r in rows]
    return {"model": model_name, "input": [1, size, size], "build_s": build_s, "rows": rows,
            "median_abs_error": statistics.median(errors), "max_abs_error": max(errors)}


def run_engine_benchmark(out_dir: Path, device: torch.device, candidates: int = 30, quick: bool = False) -> dict[str, Any]:
    """Run the three measurements and write ``report.md``, ``report.json`` and ``latency_vs_macs.png`` to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if quick:
        cost_cases, eval_models, lat_models, repeats, batches = [("digits_cnn", 8)], [("digits_cnn", 8)], ["digits_cnn"], 3, (1, 8)
        settings = EvalSettings(batch_size=128, val_samples=256, bn_batches=2, bn_batch_size=64)
        candidates = min(candidates, 5)
    else:
        cost_cases, eval_models, lat_models, repeats, batches = (
            [("resnet56", 32), ("mobilenet_v2", 32), ("vgg16_bn", 32)], [("resnet56", 28), ("mobilenet_v2", 32)],
            ["resnet56", "mobilenet_v2", "vgg11_bn"], 6, (1, 64))
        settings = EvalSettings(batch_size=500, val_samples=1000, bn_batches=5, bn_batch_size=128)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "environment": {"torch": str(torch.__version__), "device": str(device), "threads": torch.get_num_threads(),
                        "cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "cost_model": [bench_cost_model(name, size, candidates) for name, size in cost_cases],
        "evaluator": [bench_evaluator(name, size, min(candidates, 8) + 1, settings, device) for name, size in eval_models],
        "latency": [row for name in lat_models
                    for row in bench_latency(name, 28 if name != "digits_cnn" else 8, (0.7, 0.5, 0.3), device, repeats, batches)],
        "latency_table": bench_latency_table(*(("digits_cnn", 8) if quick else ("resnet20", 28)), device, 2 if quick else 7),
    }
    report["seconds"] = time.perf_counter() - started
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    _plot_latency(report["latency"], batches, out_dir / "latency_vs_macs.png")
    (out_dir / "report.md").write_text(_markdown(report, batches, quick))
    return report


def _plot_latency(rows: list[dict[str, Any]], batches: tuple[int, ...], path: Path) -> None:
    from automlprune.report.plots import figure

    fig, ax = figure(figsize=(5.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="latency = MACs")
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        for b, marker in zip(batches, "os"):
            ax.plot([1] + [r["macs_ratio"] for r in mine], [1] + [r[f"latency_ratio_b{b}"] for r in mine],
                    marker=marker, label=f"{model}, batch {b}")
    ax.set_xlabel("MACs / unpruned MACs")
    ax.set_ylabel("measured latency / unpruned latency")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, 1.3)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Uniformly pruned networks: latency vs MACs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _markdown(r: dict[str, Any], batches: tuple[int, ...], quick: bool) -> str:
    env = r["environment"]
    lines = ["# Engine benchmark", "",
             f"Command: `automlprune benchmark{' --quick' if quick else ''}`. torch {env['torch']}, device {env['device']}, "
             f"{env['threads']} threads, Python {env['python']}; {r['seconds']:.0f} s in all. Random weights and "
             "random Fashion-MNIST-shaped data (timings do not depend on values).", "",
             "## 1. Cost model vs PyTorch's FlopCounterMode", "",
             "| model | input | cost model per candidate | FlopCounterMode on a ready net | materialize + FlopCounterMode | speed-up (vs counter / vs materialize+counter) | MACs equal |",
             "|---|---|---|---|---|---|---|"]
    for c in r["cost_model"]:
        lines.append(f"| {c['model']} | {'x'.join(map(str, c['input']))} | {c['cost_model_us']:.1f} µs | {c['flop_counter_ms']:.1f} ms | "
                     f"{c['materialize_plus_counter_ms']:.1f} ms | {c['speedup_vs_counter']:.0f}x / {c['speedup_vs_materialize_plus_counter']:.0f}x | {c['exact']} |")
    lines += ["", "## 2. Evaluator time per candidate vs the forward passes it needs", "",
              f"Each evaluation runs {r['evaluator'][0]['images_per_evaluation']} images (BN re-estimation + validation); "
              "median over random candidates. Materialization cuts each layer at the index maps the search space "
              "recorded once (no dependency-graph tracing per candidate).", "",
              "| model | input | candidates | evaluate() | bare forward passes (floor) | materialize (inside evaluate) | overhead ratio |",
              "|---|---|---|---|---|---|---|"]
    for e in r["evaluator"]:
        lines.append(f"| {e['model']} | {'x'.join(map(str, e['input']))} | {e['candidates']} | {e['evaluate_s'] * 1e3:.1f} ms | "
                     f"{e['forward_floor_s'] * 1e3:.1f} ms | {e['materialize_s'] * 1e3:.1f} ms | {e['overhead_ratio']:.3f}x |")
    lines += ["", "## 3. Measured latency of materialized networks vs MACs", "",
              "Uniform keep ratio found by bisection to meet each MACs target; latency = median forward time, "
              "the unpruned and pruned networks timed in interleaved rounds.", "",
              "| model | target | keep ratio | MACs ratio | params ratio | " + " | ".join(f"latency ratio b{b}" for b in batches) + " | "
              + " | ".join(f"latency b{b}" for b in batches) + " |",
              "|---|---|---|---|---|" + "---|" * (2 * len(batches))]
    for row in r["latency"]:
        lines.append(f"| {row['model']} | {row['target_macs']:.0%} | {row['keep_ratio']:.3f} | {row['macs_ratio']:.3f} | {row['params_ratio']:.3f} | "
                     + " | ".join(f"{row[f'latency_ratio_b{b}']:.3f}" for b in batches) + " | "
                     + " | ".join(f"{row[f'latency_ms_b{b}']:.2f} ms (full {row[f'base_latency_ms_b{b}']:.2f})" for b in batches) + " |")
    lines += ["", "![latency vs MACs](latency_vs_macs.png)", ""]
    t = r["latency_table"]
    lines += ["## 4. Latency table: predicted vs measured latency (batch 1)", "",
              f"{t['model']} on {'x'.join(map(str, t['input']))}: table built in {t['build_s']:.1f} s; "
              f"median |error| {t['median_abs_error']:.1%}, max {t['max_abs_error']:.1%} "
              "(3 uniform candidates, then random ones).", "",
              "| MACs ratio | predicted (ms) | measured (ms) | predicted / measured |", "|---|---|---|---|"]
    for row in t["rows"]:
        lines.append(f"| {row['macs_ratio']:.3f} | {row['predicted_ms']:.3f} | {row['measured_ms']:.3f} | "
                     f"{row['predicted_ms'] / row['measured_ms']:.3f} |")
    lines.append("")
    return "\n".join(lines)
