"""Gate Decorator (You, Yan, Ye, Ma, Wang, 'Gate Decorator: Global Filter Pruning Method for
Accelerating Deep Convolutional Neural Networks', NeurIPS 2019), after the official code
(youzhonghui/gate-decorator-pruning, ``prune/universal.py`` and the ResNet-56 notebooks;
``../shared/references/training-time-methods.md`` section 6).

1. **Gates.** Every batch norm producing a prunable group's channels gets a gate g (forward
   hook: ``y = BN(x) * g * mask``), made function-preserving as ``extract_from_bn`` does:
   ``beta <- clamp(beta / gamma, -10, 10)``, ``g <- gamma``, ``gamma <- 1`` (frozen). A group's
   channels are one mask shared by all its batch norms (the official "group pruning" across
   residual adds is exactly the space's channel groups). A group produced by a layer without
   batch norm is gated on that layer's output (g starts at 1).
2. **Tock** first, then every ``tock_every`` Ticks: ``tock_epochs`` of full training with loss
   CE + ``sparse_lambda`` x sum |g| and a triangular learning rate ``lr_min`` -> ``lr_max`` -> ``lr_min``.
3. **Tick**: convolutions frozen (gates, BN betas and linear layers train), learning rate ``lr_min``, one pass over the
   training split (``tick_steps`` caps it); every mini-batch adds |g * dL/dg| to each channel's
   score (Taylor on gates, reset every Tick; not :mod:`automlprune.importance`'s ``taylor``).
4. **Prune** after each Tick: ``int(p x remaining)`` channels (each batch norm's channel counted,
   as the code does) go by a global ranking of group-summed scores; each gate keeps its top
   ``max(1, int(0.1 C))`` channels; masks only shrink. Stop once the masked network meets the
   budget by the one cost model (any metric).
5. **Melt.** The gates go into the batch norms (``gamma' = g * mask``, ``beta' = beta * g * mask``,
   statistics kept), so BN re-estimation stays valid; the masked channels output zero and are
   the ones removed.

Choices of this implementation, stated:

* Each Tick and Tock is one Trainer run with its own SGD (momentum 0.9, weight decay 5e-4, no
  Nesterov): momentum buffers restart at every phase (the code keeps one optimizer). The run's
  checkpoint is written after every phase (network, gates, masks, counters), so an interrupted
  search resumes after its last finished Tick or Tock and computes what an uninterrupted one does.
* ``p`` (0.002 in the ResNet-56 notebook) and the epochs are options scaled per task; the
  method's own fine-tune (triangular 1e-3 -> 1e-2, momentum 0) runs with ``finetune_epochs`` > 0
  (default 0: ``compare`` fine-tunes every answer identically), masked channels kept at zero.
* ``groups: all`` (default here): every prunable group, residual ones included, as the paper.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from automlprune.errors import ConfigError
from automlprune.search.training import TrainingSettings, TrainingStrategy
from automlprune.space import Candidate
from automlprune.train import Callback, FitHistory, Recipe, Trainer
from automlprune.train.callbacks import KeepDropped

CLAMP = 10.0


@dataclass(frozen=True)
class GateDecoratorSettings(TrainingSettings):
    """Official ResNet-56 defaults (``p``, epochs scaled by the task's YAML); see the module docstring."""

    groups: str = "all"
    batch_size: int = 128
    lr_min: float = 1e-3
    lr_max: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    sparse_lambda: float = 1e-3
    p: float = 0.002
    tock_epochs: int = 10
    tock_every: int = 10
    tock_steps: int | None = None
    tick_steps: int | None = None
    max_ticks: int = 10_000
    finetune_epochs: int = 0
    finetune_steps: int | None = None


class Gates(nn.Module):
    """The gates of every gated feature layer, the groups' shared masks and the Tick scores."""

    def __init__(self, model: nn.Module, space: Any, groups: list[str]) -> None:
        super().__init__()
        self.space, self.groups = space, groups
        self.entries: list[tuple[str, str, torch.Tensor]] = []  # (group, feature layer, channel index in it)
        gates = []
        with torch.no_grad():
            for g in groups:
                for member in space.feature_layers(space.group_by_name[g]):
                    module = model.get_submodule(member.layer)
                    index = torch.as_tensor(member.index_map[:, 0])
                    gate = torch.ones(len(index))
                    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                        gamma = module.weight[index].clone()
                        safe = torch.where(gamma.abs() < 1e-12, torch.full_like(gamma, 1e-12), gamma)
                        module.bias[index] = (module.bias[index] / safe).clamp(-CLAMP, CLAMP)
                        module.weight[index] = 1.0
                        module.weight.requires_grad_(False)
                        gate = gamma
                    self.entries.append((g, member.layer, index))
                    gates.append(nn.Parameter(gate))
        self.gates = nn.ParameterList(gates)
        self.masks = {g: torch.ones(space.group_by_name[g].channels, dtype=torch.bool) for g in groups}
        self.scores = [torch.zeros(len(e[2])) for e in self.entries]
        self.handles = [model.get_submodule(layer).register_forward_hook(self._hook(i))
                        for i, (_, layer, _) in enumerate(self.entries)]

    def _hook(self, i: int):
        group, _, index = self.entries[i]

        def fn(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            factor = self.gates[i] * self.masks[group].to(output.device, output.dtype)
            full = output.new_ones(output.shape[1]).index_copy(0, index.to(output.device), factor)
            return output * full.view(1, -1, *([1] * (output.dim() - 2)))
        return fn

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def l1(self) -> torch.Tensor:
        return sum(g.abs().sum() for g in self.gates)


class Tock(Callback):
    """CE + lambda x sum |g| (the sparsity term of the Tock)."""

    def __init__(self, gates: Gates, strength: float) -> None:
        self.gates, self.strength = gates, strength

    def param_groups(self, trainer, groups):
        return groups + [{"params": list(self.gates.parameters())}]

    def loss(self, trainer, x, y, logits, loss):
        return loss + self.strength * self.gates.l1()


class Tick(Callback):
    """Convolutions frozen (gates, batch-norm betas and linear layers train); |g * dL/dg| of
    every mini-batch added to the scores."""

    def __init__(self, gates: Gates) -> None:
        self.gates = gates

    def param_groups(self, trainer, groups):
        frozen = {id(p) for m in trainer.model.modules() if isinstance(m, nn.Conv2d) for p in m.parameters()}
        return [{"params": [p for p in trainer.model.parameters() if p.requires_grad and id(p) not in frozen]
                 + list(self.gates.parameters())}]

    def on_start(self, trainer):
        self.gates.scores = [torch.zeros_like(g.detach()) for g in self.gates.gates]

    def before_step(self, trainer):
        for score, gate in zip(self.gates.scores, self.gates.gates):
            if gate.grad is not None:
                score += (gate.grad * gate).detach().abs()


class GateDecoratorStrategy(TrainingStrategy):
    """Gate Decorator's Tick-Tock with group pruning until the budget is met (module docstring)."""

    name = "gate-decorator"
    chooses_widths = True
    settings_class = GateDecoratorSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # option values checked by the base (SETTING_RANGES)
        self.gates: Gates | None = None
        self.ticks = 0
        self.phase = 0
        self.resumed_after_phase: int | None = None
        """The Trainer runs (Ticks and Tocks) an interrupted search had finished when it resumed (None: from the start)."""

    def _run(self, net: nn.Module, epochs: int, steps: int | None, schedule: str, lr: float, callbacks: list,
             label: str, momentum: float | None = None) -> FitHistory:
        """One Tick, Tock or fine-tune: a Trainer run with its own optimizer (progress shown except for Ticks)."""
        s = self.settings
        self.phase += 1
        recipe = Recipe(epochs, s.batch_size, lr, s.momentum if momentum is None else momentum, s.weight_decay, schedule,
                        steps_per_epoch=steps, seed=self.seed * 10_007 + self.phase, nesterov=False, lr_min=s.lr_min)
        return Trainer(net, self.context.data, self.device, recipe, callbacks, description=f"gate-decorator {label}",
                       validate=False, progress=label != "tick").fit()

    def train(self, net: nn.Module, candidate: Candidate) -> list[FitHistory]:
        s = self.settings
        self.gates = gates = Gates(net, self.space, self.pruned_groups()).to(self.device)
        histories: list[FitHistory] = []
        upcoming = "tock" if s.tock_epochs else "tick"
        state = self.load_phase_state()
        if state is not None:
            histories, upcoming = self._restore(net, state), state["upcoming"]
        tock = lambda: self._run(net, s.tock_epochs, s.tock_steps, "triangular", s.lr_max,  # noqa: E731
                                 [Tock(gates, s.sparse_lambda)], "tock")
        try:
            while upcoming != "done":
                if upcoming == "tock":
                    histories.append(tock())
                    upcoming = "tick"
                elif self.feasible(self.widths_of()) or self.ticks >= s.max_ticks:
                    upcoming = "done"
                else:
                    histories.append(self._run(net, 1, s.tick_steps, "constant", s.lr_min, [Tick(gates)], "tick"))
                    self.ticks += 1
                    removed = self.prune_step()
                    self.history_log.append({"tick": self.ticks, "removed": removed,
                                             "cost_fraction": self.budget.cost_fraction(self.cost_model(self.widths_of()))})
                    if not self.feasible(self.widths_of()) and self.ticks % s.tock_every == 0 and s.tock_epochs:
                        upcoming = "tock"
                self._checkpoint(net, histories, upcoming)
        finally:
            gates.remove()
        if not self.feasible(self.widths_of()):
            raise ConfigError(f"gate-decorator did not reach {self.budget.label} in {s.max_ticks} ticks; raise p or max_ticks")
        melt_gates_(net, gates)
        if s.finetune_epochs:
            kept = self.kept_channels(net, candidate)
            histories.append(self._run(net, s.finetune_epochs, s.finetune_steps, "triangular", s.lr_max,
                                       [KeepDropped(self.space, kept)], "finetune", momentum=0.0))
        self.drop_phase_state()
        return histories

    def _checkpoint(self, net: nn.Module, histories: list[FitHistory], upcoming: str) -> None:
        """After every Tick (with its pruning) and Tock: the network, gates, masks and counters."""
        gates = self.gates
        self.save_phase_state({"net": net.state_dict(), "gates": [g.detach() for g in gates.gates], "masks": dict(gates.masks),
                               "ticks": self.ticks, "phase": self.phase, "upcoming": upcoming, "log": self.history_log,
                               "histories": [asdict(h) for h in histories]})

    def _restore(self, net: nn.Module, state: dict[str, Any]) -> list[FitHistory]:
        """Continue from :meth:`_checkpoint`'s state; the histories of the finished phases."""
        with torch.no_grad():
            net.load_state_dict(state["net"])
            for gate, saved in zip(self.gates.gates, state["gates"]):
                gate.copy_(saved)
        self.gates.masks = {g: m.cpu() for g, m in state["masks"].items()}
        self.ticks, self.phase, self.history_log = state["ticks"], state["phase"], list(state["log"])
        self.resumed_after_phase = self.phase
        return [FitHistory(**h) for h in state["histories"]]

    def widths_of(self) -> Candidate:
        return Candidate.make({g: int(m.sum()) / len(m) for g, m in self.gates.masks.items()})

    def prune_step(self) -> int:
        """Remove ``int(p x remaining)`` channels by the global ranking of group-summed scores
        (each gate's top tenth kept); returns the channels removed."""
        gates, entries = self.gates, self.gates.entries
        members: dict[str, list[int]] = {}
        for i, (group, _, _) in enumerate(entries):
            members.setdefault(group, []).append(i)
        remaining = sum(int(gates.masks[g].sum()) * len(ids) for g, ids in members.items())
        num = max(1, int(remaining * self.settings.p))
        candidates, protected = [], {}
        for g, ids in members.items():
            mask = gates.masks[g]
            score = torch.stack([gates.scores[i].cpu() for i in ids]).sum(0) * mask.float()
            minimal = max(1, int(0.1 * len(mask)), self.space.min_width(g))
            top = torch.argsort(score, descending=True, stable=True)[:minimal]
            protected[g] = top
            free = torch.ones_like(mask)
            free[top] = False
            free &= mask
            candidates += [float(v) for v in score[free] for _ in ids]
        if not candidates:
            return 0
        candidates.sort()
        threshold = candidates[min(num, len(candidates)) - 1] if num >= len(candidates) else candidates[num]
        removed = 0
        for g, ids in members.items():
            mask = gates.masks[g]
            score = torch.stack([gates.scores[i].cpu() for i in ids]).sum(0) * mask.float()
            keep = score > threshold
            keep[protected[g]] = True
            new = mask & keep
            removed += int((mask & ~new).sum())
            gates.masks[g] = new
        return removed

    def kept_channels(self, net: nn.Module, candidate: Candidate) -> dict[str, torch.Tensor]:
        return {g: torch.nonzero(m).flatten() for g, m in self.gates.masks.items() if not m.all()}

    def final_widths(self, planned: Candidate) -> Candidate:
        return self.widths_of()

    def training_report(self) -> dict[str, float]:
        report = {"ticks": float(self.ticks)}
        if self.resumed_after_phase is not None:
            report["resumed_after_phase"] = float(self.resumed_after_phase)
        return report


@torch.no_grad()
def melt_gates_(model: nn.Module, gates: Gates) -> None:
    """Fold each gate (times its group's mask) into its batch norm (gamma = g, beta = beta x g),
    or into the producing layer's rows when it has no batch norm; the function is unchanged."""
    for (group, layer, index), gate in zip(gates.entries, gates.gates):
        module = model.get_submodule(layer)
        factor = (gate.detach() * gates.masks[group].to(gate.dtype)).to(module.weight.device)
        index = index.to(module.weight.device)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            module.weight[index] = module.weight[index] * factor
            module.bias[index] = module.bias[index] * factor
            module.weight.requires_grad_(True)
        else:
            shape = (-1,) + (1,) * (module.weight.dim() - 1)
            module.weight[index] = module.weight[index] * factor.view(shape)
            if module.bias is not None:
                module.bias[index] = module.bias[index] * factor
