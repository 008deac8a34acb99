"""The base of training-time methods: strategies that prune while they train and hand back
the trained network.

One search (strategy, budget, seed) is: choose the widths that meet the budget (with the one
cost model), copy the trained model, train it with the method's callbacks on the one
:class:`~automlprune.train.Trainer` (one or several phases), then extract the channels each
shrunk group keeps, and propose the trained network with them
(:class:`~automlprune.proposal.TrainedWeights`). The loop evaluates it like any proposal (one
evaluation), the store keeps the weights, and ``compare`` fine-tunes and exports from them.

What training cost is recorded as the search's ``spent`` (``training_seconds``,
``training_steps``, ``training_images``) and shown in reports next to the search time of the
other strategies. Resuming a finished search serves the stored answer; a search interrupted
mid-training resumes from the run's checkpoint of its last finished epoch (methods trained in one
Trainer run: ``resrep``, ``greg1``, ``greg2``; see :meth:`TrainingStrategy.checkpoint_path`) or
of its last finished phase (methods trained in many short Trainer runs, ``gate-decorator``; see
:meth:`TrainingStrategy.save_phase_state`).
"""

from __future__ import annotations

import copy
import math
import os
import typing
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar

import torch
from torch import nn

from automlprune.cost import largest_within
from automlprune.data import cached_batches
from automlprune.errors import ConfigError
from automlprune.importance import channel_scores
from automlprune.proposal import Proposal, TrainedWeights
from automlprune.search.base import SearchContext, Strategy, check_option_values
from automlprune.search.budget import Budget
from automlprune.space import Candidate
from automlprune.train import FitHistory, distributed

WIDTH_RULES = ("uniform", "prunenet")
_AT_LEAST_ONE = (lambda v: v >= 1, "must be at least 1")
_NOT_NEGATIVE = (lambda v: v >= 0, "cannot be negative")
_POSITIVE = (lambda v: v > 0, "must be positive")
_FRACTION = (lambda v: 0 <= v < 1, "must be in [0, 1)")
SETTING_RANGES: dict[str, Any] = {
    **dict.fromkeys(("batch_size", "epochs", "max_epochs", "steps_per_epoch", "reg_steps", "pick_steps", "update_interval",
                     "mask_interval", "granularity", "min_channels", "tock_every", "tock_steps", "tick_steps", "max_ticks",
                     "finetune_steps", "prune_every", "events", "score_samples", "score_batch_size", "newton_steps",
                     "whitening_group"), _AT_LEAST_ONE),
    **dict.fromkeys(("weight_decay", "stabilize_steps", "before_mask_steps", "tock_epochs", "finetune_epochs", "lasso",
                     "sparse_lambda", "mu", "lambda1", "lambda2", "budget_penalty"), _NOT_NEGATIVE),
    **dict.fromkeys(("lr", "lr_min", "lr_max", "delta", "ceiling", "pick_delta", "pick_ceiling", "mag_ratio_limit", "tau"), _POSITIVE),
    **dict.fromkeys(("prune_until", "whitening_momentum"), ((lambda v: 0 < v <= 1), "must be in (0, 1]")),
    **dict.fromkeys(("momentum", "compactor_momentum"), _FRACTION),
    "p": ((lambda v: 0 < v < 1), "must be in (0, 1)"),
}
"""Rules for the training methods' settings, by field name (a field a method lacks is not checked)."""
PRUNENET_SAMPLES = 640
"""Training images PruneNet's reconstruction importance is scored on when it gives the widths."""


@dataclass(frozen=True)
class TrainingSettings:
    """Settings every training-time method has; subclasses add theirs (all are strategy options).

    groups: which channel groups the method prunes: ``internal`` (groups with exactly one
    producing multiply-accumulate layer, e.g. the first conv of each residual block, as ResRep
    and GReg prune) or ``all`` prunable groups. widths: how the budget becomes per-group widths
    (``uniform``: one keep ratio for the pruned groups, the largest that meets the budget;
    ``prunenet``: PruneNet's cost-aware allocation over every prunable group, from its
    reconstruction importance on a few training batches), for methods that train towards
    given widths (GReg); methods that choose widths while training (ResRep, Gate Decorator)
    take ``uniform`` only.
    batch_size: images per step.
    """

    groups: str = "internal"
    widths: str = "uniform"
    batch_size: int = 128


