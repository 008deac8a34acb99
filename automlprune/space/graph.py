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

COST_LAYER_TYPES = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class LayerInfo:
    """One parameterised leaf layer.

    kind: "conv", "linear" or "bn". For conv/linear, ``in_channels``/``out_channels`` are
    features for linear; ``kernel`` is kh*kw (1 for linear); ``positions`` is the number of
    output positions per sample (H_out*W_out for conv, the product of leading dims for
    linear); ``input_shape`` is the per-sample shape of its input, e.g. (C, H, W). For bn,
    in = out = num_features.
    """

    name: str
    kind: Literal["conv", "linear", "bn"]
    in_channels: int
    out_channels: int
    groups: int
    kernel: int
    stride: int
    positions: int
    has_bias: bool
    order: int
    input_shape: tuple[int, ...] = ()

    @property
    def depthwise(self) -> bool:
        return self.kind == "conv" and self.groups > 1 and self.groups == self.in_channels == self.out_channels


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
    """The layer table of ``model``, in execution order. Raises :class:`UnsupportedLayerError`
    for a parameterised layer whose cost automlprune cannot compute."""
    for name, module in model.named_modules():
        own_params = list(module.parameters(recurse=False))
        if own_params and not isinstance(module, COST_LAYER_TYPES):
            raise UnsupportedLayerError(
                f"layer '{name}' ({type(module).__name__}) holds parameters but automlprune only costs and prunes "
                "Conv2d, Linear and BatchNorm layers; replace it or wrap the model without it"
            )
    records: dict[str, LayerInfo] = {}
    handles = []

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if name in records:
                raise UnsupportedLayerError(f"layer '{name}' runs more than once per forward pass; automlprune needs each layer used once")
            records[name] = _layer_info(name, module, output, len(records), tuple(inputs[0].shape[1:]))
        return fn

    for name, module in model.named_modules():
        if isinstance(module, COST_LAYER_TYPES):
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
    unused = [n for n, m in model.named_modules() if isinstance(m, COST_LAYER_TYPES) and n not in records]
    if unused:
        raise UnsupportedLayerError(f"layers {unused[:3]} never run in the forward pass; remove unused layers from the model before pruning it")
    return sorted(records.values(), key=lambda r: r.order)


def _layer_info(name: str, module: nn.Module, output: torch.Tensor, order: int, input_shape: tuple[int, ...]) -> LayerInfo:
    batch = output.shape[0]
    if isinstance(module, nn.Conv2d):
        return LayerInfo(name, "conv", module.in_channels, module.out_channels, module.groups,
                         int(np.prod(module.kernel_size)), int(module.stride[0]), int(output[0, 0].numel()),
                         module.bias is not None, order, input_shape)
    if isinstance(module, nn.Linear):
        return LayerInfo(name, "linear", module.in_features, module.out_features, 1, 1, 1,
                         int(output.numel() // (batch * module.out_features)), module.bias is not None, order, input_shape)
    return LayerInfo(name, "bn", module.num_features, module.num_features, 1, 1, 1, 1, module.affine, order, input_shape)


def discover_groups(model: nn.Module, example_input: torch.Tensor, layers: list[LayerInfo]) -> list[ChannelGroup]:
    """The prunable channel groups of ``model``, sorted by execution order of their root layer.

    The output layer (the last Conv/Linear to run) never loses output channels.
    """
    order = {layer.name: layer.order for layer in layers}
    output_layer = max((l for l in layers if l.kind != "bn"), key=lambda l: l.order).name
    graph = build_dependency_graph(model, example_input)
    names = {module: name for name, module in model.named_modules()}
    groups = []
    for tp_group in graph.get_all_groups(ignored_layers=[model.get_submodule(output_layer)],
                                         root_module_types=[nn.Conv2d, nn.Linear]):
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
