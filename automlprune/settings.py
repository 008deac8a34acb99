"""Frozen settings of the engine: baseline training, evaluation, fine-tuning. Plain data:
YAML reading and ``--set`` overrides live in :mod:`automlprune.tasks`."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable

from automlprune.train.trainer import Recipe

Rule = tuple[Callable[[Any], bool], str]
POSITIVE: Rule = (lambda v: v > 0, "must be positive")
AT_LEAST_ONE: Rule = (lambda v: v >= 1, "must be at least 1")
NOT_NEGATIVE: Rule = (lambda v: v >= 0, "cannot be negative")
FRACTION: Rule = (lambda v: 0 <= v < 1, "must be in [0, 1)")
UNIT: Rule = (lambda v: 0 <= v <= 1, "must be in [0, 1]")


def check_ranges(settings: Any, rules: dict[str, Rule]) -> None:
    """Raise ValueError ("<field> <rule>, got <value>") for the first field of ``settings`` (a
    dataclass) outside its rule; None values (unset optional fields) are not checked."""
    values = {f.name: getattr(settings, f.name) for f in fields(settings)}
    for name, (ok, rule) in rules.items():
        value = values[name]
        if value is not None and not ok(value):
            raise ValueError(f"{name} {rule}, got {value!r}")


@dataclass(frozen=True)
class TrainSettings:
    """Baseline training: SGD (momentum, nesterov) with a cosine or one-cycle learning rate."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # "cosine" or "onecycle"
    label_smoothing: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_ranges(self, {"epochs": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE, "lr": POSITIVE, "momentum": FRACTION,
                            "weight_decay": NOT_NEGATIVE, "label_smoothing": FRACTION, "seed": NOT_NEGATIVE,
                            "schedule": (lambda v: v in ("cosine", "onecycle"), "must be cosine or onecycle")})

    def recipe(self, epochs: int | None = None) -> Recipe:
        return Recipe(self.epochs if epochs is None else epochs, self.batch_size, self.lr, self.momentum,
                      self.weight_decay, self.schedule, self.label_smoothing, None, self.seed)


@dataclass(frozen=True)
class EvalSettings:
    """How the evaluator scores a candidate.

    bn_recalibration: re-estimate batch-norm statistics on ``bn_batches`` training batches of
    ``bn_batch_size`` before scoring (adaptive BN, as in EagleEye). val_samples: score on the
    first N validation samples (None = all). criterion: which channels survive (None = the
    strategy's default, :data:`SEARCH_SIGNAL` for the black-box searches, else :data:`PLAIN_EVALUATION`);
    criterion_combine: how a coupled group combines its layers' scores (sum, max, mean).
    latency_batch_sizes: the batch sizes reports time answers at. latency_batch: the batch size a
    latency budget is measured and predicted at (its per-layer table's; 1 = one image at a time,
    the default; 64 for a throughput budget).
    reconstruction: "none", or "least_squares" to fold removed channels into the kept ones at
    the layers reading them (see :mod:`automlprune.reconstruction`; the prunenet strategy's);
    None = the strategy's default, as for ``criterion``.
    screening: multi-fidelity search (see :mod:`automlprune.search.screening`): each proposal is
    first scored on this fraction of the validation samples and BN batches, and evaluated in full
    only when its screening accuracy ranks in the top ``screening_keep`` of the search's
    screenings so far (None = every proposal in full). Only full evaluations can be answers.
    weight_criterion: which weights a sparse layer keeps (:mod:`automlprune.sparsity.criteria`:
    magnitude, lap or hessian).
    """

    batch_size: int = 256
    val_samples: int | None = None
    bn_recalibration: bool = True
    bn_batches: int = 10
    bn_batch_size: int = 64
    criterion: str | None = None
    criterion_combine: str = "sum"  # how a coupled group combines its layers' normalised scores: sum, max or mean
    latency_batch_sizes: tuple[int, ...] = (1, 64)
    latency_batch: int = 1
    reconstruction: str | None = None
    screening: float | None = None
    screening_keep: float = 1 / 3
    weight_criterion: str = "magnitude"

    def __post_init__(self) -> None:
        check_ranges(self, {"screening": (lambda v: 0 < v < 1, "must be a fraction in (0, 1), or null for no screening"),
                            "screening_keep": (lambda v: 0 < v <= 1, "must be a fraction in (0, 1]"),
                            "batch_size": AT_LEAST_ONE, "val_samples": AT_LEAST_ONE, "bn_batches": NOT_NEGATIVE,
                            "bn_batch_size": AT_LEAST_ONE, "latency_batch": AT_LEAST_ONE,
                            "criterion_combine": (lambda v: v in ("sum", "max", "mean"), "must be sum, max or mean"),
                            "latency_batch_sizes": (lambda v: len(v) > 0 and all(isinstance(b, int) and b >= 1 for b in v),
                                                    "must list whole numbers of at least 1"),
                            "reconstruction": (lambda v: v in (None, "none", "least_squares"), "must be none or least_squares")})

    def with_defaults(self, defaults: dict[str, Any]) -> EvalSettings:
        """These settings with ``defaults`` filling the fields left None (the strategy's choice),
        then :data:`PLAIN_EVALUATION` filling the rest."""
        return replace(self, **{k: v for k, v in {**PLAIN_EVALUATION, **defaults}.items() if getattr(self, k) is None})


