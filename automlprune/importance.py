"""Channel importance criteria: which channels of a group survive.

One registry, one signature: a criterion maps (model, group, a few training batches when it
needs data) to one score per channel of the group, higher = keep. Each criterion scores the
layers coupled to the group; a group's score combines its layers' scores after dividing each
by its mean (``combine``: sum by default, or max / mean), so a residual group weighs all its
convs alike. Data-driven criteria read the group's feature maps: the output of each of the
group's output convs, taken after its batch norm where there is one (and after the activation
when the network applies it in place, as the zoo's and torchvision's models do).

Registered in :data:`CRITERIA` (``automlprune list criteria``); ``materialize``, the
evaluator and the ``global`` strategy take the name (``--criterion NAME``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from automlprune.errors import ConfigError
from automlprune.nn import layer_types
from automlprune.nn.hooks import Batch, recording, run_reading_inputs
from automlprune.registry import Registry
from automlprune.space.graph import ChannelGroup, GroupMember
from automlprune.space.search_space import SearchSpace

COMBINE = ("sum", "max", "mean")


class Criterion:
    """Base: ``layer_score`` for weight-only criteria, or ``score_all`` for data-driven ones
    (one pass over the batches for every group)."""

    needs_data = False

    def layer_score(self, model: nn.Module, member: GroupMember) -> Optional[torch.Tensor]:
        """Scores of one coupled layer, per group channel, or None when the layer does not inform this criterion."""
        return None

    def score(self, model: nn.Module, group: ChannelGroup, batches: Sequence[Batch] | None = None,
              combine: str = "sum", seed: int = 0) -> torch.Tensor:
        """One score per channel of ``group`` (float, shape (channels,))."""
        return _combine([self.layer_score(model, m) for m in group.members], group.channels, combine)

    def score_all(self, model: nn.Module, space: SearchSpace, batches: Sequence[Batch] | None = None,
                  combine: str = "sum", seed: int = 0) -> dict[str, torch.Tensor]:
        return {g.name: self.score(model, g, batches, combine, seed) for g in space.groups}


CRITERIA: Registry[Criterion] = Registry("criterion")


def _combine(scores: list[Optional[torch.Tensor]], channels: int, combine: str) -> torch.Tensor:
    if combine not in COMBINE:
        raise ConfigError(f"unknown way to combine layer scores '{combine}'; use one of: {', '.join(COMBINE)}")
    valid = [s.detach().float().cpu() for s in scores if s is not None]
    if not valid:
        return torch.ones(channels)
    normed = torch.stack([s / s.abs().mean().clamp_min(1e-12) for s in valid])
    return {"sum": normed.sum(0), "max": normed.max(0).values, "mean": normed.mean(0)}[combine]


def _per_channel(values: torch.Tensor, member: GroupMember) -> torch.Tensor:
    """Sum per-index values of a layer dimension over the indices each group channel owns."""
    index = torch.as_tensor(member.index_map, device=values.device)
    return values[index].sum(dim=1)


def _out_weights(model: nn.Module, member: GroupMember) -> Optional[torch.Tensor]:
    if member.dim != "out":
        return None
    module = model.get_submodule(member.layer)
    return layer_types.of(module).out_weights(module)


# ---- weight-only criteria -----------------------------------------------------------------------
class Norm(Criterion):
    """L-p norm of each output filter (p = 1: Li et al., 'Pruning Filters for Efficient ConvNets',
    ICLR 2017; p = 2: He et al., 'Soft Filter Pruning', IJCAI 2018)."""

    def __init__(self, p: float) -> None:
        self.p = p

    def layer_score(self, model: nn.Module, member: GroupMember) -> Optional[torch.Tensor]:
        w = _out_weights(model, member)
        return None if w is None else _per_channel(w.abs().pow(self.p).sum(1).pow(1 / self.p), member)


class BNScale(Criterion):
    """|gamma| of the batch norm after the conv (Liu et al., 'Network Slimming', ICCV 2017).
    A group without batch norm falls back to L1."""

    def score(self, model, group, batches=None, combine="sum", seed=0):
        scores = []
        for m in group.members:
            module = model.get_submodule(m.layer)
            if m.dim == "out" and layer_types.of(module).kind == "bn" and module.weight is not None:
                scores.append(_per_channel(module.weight.detach().abs(), m))
        return _combine(scores, group.channels, combine) if scores else CRITERIA.get("l1").score(model, group, combine=combine)


class FPGM(Criterion):
    """Distance to the geometric median (He et al., 'Filter Pruning via Geometric Median', CVPR
    2019): a filter's summed Euclidean distance to the layer's other filters; filters near the
    geometric median (small sums) are the replaceable ones."""

    def layer_score(self, model, member):
        w = _out_weights(model, member)
        if w is None:
            return None
        index = torch.as_tensor(member.index_map)
        per_channel = w[index.flatten()].reshape(index.shape[0], -1)  # flatten-coupled indices stay together
        return torch.cdist(per_channel, per_channel).sum(1)


class Lookahead(Criterion):
    """Lookahead score (Park et al., 'Lookahead: A Far-Sighted Alternative of Magnitude-based
    Pruning', ICLR 2020) lifted to channels: the norm of a channel's output filters times the
    norm of the weights that read it in the next layers (and, through the filter, the inputs it
    reads): ||W_l[c, :]|| x ||W_{l+1}[:, c]||, summed over the group's layers."""

    def score(self, model, group, batches=None, combine="sum", seed=0):
        outgoing = [Norm(2.0).layer_score(model, m) for m in group.members if m.dim == "out"]
        incoming = []
        for m in group.members:
            module = model.get_submodule(m.layer)
            w = layer_types.of(module).in_weights(module) if m.dim == "in" else None  # (in, out * k)
            if w is not None:
                incoming.append(_per_channel(w.pow(2).sum(1).sqrt(), m))
        out_norm = _combine(outgoing, group.channels, combine)
        in_norm = _combine(incoming, group.channels, combine) if incoming else torch.ones(group.channels)
        return out_norm * in_norm


class RandomScores(Criterion):
    """The control: uniform random scores from the given seed."""

    def score(self, model, group, batches=None, combine="sum", seed=0):
        offset = sum(ord(ch) for ch in group.name)
        return torch.rand(group.channels, generator=torch.Generator().manual_seed(seed * 100_003 + offset))


class TorchPruningMagnitude(Criterion):
    """Torch-Pruning's own ``GroupMagnitudeImportance(p=2)`` (Fang et al., 'DepGraph: Towards
    Any Structural Pruning', CVPR 2023): squared L2 norms of every coupled slice of the group
    (output filters, batch norms, and the input slices of the layers reading it), each layer's
    divided by its mean, averaged over the group. Computed by Torch-Pruning on its dependency
    graph, so a group's ranking is exactly the one its pruners use (``combine`` does not apply)."""

    def score_all(self, model, space, batches=None, combine="sum", seed=0):
        import torch_pruning as tp

        from automlprune.space.graph import build_dependency_graph

        device = next(model.parameters()).device
        graph = build_dependency_graph(model, space.example_input.to(device))
        importance = tp.importance.GroupMagnitudeImportance(p=2)
        out = {}
        for group in space.groups:
            root = model.get_submodule(group.name)
            member = next(m for m in group.members if m.layer == group.name and m.dim == "out")
            index = torch.as_tensor(member.index_map)
            handler = graph.get_pruner_of_module(root).prune_out_channels
            pruning_group = graph.get_pruning_group(root, handler, list(range(int(index.numel()))))
            per_index = importance(pruning_group).detach().float().cpu()
            out[group.name] = per_index[index].sum(dim=1)
        return out


CRITERIA.register("l1", Norm(1.0), needs_data=False, description="L1 norm of each output filter (Li et al., 2017)")
CRITERIA.register("l2", Norm(2.0), needs_data=False, description="L2 norm of each output filter (He et al., Soft Filter Pruning, 2018)")
CRITERIA.register("bn_scale", BNScale(), needs_data=False, description="|gamma| of the BN after the conv (Network Slimming, 2017)")
CRITERIA.register("fpgm", FPGM(), needs_data=False, description="distance to the layer's geometric median (FPGM, 2019)")
CRITERIA.register("lookahead", Lookahead(), needs_data=False, description="filter norm x norm of the weights reading it (Lookahead, 2020)")
CRITERIA.register("tp_magnitude", TorchPruningMagnitude(), needs_data=False,
                  description="Torch-Pruning's GroupMagnitudeImportance(p=2) over the coupled group (DepGraph, 2023)")
CRITERIA.register("random", RandomScores(), needs_data=False, description="random scores: the control")


# ---- data-driven criteria -------------------------------------------------------------------------
class DataCriterion(Criterion):
    """Base of data-driven criteria: they score every group in one pass over the batches."""

    needs_data = True

    def score(self, model, group, batches=None, combine="sum", seed=0):
        raise ConfigError("data-driven criteria score all groups at once; call channel_scores(model, space, name, batches)")


class FeatureCriterion(DataCriterion):
    """Base of criteria computed from the groups' feature maps over a few batches."""

    keep_grad = False

    def channel_stat(self, outputs: list[torch.Tensor], labels: list[torch.Tensor]) -> torch.Tensor:
        """Per-index scores of one layer from its recorded outputs (each (B, C, ...))."""
        raise NotImplementedError

    def score_all(self, model, space, batches=None, combine="sum", seed=0):
        if not batches:
            raise ConfigError(f"criterion '{type(self).__name__}' needs a few training batches")
        members = {g.name: space.feature_layers(g) for g in space.groups}
        layers = sorted({m.layer for ms in members.values() for m in ms})
        was_training = model.training
        model.eval()
        labels = []
        with recording(model, layers, self.keep_grad) as store:
            for x, y in batches:
                labels.append(y)
                if self.keep_grad:
                    model.zero_grad(set_to_none=True)
                    with torch.enable_grad():
                        F.cross_entropy(model(x), y).backward()
                    self.collect_grads(store)
                else:
                    with torch.no_grad():
                        model(x)
            stats = {name: self.channel_stat(store[name], labels) for name in layers}
        model.train(was_training)
        return {g: _combine([_per_channel(stats[m.layer], m) for m in ms], space.group_by_name[g].channels, combine)
                for g, ms in members.items()}

    def collect_grads(self, store: dict[str, list[torch.Tensor]]) -> None:
        """Turn the just-recorded outputs into detached (activation, gradient) pairs."""


def _maps(outputs: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate recorded outputs to (N, C, H, W) (linear outputs become (N, C, 1, 1))."""
    x = torch.cat([o.detach().float() for o in outputs])
    return x if x.ndim == 4 else x.reshape(x.shape[0], x.shape[1], 1, 1)


class Taylor(FeatureCriterion):
    """First-order Taylor estimate of the loss change when a channel is gated off (Molchanov et
    al., 'Importance Estimation for Neural Network Pruning', CVPR 2019; Gate Decorator, NeurIPS
    2019): |sum over positions of activation x dLoss/dactivation| per sample, averaged over samples."""

    keep_grad = True

    def collect_grads(self, store):
        for name, outputs in store.items():
            last = outputs[-1]
            outputs[-1] = (last.detach() * last.grad).detach()

    def channel_stat(self, outputs, labels):
        prod = torch.cat([o.float() for o in outputs])
        prod = prod.reshape(prod.shape[0], prod.shape[1], -1)
        return prod.sum(2).abs().mean(0)


class HRank(FeatureCriterion):
    """Average rank of the channel's (post-ReLU) feature maps over the samples (Lin et al.,
    'HRank: Filter Pruning using High-Rank Feature Map', CVPR 2020)."""

    def channel_stat(self, outputs, labels):
        maps = _maps(outputs).clamp_min(0)
        if maps.shape[-1] == 1 and maps.shape[-2] == 1:
            return (maps.flatten(1) > 0).float().mean(0)  # 1x1 maps: rank is 0 or 1
        return torch.linalg.matrix_rank(maps).float().mean(0)


class EZCrop(FeatureCriterion):
    """Share of each feature map's spectral energy outside the central low-frequency zone (Lin et
    al., 'EZCrop: Energy-Zoned Channels for Robust Output Pruning', 2021): 2-D FFT, shifted, zone =
    the central ``zone`` fraction of each axis (0.5 by default), averaged over samples."""

    def __init__(self, zone: float = 0.5) -> None:
        self.zone = zone

    def channel_stat(self, outputs, labels):
        maps = _maps(outputs).clamp_min(0)
        h, w = maps.shape[-2:]
        energy = torch.fft.fftshift(torch.fft.fft2(maps), dim=(-2, -1)).abs().pow(2)
        zh, zw = max(1, int(round(h * self.zone))), max(1, int(round(w * self.zone)))
        top, left = (h - zh) // 2, (w - zw) // 2
        inner = energy[..., top:top + zh, left:left + zw].sum((-2, -1))
        total = energy.sum((-2, -1)).clamp_min(1e-12)
        return (1 - inner / total).mean(0)


class FisherRatio(FeatureCriterion):
    """How well a channel separates the classes: its Fisher ratio, the between-class variance of
    the channel's spatially averaged activation over its within-class variance, on the batches'
    labels. (Registered as ``feature_relevance`` until this release, a name that credited it to
    Aketi et al.'s feature relevance score, which is layer-wise relevance propagation instead; the
    old name is a deprecated alias for one release.)"""

    def channel_stat(self, outputs, labels):
        feats = _maps(outputs).mean((2, 3))  # (N, C)
        y = torch.cat(labels).to(feats.device)
        overall = feats.mean(0)
        between = torch.zeros_like(overall)
        within = torch.zeros_like(overall)
        for cls in y.unique():
            part = feats[y == cls]
            between += len(part) * (part.mean(0) - overall) ** 2
            within += ((part - part.mean(0)) ** 2).sum(0)
        return between / within.clamp_min(1e-12)


class Similarity(FeatureCriterion):
    """Channel similarity (Chen et al., 'Exploiting Channel Similarity for Accelerating Deep
    Convolutional Neural Networks', 2019): average-linkage hierarchical clustering of a layer's
    channels by correlation distance of their feature maps over the batches, cut at
    ``threshold`` (0.05 by default: correlation above 0.95). In each cluster the channel with the
    largest activation energy is its representative and keeps its energy as score; the others
    score 1e-3 of it (redundant)."""

    def __init__(self, threshold: float = 0.05) -> None:
        self.threshold = threshold

    def channel_stat(self, outputs, labels):
        from scipy.cluster.hierarchy import fcluster, linkage

        maps = _maps(outputs)
        flat = maps.transpose(0, 1).reshape(maps.shape[1], -1).double()
        energy = flat.pow(2).mean(1)
        if flat.shape[0] < 2:
            return energy.float()
        centered = flat - flat.mean(1, keepdim=True)
        norms = centered.norm(dim=1).clamp_min(1e-12)
        corr = (centered @ centered.T) / (norms[:, None] * norms[None, :])
        dist = (1 - corr).clamp_min(0).numpy()
        condensed = dist[np.triu_indices(len(dist), 1)]
        clusters = fcluster(linkage(condensed, method="average"), t=self.threshold, criterion="distance")
        scores = energy.clone()
        for c in np.unique(clusters):
            members = np.flatnonzero(clusters == c)
            if len(members) > 1:
                keep = members[int(torch.argmax(energy[members]))]
                for m in members:
                    if m != keep:
                        scores[m] = energy[keep] * 1e-3
        return scores.float()


class Hessian(DataCriterion):
    """Covariance-scaled importance (Li, Sattar, Thrampoulidis and Oymak, 'Exploring Weight
    Importance and Hessian Bias in Model Pruning', 2020): with the Gauss-Newton / input-covariance approximation of the Hessian
    of a linear layer, removing input channel c changes the loss by about
    1/2 * sum over outputs and kernel taps of W[o, c, k]^2 * E[x_c^2] (diagonal of the input
    covariance). Computed at every layer that reads the group's channels, from a few batches."""

    def score_all(self, model, space, batches=None, combine="sum", seed=0):
        if not batches:
            raise ConfigError("criterion 'hessian' needs a few training batches")
        readers = {m.layer for g in space.groups for m in g.members if m.dim == "in"
                   and layer_types.of(model.get_submodule(m.layer)).reads_through_weight(model.get_submodule(m.layer))}
        second: dict[str, torch.Tensor] = {}
        count: dict[str, int] = {}

        def accumulate(name: str, x: torch.Tensor) -> None:
            x = x.float().transpose(0, 1).reshape(x.shape[1], -1)  # (C_in, N * positions)
            second[name] = second.get(name, 0) + x.pow(2).sum(1)
            count[name] = count.get(name, 0) + x.shape[1]

        run_reading_inputs(model, readers, batches, accumulate)
        out = {}
        for group in space.groups:
            per_layer = []
            for m in group.members:
                if m.layer in readers and m.dim == "in":
                    module = model.get_submodule(m.layer)
                    w2 = layer_types.of(module).in_weights(module).float().pow(2).sum(1)  # (C_in,)
                    per_layer.append(_per_channel(0.5 * w2 * second[m.layer] / count[m.layer], m))
            out[group.name] = _combine(per_layer, group.channels, combine)
        return out


CRITERIA.register("taylor", Taylor(), needs_data=True, description="first-order Taylor: |activation x gradient| (Molchanov 2019, Gate Decorator 2019)")
CRITERIA.register("hrank", HRank(), needs_data=True, description="average rank of the feature maps (HRank, 2020)")
CRITERIA.register("ezcrop", EZCrop(), needs_data=True, description="spectral energy outside the central low-frequency zone (EZCrop, 2021)")
CRITERIA.register("fisher_ratio", FisherRatio(), needs_data=True, description="Fisher ratio: between-class over within-class variance of the channel's mean activation")
CRITERIA.alias("feature_relevance", "fisher_ratio", "it computes a Fisher ratio, not Aketi et al.'s feature relevance score")
CRITERIA.register("similarity", Similarity(), needs_data=True, description="hierarchical clustering of similar feature maps; one representative kept (2019)")
CRITERIA.register("prunenet", "automlprune.reconstruction:RECONSTRUCTION_IMPORTANCE", needs_data=True,
                  description="cumulative least-squares reconstruction loss of the reading layers under backward elimination (PruneNet strategy)")
CRITERIA.register("hessian", Hessian(), needs_data=True, description="weights^2 x input second moment: diagonal Gauss-Newton Hessian (2020)")


# ---- entry points ----------------------------------------------------------------------------------
def channel_scores(model: nn.Module, space: SearchSpace, criterion: str = "l1", batches: Sequence[Batch] | None = None,
                   combine: str = "sum", seed: int = 0) -> dict[str, torch.Tensor]:
    """Scores of every group's channels under ``criterion`` (data-driven ones need ``batches``)."""
    entry = CRITERIA.get(criterion)
    if entry.needs_data and not batches:
        raise ConfigError(f"criterion '{criterion}' needs a few training batches; the evaluator passes its BN batches")
    return entry.score_all(model, space, batches, combine, seed)


def order_from_scores(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """For every group, channel indices from most to least important (ties: lower index first)."""
    return {name: torch.sort(s, descending=True, stable=True).indices for name, s in scores.items()}


def channel_order(model: nn.Module, space: SearchSpace, criterion: str = "l1", batches: Sequence[Batch] | None = None,
                  combine: str = "sum", seed: int = 0) -> dict[str, torch.Tensor]:
    """For every group, its channel indices from most to least important (int64, shape (channels,))."""
    return order_from_scores(channel_scores(model, space, criterion, batches, combine, seed))
