"""Latency benchmark (``automlprune benchmark --suite latency``): where a pruned CNN spends its
CPU time, which channel alignment the backend rewards, and how far the latency table's
predictions are from the clock.

For each subject (a task's architecture, or ``torchvision:NAME@SIZE`` at 3 x SIZE x SIZE; random
weights with batch norms given random statistics: latency does not depend on the weights) it
measures, on this machine and its thread count:

1. **Latency of the forms a user can deploy**: the unpruned network and uniform prunings to each
   MACs target (widths rounded to 1 channel, i.e. irregular, and to each ``round_to``), each as
   the materialized module, with batch norms folded into the convolutions, and folded in
   channels-last memory format (the input converted inside the timed call: what ``export``
   writes, :func:`automlprune.export.deployable`).
   All are timed together in interleaved rounds (:func:`automlprune.latency.measure_latencies`),
   so their ratios hold on a machine whose speed drifts.
2. **Where the time goes**: ``torch.profiler`` self CPU time per forward pass, by kind of operator
   (convolution, batch norm, activation, residual add, pooling, linear, memory/layout, other), and
   the time spent outside operators (Python, module calls, the dispatcher's entry): the profiled
   wall time minus the operators' self times. The profiler slows small operators down; the
   shares are read from the profiled run and scaled to the unprofiled latency.
3. **Alignment**: the heaviest convolutions of the subject (distinct shapes, ungrouped), alone and
   channels-last as deployed, at every output width from a quarter of theirs to all (inputs
   scaled alike, as uniform pruning does). For an alignment ``a`` the *gain* (:func:`alignment_gains`) says how much cheaper than
   the layer's own affine trend (a fixed cost plus time per channel) rounding a width up to a
   multiple of ``a`` is: 1 when the time follows the trend, above 1 at ``a = 8`` when the time
   is a staircase in steps of 8 channels (the channels up to the next multiple come free). The
   recommended ``round_to`` is the smallest alignment within 1% of the best gain, or 1 when no
   alignment gains 3%.
4. **Latency table error**: the per-layer table (:mod:`automlprune.latency_table`, measured on the
   subject's default space, batch 1 as searches use it) predicts every network above and random
   allocations (off-grid keep ratios: irregular widths; and the same rounded to 8), each measured
   whole as exported; the report gives the relative error of each kind.

Results go to ``<out>/latency.json`` (per subject, kept on a rerun: delete a subject's entry's
file ``<out>/subjects/<name>.json`` to measure it again), ``<out>/report.md`` and one figure per
subject.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from automlprune.errors import ConfigError

SUBJECTS = ("fmnist-resnet20", "fmnist-mobilenetv2", "fmnist-vgg11")
"""Default subjects: the issue's ResNet-20, MobileNetV2 and VGG."""
TARGETS = (0.5,)
"""Default MACs fractions of the uniform prunings."""
ROUND_TO = (8, 16)
"""Default channel alignments of the rounded prunings."""
BATCH_SIZES = (1, 64)
ALIGNMENTS = (1, 2, 4, 8, 16, 32)
CATEGORIES = ("convolution", "batch norm", "activation", "residual add", "pooling", "linear", "memory/layout", "other ops",
              "outside ops")
"""Kinds of time in the breakdown; 'outside ops' is Python, module calls and dispatch not inside an operator."""
FORMS = ("module", "folded", "folded, channels-last")


# ---- subjects ---------------------------------------------------------------------------------
def load_subject(spec: str) -> tuple[nn.Module, torch.Tensor]:
    """``spec``'s network (random weights, random batch-norm statistics, eval mode) and an example
    input of batch 1."""
    from automlprune.nn.randomize import randomize_norms

    torch.manual_seed(0)
    if spec.startswith("torchvision:"):
        from automlprune.models import build_model

        name, _, size = spec[len("torchvision:"):].partition("@")
        try:
            pixels = int(size or 64)
        except ValueError:
            raise ConfigError(f"subject '{spec}': the size after '@' must be a whole number of pixels, e.g. {name}@64") from None
        model, x = build_model(f"torchvision:{name}", 10, 3), torch.randn(1, 3, pixels, pixels)
    else:
        from automlprune.tasks import Task, TaskSpec

        task = Task(TaskSpec.load(spec))
        model, x = task.build_model(), torch.randn_like(task.data.example_input())
    return randomize_norms(model, 0), x


