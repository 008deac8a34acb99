"""Kernel pruning by information dropout: the "element-wise variational pruning via information
dropout" of Zhan, Lin and Cao's two-stage DRL compression (arXiv 1912.02254), built from
information dropout (Achille and Soatto, TPAMI 2018; official code ucla-vision/information-dropout,
``cifar.py``).

The paper's body is not available (``sparsity-methods-and-competitors.md`` A5), so this follows
the reference notes' reading (A5.2, A5.3): every layer the space lets take the ``kernel`` pattern
(:class:`~automlprune.sparsity.patterns.Kernel`) gets a learned noise scale per kernel (one output
channel reading one input channel), alpha = 0.001 + max_alpha x sigmoid(theta) (``max_alpha``
0.7 as in the official code), and trains with its kernels multiplied by log-normal noise,
W'[o, i] = W[o, i] x eps[o, i], eps ~ LogNormal(0, alpha[o, i]) (the official ``sample_lognormal``
with mean 0 and sigma alpha); the loss is CE + beta x sum over layers and kernels of
KL / N_train with KL = -log(alpha / (max_alpha + 0.001)) (the official log-uniform prior; beta 3.0
as there, N_train the training images). Noise is off at evaluation, and the evaluator's batch-norm
re-estimation is the official "dry run".

After ``epochs`` of this the kernels carrying the most noise carry the least information: every
kernel whose alpha has saturated (alpha >= ``saturation`` x max_alpha) is removed, and, where that
is not enough for the budget, more in decreasing order of alpha over all layers (one global
ranking; at least one kernel stays per layer) until the budget holds. Removed kernels become
exactly zero, the network retrains ``retrain_epochs`` with its masks fixed
(:class:`~automlprune.sparsity.masks.KeepSparse`), and it is proposed with each layer's kernel
density (the evaluator's magnitude criterion keeps exactly its nonzero kernels).

Deviations and choices, where the paper is unreadable or the official code differs:

* The official alpha is a function of the input (a convolution of the layer's input, noise on
  activations, one draw per sample); here alpha is a free parameter per weight kernel and one noise
  draw per kernel per step multiplies the weights (the notes' "learned per-kernel alpha"; pruning
  needs a noise level per kernel, not per input).
* alpha's logits step in their own Adam (``alpha_lr``, no weight decay), as soft movement's
  scores do here; weights use the Trainer's SGD (weight decay 5e-4, where the official CIFAR code
  uses 1e-3). Logits start at alpha = ``init_alpha``.
* The removal rule (saturated first, then the global alpha ranking down to the budget) is ours:
  the paper says kernels are pruned "variationally" but not how a FLOPs or size budget is met.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from automlprune.errors import ConfigError
from automlprune.search.training import TrainingSettings, TrainingStrategy
from automlprune.space import Candidate
from automlprune.sparsity.masks import KeepSparse, sparsify_
from automlprune.sparsity.patterns import Kernel
from automlprune.train import FitHistory, Recipe, Trainer
from automlprune.train.callbacks import SeparateAdam
from automlprune.train.trainer import Callback

FLOOR = 0.001
"""The official lower bound of alpha (and the prior's offset)."""


class KernelNoise(nn.Module):
    """A ``torch.nn.utils.parametrize`` parametrization of a conv weight (out, in, kh, kw): in
    training mode each kernel is multiplied by one log-normal draw exp(alpha x N(0, 1)); in eval
    mode the weight passes unchanged."""

    def __init__(self, weight: torch.Tensor, max_alpha: float, init_alpha: float) -> None:
        super().__init__()
        self.max_alpha = max_alpha
        start = (init_alpha - FLOOR) / max_alpha
        self.logits = nn.Parameter(torch.full(weight.shape[:2], math.log(start / (1 - start)), device=weight.device))

    def alpha(self) -> torch.Tensor:
        """The noise scale of each kernel, shape (out, in)."""
        return FLOOR + self.max_alpha * torch.sigmoid(self.logits)

    def kl(self) -> torch.Tensor:
        """The log-uniform prior's KL term, summed over the kernels."""
        return -torch.log(self.alpha() / (self.max_alpha + FLOOR)).sum()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return weight
        noise = torch.exp(self.alpha() * torch.randn_like(self.logits))
        return weight * noise[:, :, None, None]


class InformationDropout(Callback):
    """The variational phase of :class:`InformationDropoutStrategy` on the Trainer: noise on the
    layers' kernels, the KL term in the loss, alpha's logits in their own Adam; at the end the
    noise is removed (the weights as trained) and each layer's alphas are kept in :attr:`alphas`."""

    def __init__(self, layers: list[str], settings: "InformationDropoutSettings", train_size: int) -> None:
        self.layers, self.s, self.train_size = layers, settings, train_size
        self.noise: dict[str, KernelNoise] = {}
        self.alphas: dict[str, torch.Tensor] = {}
        self.adam = SeparateAdam(settings.alpha_lr)

    def on_start(self, trainer: Trainer) -> None:
        for layer in self.layers:
            module = trainer.model.get_submodule(layer)
            noise = KernelNoise(module.weight.detach(), self.s.max_alpha, self.s.init_alpha)
            parametrize.register_parametrization(module, "weight", noise)
            self.noise[layer] = noise

    def param_groups(self, trainer: Trainer, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self.adam.split(groups, [n.logits for n in self.noise.values()])

    def loss(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        kl = torch.stack([n.kl() for n in self.noise.values()]).sum()
        return loss + self.s.beta * kl / self.train_size

    def before_step(self, trainer: Trainer) -> None:
        self.adam.step()

    def after_step(self, trainer: Trainer) -> None:
        if trainer.step % 50 == 0:
            trainer.log.update(**self.figures())

    def figures(self) -> dict[str, float]:
        """Mean alpha and the fraction of kernels saturated, over all layers."""
        with torch.no_grad():
            alphas = torch.cat([n.alpha().reshape(-1) for n in self.noise.values()])
        return {"mean_alpha": float(alphas.mean()), "saturated": float((alphas >= self.s.saturation * self.s.max_alpha).float().mean())}

    def state_dict(self) -> dict[str, Any]:
        return self.adam.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.adam.load_state_dict(state)

    def on_end(self, trainer: Trainer) -> None:
        for layer, noise in self.noise.items():
            self.alphas[layer] = noise.alpha().detach().cpu()
            module = trainer.model.get_submodule(layer)
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)  # the weights, without noise


@dataclass(frozen=True)
class InformationDropoutSettings(TrainingSettings):
    """``epochs`` of variational training (SGD at ``lr``, cosine decay, ``momentum``,
    ``weight_decay``; alpha's logits in Adam at ``alpha_lr``), then ``retrain_epochs`` with the
    kernel masks fixed; ``beta``: the KL weight; ``max_alpha``: the largest noise scale;
    ``init_alpha``: the noise scale every kernel starts at; ``saturation``: the fraction of
    max_alpha at which a kernel counts as saturated (removed whatever the budget). ``groups`` and
    ``widths`` of the base do not apply (no channel is removed)."""

    epochs: int = 2
    retrain_epochs: int = 1
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    beta: float = 3.0
    max_alpha: float = 0.7
    alpha_lr: float = 0.01
    init_alpha: float = 0.05
    saturation: float = 0.9
    steps_per_epoch: int | None = None


class InformationDropoutStrategy(TrainingStrategy):
    """Kernel pruning by information dropout (see the module docstring)."""

    name = "information-dropout"
    settings_class = InformationDropoutSettings
    evaluation = {"weight_criterion": "magnitude"}
    option_ranges = {"beta": ((lambda v: v >= 0), "cannot be negative"), "max_alpha": ((lambda v: v > 0), "must be positive"),
                     "alpha_lr": ((lambda v: v > 0), "must be positive"),
                     "saturation": ((lambda v: 0 < v < 1), "must be in (0, 1)"),
                     "retrain_epochs": ((lambda v: v >= 0), "cannot be negative")}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s = self.settings
        if not FLOOR < s.init_alpha < FLOOR + s.max_alpha:
            raise ConfigError(f"information-dropout init_alpha must lie between {FLOOR} and {FLOOR} + max_alpha ({FLOOR + s.max_alpha:g})")
        self.layers = [l for l, options in self.space.layer_patterns.items() if any(isinstance(p, Kernel) for p in options)]
        """The layers whose kernels are pruned: those the space lets take the kernel pattern."""
        if not self.layers:
            raise ConfigError("information-dropout needs a space that offers the kernel pattern to convolutions with kernels "
                              "larger than 1 x 1 (e.g. --space kernel-sparse)")
        self.chosen: Candidate | None = None
        if not self.feasible(self._densities({l: 1 for l in self.layers})):
            raise ConfigError(f"information-dropout cannot meet {self.budget.label} even with one kernel left per layer; raise the budget")

    def widths(self) -> Candidate:
        return Candidate.make()

    def final_widths(self, planned: Candidate) -> Candidate:
        return self.chosen if self.chosen is not None else planned

    def _densities(self, kept: dict[str, int]) -> Candidate:
        kernels = {l: self._kernels(l) for l in self.layers}
        return Candidate.make(None, None, {l: kept[l] / kernels[l] for l in self.layers},
                              {l: "kernel" for l in self.layers if kept[l] < kernels[l]})

    def _kernels(self, layer: str) -> int:
        info = self.space.layer_by_name[layer]
        return int(info.out_channels * (info.in_channels // info.groups))

    def train(self, net: nn.Module, candidate: Candidate) -> list[FitHistory]:
        s = self.settings
        recipe = Recipe(s.epochs, s.batch_size, s.lr, s.momentum, s.weight_decay, "cosine", steps_per_epoch=s.steps_per_epoch, seed=self.seed)
        callback = InformationDropout(self.layers, s, len(self.context.data.train))
        trainer = Trainer(net, self.context.data, self.device, recipe, [callback], description=f"{self.name} {self.budget.label}",
                          validate=False, checkpoint=self.checkpoint_path())
        histories = [trainer.fit()]
        self.resumed_from = trainer.resumed_from
        masks = self.removal(callback.alphas)
        self.chosen = self._densities({l: int(m.sum()) for l, m in masks.items()})
        sparsity = {l: (Kernel(), self.chosen.density_map[l]) for l in self.layers if l in self.chosen.density_map}
        sparsify_(net, sparsity, {l: masks[l].float()[:, :, None, None].expand_as(net.get_submodule(l).weight) for l in sparsity})
        self.history_log.append({"variational": callback.figures(), "kept_kernels": {l: int(m.sum()) for l, m in masks.items()},
                                 "kernels": {l: int(m.numel()) for l, m in masks.items()}})
        if s.retrain_epochs and sparsity:
            recipe = Recipe(s.retrain_epochs, s.batch_size, s.lr, s.momentum, s.weight_decay, "cosine",
                            steps_per_epoch=s.steps_per_epoch, seed=self.seed + 1)
            histories.append(Trainer(net, self.context.data, self.device, recipe, [KeepSparse()], validate=False,
                                     description=f"{self.name} retrain {self.budget.label}").fit())
        return histories

    def removal(self, alphas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per layer, the boolean (out, in) mask of kept kernels: saturated kernels removed, then
        more in decreasing alpha over all layers until the budget holds (at least one per layer)."""
        s = self.settings
        order = torch.cat([a.reshape(-1) for a in alphas.values()]).sort(descending=True).values

        def keep_below(threshold: float) -> dict[str, torch.Tensor]:
            out = {}
            for layer, a in alphas.items():
                mask = a < threshold
                if not mask.any():
                    mask.view(-1)[a.reshape(-1).argmin()] = True
                out[layer] = mask
            return out

        def fits(removed: int) -> bool:
            threshold = float(order[removed - 1]) if removed else math.inf
            return self.feasible(self._densities({l: int(m.sum()) for l, m in keep_below(threshold).items()}))

        saturated = int((order >= s.saturation * s.max_alpha).sum())
        removed = saturated
        if not fits(removed):  # more, by bisection on the count removed (fewer kept costs less)
            low, high = saturated, order.numel()
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (low, middle) if fits(middle) else (middle, high)
            removed = high
        return keep_below(float(order[removed - 1]) if removed else math.inf)

    def kept_channels(self, net: nn.Module, candidate: Candidate) -> dict[str, torch.Tensor]:
        return {}

    def training_report(self) -> dict[str, float]:
        entry = next((e for e in self.history_log if "kept_kernels" in e), None)
        if entry is None:
            return {}
        kept, total = sum(entry["kept_kernels"].values()), sum(entry["kernels"].values())
        return {"kernels_kept": float(kept), "kernel_density": kept / max(total, 1), **entry["variational"]}
