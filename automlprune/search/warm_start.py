"""Warm starts: a black-box search begins from the one-shot allocators' answers for its budget.

PruneNet's cost-aware allocation reaches with one evaluation what 40 evaluations of TPE or
random search did not (results/benchmarks/fmnist-resnet20/report.md); a search that starts there
can only do better. :func:`warm_start_candidates` asks each named one-shot strategy (``uniform``,
``global``, ``prunenet``, the Torch-Pruning anchors) for its candidate under the same budget,
space and context; the repairing strategies (random, the Optuna samplers) evaluate them first,
counted in their evaluation budget (Optuna enqueues them as its first trials, so the sampler
learns from them), and evaluated exactly as the allocators answered (never repaired). Option ``warm_start``: a comma-separated list of those strategies
(default :func:`default_for`: :data:`DEFAULT`, and ``global-magnitude`` in a space that searches
unstructured weight densities), or ``none``.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

from automlprune.errors import ConfigError
from automlprune.proposal import as_proposal
from automlprune.space import Candidate

DEFAULT = "uniform,global,prunenet"
ONE_SHOT = ("uniform", "global", "prunenet", "tp-local", "tp-global", "global-magnitude")
"""Strategies a search may start from: one proposal each, from the cost model and the weights."""


def default_for(space: Any) -> str:
    """The default warm start in ``space``: :data:`DEFAULT`, plus ``global-magnitude`` where the
    space searches unstructured weight densities (the classic sparsity allocation)."""
    unstructured = any(p.name == "unstructured" for options in space.layer_patterns.values() for p in options)
    return DEFAULT + (",global-magnitude" if unstructured else "")


def parse_warm_start(value: str) -> list[str]:
    """The strategies named by a ``warm_start`` option value (``none`` or empty: no warm start)."""
    names = [n.strip() for n in str(value).split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in ONE_SHOT]
    if unknown:
        raise ConfigError(f"warm_start names {', '.join(unknown)}, which are not one-shot allocators; use some of "
                          f"{', '.join(ONE_SHOT)}, or none")
    return names


def one_shot_answers(context: Any, budget: Any, seed: int, names: list[str]) -> list[tuple[str, Candidate]]:
    """(name, canonical candidate) of each one-shot strategy in ``names`` for ``budget`` (one that
    cannot answer this budget, e.g. ``uniform`` where no single keep ratio fits, is skipped with a
    line on stderr). Each
    allocates by its own criterion's channel scores (prunenet by its reconstruction loss, through
    ``context.scores_under``; the context's scores when it has none), so the allocation is the
    one that strategy answers; whoever evaluates it does so with their own settings."""
    from automlprune.search import STRATEGIES

    out = []
    context = replace(context, study=None, artifacts=None)  # the allocators leave nothing in the caller's run
    for name in names:
        cls = STRATEGIES.get(name)
        criterion = cls.evaluation.get("criterion")
        scores = context.scores_under(criterion) if criterion and context.scores_under else context.channel_scores
        try:
            asked = cls(replace(context, channel_scores=scores), budget, seed=seed, max_evals=1).ask()
        except ConfigError as error:  # this allocator has no answer here; the search itself still can
            print(f"warm start: {name} is skipped: {error}", file=sys.stderr, flush=True)
            continue
        if asked is not None:
            out.append((name, context.space.canonical(as_proposal(asked).candidate)))
    return out


def warm_start_candidates(strategy: Any, names: list[str]) -> list[Candidate]:
    """The candidates the one-shot strategies ``names`` answer for ``strategy``'s budget
    (:func:`one_shot_answers`), in order, without repeats."""
    out: list[Candidate] = []
    for _, candidate in one_shot_answers(strategy.context, strategy.budget, strategy.seed, names):
        if candidate.key not in {c.key for c in out}:
            out.append(candidate)
    return out
