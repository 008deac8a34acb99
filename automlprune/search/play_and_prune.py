"""Play and Prune: ``play-and-prune`` (Singh, Verma, Rai, Namboodiri, 'Play and Prune: Adaptive
Filter Pruning for Deep Model Compression', IJCAI 2019; arXiv 1905.04446;
``../shared/references/training-time-methods.md`` section 8). No official code exists and the full
text was not readable here: the abstract and a summary give the frame (marked [paper]); every
formula below is this implementation's choice, stated so it can be checked against the PDF.

[paper] A min-max framework: the adaptive filter pruning (AFP) module minimizes the number of
filters, the pruning rate controller (PRC) maximizes accuracy while pruning; pruning and
fine-tuning are joint, with an adaptive pruning rate; per pruning iteration t a regularization
constant lambda_t and a weight threshold W_t, which the PRC updates; the user gives an error
tolerance instead of a pruning level.

Here, while the network trains (SGD for ``epochs``; the gradual base,
:mod:`automlprune.search.gradual`: dropped channels held at exactly zero, weights and momentum),
every ``prune_every`` optimizer steps (default: 40 iterations over the run) is one iteration t:

1. **PRC measurement.** The validation accuracy A_t of the network as it trains, on the shared
   evaluator's validation images with the network's own batch-norm statistics
   (:meth:`~automlprune.evaluator.Evaluator.validation_accuracy`; the answer is then judged the
   same way: no BN re-estimation). Tolerance: under ``--budget accuracy_drop=E`` the floor is the
   unpruned network's evaluator accuracy minus E points; under a cost budget, A_0 (measured before
   training) minus ``tolerance`` points, and pruning stops once the cost budget is met.
2. **Within the tolerance** (A_t at or above the floor): this state (channels and weights) is kept
   as the latest accepted one; the channels of the unimportant set U whose magnitude is below
   W_t times the mean magnitude of the group's other kept channels are removed (never a group
   below the space's smallest keep ratio); with s = (A_t - floor) / tolerance clipped to [0, 1]
   (the share of the tolerance left), lambda_{t+1} = min(lambda_max, lambda_t (1 + s)) and W_{t+1} = min(W_max,
   W_t (1 + s)): the more room, the faster the pruning.
   **Outside it**: nothing is removed and lambda and W halve (recovery: the pull relaxes while
   training restores accuracy).
3. **AFP.** U is chosen afresh: in every pruned group the ``unimportant`` fraction (at least one
   channel while the group is above its floor) of the kept channels with the smallest magnitude;
   until the next iteration U's channels are pulled to zero by an L1 penalty lambda_t |p|_1, as a
   proximal step after every optimizer step (the [UNVERIFIED] recollection of the AFP objective
   is C + lambda sum_{f in U} |f|_1).

A channel's magnitude, and what the pull acts on: |gamma| + |beta| of its batch norms (mean over the
group's batch norms) when the group has them, else the L1 norm of its filters over the group's
producers. This deviates from an L1 pull on conv filters, on purpose: behind a batch norm a filter's
scale does not change the network's function, so a filter pull would shrink U with no resistance
from the loss and turn the threshold into a count; and beta is pulled with gamma because a channel
with gamma near zero still passes the constant relu(beta), which the next layer relies on (removing
such channels untrained collapsed digits to chance in a first version that pulled gamma alone).

The answer: under a tolerance, the trained network at the end if its accuracy is within the
tolerance, else the latest accepted state (weights and channels, rolled back); under a cost budget
the trained network, and if training ended above the budget, the globally smallest channels by
normalized magnitude cut to it (``cut_after_training`` in the search's training report).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from automlprune.errors import ConfigError
from automlprune.search.gradual import GradualSettings, GradualStrategy
from automlprune.space import Candidate
from automlprune.train import FitHistory, Trainer

MAX_PULL = 10.0
"""lambda's ceiling (a proximal shrink of at most lr x 10 per step)."""
MAX_THRESHOLD = 0.5
"""W_max: a U channel is removed at most when its magnitude is below half its group's mean."""


@dataclass(frozen=True)
class PlayAndPruneSettings(GradualSettings):
    """See the module docstring: ``unimportant``: the fraction of each group's kept channels in U;
    ``pull``: lambda_0, the L1 pull on U (added to the gradient per step); ``threshold``: W_0;
    ``tolerance``: points of validation accuracy the PRC allows under a cost budget (an
    ``accuracy_drop`` budget sets its own)."""

    unimportant: float = 0.1
    pull: float = 0.01
    threshold: float = 0.05
    tolerance: float = 1.0


