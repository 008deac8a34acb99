"""The ``dmcp`` strategy: Differentiable Markov Channel Pruning (Guo et al., CVPR 2020).

1. A copy of the trained network (the supernet) has every group's channels reordered by the
   evaluator's importance criterion, so keeping k channels means keeping the first k, exactly
   the channels materialization keeps (:func:`automlprune.dmcp.reorder_channels_`).
2. Warm-up (``warmup_epochs``): weight steps only, with the sandwich rule: the largest width
   (cross-entropy on the labels), the smallest width and ``random_widths`` uniformly random
   widths (in-place distillation from the largest's logits), gradients summed, one SGD step.
3. Search (``search_epochs``): each iteration one weight step as above (random widths now drawn
   from the Markov chain) and one architecture step on the next batch: the groups' feature maps
   scaled by their channels' keep probabilities, loss = cross-entropy + ``penalty`` x budget loss
   of the expected cost (the one cost model on expected widths) against the target, Adam on the
   alphas only.
4. Extraction: the expected widths (``extract: expected``), or the most probable of up to 1,000
   samples of the chain within +-1% of the budget (``extract: sample``, falling back to the
   expected widths), rounded to the channel rounding (or down to the ratio grid with
   ``grid: true``) and, if still over the budget, scaled down together by bisection until they
   meet it. The candidate is scored by the shared evaluator with the *original* weights (the
   supernet only chooses widths); the final network gets the shared fine-tune like every answer.

Several budgets of one run share the warm-up: its weights are saved in the run directory
(``dmcp-warmup-*.pt``, keyed by seed and the settings that shape it) and loaded by the next
budget; the search phase, which adapts weights and alphas to one target, runs per budget.
The training wall time is part of the search time; ``spent`` records its parts.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from automlprune.cost import largest_within
from automlprune.data import iterate_batches
from automlprune.dmcp import BUDGET_LOSSES, ChannelScaler, MarkovGates, budget_loss, reorder_channels_, snap_widths
from automlprune.errors import ConfigError
from automlprune.importance import order_from_scores
from automlprune.progress import Progress
from automlprune.search.base import SearchContext, Strategy
from automlprune.search.budget import Budget
from automlprune.space import Candidate

DIFFERENTIABLE_METRICS = ("macs", "params", "bytes", "bitops")
SAMPLES = 1000


class DMCPStrategy(Strategy):
    """Markov channel gates trained by gradient descent against a differentiable budget loss."""

    name = "dmcp"
    replays_on_resume = False  # the stored answer is the result; training is not repeated

    def __init__(self, context: SearchContext, budget: Budget, seed: int = 0, max_evals: int = 50,
                 warmup_epochs: int = 1, search_epochs: int = 2, steps_per_epoch: int | None = None,
                 batch_size: int = 128, block_size: int = 0, weight_lr: float = 0.01, arch_lr: float = 0.02,
                 penalty: float = 2.0, loss: str = "band", random_widths: int = 2, alpha_init: float = 2.0,
                 extract: str = "expected", grid: bool = False, **options: Any) -> None:
        if budget.metric not in DIFFERENTIABLE_METRICS:
            raise ConfigError(f"dmcp needs a differentiable cost; a {budget.metric} budget is not one: use one of {', '.join(DIFFERENTIABLE_METRICS)}")
        super().__init__(context, budget, seed, max_evals, **options)
        if loss not in BUDGET_LOSSES:
            raise ConfigError(f"dmcp loss '{loss}' is unknown; use one of: {', '.join(BUDGET_LOSSES)}")
        if extract not in ("expected", "sample"):
            raise ConfigError(f"dmcp extract '{extract}' is unknown; use expected or sample")
        if context.data is None:
            raise ConfigError("dmcp trains a supernet and needs the task's data in its search context")
        self.settings = dict(warmup_epochs=warmup_epochs, search_epochs=search_epochs, steps_per_epoch=steps_per_epoch,
                             batch_size=batch_size, block_size=block_size, weight_lr=weight_lr, arch_lr=arch_lr,
                             penalty=penalty, loss=loss, random_widths=random_widths, alpha_init=alpha_init,
                             extract=extract, grid=grid)
        self.target = self.limit / self.cost_model.base.get(budget.metric)
        self.history_log: list[dict[str, float]] = []
        self.gates: MarkovGates | None = None
        self._asked = False

    # ---- the strategy interface -----------------------------------------------------------------
    def ask(self) -> Candidate | None:
        if self._asked or self.history:
            return None
        self._asked = True
        return self.train_and_extract()

    # ---- training -------------------------------------------------------------------------------
    def train_and_extract(self) -> Candidate:
        s, device = self.settings, torch.device(self.context.device)
        torch.manual_seed(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        net = copy.deepcopy(self.context.model).to(device)
        reorder_channels_(net, self.space, order_from_scores(self.context.channel_scores))
        self.gates = gates = MarkovGates(self.space, s["block_size"], s["alpha_init"]).to(device)
        if not gates.names:
            raise ConfigError("dmcp found no group that can shrink in this search space; unpin some groups")
        scaler = ChannelScaler(net, self.space, gates.names)
        data = self.context.data
        steps = min(s["steps_per_epoch"] or 10 ** 12, max(1, len(data.train) // s["batch_size"]))
        total = (s["warmup_epochs"] + s["search_epochs"]) * steps
        weights_opt = torch.optim.SGD(net.parameters(), lr=s["weight_lr"], momentum=0.9, weight_decay=5e-4, nesterov=True)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(weights_opt, T_max=max(1, total))
        arch_opt = torch.optim.Adam(gates.parameters(), lr=s["arch_lr"], betas=(0.5, 0.999))
        start = time.perf_counter()
        warm_path = self._warmup_path()
        reused = warm_path is not None and warm_path.is_file()
        progress = Progress(f"dmcp {self.budget.label}", s["warmup_epochs"] + s["search_epochs"], "epoch")
        try:
            net.train()
            if reused:
                net.load_state_dict(torch.load(warm_path, map_location=device, weights_only=True))
                with warnings.catch_warnings():  # fast-forward the schedule past the loaded warm-up
                    warnings.simplefilter("ignore", UserWarning)
                    for _ in range(s["warmup_epochs"] * steps):
                        schedule.step()
            for epoch in range(s["warmup_epochs"] + s["search_epochs"]):
                searching = epoch >= s["warmup_epochs"]
                if not searching and reused:
                    continue
                batches = iterate_batches(data.train, data, s["batch_size"], device, shuffle=True, augment=True,
                                          seed=self.seed * 100_003 + epoch, drop_last=True)
                task_losses = []
                for step, (x, y) in enumerate(batches):
                    if step >= 2 * steps if searching else step >= steps:
                        break
                    if searching and step % 2 == 1:
                        task_losses.append(self._arch_step(net, scaler, arch_opt, x, y))
                        continue
                    loss = self._weight_step(net, scaler, weights_opt, generator, x, y, uniform=not searching)
                    schedule.step()
                    if not searching:
                        task_losses.append(loss)
                if not searching and epoch == s["warmup_epochs"] - 1 and warm_path is not None:
                    torch.save(net.state_dict(), warm_path)
                self._log_epoch(epoch, searching, task_losses, progress, time.perf_counter() - start)
        finally:
            scaler.remove()
            progress.close()
        self.spent = {"training_seconds": time.perf_counter() - start, "warmup_reused": float(reused),
                      "final_expected_cost_fraction": self.history_log[-1]["expected_cost_fraction"] if self.history_log else float("nan")}
        self._save_log()
        return self.extract()

    def _weight_step(self, net, scaler, optimizer, generator, x, y, uniform: bool) -> float:
        """Sandwich rule: largest width on the labels, smallest and random widths distilled from it."""
        optimizer.zero_grad(set_to_none=True)
        scaler.set(None)
        logits = net(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        teacher = F.softmax(logits.detach(), dim=1)
        gates = self.gates
        smallest = [1] * len(gates.names)
        widths = [smallest] + [gates.sample_blocks(generator, uniform) for _ in range(self.settings["random_widths"])]
        for blocks in widths:
            scaler.set(scaler.masks(gates.widths_of_blocks(blocks)))
            student = F.log_softmax(net(x), dim=1)
            F.kl_div(student, teacher, reduction="batchmean").backward()
        scaler.set(None)
        optimizer.step()
        return float(loss.detach())

    def _arch_step(self, net, scaler, optimizer, x, y) -> float:
        """Feature maps scaled by keep probabilities; task loss + penalty x budget loss; alphas only."""
        gates = self.gates
        optimizer.zero_grad(set_to_none=True)
        scaler.set(gates.channel_probs())
        task = F.cross_entropy(net(x), y)
        scaler.set(None)
        ratio = gates.expected_cost(self.cost_model, self.budget.metric) / self.cost_model.base.get(self.budget.metric)
        loss = task + self.settings["penalty"] * budget_loss(self.settings["loss"], ratio, self.target).to(task.dtype)
        loss.backward(inputs=list(gates.parameters()))
        optimizer.step()
        return float(task.detach())

    def _log_epoch(self, epoch: int, searching: bool, losses: list[float], progress: Progress, elapsed: float) -> None:
        with torch.no_grad():
            ratio = float(self.gates.expected_cost(self.cost_model, self.budget.metric)) / self.cost_model.base.get(self.budget.metric)
        entry = {"epoch": epoch + 1, "phase": "search" if searching else "warmup",
                 "task_loss": float(np.mean(losses)) if losses else float("nan"),
                 "expected_cost_fraction": ratio, "target": self.target, "alpha_entropy": self.gates.entropy(), "seconds": elapsed}
        self.history_log.append(entry)
        progress.update(epoch + 1, f"dmcp {self.budget.label} epoch {epoch + 1} ({entry['phase']}): task loss {entry['task_loss']:.3f}, "
                        f"expected {self.budget.metric} {ratio:.3f} vs target {self.target:.3f}, alpha entropy {entry['alpha_entropy']:.3f}, "
                        f"{elapsed:.0f}s", loss=f"{entry['task_loss']:.3f}", expected=f"{ratio:.3f}")

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
        candidate = Candidate.make(snap_widths(self.space, widths, self.settings["grid"]))
        if self.feasible(candidate):
            return candidate
        scaled = lambda f: Candidate.make(snap_widths(self.space, {n: f * w for n, w in widths.items()}, self.settings["grid"]))  # noqa: E731
        return scaled(largest_within(lambda f: self.feasible(scaled(f)), 1e-9, 1.0, 30))

    def _sample_within_budget(self) -> dict[str, float] | None:
        generator = torch.Generator().manual_seed(self.seed + 1)
        best, best_logp = None, -np.inf
        for _ in range(SAMPLES):
            blocks = self.gates.sample_blocks(generator)
            widths = self.gates.widths_of_blocks(blocks)
            cost = self.cost(Candidate.make(snap_widths(self.space, widths)))
            if abs(cost / self.limit - 1) <= 0.01:
                logp = self.gates.log_prob(blocks)
                if logp > best_logp:
                    best, best_logp = {k: float(v) for k, v in widths.items()}, logp
        return best

    # ---- artifacts ------------------------------------------------------------------------------
    def _warmup_path(self):
        if self.context.run_dir is None:
            return None
        keys = ("warmup_epochs", "steps_per_epoch", "batch_size", "block_size", "weight_lr", "random_widths",
                "search_epochs", "alpha_init")
        digest = hashlib.sha1(json.dumps({k: self.settings[k] for k in keys}, sort_keys=True).encode()).hexdigest()[:10]
        return self.context.run_dir / f"dmcp-warmup-seed{self.seed}-{digest}.pt"

    def _save_log(self) -> None:
        if self.context.run_dir is None:
            return
        gates = self.gates
        payload = {"settings": self.settings, "target": self.target, "epochs": self.history_log, "spent": self.spent,
                   "groups": {n: {"block_sizes": s, "marginals": [float(v) for v in m.detach().cpu()]}
                              for n, s, m in zip(gates.names, gates.sizes, gates.marginals())}}
        path = self.context.run_dir / f"dmcp-{self.budget.slug}-seed{self.seed}.json"
        path.write_text(json.dumps(payload, indent=1))
