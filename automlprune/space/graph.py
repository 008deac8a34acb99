"""What the network is made of, recorded once from one traced forward pass:

* the layer table: every leaf module that holds parameters (Conv2d, Linear, BatchNorm)
  with its shapes and the spatial size of its output;
* the channel groups: sets of channels that must shrink together (residual adds,
  concatenations, depthwise convs, conv -> flatten -> linear), from Torch-Pruning's
  ``DependencyGraph``. Each group records, for every coupled layer and dimension, which
  indices of that layer each of the group's channels owns. A group that feeds or leaves a
  grouped convolution is searched in units of one channel per convolution group (the same
  position in every group, as Torch-Pruning prunes them), so every pruned network still splits
  evenly into the convolution's groups (group norms alike). A group automlprune cannot shrink
  exactly (channels that reach a layer unevenly, a grouped convolution fed by a concatenation,
  a parameter outside the table's layers, a LayerNorm over another dimension) is kept with the
  reason in ``ChannelGroup.unprunable``; the search space pins it and says so.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Any, Iterator, Literal

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
    (in execution order) whose output channels belong to it.

    ``channels`` counts the units the search keeps or removes; each unit is ``unit`` of the root
    layer's channels (1, or the group count of the grouped convolutions the group touches), so
    the root layer has ``channels * unit`` of them. ``unprunable`` is why the group must keep
    every channel ("" when it may shrink)."""

    name: str
    channels: int
    members: tuple[GroupMember, ...]
    unit: int = 1
    unprunable: str = ""

    @property
    def width(self) -> int:
        """The root layer's channels in this group (``channels * unit``)."""
        return self.channels * self.unit

    @property
    def out_layers(self) -> list[str]:
        return [m.layer for m in self.members if m.dim == "out"]


SHUFFLE_OP = "ChannelShuffleBackward"
"""How a channel shuffle traced by :func:`traceable_channel_shuffles` is named in the autograd graph."""


