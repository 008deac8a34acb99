"""Reordering a network's channels without changing what it computes."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from automlprune.nn import layer_types
from automlprune.space.search_space import SearchSpace


@torch.no_grad()
def reorder_channels_(model: nn.Module, space: SearchSpace, order: Mapping[str, torch.Tensor]) -> None:
    """In place: permute every group's channels so that ``order[group]`` (most important first)
    becomes 0, 1, 2, ...: the same permutation on every coupled layer (producers' output rows,
    batch-norm parameters and statistics, readers' input columns; :mod:`automlprune.nn.layer_types`),
    so the function is unchanged and keeping k channels means keeping the first k."""
    for group in space.groups:
        perm = torch.as_tensor(order[group.name])
        for member in group.members:
            module = model.get_submodule(member.layer)
            index = torch.as_tensor(member.index_map)
            layer_types.of(module).permute_(module, member.dim, index[perm].flatten(), index.flatten())