def uniform_at(model: nn.Module, x: torch.Tensor, macs: float, round_to: int = 1) -> tuple[Any, Any, float]:
    """(space, candidate, MACs fraction): every group at one keep ratio, the largest whose network
    keeps at most ``macs`` of the MACs (:func:`~automlprune.cost.uniform_ratio_for_budget`), widths
    rounded to ``round_to`` channels; the space's narrowest uniform network when none fits."""
    from automlprune.cost import CostModel, uniform_ratio_for_budget
    from automlprune.space import SearchSpace, SpaceConfig

    space = SearchSpace(model, x, replace(SpaceConfig(), round_to=round_to, name=f"round-to-{round_to}"))
    cost = CostModel(space)
    try:
        ratio = uniform_ratio_for_budget(cost, "macs", macs * cost.base["macs"])
    except ConfigError:  # widths in multiples of round_to cannot go that low
        ratio = min(space.config.ratios)
    candidate = space.canonical(space.uniform(ratio))
    return space, candidate, cost(candidate).macs / cost.base["macs"]


def deployable_forms(net: nn.Module) -> dict[str, nn.Module]:
    """The forms of a materialized network timed: as it is, batch norms folded, folded and channels-last."""
    from automlprune.export import deployable, fold_batch_norms

    net = net.eval()
    return {"module": net, "folded": fold_batch_norms(net), "folded, channels-last": deployable(net)}


# ---- where the time goes ----------------------------------------------------------------------
def category(op: str) -> str:
    """The breakdown's kind of an aten operator name."""
    name = op.split("::")[-1]
    if "conv" in name:
        return "convolution"
    if "batch_norm" in name:
        return "batch norm"
    if name.rstrip("_") in {"relu", "relu6", "hardtanh", "clamp", "clamp_min", "hardswish", "silu", "sigmoid", "gelu",
                            "leaky_relu", "threshold", "elu", "mish", "hardsigmoid"}:
        return "activation"
    if name.rstrip("_") in {"add", "mul", "sub"}:
        return "residual add"
    if "pool" in name or name == "mean":
        return "pooling"
    if name in {"addmm", "linear", "mm", "matmul"}:
        return "linear"
    if name in {"contiguous", "copy_", "empty", "empty_like", "empty_strided", "to", "_to_copy", "clone", "as_strided",
                "view", "reshape", "flatten", "t", "transpose", "permute", "expand", "cat", "_reshape_alias", "resize_",
                "detach", "zeros", "fill_", "zero_", "slice", "select", "unsqueeze", "squeeze", "alias"}:
        return "memory/layout"
    return "other ops"


