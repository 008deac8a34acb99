"""What the network is made of, recorded once from one traced forward pass:

* the layer table: every leaf module that holds parameters (Conv2d, Linear, BatchNorm)
  with its shapes and the spatial size of its output;
* the channel groups: sets of channels that must shrink together (residual adds,
  concatenations, depthwise convs, conv -> flatten -> linear), from Torch-Pruning's
  ``DependencyGraph``. Each group records, for every coupled layer and dimension, which
  indices of that layer each of the group's channels owns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from automlprune.errors import UnsupportedLayerError
from automlprune.nn import layer_types
from automlprune.nn.layer_types import LayerInfo

__all__ = ["ChannelGroup", "GroupMember", "LayerInfo", "build_dependency_graph", "discover_groups", "record_layers"]


@dataclass(frozen=True)
class GroupMember:
    """One layer dimension coupled to a group: ``index_map[c]`` are the indices of ``layer``'s
    ``dim`` ("out" or "in") owned by the group's channel ``c`` (shape (channels, k); k > 1
    where a flatten spreads one channel over k features)."""

    layer: str
    dim: Literal["out", "in"]
    index_map: np.ndarray


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be kept or removed together; named after ``root``, the first layer
    (in execution order) whose output channels belong to it."""

    name: str
    channels: int
    members: tuple[GroupMember, ...]

    @property
    def out_layers(self) -> list[str]:
        return [m.layer for m in self.members if m.dim == "out"]


def build_dependency_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model`` traced with ``example_input`` (same device)."""
    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)


def record_layers(model: nn.Module, example_input: torch.Tensor) -> list[LayerInfo]:
    """The layer table of ``model``, in execution order (one row per module of a type in
    :mod:`automlprune.nn.layer_types`). Raises :class:`UnsupportedLayerError` for a
    parameterised layer whose cost automlprune cannot compute."""
    known = ", ".join(sorted(t.module_type.__name__.lstrip("_") for t in layer_types.types()))
    for name, module in model.named_modules():
        own_params = list(module.parameters(recurse=False))
        if own_params and layer_types.lookup(module) is None:
            raise UnsupportedLayerError(
                f"layer '{name}' ({type(module).__name__}) holds parameters but automlprune only costs and prunes "
                f"{known} layers; replace it or wrap the model without it"
            )
    records: dict[str, LayerInfo] = {}
    handles = []

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if name in records:
                raise UnsupportedLayerError(f"layer '{name}' runs more than once per forward pass; automlprune needs each layer used once")
            records[name] = layer_types.of(module).info(name, module, output, len(records), tuple(inputs[0].shape[1:]))
        return fn

    for name, module in model.named_modules():
        if layer_types.lookup(module) is not None:
            handles.append(module.register_forward_hook(hook(name)))
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(example_input)
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    unused = [n for n, m in model.named_modules() if layer_types.lookup(m) is not None and n not in records]
    if unused:
        raise UnsupportedLayerError(f"layers {unused[:3]} never run in the forward pass; remove unused layers from the model before pruning it")
    return sorted(records.values(), key=lambda r: r.order)


def discover_groups(model: nn.Module, example_input: torch.Tensor, layers: list[LayerInfo]) -> list[ChannelGroup]:
    """The prunable channel groups of ``model``, sorted by execution order of their root layer.

    The output layer (the last Conv/Linear to run) never loses output channels.
    """
    order = {layer.name: layer.order for layer in layers}
    output_layer = max((l for l in layers if l.has_weights), key=lambda l: l.order).name
    graph = build_dependency_graph(model, example_input)
    names = {module: name for name, module in model.named_modules()}
    groups = []
    for tp_group in graph.get_all_groups(ignored_layers=[model.get_submodule(output_layer)],
                                         root_module_types=[t.module_type for t in layer_types.types() if t.has_weights]):
        groups.append(_to_channel_group(graph, tp_group, names, order))
    return sorted(groups, key=lambda g: order[g.name])


def _to_channel_group(graph: tp.DependencyGraph, tp_group: tp.Group, names: dict, order: dict) -> ChannelGroup:
    per_member: dict[tuple[str, str], dict[int, list[int]]] = {}
    for item in tp_group.items:
        module = item.dep.target.module
        name = names.get(module)
        if name is None or name not in order:
            continue  # element-wise ops, reshapes: no parameters, no cost
        dim = "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
        mapping = per_member.setdefault((name, dim), {})
        for root, idx in zip(item.root_idxs, item.idxs):
            mapping.setdefault(int(root), []).append(int(idx))
    channels = len(tp_group.items[0].idxs)
    members = []
    for (name, dim), mapping in per_member.items():
        widths = {len(v) for v in mapping.values()}
        if len(mapping) != channels or len(widths) != 1:
            raise UnsupportedLayerError(
                f"layer '{name}' couples to a channel group unevenly (split or slicing of channels); automlprune cannot cost it, pin that part of the model"
            )
        members.append(GroupMember(name, dim, np.array([sorted(mapping[c]) for c in range(channels)], dtype=np.int64)))
    members.sort(key=lambda m: (order[m.layer], m.dim))
    root = next(m.layer for m in members if m.dim == "out")
    return ChannelGroup(root, channels, tuple(members))
