"""Plots of a run: Pareto fronts, search progress and per-layer width profiles.

Each function computes what it draws first, draws onto Matplotlib axes and saves a PNG;
nothing is ever shown on screen.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from automlprune.report.collect import SearchRecord
from automlprune.report.pareto import pareto_front
from automlprune.sparsity.patterns import parse_pattern
from automlprune.space import Candidate, SearchSpace


def figure(rows: int = 1, columns: int = 1, **options: Any) -> tuple[Figure, Any]:
    """A Matplotlib figure and its axes, drawn off-screen with the Agg canvas (no pyplot, no
    global backend switch: importing automlprune leaves a user's Matplotlib as it was)."""
    fig = Figure(figsize=options.pop("figsize", None))
    return fig, fig.subplots(rows, columns, **options)


def _colors(strategies: Sequence[str]) -> dict[str, tuple]:
    names = list(dict.fromkeys(strategies))
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {s: cmap(i % cmap.N) for i, s in enumerate(names)}


def plot_pareto(records: list[SearchRecord], path: Path, title: str = "", unpruned: float | None = None) -> Path:
    """Validation accuracy against cost (fraction of the unpruned network) of every evaluation
    (screenings of a multi-fidelity search as faint crosses), one colour per strategy, its Pareto front as a line, each search's answer ringed, each budget
    as a labelled dashed vertical line (an accuracy tolerance as a dotted horizontal line at its
    accuracy floor), and the unpruned network (``unpruned``: its validation
    accuracy) as a black star at cost 1."""
    metric = records[0].metric
    records = [r for r in records if r.metric == metric]
    colors = _colors([r.strategy for r in records])
    fig, ax = figure(figsize=(7, 5))
    right = 0.0
    for strategy, color in colors.items():
        mine = [r for r in records if r.strategy == strategy]
        costs = np.concatenate([r.cost_fractions(True) for r in mine]) if mine else np.array([])
        accs = np.concatenate([r.accuracies(True) for r in mine]) if mine else np.array([])
        if len(costs) == 0:
            continue
        ax.scatter(costs, accs, s=12, alpha=0.35, color=color)
        screened = [(p.relative[metric], p.accuracy) for r in mine for p in r.points if not p.full]
        if screened:  # cheap first looks (multi-fidelity): shown, never on the front
            ax.scatter(*zip(*screened), s=10, marker="x", alpha=0.25, color=color)
        right = max(right, float(costs.max()))
        front = pareto_front(costs, accs)
        ax.step(costs[front], accs[front], where="post", color=color, linewidth=1.8, label=f"{strategy} ({sum(r.evaluations for r in mine)} evals)")
        answers = [r.answer for r in mine if r.answer]
        ax.scatter([a["relative"][metric] for a in answers], [a["accuracy"] for a in answers], s=90, facecolors="none",
                   edgecolors=[color], linewidths=1.8, zorder=3)
    if any(r.answer for r in records):
        ax.scatter([], [], s=90, facecolors="none", edgecolors="black", linewidths=1.8, label="answer (ringed)")
    for value in sorted({r.budget.value for r in records if r.budget.relative and not r.budget.tolerance}):
        ax.axvline(value, color="grey", linestyle="--", linewidth=0.9)
        ax.annotate(f"{metric}={value:g}", (value, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=8, color="dimgrey")
        right = max(right, value)
    tolerances = {r.budget.label: r.budget.min_accuracy for r in records if r.budget.tolerance and r.budget.reference_accuracy is not None}
    for label, floor in sorted(tolerances.items(), key=lambda item: item[1]):  # an accuracy tolerance: its floor
        ax.axhline(floor, color="grey", linestyle=":", linewidth=0.9)
        ax.annotate(label, (0.0, floor), xycoords=("axes fraction", "data"), xytext=(3, 3), textcoords="offset points",
                    fontsize=8, color="dimgrey")
    if unpruned is not None:
        ax.scatter([1.0], [unpruned], marker="*", s=160, color="black", zorder=4, label=f"unpruned ({100 * unpruned:.2f}%)")
        right = 1.0
    ax.set_xlabel(f"{metric} / unpruned {metric}")
    ax.set_ylabel("validation accuracy (BN re-estimated)")
    ax.set_xlim(0, min(1.05, 1.15 * right) if right > 0 else 1.05)  # bytes / BitOps budgets live near 0
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or "Accuracy vs cost: every evaluation and each strategy's Pareto front")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_finetuned(rows: list[dict], path: Path, baseline_test: float | None = None) -> Path:
    """The answers after the identical fine-tune (rows of :func:`automlprune.search.compare.summarize`):
    left, test accuracy against the budget metric's fraction, one line per strategy through its
    budgets (error bars: sd over seeds); right, test accuracy against search wall time."""
    rows = [r for r in rows if r["test_accuracy"] == r["test_accuracy"]]  # NaN: not fine-tuned
    metric = rows[0]["budget"].split("=")[0] if rows else "macs"
    rows = [r for r in rows if r["budget"].split("=")[0] == metric and f"{metric}_fraction" in r]
    colors = _colors([r["strategy"] for r in rows])
    fig, (left, right) = figure(1, 2, figsize=(13, 5))
    for strategy, color in colors.items():
        mine = sorted((r for r in rows if r["strategy"] == strategy), key=lambda r: r[f"{metric}_fraction"])
        x = [r[f"{metric}_fraction"] for r in mine]
        y = [100 * r["test_accuracy"] for r in mine]
        sd = [100 * r["test_accuracy_sd"] if r["test_accuracy_sd"] == r["test_accuracy_sd"] else 0 for r in mine]
        left.errorbar(x, y, yerr=sd, color=color, marker="o", markersize=4, capsize=3, label=strategy)
        right.scatter([max(r["search_seconds"], 0.01) for r in mine], y, color=color, s=22, label=strategy)
    for ax in (left, right):
        if baseline_test is not None:
            ax.axhline(100 * baseline_test, color="black", linestyle=":", linewidth=1, label="unpruned")
        ax.set_ylabel("test accuracy after fine-tune (%)")
        ax.grid(alpha=0.3)
    left.set_xlabel(f"{metric} / unpruned {metric}")
    left.set_title("Accuracy vs cost of each strategy's answers")
    left.legend(fontsize=7, ncol=2)
    right.set_xscale("log")
    right.set_xlabel("search wall time (s, log scale)")
    right.set_title("Accuracy vs search time (one point per budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def best_so_far(record: SearchRecord) -> list[float]:
    """Best feasible accuracy after each evaluation (NaN until one meets the budget); under an
    accuracy tolerance, the accuracy of the cheapest accepted evaluation so far (the answer then)."""
    out, best, cheapest = [], np.nan, np.inf
    for ok, acc, cost in zip(record.feasible(), record.accuracies(), record.cost_fractions()):
        if record.budget.tolerance:
            if ok and cost < cheapest:
                best, cheapest = acc, cost
        elif ok and not acc <= best:  # "not <=" also replaces the initial NaN
            best = acc
        out.append(best)
    return out


def best_curve(records: list[SearchRecord], length: int) -> np.ndarray:
    """Best feasible accuracy after 1..length evaluations, one row per record (seed); a search
    that stopped early keeps its last value."""
    rows = []
    for r in records:
        best = best_so_far(r) or [np.nan]
        rows.append(best[:length] + [best[-1]] * max(0, length - len(best)))
    return np.array(rows, dtype=float)


def plot_progress(records: list[SearchRecord], path: Path, unpruned: float | None = None) -> Path:
    """Best feasible accuracy at each budget against evaluations (top: mean over seeds, band =
    min..max) and against search wall time (bottom: one line per seed), drawn as steps (the best
    so far changes only at an evaluation); the unpruned network's accuracy as a dotted line."""
    budgets = list(dict.fromkeys(r.budget.label for r in records))
    colors = _colors([r.strategy for r in records])
    fig, axes = figure(2, len(budgets), figsize=(4.6 * len(budgets), 7), squeeze=False)
    for col, label in enumerate(budgets):
        mine = [r for r in records if r.budget.label == label]
        length = max((r.evaluations for r in mine), default=1)
        for strategy, color in colors.items():
            runs = [r for r in mine if r.strategy == strategy]
            if not runs:
                continue
            curve = best_curve(runs, length)
            steps = np.arange(1, length + 1)
            with warnings.catch_warnings():  # columns before a seed's first feasible answer are all NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                axes[0, col].step(steps, np.nanmean(curve, axis=0), where="post", color=color, label=f"{strategy} ({len(runs)} seeds)")
                axes[0, col].fill_between(steps, np.nanmin(curve, axis=0), np.nanmax(curve, axis=0), step="post", color=color, alpha=0.15)
            for r in runs:
                axes[1, col].step(r.elapsed_s, best_so_far(r), where="post", color=color, alpha=0.8, linewidth=1.2)
        axes[0, col].set_title(f"budget {label}")
        axes[0, col].set_xlabel("evaluations")
        axes[1, col].set_xlabel("search wall time (s)")
        for row in range(2):
            if unpruned is not None:
                axes[row, col].axhline(unpruned, color="black", linestyle=":", linewidth=1.0,
                                       label=f"unpruned ({100 * unpruned:.2f}%)" if row == 0 else None)
            axes[row, col].set_ylabel("best feasible accuracy")
            axes[row, col].grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


PATTERN_MARKERS = {"unstructured": "o", "n:m": "s", "block": "^", "pconv": "P", "kernel": "X", "darb": "D"}
"""Marker of each sparsity pattern family in the density panels (named in their titles)."""
MARKER_WORDS = {"o": "o", "s": "□", "^": "△", "P": "+", "X": "x", "D": "◇"}


def profile_panels(space: SearchSpace) -> list[tuple[str, list[str]]]:
    """The panels of :func:`plot_profiles` for ``space``: (``widths``, its groups) when it searches
    widths (or nothing else), (``bits``, its quantizable layers) when it searches bits, and
    (``densities``, its quantizable layers) when it searches weight sparsity."""
    groups = [g.name for g in space.groups]
    panels = ([("widths", groups)] if len(space.config.ratios) > 1 or not (space.bit_searchable or space.layer_patterns) else [])
    panels += [("bits", space.quantizable)] if space.bit_searchable else []
    panels += [("densities", space.quantizable)] if space.layer_patterns else []
    return panels


def plot_profiles(records: list[SearchRecord], space: SearchSpace, path: Path) -> Path:
    """Per budget, one row of panels for each strategy's answer (first seed): the keep ratio of
    every channel group (network order) when the space searches widths, each layer's weight bits
    when it searches bits, and each layer's weight density (log scale; marker = pattern family,
    :data:`PATTERN_MARKERS`) when it searches sparsity."""
    budgets = list(dict.fromkeys(r.budget.label for r in records))
    colors = _colors([r.strategy for r in records])
    groups = [g.name for g in space.groups]
    panels = profile_panels(space)
    widths = [max(7, 0.35 * len(groups) + 3) if kind == "widths" else max(6, 0.3 * len(names) + 2) for kind, names in panels]
    fig, axes = figure(len(budgets), len(panels), figsize=(sum(widths), 3 * len(budgets)), squeeze=False)
    for row, label in enumerate(budgets):
        shown = set()
        for r in (r for r in records if r.budget.label == label and r.answer):
            if r.strategy in shown:  # first seed only: one line per strategy
                continue
            shown.add(r.strategy)
            cand = Candidate.from_dict(r.answer["candidate"])
            for column, (kind, names) in enumerate(panels):
                _draw_profile(axes[row, column], kind, names, cand, space, colors[r.strategy], r.strategy)
        for column, (kind, names) in enumerate(panels):
            _style_profile(axes[row, column], kind, names, space, label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _draw_profile(ax: Any, kind: str, names: list[str], cand: Candidate, space: SearchSpace, color: Any, label: str) -> None:
    x = np.arange(len(names))
    if kind == "widths":
        ax.plot(x, space.kept_channels(cand) / np.array([g.channels for g in space.groups]), marker="o", markersize=3,
                color=color, label=label)
    elif kind == "bits":
        bits = space.weight_bits(cand)
        ax.plot(x, [bits[l] for l in names], marker="o", markersize=3, color=color, label=label)
    else:
        sparsity = {l: (parse_pattern(p), d) for l, (p, d) in cand.sparsity().items()}
        density = [sparsity[l][1] if l in sparsity else 1.0 for l in names]
        ax.plot(x, density, color=color, label=label, linewidth=1)
        for i, layer in enumerate(names):
            family = sparsity[layer][0].family if layer in sparsity else None
            ax.plot(i, density[i], marker=PATTERN_MARKERS.get(family, "."), markersize=5 if family else 3, color=color)


def _style_profile(ax: Any, kind: str, names: list[str], space: SearchSpace, label: str) -> None:
    if kind == "widths":
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("kept fraction")
        ax.set_title(f"per-group widths of the answers, budget {label}")
    elif kind == "bits":
        ax.set_yscale("log", base=2)
        ax.set_yticks(sorted(set(space.config.bit_choices) | set(space.fixed_bits.values())))
        ax.get_yaxis().set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_ylabel("weight bits")
        ax.set_title(f"per-layer weight bits of the answers, budget {label}")
    else:
        ax.set_yscale("log")
        ax.set_ylim(min(space.config.densities[0], 0.5) / 1.5, 1.3)
        ax.get_yaxis().set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_ylabel("weight density (kept)")
        legend = ", ".join(f"{MARKER_WORDS[m]} {f}" for f, m in PATTERN_MARKERS.items())
        ax.set_title(f"per-layer weight density ({legend}), budget {label}", fontsize=9)
    _name_ticks(ax, names)


def _name_ticks(ax: Any, names: list[str]) -> None:
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=75, fontsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=3)


def plot_allocation(profile: dict[str, dict], path: Path, title: str) -> Path:
    """Left: each group's redundancy curve (relative reconstruction loss against the fraction
    of channels kept), its allocated width marked. Right: kept fraction per group (network
    order), allocated vs uniform at the same budget. ``profile``: group -> {"channels",
    "kept", "uniform_kept", "loss_curve" (loss at k = 0..channels kept)}."""
    groups = list(profile)
    fig, (left, right) = figure(1, 2, figsize=(13, 4.6))
    cmap = matplotlib.colormaps["viridis"]
    for i, g in enumerate(groups):
        p = profile[g]
        curve = np.asarray(p["loss_curve"])
        fractions = np.arange(len(curve)) / p["channels"]
        color = cmap(i / max(1, len(groups) - 1))
        left.plot(fractions, curve, color=color, linewidth=1.2, label=g if len(groups) <= 12 else None)
        left.plot(p["kept"] / p["channels"], curve[p["kept"]], "o", color=color, markersize=4)
    left.set_yscale("symlog", linthresh=1e-3)
    left.set_xlabel("fraction of the group's channels kept")
    left.set_ylabel("relative reconstruction loss (summed over readers)")
    left.set_title("redundancy per group (dots: allocated width)")
    left.grid(alpha=0.3)
    if len(groups) <= 12:
        left.legend(fontsize=6, ncol=2)
    x = np.arange(len(groups))
    right.plot(x, [profile[g]["kept"] / profile[g]["channels"] for g in groups], marker="o", markersize=3, label="allocated")
    right.plot(x, [profile[g]["uniform_kept"] / profile[g]["channels"] for g in groups], marker="s", markersize=3,
               linestyle="--", label="uniform")
    right.set_ylim(0, 1.05)
    right.set_ylabel("kept fraction")
    right.set_xticks(x)
    right.set_xticklabels(groups, rotation=75, fontsize=7)
    right.set_title("per-group widths at the same budget")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_allocations(artifacts: Any) -> list[Path]:
    """Draw every allocation profile a run's strategies left as artifacts (PruneNet's
    ``prunenet-<budget>.json``) beside it as PNG; returns the paths."""
    from automlprune.search.prunenet import ALLOCATION_PREFIX

    paths = []
    for path in artifacts.glob(f"{ALLOCATION_PREFIX}*.json"):
        data = artifacts.read_json(path.name)
        if isinstance(data, dict) and "groups" in data:
            paths.append(plot_allocation(data["groups"], path.with_suffix(".png"), data.get("title", path.stem)))
    return paths