@torch.inference_mode()
def time_breakdown(model: nn.Module, x: torch.Tensor, repeats: int, latency_ms: float) -> dict[str, float]:
    """Milliseconds per forward pass of each :data:`CATEGORIES` kind (they sum to ``latency_ms``,
    the unprofiled latency; see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        model(x)
    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
        wall_us = (time.perf_counter() - start) * 1e6 / repeats
    kinds: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            kinds[category(event.key)] += event.self_cpu_time_total / repeats
    kinds["outside ops"] = max(0.0, wall_us - sum(kinds.values()))
    total = sum(kinds.values())
    return {k: latency_ms * kinds.get(k, 0.0) / total for k in CATEGORIES}


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence the profiler's native start/stop log lines (written by C++ straight to file
    descriptor 2, out of Python's reach) while the block runs."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ---- alignment ---------------------------------------------------------------------------------
def heaviest_convs(model: nn.Module, x: torch.Tensor, count: int = 3) -> list[dict[str, Any]]:
    """The ``count`` ungrouped convolutions of distinct shape with the most MACs (all calls)."""
    from automlprune.space import SearchSpace

    space = SearchSpace(model, x)
    seen, out = set(), []
    for info in space.layers:
        module = model.get_submodule(info.name)
        if not isinstance(module, nn.Conv2d) or module.groups != 1:
            continue
        shape = (module.in_channels, module.out_channels, module.kernel_size, module.stride, tuple(info.input_shape[1:]))
        if shape not in seen:
            seen.add(shape)
            out.append({"layer": info.name, "module": module, "input_shape": tuple(info.input_shape),
                        "macs": _conv_macs(module, info.input_shape) * info.calls})
    return sorted(out, key=lambda c: -c["macs"])[:count]


def _conv_macs(module: nn.Conv2d, input_shape: Sequence[int]) -> float:
    h, w = input_shape[1:]
    oh = (h + 2 * module.padding[0] - module.dilation[0] * (module.kernel_size[0] - 1) - 1) // module.stride[0] + 1
    ow = (w + 2 * module.padding[1] - module.dilation[1] * (module.kernel_size[1] - 1) - 1) // module.stride[1] + 1
    return float(module.in_channels * module.out_channels * module.kernel_size[0] * module.kernel_size[1] * oh * ow)


def width_sweep(module: nn.Conv2d, input_shape: Sequence[int], batch_size: int, repeats: int = 15) -> dict[int, float]:
    """Median milliseconds of ``module``'s shape alone, channels-last as deployed, at each output
    width from a quarter to all (inputs scaled in proportion, at least 1)."""
    from automlprune.export import ChannelsLast
    from automlprune.latency import measure_latency
    from automlprune.nn import layer_types

    out = {}
    full_out, full_in = module.out_channels, module.in_channels
    for width in range(max(1, full_out // 4), full_out + 1):
        kept_in = max(1, round(full_in * width / full_out))
        layer = ChannelsLast(layer_types.of(module).standalone(module, kept_in, width)).eval()  # as deployed
        out[width] = measure_latency(layer, (kept_in, *input_shape[1:]), (batch_size,), warmup=2, repeats=repeats,
                                     min_seconds=0.02)[batch_size]
    return out


def alignment_gains(times: dict[int, float]) -> dict[int, float]:
    """Gain of each alignment in :data:`ALIGNMENTS` over a width sweep: the mean over widths w of
    (trend(ceil_a(w)) / trend(w)) / (t(ceil_a(w)) / t(w)), where the trend is the least-squares
    affine fit of t over the sweep. A layer whose time follows an affine trend (a fixed dispatch
    cost plus time per channel) gains 1 at every alignment; one whose time is a staircase in steps
    of 8 channels gains above 1 at 8 (and as much at its multiples)."""
    widths = np.array(sorted(times), dtype=float)
    measured = np.array([times[int(w)] for w in widths])
    slope, intercept = np.polyfit(widths, measured, 1)
    trend = lambda w: intercept + slope * w
    gains = {}
    for a in ALIGNMENTS:
        ratios = []
        for w in map(int, widths):
            up = math.ceil(w / a) * a
            if up in times:
                ratios.append((trend(up) / trend(w)) / (times[up] / times[w]))
        gains[a] = statistics.fmean(ratios) if ratios else float("nan")
    return gains


def recommended_round_to(gains: dict[int, float]) -> int:
    """Smallest alignment within 1% of the best gain; 1 when none gains 3%."""
    finite = {a: g for a, g in gains.items() if g == g}
    best = max(finite.values(), default=1.0)
    if best < 1.03:
        return 1
    return min(a for a, g in finite.items() if g >= best - 0.01)


# ---- latency table error -------------------------------------------------------------------------
def table_error(model: nn.Module, x: torch.Tensor, networks: dict[str, tuple[Any, Any]], random: int,
                seed: int = 0) -> dict[str, Any]:
    """Predicted (latency table on the default space, batch 1) against measured (as exported,
    batch 1) latency of ``networks`` (label -> (space, candidate)) and ``random`` random allocations with
    irregular widths and the same rounded to 8 channels."""
    from automlprune.cost import CostModel
    from automlprune.export import deployable
    from automlprune.latency import measure_latencies
    from automlprune.latency_table import measure_latency_table
    from automlprune.materialize import materialize
    from automlprune.space import Candidate, SearchSpace, SpaceConfig

    space = SearchSpace(model, x)
    table = measure_latency_table(model, space, batch_size=1, progress=False)
    cost = CostModel(space)
    cost.attach_latency_table(table)
    rng = np.random.default_rng(seed)
    cases = {"unpruned": (space, space.full()), **networks}
    rounded = SearchSpace(model, x, replace(SpaceConfig(), round_to=8, name="round-to-8"))
    for i in range(random):
        ratios = {g: float(rng.uniform(0.25, 1.0)) for g in space.prunable}
        cases[f"random {i} (irregular)"] = (space, Candidate.make(ratios))
        cases[f"random {i} (round_to 8)"] = (rounded, Candidate.make(ratios))
    legacy = CostModel(space)  # the same table with the overhead interpolated in MACs, as tables were before the fit
    legacy.attach_latency_table(replace(table, overhead_fit=None))
    rows, nets = [], []
    for label, (own, candidate) in cases.items():
        kept = own.kept_channels(candidate)
        exact = Candidate.make({g.name: k / g.channels for g, k in zip(own.groups, kept) if k < g.channels})
        costs = cost(exact)
        rows.append({"network": label, "macs_fraction": costs.macs / cost.base["macs"], "predicted_ms": costs["latency"],
                     "predicted_by_macs_ms": legacy(exact)["latency"]})
        nets.append(deployable(materialize(model, exact, space)))
    for row, measured in zip(rows, measure_latencies(nets, tuple(x.shape[1:]), (1,), rounds=5)):
        row["measured_ms"] = measured[1]
        row["error"] = row["predicted_ms"] / row["measured_ms"] - 1
        row["error_by_macs"] = row["predicted_by_macs_ms"] / row["measured_ms"] - 1
    unpruned, rows = rows[0], rows[1:]
    for row in rows:  # what a latency budget compares: the ratio to the unpruned network, both timed in the same rounds
        row["ratio_error"] = (row["predicted_ms"] / unpruned["predicted_ms"]) / (row["measured_ms"] / unpruned["measured_ms"]) - 1
    return {"table_seconds": table.info.get("seconds"), "overhead_fit": table.overhead_fit, "unpruned": unpruned, "rows": rows}


# ---- the suite ------------------------------------------------------------------------------------
def measure_subject(spec: str, targets: Sequence[float] = TARGETS, round_to: Sequence[int] = ROUND_TO,
                    batch_sizes: Sequence[int] = BATCH_SIZES, random: int = 4, progress: bool = True) -> dict[str, Any]:
    """Every measurement of the module docstring for one subject."""
    from automlprune.latency import measure_latencies
    from automlprune.materialize import materialize

    say = print if progress else (lambda *a, **k: None)
    model, x = load_subject(spec)
    networks: dict[str, tuple[Any, Any, float]] = {}
    unreached = []
    for macs in targets:
        for step in (1, *round_to):
            space, candidate, fraction = uniform_at(model, x, macs, step)
            label = f"uniform {macs:.0%}" + (" (irregular)" if step == 1 else f" (round_to {step})")
            if fraction > macs + 1e-9:  # widths in multiples of `step` cannot go that low (a layer narrower than `step`)
                unreached.append(f"{label}: the narrowest uniform network keeps {fraction:.1%} of the MACs")
                continue
            networks[label] = (space, candidate, fraction)
    nets = {"unpruned": model}
    nets.update({label: materialize(model, c, s).eval() for label, (s, c, _) in networks.items()})
    forms = {(label, form): m for label, net in nets.items() for form, m in deployable_forms(net).items()}
    say(f"{spec}: timing {len(forms)} networks at batch {', '.join(map(str, batch_sizes))} ...", flush=True)
    measured = measure_latencies(list(forms.values()), tuple(x.shape[1:]), batch_sizes, rounds=5)
    latency = [{"network": label, "form": form, "macs_fraction": 1.0 if label == "unpruned" else networks[label][2],
                "ms": {str(b): ms[b] for b in batch_sizes}} for (label, form), ms in zip(forms, measured)]
    say(f"{spec}: profiling ...", flush=True)
    breakdown = []
    for (label, form), module in forms.items():
        ms = next(r["ms"] for r in latency if r["network"] == label and r["form"] == form)
        for b in batch_sizes:
            xb = torch.randn(b, *x.shape[1:])
            breakdown.append({"network": label, "form": form, "batch": b,
                              "ms": time_breakdown(module, xb, 50 if b == 1 else 10, ms[str(b)])})
    say(f"{spec}: width sweeps ...", flush=True)
    alignment = []
    for conv in heaviest_convs(model, x):
        for b in batch_sizes:
            times = width_sweep(conv["module"], conv["input_shape"], b)
            gains = alignment_gains(times)
            alignment.append({"layer": conv["layer"], "shape": [conv["module"].in_channels, conv["module"].out_channels,
                                                                 *conv["module"].kernel_size, *conv["input_shape"][1:]],
                              "batch": b, "ms": {str(w): t for w, t in times.items()},
                              "gains": {str(a): g for a, g in gains.items()}, "recommended_round_to": recommended_round_to(gains)})
    say(f"{spec}: latency table ...", flush=True)
    error = table_error(model, x, {label: (s, c) for label, (s, c, _) in networks.items()}, random)
    return {"subject": spec, "input": list(x.shape[1:]), "latency": latency, "breakdown": breakdown, "alignment": alignment,
            "table_error": error, "unreached": unreached}


def run_latency_benchmark(out: Path, subjects: Sequence[str] = SUBJECTS, targets: Sequence[float] = TARGETS,
                          round_to: Sequence[int] = ROUND_TO, random: int = 4, progress: bool = True) -> dict[str, Any]:
    """Measure every subject (resuming from ``out/subjects``), write ``out/latency.json``,
    ``out/report.md`` and ``out/<subject>.png``; return the report's data."""
    folder = Path(out) / "subjects"
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    for spec in subjects:
        path = folder / f"{_slug(spec)}.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
            continue
        start = time.perf_counter()
        result = measure_subject(spec, targets, round_to, random=random, progress=progress)
        result["seconds"] = time.perf_counter() - start
        path.write_text(json.dumps(result, indent=1))
        results.append(result)
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__}, "subjects": results}
    (Path(out) / "latency.json").write_text(json.dumps(report, indent=1))
    for result in results:
        plot_subject(result, Path(out) / f"{_slug(result['subject'])}.png")
    (Path(out) / "report.md").write_text(render(report))
    return report


