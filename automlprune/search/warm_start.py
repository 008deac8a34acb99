"""Warm starts: a black-box search begins from the one-shot allocators' answers for its budget.

PruneNet's cost-aware allocation reaches with one evaluation what 40 evaluations of TPE or
random search did not (results/benchmarks/fmnist-resnet20/report.md); a search that starts there
can only do better. :func:`warm_start_candidates` asks each named one-shot strategy (``uniform``,
``global``, ``prunenet``, the Torch-Pruning anchors) for its candidate under the same budget,
space and context; the repairing strategies (random, the Optuna samplers) evaluate them first,
counted in their evaluation budget (Optuna enqueues them as its first trials, so the sampler
learns from them), and evaluated exactly as the allocators answered (never repaired).

Option ``warm_start``: a comma-separated list of those strategies, each optionally with its
options (``uniform:bits=4``, ``global-magnitude:bits=8``), or ``none``. The default
(:func:`default_for`) is :data:`DEFAULT` (in a space that prunes channels), with ``global-magnitude``
in a space that searches unstructured weight densities; in a space that searches bits under a budget the bits change
(bytes, BitOps), uniform quantization at :data:`QUANTIZED_BITS` comes first (``uniform:bits=8``,
``uniform:bits=4``, and ``global-magnitude`` at each where it applies): at 1/8 of the float32
size a width allocation at float32 keeps a tenth of the MACs, where every channel at 4 bits fits.
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
QUANTIZED_BITS = (8, 4)
"""The uniform weight precisions (int8, int4) a search over bits starts from, where the space offers them."""


def default_for(space: Any, cost_model: Any = None, metric: str | None = None) -> str:
    """The default warm start in ``space`` for a budget in ``metric`` (module docstring)."""
    unstructured = any(p.name == "unstructured" for options in space.layer_patterns.values() for p in options)
    names = (DEFAULT.split(",") if space.prunable else []) + (["global-magnitude"] if unstructured else [])
    if cost_model is not None and metric is not None and _bits_change(space, cost_model, metric):
        quantizers = ["uniform"] + (["global-magnitude"] if unstructured else [])
        names = [f"{n}:bits={b}" for b in QUANTIZED_BITS if b in space.config.bit_choices for n in quantizers] + names
    return ",".join(names)


def _bits_change(space: Any, cost_model: Any, metric: str) -> bool:
    """Whether ``space`` searches bits and the fewest of them lower ``metric`` (bytes and BitOps do;
    MACs, parameters and measured latency do not)."""
    if not space.bit_searchable:
        return False
    return cost_model(space.uniform(1.0, min(space.config.bit_choices)))[metric] < cost_model(space.full())[metric]


def parse_warm_start(value: str) -> list[str]:
    """The allocators (each ``name`` or ``name:option=value[:option=value]``) named by a
    ``warm_start`` option value (``none`` or empty: no warm start), checked."""
    from automlprune.search import STRATEGIES

    specs = [n.strip() for n in str(value).split(",") if n.strip() and n.strip() != "none"]
    for spec in specs:
        name, options = split_spec(spec)
        if name not in ONE_SHOT:
            raise ConfigError(f"warm_start names {name}, which is not a one-shot allocator; use some of "
                              f"{', '.join(ONE_SHOT)} (options after a colon, e.g. uniform:bits=4), or none")
        STRATEGIES.get(name).check_options(options)
    return specs


def split_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"uniform:bits=4"`` -> ``("uniform", {"bits": 4})`` (values read as ``--option`` reads them:
    :func:`parse_option`)."""
    name, *items = [part.strip() for part in spec.split(":")]
    options: dict[str, Any] = {}
    for item in items:
        parsed = parse_option(item)
        if parsed is None:
            raise ConfigError(f"warm_start entry '{spec}' has an option '{item}' without a value; write name:option=value")
        options[parsed[0]] = parsed[1]
    return name, options


def parse_option(item: str) -> tuple[str, Any] | None:
    """``"key=value"`` -> (key, the value read as YAML: numbers, booleans, words), or None when
    ``item`` is not of that form: how strategy options are read, on the command line
    (``--option``) and in warm-start entries."""
    import yaml

    key, sep, raw = item.partition("=")
    return (key, yaml.safe_load(raw)) if sep and key else None


def one_shot_answers(context: Any, budget: Any, seed: int, names: list[str]) -> list[tuple[str, Candidate]]:
    """(spec, canonical candidate) of each one-shot strategy in ``names`` (specs as
    :func:`parse_warm_start` reads them) for ``budget`` (one that
    cannot answer this budget, e.g. ``uniform`` where no single keep ratio fits, is skipped with a
    line on stderr). Each
    allocates by its own criterion's channel scores (prunenet by its reconstruction loss, through
    ``context.scores_under``; the context's scores when it has none), so the allocation is the
    one that strategy answers; whoever evaluates it does so with their own settings."""
    from automlprune.search import STRATEGIES

    out = []
    context = replace(context, study=None, artifacts=None)  # the allocators leave nothing in the caller's run
    for spec in names:
        name, options = split_spec(spec)
        cls = STRATEGIES.get(name)
        criterion = cls.evaluation.get("criterion")
        scores = context.scores_under(criterion) if criterion and context.scores_under else context.channel_scores
        try:
            asked = cls(replace(context, channel_scores=scores), budget, seed=seed, max_evals=1, **options).ask()
        except ConfigError as error:  # this allocator has no answer here; the search itself still can
            print(f"warm start: {spec} is skipped: {error}", file=sys.stderr, flush=True)
            continue
        if asked is not None:
            out.append((spec, context.space.canonical(as_proposal(asked).candidate)))
    return out


def warm_start_candidates(strategy: Any, names: list[str]) -> list[Candidate]:
    """The candidates the one-shot strategies ``names`` answer for ``strategy``'s budget
    (:func:`one_shot_answers`), in order, without repeats."""
    out: list[Candidate] = []
    for _, candidate in one_shot_answers(strategy.context, strategy.budget, strategy.seed, names):
        if candidate.key not in {c.key for c in out}:
            out.append(candidate)
    return out