PLAIN_EVALUATION: dict[str, Any] = {"criterion": "l1", "reconstruction": "none"}
"""What an evaluation left to its default means outside a black-box search (the evaluator on its
own, the one-shot allocators, the training-time methods): channels ranked by their L1 norm
(Li et al.), removed channels simply dropped."""

SEARCH_SIGNAL: dict[str, Any] = {"criterion": "prunenet", "reconstruction": "least_squares"}
"""The black-box searches' default evaluation (random, the Optuna samplers, the RL agents): channels
in PruneNet's reconstruction-loss order and the least-squares fold of the removed ones. Measured on
Fashion-MNIST ResNet-20 (issue 22): with repair and warm starts, TPE's best validation accuracy after
40 evaluations rose from 84.55 (l1) to 90.20 at 50% MACs and from 52.40 to 86.60 at 30%
(``results/benchmarks/fmnist-resnet20-repair``); over 8 allocations at 50% MACs its Spearman rank
correlation with the accuracy after a 200-step fine-tune was +0.83 against +0.72 for l1
(``results/benchmarks/fmnist-resnet20-signals``). It costs 2-3x the time per evaluation."""


FINETUNE_METHODS = ("standard", "snapshot_ensemble")


@dataclass(frozen=True)
class FinetuneSettings:
    """Fine-tuning of a materialized network. ``method``: ``standard`` (SGD with cosine decay,
    optional distillation from the unpruned network: loss = (1 - alpha) CE + alpha T^2
    KL(teacher || student) at temperature T) or ``snapshot_ensemble`` (Le & Hua's KESI,
    :mod:`automlprune.snapshot_ensemble`: ``snapshot_rounds`` rounds of pruning towards the answer's
    widths, each retrained with a one-cycle schedule up to ``snapshot_lr``, then the answer
    distilled from the snapshots and the unpruned network with Adam up to ``snapshot_distill_lr`` at
    temperature ``snapshot_temperature``; the same ``epochs`` of images in all, split evenly over
    the rounds and the distillation)."""

    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    distill: bool = False
    distill_alpha: float = 0.5
    distill_temperature: float = 4.0
    seed: int = 0
    steps_per_epoch: int | None = None  # cap on batches per epoch (None = the whole training split)
    method: str = "standard"
    snapshot_rounds: int = 5
    snapshot_lr: float = 0.1
    snapshot_distill_lr: float = 1e-3
    snapshot_temperature: float = 5.0

    def __post_init__(self) -> None:
        check_ranges(self, {"epochs": NOT_NEGATIVE, "batch_size": AT_LEAST_ONE, "lr": POSITIVE, "momentum": FRACTION,
                            "weight_decay": NOT_NEGATIVE, "distill_alpha": UNIT, "distill_temperature": POSITIVE,
                            "seed": NOT_NEGATIVE, "steps_per_epoch": AT_LEAST_ONE, "snapshot_rounds": AT_LEAST_ONE,
                            "snapshot_lr": POSITIVE, "snapshot_distill_lr": POSITIVE, "snapshot_temperature": POSITIVE})
        if self.method not in FINETUNE_METHODS:
            raise ValueError(f"method must be one of {', '.join(FINETUNE_METHODS)}, got {self.method!r}")

    def recipe(self) -> Recipe:
        return Recipe(self.epochs, self.batch_size, self.lr, self.momentum, self.weight_decay, "cosine", 0.0,
                      self.steps_per_epoch, self.seed)
