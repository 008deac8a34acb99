"""ResRep (Ding et al., 'ResRep: Lossless CNN Pruning via Decoupling Remembering and
Forgetting', ICCV 2021), after the official code (DingXiaoH/ResRep, ``rr/``;
``../shared/references/training-time-methods.md`` section 2).

1. **Reparametrize.** Each pruned group (``groups: internal``: the groups with one producing
   layer, each residual block's first conv, as the paper prunes) gets a *compactor*: a C x C
   matrix Q, identity at start, applied to the group's feature map right after its batch norm
   (conv -> BN -> compactor -> ReLU; a forward hook, the network's modules are untouched).
2. **Train** (one :class:`~automlprune.train.Trainer` run, cosine learning rate to zero, SGD
   without Nesterov): after ``backward()`` the compactors' objective gradient of masked rows is
   reset to zero, then the group-lasso gradient ``lasso * Q_i / ||Q_i||`` is added to every row
   (``resrep_train.py::train_one_step``). Compactors train at momentum 0.99 without weight decay;
   biases at twice the learning rate, and biases and batch norms without weight decay.
3. **Masks.** Every ``mask_interval`` steps after ``before_mask_steps``, the mask is recomputed
   from the full widths (``resrep_util.py::resrep_mask_model``): all compactor rows ranked by
   their L2 norm, the smallest deactivated one by one (at least one channel per group stays)
   until the network meets the budget by the one cost model (any metric), or until the mask
   has grown by ``granularity`` (4) channels over the current one while the network is still
   over budget.
4. **Fold.** BN fused into its conv (with the BN's own eps), the compactor folded into the conv's filters:
   the conv holds ``Q (gamma / sigma) W`` and its batch norm becomes the identity plus the folded
   bias (``fold_compactors_``), so the network keeps its architecture and computes what the
   reparametrized one did (tested within 1e-4). The official code stops here (convs with bias, no
   BN). Here the batch norm is then given real statistics of the folded conv's output on training
   batches (running mean mu, variance s^2) with gamma = sqrt(s^2 + eps) and beta = mu + bias, the
   same function in eval mode, so that a later fine-tune (batch statistics in train mode) starts
   from the trained function instead of a renormalized one. The proposal still turns BN
   re-estimation off, so the evaluation is of exactly this function.

Choices of this implementation, stated:

* **Removal by mask.** The official conversion removes rows whose norm is below 1e-5; here the
  masked rows are removed, so the answer meets the budget by construction. The two agree when
  training was long enough for masked rows to decay; the largest removed row norm is recorded
  as ``spent["max_removed_row_norm"]``. If training ends before the mask meets the budget (too
  few mask updates for ``granularity``), a last selection without the granularity limit is made
  and ``spent["forced_mask"]`` is 1.
* **Budget.** Any budget metric, through the cost model (the official code uses its own FLOPs
  formula with a projection-conv quirk).
* **Fine-tune.** None inside the method (the official reports the converted network as is);
  ``compare`` fine-tunes every answer identically.
* Spaces with ``round_to`` > 1 are refused (masks remove single channels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from automlprune.data import cached_batches
from automlprune.errors import ConfigError
from automlprune.nn.hooks import run_reading_inputs
from automlprune.search.training import TrainingSettings, TrainingStrategy
from automlprune.space import Candidate
from automlprune.train import Callback, FitHistory, Recipe, Trainer

LASSO_EPS = 1e-12
STATISTICS_SAMPLES = 1024
"""Training images whose folded-conv outputs give the folded batch norms their statistics."""


@dataclass(frozen=True)
class ResRepSettings(TrainingSettings):
    """Official ResNet-56 defaults, scaled by the task's YAML (epochs, steps): see the module docstring."""

    batch_size: int = 64
    epochs: int = 480
    steps_per_epoch: int | None = None
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lasso: float = 1e-4
    compactor_momentum: float = 0.99
    mask_interval: int = 200
    before_mask_steps: int = 3906
    granularity: int = 4
    min_channels: int = 1


