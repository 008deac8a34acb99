"""The pieces of DMCP (Guo et al., 'DMCP: Differentiable Markov Channel Pruning for Neural
Networks', CVPR 2020) that act on a network: channel reordering, Markov channel gates, the
channel scaling that applies them, and the budget losses. The training loop is the ``dmcp``
strategy (:mod:`automlprune.search.dmcp`).

Every prunable group is split into blocks: the first block (the group's minimum width, at least
one block) is always kept; block k > 0 is kept with transition probability sigmoid(alpha_k)
given block k - 1 is kept, so its marginal keep probability is the product of the transitions
up to k. A group's expected width is the minimum plus the sum of block sizes x marginals, and
the expected cost is the one cost model evaluated on expected widths (differentiable).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from automlprune.cost import CostModel
from automlprune.errors import ConfigError
from automlprune.importance import feature_layers
from automlprune.space.search_space import SearchSpace

BUDGET_LOSSES = ("l2", "l1", "log", "band")
BAND_LOW = 0.95
"""The ``band`` loss is zero for expected costs in [BAND_LOW x target, target]."""


@torch.no_grad()
def reorder_channels_(model: nn.Module, space: SearchSpace, order: Mapping[str, torch.Tensor]) -> None:
    """In place: permute every group's channels so that ``order[group]`` (most important first)
    becomes 0, 1, 2, ...: the same permutation on every coupled layer (producers' output rows,
    batch-norm parameters and statistics, readers' input columns), so the function is unchanged
    and keeping k channels means keeping the first k."""
    for group in space.groups:
        perm = torch.as_tensor(order[group.name])
        for member in group.members:
            module = model.get_submodule(member.layer)
            index = torch.as_tensor(member.index_map)
            src, dst = index[perm].flatten(), index.flatten()
            if member.dim == "out":
                tensors = [module.weight, getattr(module, "bias", None), getattr(module, "running_mean", None),
                           getattr(module, "running_var", None)]
                for t in tensors:
                    if t is not None:
                        t[dst.to(t.device)] = t[src.to(t.device)].clone()
            elif isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1):
                w = module.weight
                w[:, dst.to(w.device)] = w[:, src.to(w.device)].clone()
            # a depthwise conv's input channels are its output channels: permuted through its "out" member


class MarkovGates(nn.Module):
    """Architecture parameters of every gated group (prunable groups that can shrink).

    ``block_size``: channels per block (0: about an eighth of the group), rounded up to the
    space's ``round_to``. Alphas start at ``alpha_init`` (transition probability sigmoid(alpha_init)).
    """

    def __init__(self, space: SearchSpace, block_size: int = 0, alpha_init: float = 3.0) -> None:
        super().__init__()
        self.space = space
        unit = space.config.round_to
        self.names, self.sizes = [], []
        alphas = []
        for group in space.groups:
            if group.name not in space.prunable:
                continue
            size = block_size or math.ceil(group.channels / 8)
            size = max(unit, math.ceil(size / unit) * unit)
            first = min(group.channels, max(space.min_width(group.channels), size))
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


class ChannelScaler:
    """Forward hooks multiplying each gated group's feature maps (the outputs of its producing
    layers, after their batch norm) by per-channel factors: keep probabilities for the
    architecture step, 0/1 masks for sampled widths. ``set(None)`` turns scaling off."""

    def __init__(self, model: nn.Module, space: SearchSpace, groups: Sequence[str]) -> None:
        self.factors: dict[str, torch.Tensor] | None = None
        self.channels = {name: space.group_by_name[name].channels for name in groups}
        self.handles = []
        for name in groups:
            for member in feature_layers(space, space.group_by_name[name]):
                module = model.get_submodule(member.layer)
                self.handles.append(module.register_forward_hook(self._hook(name, torch.as_tensor(member.index_map[:, 0]),
                                                                            space.layer_by_name[member.layer].out_channels)))

    def _hook(self, group: str, index: torch.Tensor, width: int):
        def fn(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if self.factors is None or group not in self.factors:
                return None
            factor = output.new_ones(width).index_copy(0, index.to(output.device), self.factors[group].to(output.dtype))
            return output * factor.view(1, -1, *([1] * (output.ndim - 2)))
        return fn

    def set(self, factors: dict[str, torch.Tensor] | None) -> None:
        self.factors = factors

    def masks(self, widths: Mapping[str, int]) -> dict[str, torch.Tensor]:
        """0/1 factors keeping the first ``widths[g]`` channels of each group."""
        return {g: (torch.arange(self.channels[g]) < w).float() for g, w in widths.items()}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def budget_loss(kind: str, ratio: torch.Tensor, target: float) -> torch.Tensor:
    """Penalty on the expected cost ``ratio`` (fraction of the full network's) against ``target``:
    l2: ((r - t) / t)^2; l1: |r - t| / t; log: (log r - log t)^2; band: zero inside
    [0.95 t, t], the relative distance to the band outside."""
    if kind == "l2":
        return ((ratio - target) / target) ** 2
    if kind == "l1":
        return (ratio - target).abs() / target
    if kind == "log":
        return (ratio.log() - math.log(target)) ** 2
    if kind == "band":
        return (F.relu(ratio - target) + F.relu(BAND_LOW * target - ratio)) / target
    raise ConfigError(f"unknown DMCP budget loss '{kind}'; use one of: {', '.join(BUDGET_LOSSES)}")


def snap_widths(space: SearchSpace, widths: Mapping[str, float], to_grid: bool = False) -> dict[str, float]:
    """Keep ratios from (expected) widths: each rounded to the space's channel rounding, or down
    to the space's ratio grid with ``to_grid``."""
    ratios = {}
    for name, w in widths.items():
        channels = space.group_by_name[name].channels
        r = float(np.clip(w / channels, 1e-9, 1.0))
        if to_grid:
            below = [g for g in space.config.ratios if g <= r + 1e-9]
            r = below[-1] if below else space.config.ratios[0]
        ratios[name] = space.channels_for(channels, r) / channels
    return ratios