class TrainingStrategy(Strategy):
    """Base of the training-time methods (see the module docstring). Subclasses set
    ``settings_class`` and implement :meth:`train` (and usually :meth:`kept_channels`)."""

    replays_on_resume = False  # the stored answer is the result; training is not repeated
    one_worker_reason = "it trains its network in one process"
    ddp_refusal = ("its decisions read statistics of the data each process sees, or have not yet been checked to agree "
                   "across processes (resrep, greg1, greg2, l0-anneal and dmcp have)")
    settings_class: ClassVar[type] = TrainingSettings
    chooses_widths: ClassVar[bool] = False
    """True for methods whose training decides the widths (the planned ones only check the budget is reachable)."""

    def __init__(self, context: SearchContext, budget: Budget, seed: int = 0, max_evals: int = 50, **options: Any) -> None:
        super().__init__(context, budget, seed, max_evals, **options)
        if context.data is None or context.model is None:
            raise ConfigError(f"{self.name} trains the network and needs the task's model and data in its search context")
        self.settings = self.settings_class(**options)
        if self.settings.groups not in ("internal", "all"):
            raise ConfigError(f"{self.name} groups '{self.settings.groups}' is unknown; use internal or all")
        if self.settings.widths not in WIDTH_RULES:
            raise ConfigError(f"{self.name} widths '{self.settings.widths}' is unknown; use one of: {', '.join(WIDTH_RULES)}")
        if self.chooses_widths and self.settings.widths != "uniform":
            raise ConfigError(f"{self.name} chooses its widths while training; drop --option widths")
        if self.chooses_widths and self.space.config.round_to > 1:
            raise ConfigError(f"{self.name} removes single channels; use a space with round_to 1")
        in_units = [g for g in self.pruned_groups() if self.space.group_by_name[g].unit > 1]
        if in_units:
            raise ConfigError(f"{self.name} prunes single channels and cannot yet shrink groups that feed or leave grouped convolutions "
                              f"({', '.join(in_units[:3])}{' ...' if len(in_units) > 3 else ''}); list them under 'pinned' in "
                              "the search space, or use a search strategy")
        self.device = torch.device(context.device)
        self.history_log: list[dict[str, Any]] = []
        self.resumed_from: int | None = None
        """The epoch a checkpoint of an interrupted run resumed training after (None: trained from the start)."""
        self._asked = False

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        accepted = sorted(f.name for f in fields(cls.settings_class))
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ConfigError(f"strategy '{cls.name}' does not take the options {unknown}; its options are: {', '.join(accepted)}")
        check_option_values(cls.name, options, typing.get_type_hints(cls.settings_class), {**SETTING_RANGES, **cls.option_ranges})

    # ---- the strategy interface ---------------------------------------------------------------
    def ask(self) -> Proposal | None:
        if self._asked or self.history:
            return None
        self._asked = True
        planned = self.widths()
        net = copy.deepcopy(self.context.model).to(self.device)
        histories = self.train(net, planned)
        candidate = self.final_widths(planned)
        kept = self.kept_channels(net, candidate)
        self.spent = {"training_seconds": sum(h.seconds for h in histories),
                      "training_steps": float(sum(h.steps for h in histories)),
                      "training_images": float(sum(h.images for h in histories)), **self.training_report()}
        if self.resumed_from is not None:
            self.spent["resumed_after_epoch"] = float(self.resumed_from - 1)
        self.save_log()
        return Proposal(candidate, TrainedWeights(net.eval(), kept, self.name), self.bn_recalibration())

    # ---- what a method fills ------------------------------------------------------------------
    def train(self, net: nn.Module, candidate: Candidate) -> list[FitHistory]:
        """Train ``net`` in place towards ``candidate``'s widths; one history per phase."""
        raise NotImplementedError

    def final_widths(self, planned: Candidate) -> Candidate:
        """The widths of the trained network (the planned ones unless training chose its own)."""
        return planned

    def kept_channels(self, net: nn.Module, candidate: Candidate) -> dict[str, torch.Tensor]:
        """Group -> indices of the channels kept, for every group ``candidate`` shrinks."""
        raise NotImplementedError

    def training_report(self) -> dict[str, float]:
        """Method-specific figures recorded with the training cost (``spent``)."""
        return {}

    def bn_recalibration(self) -> bool | None:
        """Whether the evaluator re-estimates BN statistics (None: its setting; False after
        folding a reparametrization behind a batch norm)."""
        return None

    # ---- shared pieces ------------------------------------------------------------------------
    def pruned_groups(self) -> list[str]:
        """The prunable groups this method shrinks (see :class:`TrainingSettings` ``groups``)."""
        if self.settings.groups == "all":
            return list(self.space.prunable)
        return [g for g in self.space.prunable if len(self.producers(g)) == 1]

    def producers(self, group: str) -> list[str]:
        """The multiply-accumulate layers producing ``group``'s channels (its out-members with weights)."""
        return [m.layer for m in self.space.group_by_name[group].members
                if m.dim == "out" and self.space.layer_by_name[m.layer].has_weights]

    def widths(self) -> Candidate:
        """The widths meeting the budget (see :class:`TrainingSettings` ``widths``)."""
        return self.prunenet_widths() if self.settings.widths == "prunenet" else self.uniform_widths()

    def prunenet_widths(self) -> Candidate:
        """PruneNet's allocation for the budget, from its importance on the original network."""
        from automlprune.search.prunenet import PruneNetStrategy

        data = self.context.data
        batches = cached_batches(data.train, data, 64, self.device, max_samples=PRUNENET_SAMPLES, seed=self.seed, shuffle=True)
        scores = channel_scores(self.context.model, self.space, "prunenet", batches, seed=self.seed)
        allocator = PruneNetStrategy(replace(self.context, channel_scores=scores, artifacts=None), self.budget, self.seed)
        return self.space.canonical(allocator.propose())

    def uniform_widths(self) -> Candidate:
        """One keep ratio for every pruned group, the largest that fits (bisection on the cost model)."""
        groups = self.pruned_groups()
        if not groups:
            raise ConfigError(f"{self.name} finds no {self.settings.groups} group to prune in this space; try --option groups=all")
        at = lambda r: Candidate.make({g: r for g in groups})  # noqa: E731
        if self.feasible(at(1.0)):
            return self.space.canonical(at(1.0))
        if not self.feasible(at(1e-6)):
            smallest = self.cost_model(at(1e-6))[self.budget.metric] / self.budget.base
            raise ConfigError(f"{self.name} cannot meet {self.budget.label} by pruning its {self.settings.groups} groups alone "
                              f"(they reach {smallest:.1%} at their narrowest); raise the budget or use --option groups=all")
        steps = math.ceil(math.log2(1e6))
        return self.space.canonical(at(largest_within(lambda r: self.feasible(at(r)), 1e-6, 1.0, steps + 8)))

    def uniform_density(self, layers: list[str], pattern: Any) -> Candidate:
        """Every channel kept and one density in ``pattern`` (a :class:`~automlprune.sparsity.patterns.Pattern`)
        for ``layers``, the largest (up to the pattern's maximum) that meets the budget
        (bisection on the cost model); for sparsity methods."""
        at = lambda d: Candidate.make(None, None, {l: pattern.clip(d) for l in layers}, {l: pattern.name for l in layers})  # noqa: E731
        if self.feasible(Candidate.make()):
            return self.space.canonical(Candidate.make())
        if not self.feasible(at(1e-6)):
            raise ConfigError(f"{self.name} cannot meet {self.budget.label} with {pattern.name} weight sparsity alone; raise the budget")
        return self.space.canonical(at(largest_within(lambda d: self.feasible(at(d)), 1e-6, pattern.clip(1.0), 30)))

    def checkpoint_path(self):
        """The epoch checkpoint of this search in the run's artifacts (None without a run directory)."""
        if self.context.artifacts is None:
            return None
        return self.context.artifacts.path(f"checkpoints/{self.name}-{self.budget.slug}-seed{self.seed}.pt")

    def save_phase_state(self, state: dict[str, Any]) -> None:
        """Keep ``state`` (tensors and plain values) as this search's checkpoint, atomically, after a
        finished phase; nothing without a run directory."""
        path = self.checkpoint_path()
        if path is None:
            return
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save(state, tmp)
        tmp.replace(path)

    def load_phase_state(self) -> dict[str, Any] | None:
        """The state :meth:`save_phase_state` kept for an interrupted run of this search (None: none)."""
        path = self.checkpoint_path()
        if path is None or not path.is_file():
            return None
        return torch.load(path, map_location=self.device, weights_only=True)

    def drop_phase_state(self) -> None:
        """Remove the checkpoint once training is done."""
        path = self.checkpoint_path()
        if path is not None:
            path.unlink(missing_ok=True)

    def save_log(self) -> None:
        """The method's training log as the run artifact ``<name>-<budget>-seed<k>.json`` (by rank 0
        alone when several processes train)."""
        if self.context.artifacts is not None and distributed.is_main():
            self.context.artifacts.write_json(f"{self.name}-{self.budget.slug}-seed{self.seed}.json",
                                              {"settings": asdict(self.settings), "spent": self.spent, "log": self.history_log})