class Compactors(nn.Module):
    """One compactor (C x C, identity at start) per pruned group, applied by forward hooks to the
    output of the group's feature layer (its batch norm, or its producer without one)."""

    def __init__(self, model: nn.Module, space: Any, groups: list[str]) -> None:
        super().__init__()
        self.groups = groups
        self.weights = nn.ParameterList([nn.Parameter(torch.eye(space.group_by_name[g].channels)) for g in groups])
        self.masks = [torch.ones(space.group_by_name[g].channels, dtype=torch.bool) for g in groups]
        self.feature_layers = [space.feature_layers(space.group_by_name[g])[0].layer for g in groups]
        self.handles = [model.get_submodule(name).register_forward_hook(self._hook(i))
                        for i, name in enumerate(self.feature_layers)]

    def _hook(self, i: int):
        def fn(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            q = self.weights[i]
            return F.conv2d(output, q[:, :, None, None]) if output.dim() == 4 else F.linear(output, q)
        return fn

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def row_norms(self) -> list[torch.Tensor]:
        with torch.no_grad():
            return [q.norm(dim=1) for q in self.weights]


class ResRepTraining(Callback):
    """ResRep's optimizer groups, gradient resetting with the lasso gradient, and mask updates."""

    def __init__(self, strategy: "ResRepStrategy", compactors: Compactors) -> None:
        self.strategy, self.s, self.compactors = strategy, strategy.settings, compactors

    def on_start(self, trainer):
        self.compactors.to(trainer.device)
        self.compactors.masks = [m.to(trainer.device) for m in self.compactors.masks]

    def param_groups(self, trainer, groups):
        weights, biases, norms = [], [], []
        for module in trainer.model.modules():
            for name, p in module.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    norms.append(p)
                elif name == "bias":
                    biases.append(p)
                else:
                    weights.append(p)
        s = self.s
        return [{"params": weights}, {"params": biases, "lr": 2 * s.lr, "weight_decay": 0.0},
                {"params": norms, "weight_decay": 0.0},
                {"params": list(self.compactors.parameters()), "momentum": s.compactor_momentum, "weight_decay": 0.0}]

    def state_dict(self) -> dict[str, Any]:
        return {"compactors": self.compactors.state_dict(), "masks": self.compactors.masks,
                "log": list(self.strategy.history_log)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.compactors.load_state_dict(state["compactors"])
        self.compactors.masks = state["masks"]
        self.strategy.history_log[:] = state["log"]

    def before_step(self, trainer):
        for q, mask in zip(self.compactors.weights, self.compactors.masks):
            if q.grad is None:
                continue
            q.grad.mul_(mask[:, None].to(q.grad.dtype))  # reset the objective gradient of masked rows
            norms = q.detach().pow(2).sum(dim=1, keepdim=True).clamp_min(LASSO_EPS).rsqrt()
            q.grad.add_(q.detach() * norms, alpha=self.s.lasso)  # group lasso on every row

    def after_step(self, trainer):
        if trainer.step > self.s.before_mask_steps and trainer.step % self.s.mask_interval == 0:
            self.strategy.update_masks(limit=True)
            if trainer.step % (5 * self.s.mask_interval) == 0:
                self.strategy.log_state(trainer)
        return None


class ResRepStrategy(TrainingStrategy):
    """ResRep: compactors trained with gradient resetting and a group lasso, masks chosen under
    the budget, folded back into plain convs (see the module docstring)."""

    ddp_refusal = None  # decisions from weights and gradients alone: every rank decides alike under --nproc

    name = "resrep"
    chooses_widths = True
    settings_class = ResRepSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s = self.settings
        if s.groups != "internal":
            raise ConfigError("resrep prunes internal groups only (one producing layer each); drop --option groups")
        self.compactors: Compactors | None = None
        self.forced = False

    # ---- masks ------------------------------------------------------------------------------------
    def widths_of(self, masks: list[torch.Tensor]) -> Candidate:
        channels = [self.space.group_by_name[g].channels for g in self.compactors.groups]
        return Candidate.make({g: int(m.sum()) / c for g, m, c in zip(self.compactors.groups, masks, channels)})

    def update_masks(self, limit: bool) -> None:
        """Recompute the masks from the full widths (see the module docstring, step 3)."""
        comp = self.compactors
        norms = comp.row_norms()
        current_off = sum(int((~m).sum()) for m in comp.masks)
        over = not self.feasible(self.widths_of(comp.masks))
        cap = current_off + self.settings.granularity if (limit and over) else None
        ranking = sorted((float(v), gi, ci) for gi, n in enumerate(norms) for ci, v in enumerate(n.tolist()))
        masks = [torch.ones_like(m) for m in comp.masks]
        kept = [len(m) for m in masks]
        floor = max(self.settings.min_channels, self.space.config.min_channels)
        off = 0
        for _, gi, ci in ranking:
            if self.feasible(self.widths_of(masks)) or (cap is not None and off >= cap):
                break
            if kept[gi] <= floor:
                continue
            masks[gi][ci] = False
            kept[gi] -= 1
            off += 1
        comp.masks = masks

    def log_state(self, trainer) -> None:
        comp = self.compactors
        costs = self.cost_model(self.widths_of(comp.masks))
        entry = {"step": trainer.step, "masked": sum(int((~m).sum()) for m in comp.masks),
                 "cost_fraction": self.budget.cost_fraction(costs),
                 "max_masked_row_norm": max((float(n[~m].max()) for n, m in zip(comp.row_norms(), comp.masks) if (~m).any()),
                                            default=0.0)}
        self.history_log.append(entry)
        trainer.log.update(masked=entry["masked"], cost=entry["cost_fraction"], masked_norm=entry["max_masked_row_norm"])

    # ---- the training-strategy hooks (the planned uniform widths only check the budget is reachable) ----
    def train(self, net: nn.Module, candidate: Candidate) -> list[FitHistory]:
        s = self.settings
        self.compactors = Compactors(net, self.space, [g for g in self.pruned_groups()])
        recipe = Recipe(s.epochs, s.batch_size, s.lr, s.momentum, s.weight_decay, "cosine", steps_per_epoch=s.steps_per_epoch,
                        seed=self.seed, nesterov=False)
        trainer = Trainer(net, self.context.data, self.device, recipe, [ResRepTraining(self, self.compactors)],
                          description=f"resrep {self.budget.label}", validate=False, checkpoint=self.checkpoint_path())
        try:
            history = trainer.fit()
        finally:
            self.compactors.remove()
        self.resumed_from = trainer.resumed_from
        if not self.feasible(self.widths_of(self.compactors.masks)):
            self.update_masks(limit=False)
            self.forced = True
        self.log_state(trainer)
        comp = self.compactors
        fold_compactors_(net, self.space, comp.groups, list(comp.weights), comp.feature_layers)
        data = self.context.data
        batches = cached_batches(data.train, data, s.batch_size, self.device, max_samples=STATISTICS_SAMPLES, seed=self.seed,
                                 shuffle=True)
        give_batch_norms_statistics_(net, self.compactors.feature_layers, batches)
        return [history]

    def kept_channels(self, net: nn.Module, candidate: Candidate) -> dict[str, torch.Tensor]:
        return {g: torch.nonzero(m.cpu()).flatten() for g, m in zip(self.compactors.groups, self.compactors.masks) if not m.all()}

    def final_widths(self, planned: Candidate) -> Candidate:
        return self.widths_of(self.compactors.masks)

    def bn_recalibration(self) -> bool | None:
        return False

    def training_report(self) -> dict[str, float]:
        return {"forced_mask": float(self.forced), "max_removed_row_norm": self.history_log[-1]["max_masked_row_norm"]}


@torch.no_grad()
def fold_compactors_(model: nn.Module, space: Any, groups: list[str], matrices: list[torch.Tensor], feature_layers: list[str]) -> None:
    """In place: fuse each group's C x C matrix (a compactor, or BWCP's masked whitening), applied
    after its feature layer (the batch norm, if any, fused first), into the producing layer; the
    batch norm becomes the identity plus the folded bias (the architecture is unchanged)."""
    for group, q, feature in zip(groups, matrices, feature_layers):
        producer = next(m.layer for m in space.group_by_name[group].members
                        if m.dim == "out" and space.layer_by_name[m.layer].has_weights)
        fold_matrix_(model, producer, feature, q)


@torch.no_grad()
def fold_matrix_(model: nn.Module, producer: str, feature: str, q: torch.Tensor) -> None:
    """In place: fuse the C x C matrix ``q``, applied after ``feature`` (``producer``'s batch norm,
    fused first, or ``producer`` itself), into ``producer`` (see :func:`fold_compactors_`)."""
    conv, norm = model.get_submodule(producer), model.get_submodule(feature)
    q = q.detach().to(conv.weight.dtype)
    weight = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros(weight.shape[0], device=weight.device)
    if norm is not conv:  # fuse the batch norm first
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
        bias = norm.bias + (bias - norm.running_mean) * scale
    weight = torch.einsum("oc,c...->o...", q, weight)
    bias = q @ bias
    conv.weight.copy_(weight)
    if norm is conv:
        if conv.bias is not None:  # a bias-less layer without batch norm has nothing to fold: Q @ 0
            conv.bias.copy_(bias)
        return
    if conv.bias is not None:
        conv.bias.zero_()
    norm.weight.fill_(1.0)
    norm.bias.copy_(bias)
    norm.running_mean.zero_()
    norm.running_var.fill_(1.0 - norm.eps)


@torch.no_grad()
def give_batch_norms_statistics_(model: nn.Module, layers: list[str], batches: list) -> None:
    """For each identity-plus-bias batch norm in ``layers`` (as :func:`fold_compactors_` leaves
    them): running mean and variance from its inputs over ``batches``, gamma = sqrt(var + eps),
    beta = mean + bias; the function in eval mode is unchanged."""
    norms = {name: model.get_submodule(name) for name in layers
             if isinstance(model.get_submodule(name), nn.modules.batchnorm._BatchNorm)}
    sums: dict[str, list] = {}

    def read(name: str, x: torch.Tensor) -> None:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1).double()
        total = sums.setdefault(name, [0.0, 0.0, 0])
        total[0] = total[0] + flat.sum(1)
        total[1] = total[1] + flat.pow(2).sum(1)
        total[2] += flat.shape[1]

    run_reading_inputs(model, norms, batches, read)
    for name, norm in norms.items():
        first, second, count = sums[name]
        mean = first / count
        var = (second / count - mean.pow(2)).clamp_min(0)
        bias = norm.bias.detach().double()
        norm.running_mean.copy_(mean)
        norm.running_var.copy_(var)
        norm.weight.copy_(torch.sqrt(var + norm.eps))
        norm.bias.copy_(mean + bias)
