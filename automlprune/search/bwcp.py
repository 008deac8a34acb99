"""BWCP: batch whitening with probabilistic channel masks (Shao et al., 'BWCP: Probabilistic
Learning-to-Prune Channels for ConvNets via Batch Whitening', arXiv 2105.06423; ICLR 2022
submission; ``../shared/references/training-time-methods.md`` section 4). No official code was
found; every step follows the paper's text (the ICLR version), section by section.

After the batch norm of each pruned group (conv -> BN -> BWCP -> ReLU; a forward hook, the
network's modules are untouched):

1. **Batch whitening** (Eq. 3-4, Alg. 1 l. 6): x_hat = S^-1/2 (gamma x_bar + beta), with x_bar the
   standardized features (the batch norm's own batch statistics in training, running ones in eval),
   rho = x_bar x_bar^T / (N H W) their channel correlation and S_N = (gamma gamma^T o rho) /
   ||gamma||^2, in groups of ``whitening_group`` channels (block-diagonal; the paper's ImageNet
   group size, CIFAR's is not given).
2. **Newton iteration** (Eq. 5, Alg. 1 l. 7-11): S_0 = I, S_k = (3 S_{k-1} - S_{k-1}^3 S_N) / 2 for
   k = 1..``newton_steps`` (not given; 5 as IterNorm); in eval the moving average of S^-1/2 with
   momentum ``whitening_momentum`` (not given; 0.1).
3. **Activation probability** (Alg. 1 l. 14, Prop. 1-3): gamma_hat = S^-1/2 gamma, beta_hat =
   S^-1/2 beta, P_c = (1 + erf((beta_hat_c - delta) / (sqrt(2) |gamma_hat_c|))) / 2, delta =
   ``delta`` (0.05, the appendix's "in all experiments").
4. **Soft masks** (Eq. 6): m_c = GumbelSoftmax(P_c; tau) in its two-class binary-concrete form
   sigmoid((log P - log(1 - P) + L) / tau), L ~ Logistic(0, 1), tau = 0.5; in eval the hard mask
   1[P_c > 0.5]. The output is x_hat o m. (P is sharpened first; see the deviations.)
5. **Sparsity regularizer** (Eq. 7): lambda1 |gamma_c| + lambda2 beta_c summed over the BWCP layers
   (CIFAR-10's 4e-5 and 8e-5), pushing gamma to 0 and beta negative.
6. **Fold** (section 4e of the spec): in eval, x_hat o m = diag(m) S^-1/2 BN(x), a 1 x 1 conv after
   the batch norm, fused into the producing conv exactly as ResRep's compactors
   (:func:`~automlprune.search.resrep.fold_compactors_`), the batch norm left as an identity with
   real statistics; channels with mask 0 are removed and no BN re-estimation runs over the fold.

Deviations, stated:

* **Budget term.** The paper reaches a size only by sweeping lambda1 and lambda2. Here the loss
  also holds ``budget_penalty`` x the budget loss ``budget_loss`` (:mod:`automlprune.train.regularizers`)
  of the expected cost, the one cost model on the expected widths sum_c P_c (differentiable:
  macs or params budgets), against the budget. At the end, channels with P > 0.5 are kept, and if
  that is over the budget the lowest-P channels go (globally) until it fits.
* **Start and length.** The paper trains from scratch for 160 epochs; here the trained network
  is the start and ``epochs`` the length (the equal-training-budget comparison). The whitening
  changes the function at the start; training adapts to it.
* **Groups.** ``groups: internal`` (the default) whitens and masks the groups with one producer.
  ``groups: all`` also prunes the residual groups (several producers whose outputs are added),
  with one mask per group shared by every member's BWCP (App. A.6: "residual groups share
  masks"), each member keeping its own whitening and regularizer. The paper's shared mask is
  the product m^s m^last of the shortcut's and the block's last BWCP for a conv-BN shortcut, and
  "the mask in the previous layer" for an identity shortcut. Here the mask of a group is the one
  its first member in forward order samples (the stem's or the downsampling block's batch
  norm), which every later member applies: the paper's rule for identity shortcuts, but one of
  the two masks instead of their product at a conv-BN shortcut (the later member's probability
  is only known after the earlier member's output has left its hook). The group's expected
  width and final selection are its first member's. Groups whose members are not all followed by
  a BatchNorm2d are not pruned.
* **Sharpening.** The paper makes P "approach 0 or 1 in training" by a "sigmoid-alike
  transformation" it does not give. Here it is P' = sigmoid(k logit P), with k rising
  geometrically from 1 to ``sharpness`` (30) at the start of the hard phase. P' replaces P in the
  soft mask, in the budget term and in the final selection (1[P' > 0.5] = 1[P > 0.5]).
* **Hard phase.** The last ``hard_fraction`` (a quarter) of the steps train with the final masks
  fixed: they are chosen on that step's P' (P' > 0.5, then the budget cut above), every BWCP then
  applies its hard mask in training too, and the loss is the task's alone. The paper trains soft
  masks to the end. Not doing so was measured (``results/benchmarks/fmnist-resnet20-training/
  bwcp_probe.py``, digits, 4 epochs, macs=0.5 / 0.3): without sharpening most P ended in
  [0.4, 0.6), where the hard mask is a coin flip, and the folded networks scored 47% / 43%;
  with sharpening 30 and no hard phase 75% / 90%; with both 95% / 94%.
  ``hard_fraction=0`` and ``sharpness=1`` give the paper's soft-to-the-end training without
  sharpening.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from automlprune.cost import differentiable_metrics
from automlprune.data import cached_batches
from automlprune.errors import ConfigError
from automlprune.search.resrep import STATISTICS_SAMPLES, fold_matrix_, give_batch_norms_statistics_
from automlprune.search.training import TrainingSettings, TrainingStrategy
from automlprune.space import Candidate
from automlprune.train import Callback, FitHistory, Recipe, Trainer
from automlprune.train.regularizers import BUDGET_LOSSES, budget_loss

P_CLAMP = 1e-6
"""P is kept in [P_CLAMP, 1 - P_CLAMP] inside the log-odds of the soft mask."""
SATURATED = 0.1
"""A channel's P' counts as saturated (its mask all but decided) below SATURATED or above 1 - SATURATED."""


@dataclass(frozen=True)
class BWCPSettings(TrainingSettings):
    """See the module docstring (paper defaults where it gives them)."""

    epochs: int = 4
    steps_per_epoch: int | None = None
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lambda1: float = 4e-5
    lambda2: float = 8e-5
    tau: float = 0.5
    delta: float = 0.05
    newton_steps: int = 5
    whitening_momentum: float = 0.1
    whitening_group: int = 16
    sharpness: float = 30.0
    hard_fraction: float = 0.25
    budget_penalty: float = 1.0
    budget_loss: str = "band"
    min_channels: int = 1


def newton_inverse_sqrt(sigma: torch.Tensor, steps: int) -> torch.Tensor:
    """S^-1/2 of a trace-normalized covariance by ``steps`` Newton iterations from the identity (Eq. 5)."""
    p = torch.eye(sigma.shape[0], dtype=sigma.dtype, device=sigma.device)
    for _ in range(steps):
        p = 0.5 * (3 * p - torch.linalg.matrix_power(p, 3) @ sigma)
    return p


class Whitening(nn.Module):
    """BWCP after one batch norm (steps 1-4 of the module docstring), as a forward hook; with a
    ``leader`` (the first member of a residual group) it applies the mask the leader sampled in
    the same forward pass instead of its own."""

    def __init__(self, norm: nn.BatchNorm2d, settings: BWCPSettings, leader: "Whitening | None" = None) -> None:
        super().__init__()
        self.norm, self.s, self.leader = norm, settings, leader
        self.mask: torch.Tensor | None = None
        """The mask applied in the last forward pass (a leader's is its followers')."""
        channels = norm.num_features
        self.register_buffer("running_inverse_sqrt", torch.eye(channels))
        self.slices = [slice(i, min(i + settings.whitening_group, channels)) for i in range(0, channels, settings.whitening_group)]
        self.sharpness = 1.0
        """k of the sharpening P' = sigmoid(k logit P) (set by :class:`BWCPTraining` each step)."""
        self.probability: torch.Tensor | None = None
        """P' of the last forward pass (with its gradient in training)."""
        self.hard: torch.Tensor | None = None
        """The final selection, a fixed 0/1 mask that replaces 1[P' > 0.5] in eval and the sampled
        mask in training (the hard phase), or None before it is made."""
        self.handle = norm.register_forward_hook(self._hook)

    def inverse_sqrt(self, x: torch.Tensor) -> torch.Tensor:
        """S^-1/2 from this batch (block-diagonal over the whitening groups); updates the running one."""
        norm = self.norm
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        standardized = ((x - mean[None, :, None, None]) / torch.sqrt(var + norm.eps)[None, :, None, None])
        flat = standardized.transpose(0, 1).flatten(1)
        gamma = norm.weight
        out = torch.zeros(len(gamma), len(gamma), dtype=x.dtype, device=x.device)
        for part in self.slices:
            rho = flat[part] @ flat[part].t() / flat.shape[1]
            g = gamma[part]
            sigma = torch.outer(g, g) * rho / g.pow(2).sum().clamp_min(1e-12)
            out[part, part] = newton_inverse_sqrt(sigma, self.s.newton_steps)
        with torch.no_grad():
            self.running_inverse_sqrt.lerp_(out.detach(), self.s.whitening_momentum)
        return out

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        w = self.inverse_sqrt(args[0]) if module.training else self.running_inverse_sqrt
        whitened = F.conv2d(output, w[:, :, None, None])
        gamma_hat, beta_hat = w @ self.norm.weight, w @ self.norm.bias
        p = 0.5 * (1 + torch.erf((beta_hat - self.s.delta) / (math.sqrt(2) * gamma_hat.abs()).clamp_min(1e-12)))
        if self.sharpness != 1.0:
            p = p.clamp(P_CLAMP, 1 - P_CLAMP)
            p = torch.sigmoid(self.sharpness * (p.log() - torch.log1p(-p)))
        self.probability = p
        if self.leader is not None:
            if self.leader.mask is None:
                raise RuntimeError(f"BWCP: the group's first batch norm did not run before {self.norm}")
            mask = self.leader.mask
        elif module.training and self.hard is None:
            p = p.clamp(P_CLAMP, 1 - P_CLAMP)
            u = torch.rand_like(p).clamp(1e-6, 1 - 1e-6)
            mask = torch.sigmoid((p.log() - torch.log1p(-p) + u.log() - torch.log1p(-u)) / self.s.tau)
        else:
            mask = self.hard_mask().to(whitened.dtype)
        self.mask = mask
        return whitened * mask.view(1, -1, 1, 1)

    def hard_mask(self) -> torch.Tensor:
        """The 0/1 mask in eval: the final selection, else 1[P > 0.5] (the leader's, in a residual group)."""
        if self.leader is not None:
            return self.leader.hard_mask()
        return self.hard if self.hard is not None else (self.probability > 0.5).float()

    def folded_matrix(self) -> torch.Tensor:
        """diag(hard mask) S^-1/2 (running): what the fold puts after the batch norm."""
        return self.hard_mask().detach().to(self.running_inverse_sqrt.dtype)[:, None] * self.running_inverse_sqrt

    def remove(self) -> None:
        self.handle.remove()


