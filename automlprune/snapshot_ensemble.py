"""Snapshot-ensemble distillation as a fine-tune method (Le, Vo, Thoai, 'Paying more attention
to snapshots of Iterative Pruning: Improving Model Compression via Ensemble Distillation', BMVC
2020, "KESI"), after the official code (``lehduong/kesi``, ``cifar/filter_pruning/``;
``../shared/references/training-time-methods.md`` section 11). Chosen with ``finetune.method:
snapshot_ensemble`` (a task's ``finetune:`` block, or ``--set finetune.method=snapshot_ensemble``),
for any strategy's answer.

1. **Rounds** (``snapshot_rounds``, official 5): starting from the network the answer comes from
   (the original weights, or a training-time method's trained ones), each round prunes every
   group the answer shrinks part of the way to the answer's width, then retrains with a one-cycle
   schedule (SGD, max learning rate ``snapshot_lr``, official 0.1; div_factor 10,
   final_div_factor 100, pct_start 0.1, momentum cycled, as ``finetune.py``). The widths follow
   a geometric path, round r keeping C (k / C)^(r / R) channels, the compounding of the
   official per-round ratio; the last round is at the answer's widths. Within a group the
   channels to go are those the answer drops, the lowest L1 norm of their producing filters first
   (the official ``create_l1_norm_mask``), so the answer keeps exactly its channels. Pruned
   channels are held at zero on the full-shape network
   (:class:`~automlprune.train.callbacks.KeepDropped`), which computes what the narrower one does.
   Each round's network is a snapshot.
2. **Ensemble distillation** (``ensemble_finetune.py``): the answer, materialized from the last
   snapshot (bits and sparsity applied, BN re-estimated, as every fine-tune starts), is trained
   with Adam (no weight decay; one-cycle up to ``snapshot_distill_lr``, official 1e-3) on the
   mean over the teachers, every snapshot and the unpruned network, of T^2 KL(teacher ||
   student) at T = ``snapshot_temperature`` (official 5), with PyTorch's ``reduction='mean'`` as
   the official code, and no cross-entropy term.

Deviations, stated: the official runs 40 epochs per round and 40 of distillation (240 in all);
here the fine-tune's ``epochs`` of images are split evenly over the rounds and the distillation,
so a comparison at equal training compute stays equal. The official plan prunes fixed per-stage
ratios of each residual block's first conv and skips four sensitive blocks; here the answer's
widths (any groups, any budget metric) are the end of the path.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from automlprune.materialize import kept_channels_by_group
from automlprune.proposal import Proposal, TrainedWeights
from automlprune.settings import FinetuneSettings
from automlprune.space.search_space import Resolved
from automlprune.train import FitHistory, Recipe, Trainer
from automlprune.train.callbacks import Distillation, KeepDropped

ROUND_ONECYCLE = (0.1, 10.0, 100.0)
"""(pct_start, div_factor, final_div_factor) of the official one-cycle schedules."""


class SnapshotEnsemble:
    """The rounds of one snapshot-ensemble fine-tune by ``evaluator`` (the
    :class:`~automlprune.evaluator.Evaluator` fine-tuning; see the module docstring): :meth:`run`
    trains them; then :meth:`proposal` is the answer on the last snapshot's weights and
    :meth:`distillation` the loss of the final phase."""

    def __init__(self, evaluator: Any, proposal: Proposal, resolved: Resolved, settings: FinetuneSettings) -> None:
        self.evaluator, self.resolved, self.settings = evaluator, resolved, settings
        space = evaluator.space
        if proposal.trained:
            source, order = proposal.weights.model, proposal.weights.order(space, resolved)
        else:
            source, order = evaluator.model, evaluator.order
        self.final = kept_channels_by_group(space, resolved, order)
        self.net = copy.deepcopy(source).to(evaluator.device)
        self.snapshots: list[nn.Module] = []
        self.histories: list[FitHistory] = []

    def phase_recipe(self, lr: float, phase: int, optimizer: str = "sgd") -> Recipe:
        """One of the rounds + 1 phases: an equal share of the fine-tune's steps."""
        s, data = self.settings, self.evaluator.data
        epoch_steps = min(s.steps_per_epoch or 10 ** 12, max(1, len(data.train) // s.batch_size))
        share = max(1, s.epochs * epoch_steps // (s.snapshot_rounds + 1))
        epochs = math.ceil(share / epoch_steps)
        return Recipe(epochs, s.batch_size, lr, s.momentum, s.weight_decay if optimizer == "sgd" else 0.0, "onecycle",
                      steps_per_epoch=math.ceil(share / epochs), seed=s.seed * 1009 + phase, optimizer=optimizer,
                      onecycle=ROUND_ONECYCLE)

    def widths(self, round_: int) -> dict[str, int]:
        """Group -> channels kept after round ``round_`` of R (geometric path to the answer's)."""
        rounds, out = self.settings.snapshot_rounds, {}
        for group, keep in self.final.items():
            full = self.evaluator.space.group_by_name[group].channels
            out[group] = max(len(keep), min(full, round(full * (len(keep) / full) ** (round_ / rounds))))
        return out

    @torch.no_grad()
    def l1(self, group: str) -> torch.Tensor:
        """The L1 norm of each channel's filters over the group's producing layers (0 where none)."""
        space = self.evaluator.space
        total = torch.zeros(space.group_by_name[group].channels)
        for member in space.group_by_name[group].members:
            module = self.net.get_submodule(member.layer)
            if member.dim == "out" and space.layer_by_name[member.layer].kind in ("conv", "linear"):
                rows = torch.as_tensor(member.index_map[:, 0])
                total += module.weight.detach()[rows.to(module.weight.device)].abs().flatten(1).sum(1).cpu()
        return total

    def run(self, progress: bool = True) -> None:
        kept = {g: torch.arange(self.evaluator.space.group_by_name[g].channels) for g in self.final}
        for round_ in range(1, self.settings.snapshot_rounds + 1):
            for group, width in self.widths(round_).items():
                present, final = kept[group], set(self.final[group].tolist())
                going = [c for c in present.tolist() if c not in final]
                scores = self.l1(group)
                going.sort(key=lambda c: (float(scores[c]), c))
                gone = set(going[: len(present) - width])
                kept[group] = torch.tensor([c for c in present.tolist() if c not in gone], dtype=torch.long)
            trainer = Trainer(self.net, self.evaluator.data, self.evaluator.device,
                              self.phase_recipe(self.settings.snapshot_lr, round_),
                              [KeepDropped(self.evaluator.space, kept)], description=f"snapshot round {round_}",
                              progress=progress, validate=False)
            self.histories.append(trainer.fit())
            self.snapshots.append(copy.deepcopy(self.net).eval())

    def proposal(self) -> Proposal:
        """The answer's candidate on the last snapshot's weights (its channels are the answer's)."""
        return Proposal(self.resolved.candidate, TrainedWeights(self.net, self.final, "snapshot-ensemble"))

    def distillation(self) -> Distillation:
        """The final phase's loss: the snapshots and the unpruned network as teachers, no cross-entropy."""
        return Distillation(self.snapshots + [self.evaluator.teacher], alpha=1.0, temperature=self.settings.snapshot_temperature,
                            reduction="mean")

    def distill_recipe(self) -> Recipe:
        return self.phase_recipe(self.settings.snapshot_distill_lr, self.settings.snapshot_rounds + 1, optimizer="adam")
