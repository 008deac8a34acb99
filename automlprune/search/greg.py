"""Growing regularization: GReg-1 and GReg-2 (Wang, Qin, Zhang, Fu, 'Neural Pruning via Growing
Regularization', ICLR 2021), after the official code (MingSun-Tse/Regularization-Pruning,
``pruner/reg_pruner.py``; ``../shared/references/training-time-methods.md`` section 3).

Both grow an L2 penalty on the filters chosen to go until they are negligible, then the
network is pruned physically and fine-tuned:

* The penalty is per filter: after ``backward()`` and before the optimizer step,
  ``W.grad[j] += reg[j] * W[j]`` on the producing conv's filter rows (not BN, not the reading
  layers), on top of the optimizer's weight decay (``_apply_reg``).
* **GReg-1**: the filters to go are picked once, on the trained network, by the smallest mean
  |w| (L1 / numel); every ``update_interval`` steps their ``reg += delta``.
* **GReg-2**: first every filter's ``reg += pick_delta`` every ``update_interval`` steps; when a
  group's ``reg`` reaches ``pick_ceiling`` its filters to go are picked by the same score, then
  theirs grows by ``delta`` and the kept ones are set to ``recover`` (a negative penalty).
* A group is done when its ``reg`` exceeds ``ceiling``; all are done when every group's
  magnitude ratio (mean score kept / mean score pruned, an EMA 0.9 / 0.1 updated with every
  growth) reaches ``mag_ratio_limit``. Then ``stabilize_steps`` more steps with the penalties
  fixed; training stops there.
* The learning rate is constant (``lr`` 1e-3, the official ``lr_prune``) throughout.

Defaults are the official CIFAR ones (K_u = 10, delta = 1e-4, ceiling 1, ratio 1000, K_s =
10,000; GReg-2: 1e-5 up to 1e-2, recover -1e-4). Choices of this implementation, stated:

* **Widths from the budget.** The official code takes per-stage ratios; here the budget, in
  any metric, becomes one keep ratio for the pruned groups by the cost model (``widths:
  uniform``), or PruneNet's allocation over every prunable group (``widths: prunenet``).
  ``groups: internal`` (default) prunes the groups with one producing conv (each residual
  block's first conv, as the official ResNet setting); ``groups: all`` (or PruneNet's widths)
  also penalizes every producer of residual groups.
* **Short training budgets.** The official schedule reaches its ceiling after ``ceiling /
  delta x update_interval`` = 100,000 steps. ``reg_steps`` (and ``pick_steps`` for GReg-2), when
  set, compress it k = 100,000 / reg_steps times while keeping its integrated penalty (the
  learning rate times the sum of ``reg`` over the phase, what shrinks the filters): growth
  ``delta x k^2``, ceiling ``ceiling x k``, recover ``recover x k``. ``max_epochs`` caps the whole
  run (if the cap comes first, the filters are removed as they are and ``spent["finished"]`` is 0).
* **Fine-tune.** The method's own 120-epoch fine-tune is not part of the search: ``compare``
  fine-tunes every answer identically (from these trained weights).
* Torch-Pruning's ``GrowingRegPruner`` is a different rule (spec 1.2-8) and is not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from automlprune.search.training import TrainingSettings, TrainingStrategy
from automlprune.space import Candidate
from automlprune.train import Callback, FitHistory, Recipe, Trainer


@dataclass(frozen=True)
class GRegSettings(TrainingSettings):
    """See the module docstring; steps are optimizer steps, penalties per unit of ||w||^2 / 2."""

    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    update_interval: int = 10
    delta: float = 1e-4
    ceiling: float = 1.0
    mag_ratio_limit: float = 1000.0
    stabilize_steps: int = 10_000
    max_epochs: int = 30
    reg_steps: int | None = None
    pick_delta: float = 1e-5
    pick_ceiling: float = 1e-2
    recover: float = -1e-4
    pick_steps: int | None = None

    def compression(self, steps: int | None, ceiling: float, delta: float) -> float:
        """k: how many times faster than the official schedule (``ceiling / delta x
        update_interval`` steps) a phase of ``steps`` steps grows its penalty (1 without ``steps``)."""
        return ceiling / delta * self.update_interval / steps if steps else 1.0

    @property
    def growth(self) -> float:
        """Penalty added to the filters to go every ``update_interval`` steps (delta x k^2)."""
        return self.delta * self.compression(self.reg_steps, self.ceiling, self.delta) ** 2

    @property
    def reg_ceiling(self) -> float:
        """The ceiling x k: the integrated penalty (lr x the sum of reg over the phase) stays the official one."""
        return self.ceiling * self.compression(self.reg_steps, self.ceiling, self.delta)

    @property
    def recover_reg(self) -> float:
        return self.recover * self.compression(self.reg_steps, self.ceiling, self.delta)

    @property
    def pick_growth(self) -> float:
        return self.pick_delta * self.compression(self.pick_steps, self.pick_ceiling, self.pick_delta) ** 2

    @property
    def pick_reg_ceiling(self) -> float:
        return self.pick_ceiling * self.compression(self.pick_steps, self.pick_ceiling, self.pick_delta)


class GrowingRegularization(Callback):
    """The penalty schedule of GReg-1 / GReg-2 as Trainer hooks (phases per group: ``pick`` ->
    ``grow`` -> done; then ``stabilize`` for all)."""

    def __init__(self, strategy: "GRegStrategy", rows: dict[str, list[tuple[nn.Module, torch.Tensor]]],
                 to_prune: dict[str, int]) -> None:
        self.strategy, self.s = strategy, strategy.settings
        self.rows, self.to_prune = rows, to_prune
        self.reg: dict[str, torch.Tensor] = {}
        self.pruned: dict[str, torch.Tensor | None] = {}
        self.phase: dict[str, str] = {}
        self.ratio_ema: dict[str, float] = {g: 0.0 for g in rows}
        self.stabilize_left: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"reg": self.reg, "pruned": self.pruned, "phase": self.phase, "ratio_ema": self.ratio_ema,
                "stabilize_left": self.stabilize_left, "log": list(self.strategy.history_log)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reg, self.pruned, self.phase = state["reg"], state["pruned"], state["phase"]
        self.ratio_ema, self.stabilize_left = state["ratio_ema"], state["stabilize_left"]
        self.strategy.history_log[:] = state["log"]

    def scores(self, group: str) -> torch.Tensor:
        """Mean |w| of each channel's filter (L1 / numel), averaged over the group's producers."""
        with torch.no_grad():
            return torch.stack([module.weight[rows].abs().flatten(1).mean(1) for module, rows in self.rows[group]]).mean(0)

    def pick(self, group: str) -> None:
        order = torch.argsort(self.scores(group), stable=True)
        mask = torch.zeros_like(self.reg[group], dtype=torch.bool)
        mask[order[: self.to_prune[group]]] = True
        self.pruned[group] = mask
        self.phase[group] = "grow"
        if self.strategy.variant == 2:
            self.reg[group][~mask] = self.s.recover_reg

    def on_start(self, trainer):
        for group, producers in self.rows.items():
            self.reg[group] = torch.zeros(len(producers[0][1]), device=trainer.device)
            self.pruned[group] = None
            self.phase[group] = "pick" if self.strategy.variant == 2 else "grow"
            if self.strategy.variant == 1:
                self.pick(group)

    def before_step(self, trainer):
        for group, producers in self.rows.items():
            reg = self.reg[group]
            for module, rows in producers:
                weight = module.weight
                shape = (-1,) + (1,) * (weight.dim() - 1)
                weight.grad.index_add_(0, rows, (reg.view(shape) * weight.detach()[rows]).to(weight.grad.dtype))

    def after_step(self, trainer):
        if self.stabilize_left is not None:
            self.stabilize_left -= 1
            return self.stabilize_left > 0
        if trainer.step % self.s.update_interval:
            return None
        for group in self.rows:
            self._update(group)
        ratios = [self.ratio_ema[g] for g in self.rows if self.pruned[g] is not None]
        all_ratios_high = len(ratios) == len(self.rows) and min(ratios) >= self.s.mag_ratio_limit
        if all(p == "done" for p in self.phase.values()) or all_ratios_high:
            self.stabilize_left = self.s.stabilize_steps
            self._log(trainer, "stabilize")
            return self.stabilize_left > 0
        if trainer.step % (10 * self.s.update_interval) == 0:
            self._log(trainer, "regularize")
        return None

    def _update(self, group: str) -> None:
        reg, phase = self.reg[group], self.phase[group]
        if phase == "pick":
            reg += self.s.pick_growth
            if reg.max() >= self.s.pick_reg_ceiling:
                self.pick(group)
            return
        if phase == "grow":
            reg[self.pruned[group]] += self.s.growth
            if reg.max() > self.s.reg_ceiling:
                self.phase[group] = "done"
        mask, scores = self.pruned[group], self.scores(group)
        if mask.any() and (~mask).any():
            ratio = float(scores[~mask].mean() / scores[mask].mean().clamp_min(1e-30))
            self.ratio_ema[group] = 0.9 * self.ratio_ema[group] + 0.1 * ratio

    def _log(self, trainer, phase: str) -> None:
        entry = {"step": trainer.step, "phase": phase, "max_reg": max(float(r.max()) for r in self.reg.values()),
                 "min_magnitude_ratio": min(self.ratio_ema.values()), "groups_done": sum(p == "done" for p in self.phase.values())}
        self.strategy.history_log.append(entry)
        trainer.log.update(max_reg=entry["max_reg"], magnitude_ratio=entry["min_magnitude_ratio"])


class GRegStrategy(TrainingStrategy):
    """GReg-1: growing L2 penalty on filters picked once by L1 (see the module docstring)."""

    ddp_refusal = None  # decisions from weights and gradients alone: every rank decides alike under --nproc

    name = "greg1"
    variant: ClassVar[int] = 1
    settings_class = GRegSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # option values checked by the base (SETTING_RANGES)
        self.regularizer: GrowingRegularization | None = None

    def train(self, net: nn.Module, candidate: Candidate) -> list[FitHistory]:
        s = self.settings
        kept = dict(zip([g.name for g in self.space.groups], self.space.kept_channels(candidate).tolist()))
        groups = [g for g in self.space.prunable if kept[g] < self.space.group_by_name[g].channels]  # what the widths shrink
        rows = {g: [(net.get_submodule(m.layer), torch.as_tensor(m.index_map[:, 0], device=self.device))
                    for m in self.space.group_by_name[g].members if m.layer in self.producers(g) and m.dim == "out"]
                for g in groups}
        self.regularizer = GrowingRegularization(self, rows, {g: self.space.group_by_name[g].channels - kept[g] for g in groups})
        recipe = Recipe(s.max_epochs, s.batch_size, s.lr, s.momentum, s.weight_decay, "constant", seed=self.seed)
        trainer = Trainer(net, self.context.data, self.device, recipe, [self.regularizer],
                          description=f"{self.name} {self.budget.label}", validate=False, checkpoint=self.checkpoint_path())
        history = trainer.fit()
        self.finished, self.resumed_from = trainer.stopped, trainer.resumed_from
        return [history]

    def kept_channels(self, net: nn.Module, candidate: Candidate) -> dict[str, torch.Tensor]:
        out = {}
        for group, mask in self.regularizer.pruned.items():
            if mask is None:  # GReg-2 ran out of steps before picking: pick by the current scores
                self.regularizer.pick(group)
                mask = self.regularizer.pruned[group]
            out[group] = torch.nonzero(~mask.cpu()).flatten()
        return out

    def training_report(self) -> dict[str, float]:
        return {"finished": float(self.finished)}


class GReg2Strategy(GRegStrategy):
    """GReg-2: a uniform growing penalty first reveals the filters to go, then GReg-1's rule."""

    name = "greg2"
    variant = 2