class BWCPTraining(Callback):
    """The regularizer and the budget term added to the loss (steps 5 and the budget deviation)."""

    def __init__(self, strategy: "BWCPStrategy") -> None:
        self.strategy, self.s = strategy, strategy.settings

    def on_start(self, trainer):
        for w in self.strategy.all_whitenings:
            w.to(trainer.device)
        self.sharpen(trainer)

    def after_step(self, trainer):
        self.sharpen(trainer)
        if not self.strategy.hard_phase and trainer.step >= self.hard_from(trainer) and self.s.hard_fraction > 0:
            self.strategy.select_masks()  # on the P' of this step's forward pass
            self.strategy.log_state(trainer)

    def hard_from(self, trainer: Trainer) -> int:
        """The step from which the masks are fixed: the last ``hard_fraction`` of the steps."""
        return round(trainer.total_steps * (1 - self.s.hard_fraction))

    def sharpen(self, trainer: Trainer) -> None:
        """k = sharpness ** (step / first step of the hard phase): 1 at the start, ``sharpness`` from there on."""
        k = self.s.sharpness ** min(1.0, trainer.step / max(1, self.hard_from(trainer)))
        for w in self.strategy.all_whitenings:
            w.sharpness = k

    def loss(self, trainer, x, y, logits, loss):
        strategy = self.strategy
        if strategy.hard_phase:  # the masks are fixed: what is left is the task's loss
            return loss
        sparse = sum(self.s.lambda1 * w.norm.weight.abs().sum() + self.s.lambda2 * w.norm.bias.sum() for w in strategy.all_whitenings)
        ratio = strategy.expected_cost_fraction()
        trainer.log.update(expected_cost=float(ratio.detach()))
        return loss + sparse + self.s.budget_penalty * budget_loss(self.s.budget_loss, ratio, strategy.budget.fraction).to(loss.dtype)

    def state_dict(self) -> dict[str, Any]:
        strategy = self.strategy
        return {"whitening": [w.running_inverse_sqrt for w in strategy.all_whitenings],
                "hard": [w.hard for w in strategy.whitenings], "forced": strategy.forced,
                "sharpness": strategy.whitenings[0].sharpness,
                "history": list(strategy.history_log)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        strategy = self.strategy
        for w, saved in zip(strategy.all_whitenings, state["whitening"]):
            w.running_inverse_sqrt.copy_(saved)
            w.sharpness = state["sharpness"]  # (on_start ran before the trainer restored its step)
        for w, hard in zip(strategy.whitenings, state["hard"]):
            w.hard = hard
        strategy.forced = state["forced"]
        strategy.history_log[:] = state["history"]


class BWCPStrategy(TrainingStrategy):
    """BWCP: batch whitening and probabilistic channel masks, folded into plain convs."""

    name = "bwcp"
    chooses_widths = True
    settings_class = BWCPSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s = self.settings
        if self.budget.metric not in differentiable_metrics():
            raise ConfigError(f"bwcp's budget term needs a differentiable cost; a {self.budget.metric} budget is not one: "
                              f"use one of {', '.join(differentiable_metrics())}")
        if s.budget_loss not in BUDGET_LOSSES:
            raise ConfigError(f"bwcp budget_loss '{s.budget_loss}' is unknown; use one of: {', '.join(BUDGET_LOSSES.names())}")
        if not 0 <= s.hard_fraction < 1:
            raise ConfigError(f"bwcp hard_fraction is the share of the steps trained with fixed masks and must be in [0, 1), "
                              f"got {s.hard_fraction}")
        if s.sharpness < 1:
            raise ConfigError(f"bwcp sharpness is the final k of P' = sigmoid(k logit P) and must be at least 1, got {s.sharpness}")
        self.whitenings: list[Whitening] = []
        """One per pruned group: its first member's, whose mask the group shares."""
        self.groups: list[str] = []
        self.members: list[tuple[str, str, Whitening]] = []
        """(producing layer, its batch norm, the BWCP after it) of every member of every pruned group."""
        self.forced = False

    @property
    def hard_phase(self) -> bool:
        """Whether the final masks are fixed (the last ``hard_fraction`` of the training)."""
        return self.whitenings[0].hard is not None

    @property
    def all_whitenings(self) -> list[Whitening]:
        return [w for _, _, w in self.members]

    # ---- expected and final widths --------------------------------------------------------------
    def expected_cost_fraction(self) -> torch.Tensor:
        """The one cost model on the expected widths (sum of P over each pruned group), over the full network's."""
        kept: list[Any] = [float(g.channels) for g in self.space.groups]
        index = {g.name: i for i, g in enumerate(self.space.groups)}
        for group, w in zip(self.groups, self.whitenings):
            if w.probability is not None:
                kept[index[group]] = w.probability.sum()
        device = next((k.device for k in kept if isinstance(k, torch.Tensor)), torch.device("cpu"))
        tensor = torch.stack([k if isinstance(k, torch.Tensor) else torch.tensor(k, device=device) for k in kept]).float()
        return self.cost_model.from_kept(tensor)[self.budget.metric] / self.budget.base

    def widths_of(self, masks: list[torch.Tensor]) -> Candidate:
        return Candidate.make({g: float(m.sum()) / len(m) for g, m in zip(self.groups, masks)})

    def select_masks(self) -> None:
        """Hard masks: P > 0.5 (at least ``min_channels`` per group), then the lowest P globally
        removed until the budget is met (the budget deviation of the module docstring)."""
        floor = max(self.settings.min_channels, self.space.config.min_channels)
        probabilities = [w.probability.detach().cpu() for w in self.whitenings]
        masks = []
        for p in probabilities:
            mask = p > 0.5
            if int(mask.sum()) < floor:
                mask[torch.argsort(p, descending=True)[:floor]] = True
            masks.append(mask)
        ranking = sorted((float(p[c]), gi, c) for gi, p in enumerate(probabilities) for c in torch.nonzero(masks[gi]).flatten().tolist())
        for _, gi, c in ranking:
            if self.feasible(self.widths_of(masks)):
                break
            if int(masks[gi].sum()) > floor:
                masks[gi][c] = False
                self.forced = True
        for w, mask in zip(self.whitenings, masks):
            w.hard = mask.to(w.running_inverse_sqrt.device).float()

    # ---- the training-strategy hooks -----------------------------------------------------------
    def train(self, net: nn.Module, candidate: Candidate) -> list[FitHistory]:
        s = self.settings
        order = {layer.name: layer.order for layer in self.space.layers}
        for group in self.pruned_groups():
            features = [m.layer for m in self.space.feature_layers(self.space.group_by_name[group])]
            if not all(isinstance(net.get_submodule(f), nn.BatchNorm2d) for f in features):
                continue
            pairs = sorted(zip(self.producers(group), features), key=lambda pair: order[pair[1]])  # forward order
            leader = Whitening(net.get_submodule(pairs[0][1]), s)
            self.groups.append(group)
            self.whitenings.append(leader)
            self.members += [(producer, feature, leader if i == 0 else Whitening(net.get_submodule(feature), s, leader))
                             for i, (producer, feature) in enumerate(pairs)]
        if not self.groups:
            raise ConfigError(f"bwcp finds no {'' if s.groups == 'all' else 'internal '}group with a 2-D batch norm to whiten "
                              "in this network; use another strategy")
        recipe = Recipe(s.epochs, s.batch_size, s.lr, s.momentum, s.weight_decay, "cosine", steps_per_epoch=s.steps_per_epoch,
                        seed=self.seed)
        trainer = Trainer(net, self.context.data, self.device, recipe, [BWCPTraining(self)],
                          description=f"bwcp {self.budget.label}", validate=False, checkpoint=self.checkpoint_path())
        data = self.context.data
        batches = cached_batches(data.train, data, s.batch_size, self.device, max_samples=STATISTICS_SAMPLES, seed=self.seed,
                                 shuffle=True)
        try:
            history = trainer.fit()
            net.eval()
            with torch.no_grad():
                net(batches[0][0])  # P' from the running whitening, for the final selection
            if not self.hard_phase:  # (hard_fraction 0: no hard phase)
                self.select_masks()
            self.log_state(trainer)
        finally:
            for w in self.all_whitenings:
                w.remove()
        self.resumed_from = trainer.resumed_from
        for producer, feature, w in self.members:
            fold_matrix_(net, producer, feature, w.folded_matrix())
        give_batch_norms_statistics_(net, [feature for _, feature, _ in self.members], batches)
        return [history]

    def log_state(self, trainer: Trainer) -> None:
        """Log the masks and the P' they were chosen from: when they are fixed, and at the end."""
        masks = [w.hard for w in self.whitenings]
        probabilities = torch.cat([w.probability.detach().flatten() for w in self.whitenings])
        saturated = float(((probabilities < 1 - SATURATED) & (probabilities > SATURATED)).logical_not().float().mean())
        self.history_log.append({"step": trainer.step, "kept": int(sum(float(m.sum()) for m in masks)),
                                 "expected_cost_fraction": float(self.expected_cost_fraction().detach()),
                                 "cost_fraction": self.budget.cost_fraction(self.cost_model(self.widths_of(masks))),
                                 "saturated": saturated, "sharpness": self.whitenings[0].sharpness, "forced": self.forced})

    def kept_channels(self, net: nn.Module, candidate: Candidate) -> dict[str, torch.Tensor]:
        return {g: torch.nonzero(w.hard.cpu() > 0).flatten() for g, w in zip(self.groups, self.whitenings) if not bool(w.hard.all())}

    def final_widths(self, planned: Candidate) -> Candidate:
        return self.space.canonical(self.widths_of([w.hard for w in self.whitenings]))

    def bn_recalibration(self) -> bool | None:
        return False

    def training_report(self) -> dict[str, float]:
        chosen = self.history_log[0]  # when the masks were fixed
        return {"forced_mask": float(self.forced), "expected_cost_fraction": chosen["expected_cost_fraction"],
                "saturated_fraction": chosen["saturated"]}
