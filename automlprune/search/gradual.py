"""Gradual channel pruning while training: the base of methods that, at scheduled optimizer
steps, drop each pruned group's lowest-scored channels towards the budget's widths and hold the
dropped ones at exactly zero for the rest of training (``l0-anneal``, ``prune-while-training``;
``gradual-frs`` overrides :meth:`GradualStrategy.select` to choose globally by cost instead).

One search: the budget becomes per-group target counts k_g through the one cost model
(``widths``: one keep ratio for the pruned groups, or PruneNet's allocation; see
:class:`~automlprune.search.training.TrainingSettings`); the trained network is copied and
trained with SGD for ``epochs``; every ``prune_every`` optimizer steps the method's schedule
(:meth:`GradualStrategy.fraction_left`, 1 at the start, 0 once pruning is over) sets each group's
count to k_g + round((M_g - k_g) x fraction_left) (M_g: its channels), and the channels with the
lowest :meth:`GradualStrategy.scores` among those still kept are dropped. Dropped channels are
zeroed on every coupled layer after every step, their momentum buffers too
(:class:`~automlprune.train.callbacks.KeepDropped`), so the network always computes what the
materialized one does; the answer is the trained network with the kept channels (judged on its
trained weights, BN re-estimated by the evaluator as after any removal). Choices made here for all
of them: the count is per group (a layer-wise budget, exact for the cost model), a group's
channels are scored together over its producing layers, and the learning rate follows the
``schedule`` over the whole run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from automlprune.errors import ConfigError
from automlprune.search.training import TrainingSettings, TrainingStrategy
from automlprune.space import Candidate
from automlprune.train import Callback, FitHistory, Recipe, Trainer
from automlprune.train.callbacks import KeepDropped
from automlprune.train.trainer import SCHEDULES

EVENTS_PER_RUN = 40
"""Pruning steps (annealing steps) over a run when ``prune_every`` is not given."""


@dataclass(frozen=True)
class GradualSettings(TrainingSettings):
    """Settings of every gradual method (subclasses add theirs): ``epochs`` of SGD at ``lr``
    (momentum, weight decay, learning-rate ``schedule`` as in :class:`~automlprune.train.Recipe`),
    at most ``steps_per_epoch`` steps each (None: the whole training split); a pruning event
    every ``prune_every`` optimizer steps (None: :data:`EVENTS_PER_RUN` events spread over the run)."""

    epochs: int = 4
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    steps_per_epoch: int | None = None
    prune_every: int | None = None


class GradualPruning(Callback):
    """The pruning events of a :class:`GradualStrategy` as Trainer hooks (see the module docstring)."""

    def __init__(self, strategy: "GradualStrategy", targets: dict[str, int]) -> None:
        self.strategy, self.targets = strategy, targets
        space = strategy.space
        self.kept = {g: torch.arange(space.group_by_name[g].channels) for g in targets}
        self.keep = KeepDropped(space, {})

    def state_dict(self) -> dict[str, Any]:
        return {"kept": dict(self.kept), "log": list(self.strategy.history_log), "method": self.strategy.method_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kept = {g: k.cpu() for g, k in state["kept"].items()}
        self.strategy.history_log[:] = state["log"]
        self.strategy.load_method_state(state["method"])
        self.keep.set_kept(self.kept)

    def on_start(self, trainer: Trainer) -> None:
        self.strategy.on_train_start(trainer)

    def after_step(self, trainer: Trainer) -> None:
        self.strategy.after_step(trainer)
        if trainer.step % self.strategy.prune_interval(trainer.total_steps) == 0:
            self.prune(trainer)
        self.keep.after_step(trainer)

    def on_end(self, trainer: Trainer) -> None:
        self.strategy.on_train_end(trainer)

    @torch.no_grad()
    def prune(self, trainer: Trainer, fraction_left: float | None = None) -> None:
        """One pruning event: every group down to its count for ``fraction_left`` (None: the schedule's)."""
        strategy = self.strategy
        left = strategy.fraction_left(trainer.step, trainer.total_steps) if fraction_left is None else fraction_left
        before = sum(len(k) for k in self.kept.values())
        strategy.step = trainer.step
        self.kept = strategy.select(trainer.model, self.kept, min(1.0, max(0.0, left)))
        kept = sum(len(k) for k in self.kept.values())
        if kept < before:
            self.keep.set_kept(self.kept)
            widths = strategy.widths_of(self.kept)
            entry = {"step": trainer.step, "fraction_left": left, "removed": before - kept, "kept": kept,
                     "cost_fraction": strategy.budget.cost_fraction(strategy.cost_model(widths))}
            strategy.history_log.append(entry)
            trainer.log.update(kept=kept)
        strategy.after_prune(trainer)


class GradualStrategy(TrainingStrategy):
    """Base of the gradual methods: subclasses give :meth:`fraction_left` and :meth:`scores`."""

    settings_class = GradualSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.settings.schedule not in SCHEDULES:
            raise ConfigError(f"{self.name} schedule '{self.settings.schedule}' is unknown; use one of: {', '.join(SCHEDULES)}")
        self.pruning: GradualPruning | None = None
        self.step = 0
        """The optimizer step of the pruning event under way (set before :meth:`select`)."""
        self.cut_at_end = False
        """Whether training ended before the schedule reached the targets (then pruned to them at the end, untrained)."""

    # ---- what a method fills ------------------------------------------------------------------
    def fraction_left(self, step: int, total_steps: int) -> float:
        """How much of the way from the full width to the target is still to go after optimizer
        step ``step`` of ``total_steps`` (1: nothing pruned yet; 0: at the target)."""
        raise NotImplementedError

    def scores(self, net: nn.Module, group: str) -> torch.Tensor:
        """One score per channel of ``group`` (higher: more worth keeping)."""
        raise NotImplementedError

    def select(self, net: nn.Module, kept: dict[str, torch.Tensor], fraction_left: float) -> dict[str, torch.Tensor]:
        """The channels each group keeps after a pruning event with ``fraction_left`` of the way to
        go (a subset of ``kept``). Here per group: its count k + round((M - k) x fraction_left),
        the highest :meth:`scores` among those still kept."""
        out = {}
        for group, channels in kept.items():
            full, target = self.space.group_by_name[group].channels, self.pruning.targets[group]
            count = target + round((full - target) * fraction_left)
            if count >= len(channels):
                out[group] = channels
                continue
            order = torch.argsort(self.scores(net, group)[channels].cpu(), descending=True, stable=True)
            out[group] = channels[order[:count]].sort().values
        return out

    def cut_to_cost(self, kept: dict[str, torch.Tensor], scores: dict[str, torch.Tensor],
                    target: float) -> tuple[dict[str, torch.Tensor], bool]:
        """``kept`` less the globally lowest-``scores`` channels, the fewest that bring the budget
        metric's cost to at most ``target`` (bisection on how many; no group below its target
        count), and whether that was reached (if not: every channel allowed to go has gone)."""
        metric = self.budget.metric
        if self.cost_model(self.widths_of(kept))[metric] <= target:
            return kept, True
        counts = {g: len(k) for g, k in kept.items()}
        order = sorted(((float(scores[g][c]), g, int(c)) for g, k in kept.items() for c in k.tolist()))
        removals = []  # in score order, each allowed while its group stays above its floor
        for _, group, channel in order:
            if counts[group] > self.pruning.targets[group]:
                counts[group] -= 1
                removals.append((group, channel))

        def after(n: int) -> dict[str, torch.Tensor]:
            gone: dict[str, set[int]] = {}
            for group, channel in removals[:n]:
                gone.setdefault(group, set()).add(channel)
            return {g: torch.tensor([c for c in k.tolist() if c not in gone.get(g, ())], dtype=torch.long) for g, k in kept.items()}

        fits = lambda n: self.cost_model(self.widths_of(after(n)))[metric] <= target  # noqa: E731
        if not fits(len(removals)):
            return after(len(removals)), False
        lo, hi = 0, len(removals)  # fits(hi); find the fewest removals that fit
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if not fits(mid) else (lo, mid)
        return after(lo), True

    def reached(self, kept: dict[str, torch.Tensor]) -> bool:
        """Whether ``kept`` is the answer's size (every group at its target)."""
        return all(len(k) == self.pruning.targets[g] for g, k in kept.items())

    def pruning_targets(self, planned: Candidate) -> dict[str, int]:
        """Group -> the fewest channels it may end with: the planned widths' counts, for the groups
        they shrink; for a method that chooses its widths while training (``chooses_widths``),
        every pruned group down to the space's smallest keep ratio (the cost decides)."""
        if self.chooses_widths:
            floor = min(self.space.config.ratios)
            return {g: self.space.channels_for(self.space.group_by_name[g].channels, floor, 1) for g in self.pruned_groups()}
        kept = dict(zip([g.name for g in self.space.groups], self.space.kept_channels(planned).tolist()))
        return {g: int(kept[g]) for g in self.space.prunable if kept[g] < self.space.group_by_name[g].channels}

    def on_train_start(self, trainer: Trainer) -> None:
        """Hook: training starts (e.g. register forward hooks)."""

    def after_step(self, trainer: Trainer) -> None:
        """Hook: after every optimizer step, before a pruning event (e.g. a proximal step)."""

    def after_prune(self, trainer: Trainer) -> None:
        """Hook: after every pruning event (e.g. reset accumulated statistics)."""

    def on_train_end(self, trainer: Trainer) -> None:
        """Hook: training ended (e.g. remove forward hooks)."""

    def method_state(self) -> dict[str, Any]:
        """What the method keeps between steps, for the epoch checkpoint."""
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`method_state`."""

    # ---- the base -----------------------------------------------------------------------------
    def prune_interval(self, total_steps: int) -> int:
        """Optimizer steps between pruning events (``prune_every``, or the run's steps / :data:`EVENTS_PER_RUN`)."""
        return self.settings.prune_every or max(1, total_steps // EVENTS_PER_RUN)

    def producer_rows(self, net: nn.Module, group: str) -> list[tuple[nn.Module, torch.Tensor]]:
        """(module, row indices in group order) of each layer producing ``group``'s channels."""
        return [(net.get_submodule(m.layer), torch.as_tensor(m.index_map[:, 0], device=self.device))
                for m in self.space.group_by_name[group].members if m.dim == "out" and m.layer in self.producers(group)]

    def filter_norms(self, net: nn.Module, group: str, p: int) -> torch.Tensor:
        """The L``p`` norm of each channel's filters over all the group's producers together."""
        rows = [module.weight.detach()[index].flatten(1) for module, index in self.producer_rows(net, group)]
        return torch.cat(rows, dim=1).norm(p=p, dim=1)

    def train(self, net: nn.Module, candidate: Candidate) -> list[FitHistory]:
        s = self.settings
        self.pruning = GradualPruning(self, self.pruning_targets(candidate))
        recipe = Recipe(s.epochs, s.batch_size, s.lr, s.momentum, s.weight_decay, s.schedule,
                        steps_per_epoch=s.steps_per_epoch, seed=self.seed)
        trainer = Trainer(net, self.context.data, self.device, recipe, [self.pruning],
                          description=f"{self.name} {self.budget.label}", validate=False, checkpoint=self.checkpoint_path())
        history = trainer.fit()
        self.resumed_from = trainer.resumed_from
        self.cut_at_end = not self.reached(self.pruning.kept)
        if self.cut_at_end:  # training ended before the schedule did (too few steps): to the targets at once
            self.pruning.prune(trainer, fraction_left=0.0)
            self.pruning.keep.zero_(net)
        return [history]

    def final_widths(self, planned: Candidate) -> Candidate:
        """The planned widths, or for a method that chooses its widths, those it kept."""
        return self.widths_of(self.pruning.kept) if self.chooses_widths else planned

    def kept_channels(self, net: nn.Module, candidate: Candidate) -> dict[str, torch.Tensor]:
        return {g: k.cpu() for g, k in self.pruning.kept.items()}

    def widths_of(self, kept: dict[str, torch.Tensor]) -> Candidate:
        """The candidate keeping ``len(kept[g])`` channels of each group."""
        return self.space.canonical(Candidate.make({g: len(k) / self.space.group_by_name[g].channels for g, k in kept.items()}))

    def measured_layers(self, group: str) -> list[tuple[str, torch.Tensor]]:
        """(layer, channel index in group order) whose outputs stand for ``group``'s channels: its
        batch norms, or its producers when it has none."""
        members = [m for m in self.space.group_by_name[group].members if m.dim == "out"]
        norms = [m for m in members if self.space.layer_by_name[m.layer].kind == "bn"]
        chosen = norms or [m for m in members if m.layer in self.producers(group)]
        return [(m.layer, torch.as_tensor(m.index_map[:, 0])) for m in chosen]

    def training_report(self) -> dict[str, float]:
        events = [e for e in self.history_log if "removed" in e]
        return {"pruning_events": float(len(events)), "last_pruning_step": float(events[-1]["step"]) if events else 0.0,
                "cut_after_training": float(self.cut_at_end)}


def annealed_fraction(e: int, n: int, mu: float) -> float:
    """FSA's annealing of the count (Barbu et al., ``ComputeNumberToKeepInverse``):
    max(0, (N - 2e) / (2 e mu + N)) at annealing step ``e`` of a window of ``n`` (1 for e < 1;
    0 from e = N/2 on)."""
    if e < 1:
        return 1.0
    return max(0.0, (n - 2 * e) / (2 * e * mu + n))


def linear_fraction(event: int, events: int) -> float:
    """1 - event / events: equal steps from the full width to the target over ``events`` events."""
    return 1.0 - min(event, events) / max(events, 1)