def _slug(spec: str) -> str:
    return spec.replace("torchvision:", "tv-").replace("@", "-").replace("/", "-").replace(":", "-")


# ---- report -------------------------------------------------------------------------------------
def render(report: dict[str, Any]) -> str:
    """The Markdown report."""
    machine = report["machine"]
    lines = ["# Where pruned networks spend their CPU time", "",
             f"Command: `automlprune benchmark --suite latency` ({machine['cpu']}, {machine['threads']} threads, "
             f"torch {machine['torch']}; random weights, random batch-norm statistics).", "",
             "Latency in ms (median of interleaved rounds), in brackets its ratio to the unpruned network in the same form / "
             "to the unpruned module. "
             "*module*: the materialized network as PyTorch runs it; *folded*: batch norms folded into the convolutions "
             "(what `export` wrote before channels-last); *channels-last*: folded, in channels-last memory format, the input "
             "converted inside the timed call (what `export` writes, `compare` times and latency budgets predict).", ""]
    for result in report["subjects"]:
        batches = sorted({int(b) for r in result["latency"] for b in r["ms"]})
        lines += [f"## {result['subject']} (input {'x'.join(map(str, result['input']))})", ""]
        lines += [f"- Not measured: {u}." for u in result.get("unreached", [])] + ([""] if result.get("unreached") else [])
        lines += [
                  "| network | MACs | form | " + " | ".join(f"batch {b} ms" for b in batches) + " |",
                  "|---|---:|---|" + "---:|" * len(batches)]
        unpruned = {r["form"]: r["ms"] for r in result["latency"] if r["network"] == "unpruned"}
        for r in result["latency"]:
            cells = [f"{r['ms'][str(b)]:.3f} ({r['ms'][str(b)] / unpruned[r['form']][str(b)]:.2f} / "
                     f"{r['ms'][str(b)] / unpruned['module'][str(b)]:.2f})" for b in batches]
            lines.append(f"| {r['network']} | {r['macs_fraction']:.1%} | {r['form']} | " + " | ".join(cells) + " |")
        lines += ["", "Where the time goes (ms per forward pass, `torch.profiler` self CPU time by operator kind, "
                      "scaled to the unprofiled latency; *outside ops*: Python, module calls and dispatch):", "",
                  "| network | form | batch | " + " | ".join(CATEGORIES) + " |", "|---|---|---:|" + "---:|" * len(CATEGORIES)]
        for r in result["breakdown"]:
            lines.append(f"| {r['network']} | {r['form']} | {r['batch']} | " + " | ".join(f"{r['ms'][k]:.3f}" for k in CATEGORIES) + " |")
        lines += ["", "Alignment (the heaviest convolutions alone, every output width from a quarter to all; gain of rounding "
                      "widths up to a multiple of a, against the layer's affine trend of time in width: 1 = no step, "
                      "above 1 = the channels up to the next multiple of a come cheaper than the trend):", "",
                  "| layer (in, out, kh, kw, h, w) | batch | " + " | ".join(f"a={a}" for a in ALIGNMENTS) + " | recommended round_to |",
                  "|---|---:|" + "---:|" * len(ALIGNMENTS) + "---:|"]
        for r in result["alignment"]:
            lines.append(f"| {r['layer']} {tuple(r['shape'])} | {r['batch']} | "
                         + " | ".join(f"{r['gains'][str(a)]:.3f}" for a in ALIGNMENTS) + f" | {r['recommended_round_to']} |")
        rows = result["table_error"]["rows"]
        fixed, per_million = result["table_error"]["overhead_fit"]
        lines += ["", "Latency table (default space, batch 1) against the clock (the network as exported, batch 1). *predicted*: the table "
                      f"as shipped, its overhead fitted on the activations the network writes ({fixed:.3f} ms + "
                      f"{per_million:.3f} ms per million elements); *by MACs*: the same layer times with the overhead "
                      "interpolated in the MACs fraction, as tables did before:", "",
                  "| network | MACs | measured ms | predicted ms | error | error of the ratio to the unpruned | by MACs ms | error |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            ratio = f"{r['ratio_error']:+.1%}" if "ratio_error" in r else "-"
            lines.append(f"| {r['network']} | {r['macs_fraction']:.1%} | {r['measured_ms']:.3f} | {r['predicted_ms']:.3f} | "
                         f"{r['error']:+.1%} | {ratio} | {r['predicted_by_macs_ms']:.3f} | {r['error_by_macs']:+.1%} |")
        lines.append("")
        kinds = {"uniform prunings": lambda n: n.startswith("uniform"),
                 "random allocations, irregular widths": lambda n: n.startswith("random") and "irregular" in n,
                 "random allocations, round_to 8": lambda n: n.startswith("random") and "round_to" in n}
        for kind, member in kinds.items():
            chosen = [r for r in rows if member(r["network"])]
            if chosen:
                ratios = [abs(r["ratio_error"]) for r in chosen if "ratio_error" in r]
                lines.append(f"- {kind}: mean |error| {statistics.fmean(abs(r['error']) for r in chosen):.1%} "
                             f"(by MACs {statistics.fmean(abs(r['error_by_macs']) for r in chosen):.1%})"
                             + (f", of the ratio to the unpruned {statistics.fmean(ratios):.1%}" if ratios else "")
                             + f" over {len(chosen)} networks.")
        lines += ["", f"![{result['subject']}]({_slug(result['subject'])}.png)", ""]
    return "\n".join(lines)


def plot_subject(result: dict[str, Any], path: Path) -> None:
    """Stacked bars of the breakdown per batch size, and the width sweeps' latency curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in result["breakdown"]})
    fig, axes = plt.subplots(2, len(batches), figsize=(6.5 * len(batches), 9), squeeze=False)
    colors = plt.get_cmap("tab10")
    for col, b in enumerate(batches):
        ax = axes[0][col]
        rows = [r for r in result["breakdown"] if r["batch"] == b]
        labels = [f"{r['network']}\n{r['form']}" for r in rows]
        left = np.zeros(len(rows))
        for k, kind in enumerate(CATEGORIES):
            values = np.array([r["ms"][kind] for r in rows])
            ax.barh(labels, values, left=left, color=colors(k), label=kind)
            left += values
        ax.set_xlabel("ms per forward pass")
        ax.set_title(f"{result['subject']}: where the time goes, batch {b}")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        if col == 0:
            ax.legend(fontsize=7, loc="lower right")
        ax = axes[1][col]
        for r in [r for r in result["alignment"] if r["batch"] == b]:
            widths = [int(w) for w in r["ms"]]
            full = r["ms"][str(max(widths))]
            ax.plot(widths, [r["ms"][str(w)] / full for w in widths], marker=".", label=f"{r['layer']} {tuple(r['shape'])}")
            for w in widths:
                if w % 8 == 0:
                    ax.axvline(w, color="0.85", linewidth=0.6, zorder=0)
        ax.set_xlabel("output channels (grey: multiples of 8)")
        ax.set_ylabel("time / time at full width")
        ax.set_title(f"width sweep, batch {b}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