class PlayAndPruneStrategy(GradualStrategy):
    """Channels pulled to zero and removed while training, at a rate an accuracy controller sets."""

    name = "play-and-prune"
    chooses_widths = True
    takes_tolerance = "native"
    settings_class = PlayAndPruneSettings
    option_ranges = {"pull": ((lambda v: v >= 0), "cannot be negative"),
                     "unimportant": ((lambda v: 0 < v <= 1), "must be in (0, 1]"),
                     "threshold": ((lambda v: 0 < v <= MAX_THRESHOLD), f"must be in (0, {MAX_THRESHOLD}]"),
                     "tolerance": ((lambda v: 0 <= v < 100), "must be in [0, 100) points")}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.context.validation is None:
            raise ConfigError("play-and-prune steers by validation accuracy and needs the evaluator's validation in its search context")
        s = self.settings
        self.lam, self.threshold = s.pull, s.threshold
        self.unimportant: dict[str, torch.Tensor] = {}
        self.floor_accuracy: float | None = None
        self.accepted: dict[str, Any] | None = None
        """The latest state within the tolerance: {"kept": group -> channels, "weights": state dict, "step": k}."""
        self.rolled_back = False

    # ---- schedule and targets -----------------------------------------------------------------
    def fraction_left(self, step: int, total_steps: int) -> float:
        return 1.0  # the controller sets the rate; 0 is the base's call for the final cut

    def reached(self, kept: dict[str, torch.Tensor]) -> bool:
        return self.budget.tolerance or self.feasible(self.widths_of(kept))

    def bn_recalibration(self) -> bool | None:
        """Judged as the controller measured it, with the statistics its training kept; after a cut at
        the end of training (untrained removals) the evaluator re-estimates them as after any cut."""
        return None if self.cut_at_end else False

    # ---- magnitudes and the pull --------------------------------------------------------------
    def affine(self, net: nn.Module, group: str) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(BN weight or bias, channel index in group order) of each batch norm of ``group``."""
        norms = [(net.get_submodule(m.layer), torch.as_tensor(m.index_map[:, 0], device=self.device))
                 for m in self.space.group_by_name[group].members
                 if m.dim == "out" and self.space.layer_by_name[m.layer].kind == "bn"]
        return [(p, index) for bn, index in norms for p in (bn.weight, bn.bias)]

    @torch.no_grad()
    def magnitude(self, net: nn.Module, group: str) -> torch.Tensor:
        """Each channel's magnitude (see the module docstring), in group order."""
        affine = self.affine(net, group)
        if affine:
            return torch.stack([p.detach()[index].abs() for p, index in affine]).sum(0).cpu() * 2 / len(affine)
        return self.filter_norms(net, group, 1).cpu()

    @torch.no_grad()
    def after_step(self, trainer: Trainer) -> None:
        """The L1 pull on U's channels (their BN gammas and betas, or their filters) as a proximal
        step after the optimizer's: p <- sign(p) max(|p| - lr lambda, 0) (soft thresholding, which
        reaches exact zeros; a subgradient lambda sign(p) with momentum oscillates around zero)."""
        shrink = trainer.optimizer.param_groups[0]["lr"] * self.lam
        for group, channels in self.unimportant.items():
            if not len(channels):
                continue
            targets = self.affine(trainer.model, group) or [(m.weight, i) for m, i in self.producer_rows(trainer.model, group)]
            for param, index in targets:
                rows = index[channels.to(index.device)]
                values = param[rows]
                param[rows] = values.sign() * (values.abs() - shrink).clamp_min(0)

    def choose_unimportant(self, net: nn.Module, kept: dict[str, torch.Tensor]) -> None:
        """U afresh: the ``unimportant`` fraction of each group's kept channels with the smallest
        magnitude (none once a cost budget is met: nothing more is removed)."""
        self.unimportant = {}
        if not self.budget.tolerance and self.feasible(self.widths_of(kept)):
            return
        for group, channels in kept.items():
            room = len(channels) - self.pruning.targets[group]
            count = min(room, max(1, round(self.settings.unimportant * len(channels)))) if room > 0 else 0
            order = torch.argsort(self.magnitude(net, group)[channels], stable=True)
            self.unimportant[group] = channels[order[:count]].sort().values

    # ---- the iteration ------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer) -> None:
        if self.floor_accuracy is None:
            reference = self.context.validation(trainer.model)
            self.floor_accuracy = self.budget.min_accuracy if self.budget.tolerance else reference - self.settings.tolerance / 100
            self.history_log.append({"step": 0, "accuracy": reference, "floor_accuracy": self.floor_accuracy})
        if self.accepted is None:
            self.accepted = self.snapshot(trainer.model, self.pruning.kept, 0)
        if not self.unimportant:
            self.choose_unimportant(trainer.model, self.pruning.kept)

    def snapshot(self, net: nn.Module, kept: dict[str, torch.Tensor], step: int) -> dict[str, Any]:
        return {"kept": {g: k.clone() for g, k in kept.items()},
                "weights": {k: v.detach().clone() for k, v in net.state_dict().items()}, "step": step}

    def tolerance_points(self) -> float:
        return self.budget.accuracy_drop if self.budget.tolerance else self.settings.tolerance

    def select(self, net: nn.Module, kept: dict[str, torch.Tensor], fraction_left: float) -> dict[str, torch.Tensor]:
        if fraction_left == 0.0:  # training ended above a cost budget: the final cut
            return self.final_cut(net, kept)
        step = self.step
        accuracy = self.context.validation(net)
        within = accuracy >= self.floor_accuracy
        entry = {"step": step, "accuracy": accuracy, "within": within, "lambda": self.lam, "threshold": self.threshold}
        out = kept
        if within:
            self.accepted = self.snapshot(net, kept, step)
            if self.budget.tolerance or not self.feasible(self.widths_of(kept)):
                out = self.remove_below_threshold(net, kept)
            points = self.tolerance_points()
            room = min(1.0, max(0.0, (accuracy - self.floor_accuracy) * 100 / points)) if points > 0 else 0.0
            self.lam = min(MAX_PULL, self.lam * (1 + room))
            self.threshold = min(MAX_THRESHOLD, self.threshold * (1 + room))
        else:
            self.lam /= 2
            self.threshold /= 2
        entry["removed_now"] = sum(len(k) for k in kept.values()) - sum(len(k) for k in out.values())
        self.history_log.append(entry)
        self.choose_unimportant(net, out)
        return out

    def remove_below_threshold(self, net: nn.Module, kept: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``kept`` less the U channels below W_t times their group's mean (see the module docstring);
        under a cost budget no more of them than it takes to meet it."""
        out, scores = {}, {}
        for group, channels in kept.items():
            magnitude = self.magnitude(net, group)
            unimportant = self.unimportant.get(group, torch.empty(0, dtype=torch.long))
            others = channels[~torch.isin(channels, unimportant)]
            mean = magnitude[others].mean() if len(others) else magnitude[channels].mean()
            below = unimportant[magnitude[unimportant] < self.threshold * mean]
            below = below[:max(0, len(channels) - self.pruning.targets[group])]
            out[group] = channels[~torch.isin(channels, below)]
            score = torch.full((self.space.group_by_name[group].channels,), float("inf"))
            score[below] = magnitude[below] / mean
            scores[group] = score
        if self.budget.tolerance or not self.feasible(self.widths_of(out)):
            return out
        cut, _ = self.cut_to_cost(kept, scores, self.limit)  # the fewest of them that meet the budget
        return cut

    def final_cut(self, net: nn.Module, kept: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The globally smallest channels by magnitude over their group's mean, cut to the cost budget."""
        scores = {g: self.magnitude(net, g) / self.magnitude(net, g)[k].mean().clamp_min(1e-12) for g, k in kept.items()}
        cut, fits = self.cut_to_cost(kept, scores, self.limit)
        if not fits:
            raise ConfigError(f"play-and-prune cannot meet {self.budget.label} by pruning its {self.settings.groups} groups down to "
                              "the space's smallest keep ratio; raise the budget or use --option groups=all")
        return cut

    def train(self, net: nn.Module, candidate: Candidate) -> list[FitHistory]:
        histories = super().train(net, candidate)
        if self.budget.tolerance:
            final = self.context.validation(net)
            self.history_log.append({"step": "end", "accuracy": final, "within": final >= self.floor_accuracy})
            if final < self.floor_accuracy:  # back to the latest state within the tolerance
                net.load_state_dict(self.accepted["weights"])
                self.pruning.kept = {g: k.clone() for g, k in self.accepted["kept"].items()}
                self.pruning.keep.set_kept(self.pruning.kept)
                self.pruning.keep.zero_(net)
                self.rolled_back = True
        return histories

    # ---- checkpoint ---------------------------------------------------------------------------
    def method_state(self) -> dict[str, Any]:
        return {"lam": self.lam, "threshold": self.threshold, "unimportant": dict(self.unimportant),
                "floor_accuracy": self.floor_accuracy, "accepted": copy.copy(self.accepted)}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.lam, self.threshold = state["lam"], state["threshold"]
        self.unimportant = {g: k.cpu() for g, k in state["unimportant"].items()}
        self.floor_accuracy = state["floor_accuracy"]
        self.accepted = state["accepted"]
        if self.accepted is not None:
            self.accepted["kept"] = {g: k.cpu() for g, k in self.accepted["kept"].items()}

    def training_report(self) -> dict[str, float]:
        iterations = [e for e in self.history_log if "within" in e and e["step"] != "end"]
        return {**super().training_report(), "iterations": float(len(iterations)),
                "iterations_outside_tolerance": float(sum(not e["within"] for e in iterations)),
                "rolled_back": float(self.rolled_back), "floor_accuracy": float(self.floor_accuracy or 0.0)}
