"""Channel importance criteria: which channels of a group survive.

A criterion scores each layer coupled to a group, one score per group channel (higher =
keep). The group's score is the sum over its layers of each layer's scores divided by
their mean (so layers of different scale weigh alike; a residual group combines all its
convs). Registered by name in :data:`CRITERIA`; ``materialize`` and the strategies take
the name.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from automlprune.registry import Registry
from automlprune.space.graph import ChannelGroup, GroupMember
from automlprune.space.search_space import SearchSpace

LayerScore = Callable[[nn.Module, GroupMember], Optional[torch.Tensor]]
"""(layer module, member) -> one score per group channel, or None when the layer does not inform this criterion."""

CRITERIA: Registry[LayerScore] = Registry("criterion")


def _per_channel(values: torch.Tensor, member: GroupMember) -> torch.Tensor:
    """Sum per-index values of a layer dimension over the indices each group channel owns."""
    index = torch.as_tensor(member.index_map, device=values.device)
    return values[index].sum(dim=1)


def _weight_norm(p: float) -> LayerScore:
    def score(module: nn.Module, member: GroupMember) -> Optional[torch.Tensor]:
        if member.dim != "out" or not isinstance(module, (nn.Conv2d, nn.Linear)):
            return None
        w = module.weight.detach().flatten(1)
        return _per_channel(w.abs().pow(p).sum(dim=1).pow(1 / p), member)
    return score


CRITERIA.register("l1", _weight_norm(1.0), needs_data=False,
                  description="L1 norm of each output filter (Li et al., 'Pruning Filters for Efficient ConvNets', ICLR 2017)")
CRITERIA.register("l2", _weight_norm(2.0), needs_data=False,
                  description="L2 norm of each output filter (Li et al. 2017; He et al., 'Soft Filter Pruning', 2018)")


@CRITERIA.register("bn_scale", needs_data=False,
                   description="|gamma| of the batch norm after the conv (Liu et al., 'Network Slimming', ICCV 2017); groups without BN fall back to L1")
def _bn_scale(module: nn.Module, member: GroupMember) -> Optional[torch.Tensor]:
    if member.dim != "out" or not isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) or module.weight is None:
        return None
    return _per_channel(module.weight.detach().abs(), member)


def group_scores(model: nn.Module, group: ChannelGroup, criterion: str) -> torch.Tensor:
    """Importance of each channel of ``group`` in ``model``: float tensor of shape (channels,)."""
    layer_score = CRITERIA.get(criterion)
    total = None
    for member in group.members:
        s = layer_score(model.get_submodule(member.layer), member)
        if s is None:
            continue
        s = s.float().cpu()
        s = s / s.mean().clamp_min(1e-12)
        total = s if total is None else total + s
    if total is None:  # e.g. bn_scale on a group without batch norm
        return group_scores(model, group, "l1") if criterion != "l1" else torch.ones(group.channels)
    return total


def channel_order(model: nn.Module, space: SearchSpace, criterion: str = "l1") -> dict[str, torch.Tensor]:
    """For every group, its channel indices from most to least important (int64, shape (channels,)).
    Ties keep the lower index first, so the order is deterministic."""
    order = {}
    for group in space.groups:
        scores = group_scores(model, group, criterion)
        order[group.name] = torch.sort(scores, descending=True, stable=True).indices
    return order