class _ChannelShuffle(torch.autograd.Function):
    """torchvision's ``channel_shuffle`` as one autograd node: Torch-Pruning's tracer cannot follow
    its reshape-transpose-reshape, but sees this as one element-wise op whose groups automlprune
    then pins (a shuffle interleaves channels the tracer would map one-to-one)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, groups: int) -> torch.Tensor:
        ctx.groups = groups
        return _shuffle(x, groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _shuffle(grad, grad.shape[1] // ctx.groups), None  # the inverse interleave


def _shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's ``channel_shuffle``: channel g * (C / groups) + j moves to j * groups + g."""
    n, c, *rest = x.shape
    return x.reshape(n, groups, c // groups, *rest).transpose(1, 2).reshape(n, c, *rest)


@contextlib.contextmanager
def traceable_channel_shuffles() -> Iterator[None]:
    """While tracing: torchvision's ShuffleNet calls :class:`_ChannelShuffle` instead of its own
    ``channel_shuffle`` (the same values)."""
    try:
        import torchvision.models.shufflenetv2 as shufflenet
    except ImportError:
        yield
        return
    real = shufflenet.channel_shuffle
    shufflenet.channel_shuffle = lambda x, groups: _ChannelShuffle.apply(x, groups)
    try:
        yield
    finally:
        shufflenet.channel_shuffle = real


def build_dependency_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model`` traced with ``example_input`` (same device).
    Raises :class:`UnsupportedLayerError` when Torch-Pruning cannot trace the model (it fails,
    for one, on a channel shuffle written as reshape-transpose-reshape outside torchvision)."""
    try:
        with torch.enable_grad(), traceable_channel_shuffles():
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
    except Exception as exc:  # noqa: BLE001 - the model's forward already ran (record_layers): this is Torch-Pruning's tracing
        raise UnsupportedLayerError(
            f"Torch-Pruning, which automlprune uses to find which channels are coupled, cannot trace this model "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else 'no message'}); a channel shuffle "
            "written as reshape-transpose-reshape is one such case: automlprune cannot prune this model yet") from None


def _tp_groups(graph: tp.DependencyGraph, ignored: list[nn.Module], root_types: list[type]) -> Iterator[tuple[nn.Module, Any]]:
    """Torch-Pruning's ``get_all_groups``, one root at a time: (root module, its group), or
    (root module, the exception) for a root whose group Torch-Pruning cannot map (its index
    mappings fail, e.g. through a split after a shuffle). Groups holding an ignored layer's
    output channels are skipped, as there."""
    visited: set[nn.Module] = set()
    for module in list(graph.module2node):
        if module in ignored or not isinstance(module, tuple(root_types)) or module in visited:
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        try:
            group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(pruner.get_out_channels(module))))
        except Exception as exc:  # noqa: BLE001 - Torch-Pruning's index mapping: the group is pinned with the reason
            visited.add(module)
            yield module, exc
            continue
        outs = [dep.target.module for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler)]
        visited.update(outs)
        if not any(m in ignored for m in outs):
            yield module, group


def fixed_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters held outside the table's layers (a block's layer scale, a PReLU's slopes):
    name -> entries. They are costed as float32 and never cut; a channel group passing through
    one is pinned (:func:`discover_groups`)."""
    in_table = {id(p) for m in model.modules() if layer_types.lookup(m) is not None for p in m.parameters(recurse=False)}
    return {name: p.numel() for name, p in model.named_parameters() if id(p) not in in_table}


def record_layers(model: nn.Module, example_input: torch.Tensor) -> list[LayerInfo]:
    """The layer table of ``model``, in execution order (one row per module of a type in
    :mod:`automlprune.nn.layer_types`); a module used more than once is one row with all
    its calls' positions (its channels are coupled across the calls by the dependency graph).
    Raises :class:`UnsupportedLayerError` for a layer that never runs."""
    records: dict[str, LayerInfo] = {}
    handles = []

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if name in records:  # a shared module: its weights serve every call, its MACs add up
                first = records[name]
                again = layer_types.of(module).info(name, module, output, first.order, tuple(inputs[0].shape[1:]))
                records[name] = replace(first, positions=first.positions + again.positions, calls=first.calls + 1)
                return
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
    fixed = fixed_parameters(model)
    names.update({p: name for name, p in model.named_parameters() if name in fixed})
    groups = []
    by_name = {layer.name: layer for layer in layers}
    layer_norms = {layer.name: layer.out_channels for layer in layers if layer.kind == "ln"}  # features each normalizes
    for root, tp_group in _tp_groups(graph, [model.get_submodule(output_layer)],
                                     [t.module_type for t in layer_types.types() if t.has_weights]):
        if isinstance(tp_group, Exception):
            name = names[root]
            width = by_name[name].out_channels
            groups.append(ChannelGroup(name, width, (GroupMember(name, "out", np.arange(width)[:, None]),),
                                       unprunable=f"Torch-Pruning cannot map its channels ({type(tp_group).__name__})"))
            continue
        groups.append(_in_units(_to_channel_group(graph, tp_group, names, order, fixed, layer_norms), by_name))
    return sorted(groups, key=lambda g: order[g.name])


def _to_channel_group(graph: tp.DependencyGraph, tp_group: tp.Group, names: dict, order: dict,
                      fixed: dict[str, int], layer_norms: dict[str, int]) -> ChannelGroup:
    per_member: dict[tuple[str, str], dict[int, list[int]]] = {}
    held = []  # parameters outside the table that these channels pass through
    shuffled = False
    for item in tp_group.items:
        module = item.dep.target.module
        name = names.get(module)
        if name is not None and name not in order and (name in fixed or any(p.startswith(name + ".") for p in fixed)):
            held.append(name)
        if SHUFFLE_OP in repr(module):
            shuffled = True
        if name is None or name not in order:
            continue  # element-wise ops, reshapes: no parameters, no cost
        dim = "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
        mapping = per_member.setdefault((name, dim), {})
        for root, idx in zip(item.root_idxs, item.idxs):
            mapping.setdefault(int(root), []).append(int(idx))
    channels = len(tp_group.items[0].idxs)
    members, uneven = [], []
    for (name, dim), mapping in per_member.items():
        widths = {len(v) for v in mapping.values()}
        if len(mapping) != channels or len(widths) != 1:
            uneven.append(name)
            continue
        members.append(GroupMember(name, dim, np.array([sorted(mapping[c]) for c in range(channels)], dtype=np.int64)))
    members.sort(key=lambda m: (order[m.layer], m.dim))
    root = next(m.layer for m in members if m.dim == "out")
    other_axis = [m.layer for m in members if m.layer in layer_norms and m.index_map.size != layer_norms[m.layer]]
    reason = (f"its channels reach layer '{uneven[0]}' unevenly (a split or slice of channels)" if uneven
              else f"it passes through '{held[0]}', whose parameters automlprune cannot cut" if held
              else "it passes through a channel shuffle" if shuffled
              else f"LayerNorm '{other_axis[0]}' normalizes {layer_norms[other_axis[0]]} entries, not these {channels} channels"
              if other_axis else "")
    return ChannelGroup(root, channels, tuple(members), unprunable=reason)


def _split(layer: LayerInfo) -> bool:
    """Whether ``layer``'s channels must stay evenly split (a grouped conv, a group norm)."""
    return layer.even_split > 1


def _in_units(group: ChannelGroup, layers: dict[str, LayerInfo]) -> ChannelGroup:
    """``group`` searched in units that keep every grouped convolution (or group norm) it
    touches evenly split: unit u holds the channels at position u of each of L equal slices of
    the first such member's side (L = the lcm of the members' group counts), so removing a unit
    removes the same local channel from every convolution group. Unchanged when no such layer is
    coupled; marked unprunable when the units cannot keep every one of them even."""
    grouped = [m for m in group.members if _split(layers[m.layer])]
    if not grouped or group.unprunable:
        return group
    slices = math.lcm(*(layers[m.layer].even_split for m in grouped))
    first = grouped[0]
    side = _side_width(layers[first.layer], first.dim)
    position = first.index_map[:, 0]
    if first.index_map.shape[1] != 1 or group.channels % slices or sorted(position.tolist()) != list(range(side)):
        return replace(group, unprunable=f"it reaches '{first.layer}' (in {layers[first.layer].groups} groups) "
                                         "together with other channels")
    channel_at = np.argsort(position)  # root channel at each position of the first grouped member's side
    units = group.channels // slices
    unit_channels = np.stack([channel_at[np.arange(slices) * units + u] for u in range(units)])  # (units, slices)
    members = tuple(GroupMember(m.layer, m.dim, m.index_map[unit_channels].reshape(units, -1)) for m in group.members)
    for m in members:
        if _split(layers[m.layer]) and not _splits_evenly(m, layers[m.layer]):
            return replace(group, unprunable=f"its channels cannot be removed evenly from the groups of '{m.layer}'")
    root_unit = next(m.index_map.shape[1] for m in members if m.layer == group.name and m.dim == "out")
    return ChannelGroup(group.name, units, members, unit=root_unit)


def _side_width(layer: LayerInfo, dim: str) -> int:
    return layer.out_channels if dim == "out" else layer.in_channels


def _splits_evenly(member: GroupMember, layer: LayerInfo) -> bool:
    """Whether removing any one unit of ``member`` removes the same local channels from every
    group of its layer (a grouped convolution or group norm)."""
    per_group = _side_width(layer, member.dim) // layer.even_split
    for indices in member.index_map:
        owner, local = indices // per_group, indices % per_group
        sets = [sorted(local[owner == g].tolist()) for g in range(layer.even_split)]
        if any(s != sets[0] for s in sets):
            return False
    return True
