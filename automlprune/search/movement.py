"""Movement pruning (Sanh, Wolf and Rush, NeurIPS 2020) for CNN weights: hard top-k and soft
(sigmoid-threshold) movement.

Each sparsified layer gets a score per weight, S (zeros at the start). The layer computes with
W' = M ⊙ W, M the top-k mask of S (k = the layer's current kept count), and the mask's
gradient passes straight through to S (``TopKBinarizer`` of the official code,
huggingface/transformers ``examples/research_projects/movement-pruning``), so
dL/dS = dL/dW' ⊙ W: weights moving away from zero gain score. The kept fraction follows the
official cubic schedule (``schedule_threshold``): 1.0 for the first ``warmup`` of the steps,
then d + (1 - d)(1 - progress)^3 down to the layer's final density d, reached ``cooldown``
before the end and held. At the end the masks are applied (removed weights become exactly zero)
and the trained network is proposed with its densities; the evaluator keeps its nonzero weights
(``weight_criterion`` magnitude: the top-k by |w| of a layer with k nonzero weights is exactly them).

Soft movement (``--option method=soft``, the official ``sigmoied_threshold``): the mask is
sigmoid(S) > tau (the ``ThresholdBinarizer``, straight-through; when fewer than
int(0.005 x weights) + 1 weights pass, that many top scores are kept instead), tau follows the same
cubic schedule from 0 to ``final_threshold`` (0.1 in the official recipe), and the loss gains
lambda_t x mean over layers of sum(sigmoid(S)) / weights with lambda_t = ``final_lambda`` x tau_t /
``final_threshold`` (the official ``regularization(model, "l1")``; 400 in the recipe). Soft
movement does not reach a given density by itself, so (our choice, the projection the
reference notes suggest) for the ``cooldown`` steps its masks become the hard top-k of the learned
scores at the layer's budget density, and the network trains on the mask it is judged with.
How sparse soft movement gets before that is set by ``final_lambda`` and by how far the scores
can move: the official recipe runs about 55,000 steps at ``scores_lr`` 1e-2; in a fine-tune of a
few hundred steps raise ``scores_lr`` (on digits, 4 epochs at batch 32: 1e-2 leaves every weight
above the threshold, 1e-1 with lambda 400 thresholds down to about 2 % before the projection).

Choices of this implementation, where the official code (for BERT) leaves them open or differs:

* The final densities are one density for every layer the space sparsifies (unstructured), the
  largest that meets the budget; the official code uses one threshold for all layers too (or a
  global top-k).
* Hard top-k updates the scores by plain SGD at ``scores_lr`` without momentum or weight decay
  by default, the literal accumulation S = -lr Σ dL/dW' ⊙ W of the paper's analysis; the official
  script updates them with AdamW (lr 1e-2, no weight decay on scores) in the weights' optimizer,
  which ``--option scores_optimizer=adam`` follows (Adam at ``scores_lr``). Soft movement uses
  Adam by default: under plain SGD its L1 pull, divided by the layer's weight count, is too
  weak to sparsify anything. Weights use the Trainer's SGD.
* Unstructured masks only (the mask is the top-k of S over the whole layer); channels and bits
  are left as they are (a sparsity-only method).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from automlprune.errors import ConfigError
from automlprune.search.training import TrainingSettings, TrainingStrategy
from automlprune.space import Candidate
from automlprune.sparsity.patterns import Unstructured
from automlprune.train import FitHistory, Recipe, Trainer
from automlprune.train.callbacks import SeparateAdam, without
from automlprune.train.trainer import Callback


class TopK(torch.autograd.Function):
    """The mask of the ``kept`` largest scores; the gradient passes straight through."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, kept: int) -> torch.Tensor:
        mask = torch.zeros_like(scores)
        mask.view(-1)[torch.topk(scores.reshape(-1), kept, sorted=False).indices] = 1.0
        return mask

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class Threshold(torch.autograd.Function):
    """The official ``ThresholdBinarizer``: sigmoid(scores) > ``threshold``, or the ``floor`` top
    scores when fewer pass; the gradient passes straight through."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, threshold: float, floor: int) -> torch.Tensor:
        mask = (torch.sigmoid(scores) > threshold).to(scores.dtype)
        if int(mask.sum()) < floor:
            return TopK.forward(ctx, scores, floor)
        return mask

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad, None, None


class MovementMask(nn.Module):
    """A ``torch.nn.utils.parametrize`` parametrization: the layer sees ``TopK(scores) ⊙ weight``
    (``kept`` of them), or with ``threshold`` set the soft mask ``Threshold(scores) ⊙ weight``."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.scores = nn.Parameter(torch.zeros_like(weight))
        self.kept = weight.numel()
        self.threshold: float | None = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.threshold is not None:
            return weight * Threshold.apply(self.scores, self.threshold, int(0.005 * weight.numel()) + 1)
        if self.kept >= weight.numel():
            return weight
        return weight * TopK.apply(self.scores, self.kept)

    def density(self) -> float:
        """The fraction of weights the current mask keeps."""
        if self.threshold is None:
            return self.kept / self.scores.numel()
        return float((torch.sigmoid(self.scores) > self.threshold).float().mean())


