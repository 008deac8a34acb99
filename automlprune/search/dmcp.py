"""The ``dmcp`` strategy: Differentiable Markov Channel Pruning (Guo et al., CVPR 2020).

Every prunable group is split into blocks: the first block (the group's minimum width, at least
one block) is always kept; block k > 0 is kept with transition probability sigmoid(alpha_k)
given block k - 1 is kept, so its marginal keep probability is the product of the transitions
up to k. A group's expected width is the minimum plus the sum of block sizes x marginals, and
the expected cost is the one cost model evaluated on expected widths (differentiable).

1. A copy of the trained network (the supernet) has every group's channels reordered by the
   evaluator's importance criterion, so keeping k channels means keeping the first k, exactly
   the channels materialization keeps (:func:`automlprune.nn.reorder.reorder_channels_`).
2. Warm-up (``warmup_epochs``): weight steps only, with the sandwich rule: the largest width
   (cross-entropy on the labels), the smallest width and ``random_widths`` uniformly random
   widths (in-place distillation from the largest's logits), gradients summed, one SGD step.
3. Search (``search_epochs``): each iteration one weight step as above (random widths now drawn
   from the Markov chain) and one architecture step on the next batch: the groups' feature maps
   scaled by their channels' keep probabilities, loss = cross-entropy + ``penalty`` x budget loss
   of the expected cost (the one cost model on expected widths) against the target (a budget
   loss of :mod:`automlprune.train.regularizers`), Adam on the alphas only. Both phases are one
   :class:`~automlprune.train.Trainer` run: :class:`DMCPTraining` replaces its step (the sandwich
   rule needs several forward passes per step) and draws two batches per step while searching.
4. Extraction: the expected widths (``extract: expected``), or the most probable of up to 1,000
   samples of the chain within +-1% of the budget (``extract: sample``, falling back to the
   expected widths), rounded to the channel rounding (or down to the ratio grid with
   ``grid: true``) and, if still over the budget, scaled down together by bisection until they
   meet it. The proposal is scored by the shared evaluator with the *original* weights (the
   supernet only chooses widths: :class:`~automlprune.proposal.OriginalWeights`, the documented
   choice of this implementation); the final network gets the shared fine-tune like every answer.

Several budgets of one run share the warm-up: its weights are saved in the run directory
(artifact ``dmcp-warmup-*.pt``, keyed by seed and the settings that shape it) and loaded by the
next budget; the search phase, which adapts weights and alphas to one target, runs per budget.
The training wall time is part of the search time; ``spent`` records its parts (seconds,
optimizer steps, images).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from automlprune.cost import CostModel, differentiable_metrics, largest_within
from automlprune.errors import ConfigError
from automlprune.importance import order_from_scores
from automlprune.nn.gates import ChannelScaler
from automlprune.nn.reorder import reorder_channels_
from automlprune.proposal import Proposal
from automlprune.search.base import SearchContext, Strategy
from automlprune.search.budget import Budget
from automlprune.space import Candidate, SearchSpace
from automlprune.train import Callback, Recipe, StepResult, Trainer, distributed
from automlprune.train.regularizers import BUDGET_LOSSES, budget_loss

SAMPLES = 1000


class MarkovGates(nn.Module):
    """Architecture parameters of every gated group (prunable groups that can shrink).

    ``block_size``: channels per block (0: about an eighth of the group), rounded up to the
    space's ``round_to``. Alphas start at ``alpha_init`` (transition probability sigmoid(alpha_init)).
    """

    def __init__(self, space: SearchSpace, block_size: int = 0, alpha_init: float = 3.0) -> None:
        super().__init__()
        self.space = space
        self.names, self.sizes = [], []
        alphas = []
        for group in space.groups:
            if group.name not in space.prunable:
                continue
            size = block_size or math.ceil(group.channels / 8)
            step = space.rounding_step(group.unit)
            size = max(step, math.ceil(size / step) * step)
            first = min(group.channels, max(space.min_width(group), size))
            sizes = [first] + [size] * ((group.channels - first) // size)
            if group.channels - sum(sizes) > 0:
                sizes.append(group.channels - sum(sizes))
            if len(sizes) < 2:
                continue
            self.names.append(group.name)
            self.sizes.append(sizes)
            alphas.append(nn.Parameter(torch.full((len(sizes) - 1,), float(alpha_init))))
        self.alphas = nn.ParameterList(alphas)
        self.group_index = {g.name: i for i, g in enumerate(space.groups)}

    def transitions(self) -> list[torch.Tensor]:
        return [torch.sigmoid(a) for a in self.alphas]

    def marginals(self) -> list[torch.Tensor]:
        """Per gated group, each block's marginal keep probability (the first block: 1)."""
        return [torch.cat([p.new_ones(1), torch.cumprod(p, 0)]) for p in self.transitions()]

    def channel_probs(self, marginals: Sequence[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Per gated group, each channel's keep probability (its block's marginal)."""
        marginals = self.marginals() if marginals is None else marginals
        return {name: torch.repeat_interleave(m, torch.tensor(sizes, device=m.device))
                for name, sizes, m in zip(self.names, self.sizes, marginals)}

    def expected_kept(self, marginals: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Expected kept channels of every group of the space (ungated groups: all), float64."""
        marginals = self.marginals() if marginals is None else marginals
        kept = torch.tensor([float(g.channels) for g in self.space.groups], dtype=torch.float64)
        parts = {self.group_index[n]: (torch.tensor(s, dtype=torch.float64) * m.double()).sum()
                 for n, s, m in zip(self.names, self.sizes, marginals)}
        return torch.stack([parts.get(i, kept[i]) for i in range(len(kept))])

    def expected_cost(self, cost_model: CostModel, metric: str) -> torch.Tensor:
        """The one cost model on expected widths (differentiable in the alphas)."""
        return cost_model.from_kept(self.expected_kept())[metric]

    def widths_of_blocks(self, blocks: Sequence[int]) -> dict[str, int]:
        """Channels kept when each gated group keeps its first ``blocks[i]`` blocks."""
        return {n: int(sum(s[:b])) for n, s, b in zip(self.names, self.sizes, blocks)}

    def sample_blocks(self, generator: torch.Generator, uniform: bool = False) -> list[int]:
        """Blocks kept per gated group: drawn from the Markov chain, or uniformly (warm-up)."""
        out = []
        with torch.no_grad():
            for sizes, p in zip(self.sizes, self.transitions()):
                if uniform:
                    out.append(int(torch.randint(1, len(sizes) + 1, (1,), generator=generator)))
                    continue
                draws = torch.rand(len(p), generator=generator) < p.cpu()
                out.append(1 + int(torch.cumprod(draws.int(), 0).sum()))
        return out

    def log_prob(self, blocks: Sequence[int]) -> float:
        """Log-probability of keeping ``blocks[i]`` blocks of each group under the chain."""
        total = 0.0
        with torch.no_grad():
            for p, b in zip(self.transitions(), blocks):
                p = p.double().clamp(1e-12, 1 - 1e-12)
                total += float(p[: b - 1].log().sum())
                if b - 1 < len(p):
                    total += float((1 - p[b - 1]).log())
        return total

    def entropy(self) -> float:
        """Mean binary entropy of the transition probabilities (nats; 0 = decided)."""
        with torch.no_grad():
            p = torch.cat(self.transitions()).double().clamp(1e-12, 1 - 1e-12)
            return float(-(p * p.log() + (1 - p) * (1 - p).log()).mean())


class DMCPTraining(Callback):
    """The two phases of DMCP as Trainer hooks: warm-up epochs of sandwich weight steps, then
    search epochs alternating a weight step and an architecture step (two batches per step)."""

    def __init__(self, strategy: "DMCPStrategy", net: nn.Module, scaler: ChannelScaler, generator: torch.Generator) -> None:
        self.strategy, self.net, self.scaler, self.generator = strategy, net, scaler, generator
        s = strategy.settings
        self.warmup_epochs = s["warmup_epochs"]
        self.arch_optimizer = torch.optim.Adam(strategy.gates.parameters(), lr=s["arch_lr"], betas=(0.5, 0.999))
        if distributed.rank_and_world()[1] > 1:  # several processes: the architecture step, too, on the global batch
            self.arch_optimizer.register_step_pre_hook(distributed.average_gradients)
        self.task_losses: list[float] = []

    def searching(self, epoch: int) -> bool:
        return epoch >= self.warmup_epochs

    def batches_in_epoch(self, trainer, epoch, steps):
        return 2 * steps if self.searching(epoch) else steps

    def train_step(self, trainer, x, y):
        if self.searching(trainer.epoch) and trainer.batch_index % 2 == 1:
            self.task_losses.append(self._arch_step(x, y))
            return StepResult(None, stepped=False)
        loss = self._weight_step(trainer.optimizer, x, y, uniform=not self.searching(trainer.epoch))
        if not self.searching(trainer.epoch):
            self.task_losses.append(loss)
        return StepResult(loss)

    def _weight_step(self, optimizer, x, y, uniform: bool) -> float:
        """Sandwich rule: largest width on the labels, smallest and random widths distilled from it."""
        net, scaler, gates = self.net, self.scaler, self.strategy.gates
        optimizer.zero_grad(set_to_none=True)
        scaler.set(None)
        logits = net(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        teacher = F.softmax(logits.detach(), dim=1)
        smallest = [1] * len(gates.names)
        widths = [smallest] + [gates.sample_blocks(self.generator, uniform) for _ in range(self.strategy.settings["random_widths"])]
        for blocks in widths:
            scaler.set(scaler.masks(gates.widths_of_blocks(blocks)))
            student = F.log_softmax(net(x), dim=1)
            F.kl_div(student, teacher, reduction="batchmean").backward()
        scaler.set(None)
        optimizer.step()
        return float(loss.detach())

    def _arch_step(self, x, y) -> float:
        """Feature maps scaled by keep probabilities; task loss + penalty x budget loss; alphas only."""
        strategy, gates, scaler = self.strategy, self.strategy.gates, self.scaler
        self.arch_optimizer.zero_grad(set_to_none=True)
        scaler.set(gates.channel_probs())
        task = F.cross_entropy(self.net(x), y)
        scaler.set(None)
        ratio = strategy.expected_fraction()
        loss = task + strategy.settings["penalty"] * budget_loss(strategy.settings["loss"], ratio, strategy.target).to(task.dtype)
        loss.backward(inputs=list(gates.parameters()))
        self.arch_optimizer.step()
        return float(task.detach())

    def on_epoch_end(self, trainer, epoch):
        strategy = self.strategy
        if epoch == self.warmup_epochs - 1 and not self.searching(epoch):
            path = strategy.warmup_path()
            if path is not None and distributed.is_main():
                torch.save(self.net.state_dict(), path)
        with torch.no_grad():
            ratio = float(strategy.expected_fraction())
        entry = {"epoch": epoch + 1, "phase": "search" if self.searching(epoch) else "warmup",
                 "task_loss": float(np.mean(self.task_losses)) if self.task_losses else float("nan"),
                 "expected_cost_fraction": ratio, "target": strategy.target, "alpha_entropy": strategy.gates.entropy(),
                 "seconds": trainer.elapsed}
        strategy.history_log.append(entry)
        trainer.log.update(phase=entry["phase"], task_loss=entry["task_loss"], expected=ratio, target=strategy.target,
                           alpha_entropy=entry["alpha_entropy"])
        self.task_losses = []


class DMCPStrategy(Strategy):
    """Markov channel gates trained by gradient descent against a differentiable budget loss."""

    name = "dmcp"
    replays_on_resume = False  # the stored answer is the result; training is not repeated
    one_worker_reason = "it trains its network in one process"
    ddp_refusal = None  # weights and architecture parameters both step on gradients averaged over the ranks: all decide alike

    option_ranges = {**dict.fromkeys(("search_epochs", "steps_per_epoch", "batch_size"), (lambda v: v >= 1, "must be at least 1")),
                     **dict.fromkeys(("warmup_epochs", "block_size", "penalty", "random_widths"), (lambda v: v >= 0, "cannot be negative")),
                     **dict.fromkeys(("weight_lr", "arch_lr"), (lambda v: v > 0, "must be positive"))}

    def __init__(self, context: SearchContext, budget: Budget, seed: int = 0, max_evals: int = 50,
                 warmup_epochs: int = 1, search_epochs: int = 2, steps_per_epoch: int | None = None,
                 batch_size: int = 128, block_size: int = 0, weight_lr: float = 0.01, arch_lr: float = 0.02,
                 penalty: float = 2.0, loss: str = "band", random_widths: int = 2, alpha_init: float = 2.0,
                 extract: str = "expected", grid: bool = False, **options: Any) -> None:
        if budget.metric not in differentiable_metrics():
            raise ConfigError(f"dmcp needs a differentiable cost; a {budget.metric} budget is not one: use one of {', '.join(differentiable_metrics())}")
        super().__init__(context, budget, seed, max_evals, **options)
        if loss not in BUDGET_LOSSES:
            raise ConfigError(f"dmcp loss '{loss}' is unknown; use one of: {', '.join(BUDGET_LOSSES.ordered_names())}")
        if extract not in ("expected", "sample"):
            raise ConfigError(f"dmcp extract '{extract}' is unknown; use expected or sample")
        if context.data is None:
            raise ConfigError("dmcp trains a supernet and needs the task's data in its search context")
        self.settings = dict(warmup_epochs=warmup_epochs, search_epochs=search_epochs, steps_per_epoch=steps_per_epoch,
                             batch_size=batch_size, block_size=block_size, weight_lr=weight_lr, arch_lr=arch_lr,
                             penalty=penalty, loss=loss, random_widths=random_widths, alpha_init=alpha_init,
                             extract=extract, grid=grid)
        self.target = self.budget.fraction
        self.history_log: list[dict[str, float]] = []
        self.gates: MarkovGates | None = None
        self._asked = False

    # ---- the strategy interface -----------------------------------------------------------------
    def ask(self) -> Proposal | None:
        if self._asked or self.history:
            return None
        self._asked = True
        return Proposal(self.train_and_extract())

    def expected_fraction(self) -> torch.Tensor:
        """The gates' expected cost of the budget metric, as a fraction of the unpruned network's."""
        return self.gates.expected_cost(self.cost_model, self.budget.metric) / self.budget.base

    # ---- training -------------------------------------------------------------------------------
    def train_and_extract(self) -> Candidate:
        s, device = self.settings, torch.device(self.context.device)
        generator = torch.Generator().manual_seed(self.seed)
        net = copy.deepcopy(self.context.model).to(device)
        reorder_channels_(net, self.space, order_from_scores(self.context.channel_scores))
        self.gates = gates = MarkovGates(self.space, s["block_size"], s["alpha_init"]).to(device)
        if not gates.names:
            raise ConfigError("dmcp found no group that can shrink in this search space; unpin some groups")
        scaler = ChannelScaler(net, self.space, gates.names)
        warm_path = self.warmup_path()
        reused = warm_path is not None and warm_path.is_file()
        if reused:
            net.load_state_dict(torch.load(warm_path, map_location=device, weights_only=True))
        recipe = Recipe(s["warmup_epochs"] + s["search_epochs"], s["batch_size"], s["weight_lr"], momentum=0.9,
                        weight_decay=5e-4, steps_per_epoch=s["steps_per_epoch"], seed=self.seed)
        trainer = Trainer(net, self.context.data, device, recipe, [DMCPTraining(self, net, scaler, generator)],
                          description=f"dmcp {self.budget.label}", validate=False,
                          start_epoch=s["warmup_epochs"] if reused else 0)
        try:
            history = trainer.fit()
        finally:
            scaler.remove()
        self.spent = {"training_seconds": history.seconds, "warmup_reused": float(reused),
                      "training_steps": float(history.steps), "training_images": float(history.images),
                      "final_expected_cost_fraction": self.history_log[-1]["expected_cost_fraction"] if self.history_log else float("nan")}
        self._save_log()
        return self.extract()

    # ---- extraction -----------------------------------------------------------------------------
    def extract(self) -> Candidate:
        """The candidate the gates describe, within the budget (see the module docstring)."""
        gates = self.gates
        with torch.no_grad():
            expected = gates.expected_kept().tolist()
        widths = {n: expected[gates.group_index[n]] for n in gates.names}
        if self.settings["extract"] == "sample":
            sampled = self._sample_within_budget()
            widths = sampled if sampled is not None else widths
        snap = lambda w: Candidate.make(self.space.ratios_from_widths(w, self.settings["grid"]))  # noqa: E731
        candidate = snap(widths)
        if self.feasible(candidate):
            return candidate
        scaled = lambda f: snap({n: f * w for n, w in widths.items()})  # noqa: E731
        return scaled(largest_within(lambda f: self.feasible(scaled(f)), 1e-9, 1.0, 30))

    def _sample_within_budget(self) -> dict[str, float] | None:
        generator = torch.Generator().manual_seed(self.seed + 1)
        best, best_logp = None, -np.inf
        for _ in range(SAMPLES):
            blocks = self.gates.sample_blocks(generator)
            widths = self.gates.widths_of_blocks(blocks)
            cost = self.cost(Candidate.make(self.space.ratios_from_widths(widths)))
            if abs(cost / self.limit - 1) <= 0.01:
                logp = self.gates.log_prob(blocks)
                if logp > best_logp:
                    best, best_logp = {k: float(v) for k, v in widths.items()}, logp
        return best

    # ---- artifacts ------------------------------------------------------------------------------
    def warmup_path(self):
        """Where the shared warm-up weights live (None without a run directory)."""
        if self.context.artifacts is None:
            return None
        keys = ("warmup_epochs", "steps_per_epoch", "batch_size", "block_size", "weight_lr", "random_widths",
                "search_epochs", "alpha_init")
        digest = hashlib.sha1(json.dumps({k: self.settings[k] for k in keys}, sort_keys=True).encode()).hexdigest()[:10]
        return self.context.artifacts.path(f"dmcp-warmup-seed{self.seed}-{digest}.pt")

    def _save_log(self) -> None:
        if self.context.artifacts is None or not distributed.is_main():
            return
        gates = self.gates
        payload = {"settings": self.settings, "target": self.target, "epochs": self.history_log, "spent": self.spent,
                   "groups": {n: {"block_sizes": s, "marginals": [float(v) for v in m.detach().cpu()]}
                              for n, s, m in zip(gates.names, gates.sizes, gates.marginals())}}
        self.context.artifacts.write_json(f"dmcp-{self.budget.slug}-seed{self.seed}.json", payload)
