"""Channel gates: per-channel factors multiplied into a group's feature maps by forward hooks.

Used for soft gates (keep probabilities, as DMCP's architecture step) and hard 0/1 masks
(sampled widths, masked training); the network's weights are never touched.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from automlprune.space.search_space import SearchSpace


class ChannelScaler:
    """Forward hooks multiplying each listed group's feature maps (the outputs of its producing
    layers, after their batch norm: :meth:`SearchSpace.feature_layers`) by per-channel factors.
    ``set(None)`` (the start state) turns scaling off; ``remove()`` takes the hooks away."""

    def __init__(self, model: nn.Module, space: SearchSpace, groups: Sequence[str]) -> None:
        self.factors: dict[str, torch.Tensor] | None = None
        self.channels = {name: space.group_by_name[name].channels for name in groups}
        self.handles = []
        for name in groups:
            for member in space.feature_layers(space.group_by_name[name]):
                module = model.get_submodule(member.layer)
                self.handles.append(module.register_forward_hook(self._hook(name, torch.as_tensor(member.index_map),
                                                                            space.layer_by_name[member.layer].out_channels)))

    def _hook(self, group: str, index: torch.Tensor, width: int):
        def fn(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if self.factors is None or group not in self.factors:
                return None
            per_unit = self.factors[group].to(output.dtype).repeat_interleave(index.shape[1])  # a unit's channels share its factor
            factor = output.new_ones(width).index_copy(0, index.flatten().to(output.device), per_unit)
            return output * factor.view(1, -1, *([1] * (output.ndim - 2)))
        return fn

    def set(self, factors: dict[str, torch.Tensor] | None) -> None:
        """Per group, one factor per channel (shape (channels,)); groups left out are not scaled."""
        self.factors = factors

    def masks(self, widths: Mapping[str, int]) -> dict[str, torch.Tensor]:
        """0/1 factors keeping the first ``widths[g]`` channels of each group."""
        return {g: (torch.arange(self.channels[g]) < w).float() for g, w in widths.items()}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