def cubic_density(step: int, total: int, final: float, warmup: float, cooldown: float) -> float:
    """The kept fraction at ``step`` of ``total``: 1 during the first ``warmup`` fraction of the
    steps, then final + (1 - final)(1 - progress)^3, reaching ``final`` when the last
    ``cooldown`` fraction begins (the official ``schedule_threshold``, as a fraction kept)."""
    start, end = warmup * total, (1.0 - cooldown) * total
    if step <= start:
        return 1.0
    if step >= end:
        return final
    return final + (1.0 - final) * (1.0 - (step - start) / max(end - start, 1e-9)) ** 3


class MovementPruning(Callback):
    """The training side of :class:`MovementStrategy`: parametrizes the layers, gives the scores
    their own optimizer group, moves every layer's kept count along the cubic schedule, and at
    the end folds the final masks into the weights."""

    def __init__(self, densities: dict[str, float], settings: "MovementSettings") -> None:
        self.densities, self.s = densities, settings
        self.masks: dict[str, MovementMask] = {}
        self.soft = settings.method == "soft"
        self.lam = 0.0  # soft movement's current L1 strength
        self.adam = SeparateAdam(settings.scores_lr) if settings.scores_optimizer_for() == "adam" else None

    def on_start(self, trainer: Trainer) -> None:
        for layer in self.densities:
            module = trainer.model.get_submodule(layer)
            mask = MovementMask(module.weight.detach())
            parametrize.register_parametrization(module, "weight", mask)
            self.masks[layer] = mask
        self._schedule(trainer)

    def param_groups(self, trainer: Trainer, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        scores = [m.scores for m in self.masks.values()]
        if self.adam is not None:  # the scores step in their own Adam (before_step)
            return self.adam.split(groups, scores)
        return without(groups, scores) + [{"params": scores, "lr": self.s.scores_lr, "momentum": 0.0, "weight_decay": 0.0, "nesterov": False}]

    def _schedule(self, trainer: Trainer) -> None:
        cooling = trainer.step >= (1.0 - self.s.cooldown) * trainer.total_steps
        for layer, mask in self.masks.items():
            if self.soft and not cooling:
                progress = cubic_density(trainer.step, trainer.total_steps, 0.0, self.s.warmup, self.s.cooldown)
                mask.threshold = self.s.final_threshold * (1.0 - progress)
                self.lam = self.s.final_lambda * (1.0 - progress)
                continue
            final = self.densities[layer]
            fraction = final if self.soft else cubic_density(trainer.step, trainer.total_steps, final, self.s.warmup, self.s.cooldown)
            mask.threshold, mask.kept = None, max(1, round(fraction * mask.scores.numel()))
        if self.soft and cooling:
            self.lam = 0.0

    def loss(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        if not self.soft or self.lam == 0.0:
            return loss
        regularization = torch.stack([torch.sigmoid(m.scores).sum() / m.scores.numel() for m in self.masks.values()]).mean()
        return loss + self.lam * regularization

    def before_step(self, trainer: Trainer) -> None:
        if self.adam is not None:
            self.adam.step()

    def after_step(self, trainer: Trainer) -> None:
        self._schedule(trainer)
        if trainer.step % 50 == 0:
            sizes = [m.scores.numel() for m in self.masks.values()]
            trainer.log.update(density=sum(m.density() * n for m, n in zip(self.masks.values(), sizes)) / sum(sizes))

    def state_dict(self) -> dict[str, Any]:
        return self.adam.state_dict() if self.adam is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.adam is not None:
            self.adam.load_state_dict(state)

    def on_end(self, trainer: Trainer) -> None:
        for layer, mask in self.masks.items():
            mask.threshold, mask.kept = None, max(1, round(self.densities[layer] * mask.scores.numel()))  # the final masks
            module = trainer.model.get_submodule(layer)
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


@dataclass(frozen=True)
class MovementSettings(TrainingSettings):
    """epochs of SGD at ``lr`` (cosine decay, ``momentum``, ``weight_decay`` on the weights);
    ``scores_lr``: the scores' learning rate; ``warmup`` / ``cooldown``: fractions of the steps
    before the schedule starts and after it reaches the final densities; ``method``: ``topk``
    (hard movement) or ``soft``; ``final_threshold`` / ``final_lambda``: soft movement's final
    sigmoid threshold and L1 strength; ``scores_optimizer``: ``sgd`` or ``adam`` (unset: SGD for
    top-k, Adam for soft, see the module docstring). ``groups`` and ``widths`` of the base do
    not apply (no channel is removed)."""

    epochs: int = 2
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scores_lr: float = 0.01
    warmup: float = 0.1
    cooldown: float = 0.2
    steps_per_epoch: int | None = None
    method: str = "topk"
    final_threshold: float = 0.1
    final_lambda: float = 400.0
    scores_optimizer: str | None = None

    def scores_optimizer_for(self) -> str:
        """The optimizer the scores use: the one set, else SGD for top-k and Adam for soft."""
        return self.scores_optimizer or ("adam" if self.method == "soft" else "sgd")


class MovementStrategy(TrainingStrategy):
    """Movement pruning (see the module docstring)."""

    name = "movement"
    settings_class = MovementSettings
    evaluation = {"weight_criterion": "magnitude"}
    option_ranges = {"warmup": ((lambda v: 0 <= v < 1), "must be in [0, 1)"), "cooldown": ((lambda v: 0 <= v < 1), "must be in [0, 1)"),
                     "method": ((lambda v: v in ("topk", "soft")), "must be topk or soft"),
                     "scores_optimizer": ((lambda v: v in ("sgd", "adam")), "must be sgd or adam"),
                     "final_threshold": ((lambda v: 0 < v < 1), "must be in (0, 1)"),
                     "final_lambda": ((lambda v: v >= 0), "must be at least 0")}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.settings.warmup + self.settings.cooldown >= 1:
            raise ConfigError("movement warmup + cooldown must leave some steps for the schedule (their sum below 1)")
        if self.settings.method == "soft" and self.settings.cooldown <= 0:
            raise ConfigError("soft movement meets its budget in the cooldown (the hard top-k of its scores); give it cooldown > 0")
        self.layers = [l for l, options in self.space.layer_patterns.items() if any(p.name == "unstructured" for p in options)]
        """The layers movement sparsifies: those the space lets take unstructured densities."""
        if not self.layers:
            raise ConfigError("movement pruning needs a space that searches unstructured weight densities (e.g. --space sparse)")

    def widths(self) -> Candidate:
        """Every channel kept; one unstructured density for the sparsified layers, the largest
        that meets the budget (bisection on the cost model)."""
        return self.uniform_density(self.layers, Unstructured())

    def train(self, net: nn.Module, candidate: Candidate) -> list[FitHistory]:
        s = self.settings
        densities = {layer: candidate.density_map.get(layer, 1.0) for layer in self.layers}
        recipe = Recipe(s.epochs, s.batch_size, s.lr, s.momentum, s.weight_decay, "cosine", steps_per_epoch=s.steps_per_epoch,
                        seed=self.seed)
        callback = MovementPruning(densities, s)
        trainer = Trainer(net, self.context.data, self.device, recipe, [callback], description=f"{self.name} {self.budget.label}",
                          validate=False, checkpoint=self.checkpoint_path())
        history = trainer.fit()
        self.resumed_from = trainer.resumed_from
        self.history_log.append({"final_density": {l: float((net.get_submodule(l).weight != 0).float().mean()) for l in densities}})
        return [history]

    def kept_channels(self, net: nn.Module, candidate: Candidate) -> dict[str, torch.Tensor]:
        return {}
