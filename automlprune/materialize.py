"""Turning a candidate into a network.

:func:`materialize` returns a physically narrower copy (channels removed with
Torch-Pruning, weights snapped to the candidate's bits with the space's quantization scheme and
the bits and scales recorded on the module, see :mod:`automlprune.quantization`); :func:`mask` returns a
same-shape copy whose dropped channels are forced to zero. The two compute the same
function (the tests check it), which is what makes masked training and physical
removal interchangeable.
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import nn

from automlprune.importance import channel_order
from automlprune.quantization import quantize_weights_
from automlprune.reconstruction import Reconstruction
from automlprune.space.candidate import Candidate
from automlprune.space.graph import build_dependency_graph
from automlprune.space.search_space import SearchSpace

ChannelOrder = Mapping[str, torch.Tensor]


def dropped_channels(space: SearchSpace, candidate: Candidate, order: ChannelOrder) -> dict[str, list[int]]:
    """Group name -> sorted indices of the channels ``candidate`` removes (the least important)."""
    space.validate(candidate)
    dropped = {}
    for group, kept in zip(space.groups, space.kept_channels(candidate)):
        if kept < group.channels:
            dropped[group.name] = sorted(order[group.name][int(kept):].tolist())
    return dropped


def kept_channels_by_group(space: SearchSpace, candidate: Candidate, order: ChannelOrder) -> dict[str, torch.Tensor]:
    """Group name -> indices of the channels ``candidate`` keeps, for the groups it shrinks."""
    return {g.name: order[g.name][: int(k)] for g, k in zip(space.groups, space.kept_channels(candidate)) if k < g.channels}


def _prepared_copy(model: nn.Module, candidate: Candidate, space: SearchSpace, order: ChannelOrder,
                   reconstruction: Reconstruction | None) -> nn.Module:
    copied = copy.deepcopy(model)
    if reconstruction is not None:
        reconstruction.fold_(copied, kept_channels_by_group(space, candidate, order))
    return copied


def materialize(model: nn.Module, candidate: Candidate, space: SearchSpace,
                criterion: str | ChannelOrder = "l1", reconstruction: Reconstruction | None = None) -> nn.Module:
    """A pruned, quantized copy of ``model``; ``model`` itself is untouched.

    ``criterion`` names a weight-only importance criterion, or is a precomputed
    :func:`channel_order` of ``model`` (required for data-driven criteria, which need batches;
    reuse it across candidates: it is the same for all). With ``reconstruction``, the removed
    channels are first folded into the kept ones at the layers reading them (least squares, see
    :mod:`automlprune.reconstruction`).
    The result is an ordinary module of the original classes with narrower layers; it needs
    no automlprune to run, and exports with ``torch.export`` / ONNX like the original.
    """
    order = channel_order(model, space, criterion) if isinstance(criterion, str) else criterion
    dropped = dropped_channels(space, candidate, order)
    pruned = _prepared_copy(model, candidate, space, order, reconstruction)
    if dropped:
        device = next(pruned.parameters()).device
        graph = build_dependency_graph(pruned, space.example_input.to(device))
        for group_name, idxs in dropped.items():
            root = pruned.get_submodule(group_name)
            handler = graph.get_pruner_of_module(root).prune_out_channels
            graph.get_pruning_group(root, handler, idxs).prune(record_history=False)
    _quantize(pruned, candidate, space)
    return pruned


def mask(model: nn.Module, candidate: Candidate, space: SearchSpace,
         criterion: str | ChannelOrder = "l1", reconstruction: Reconstruction | None = None) -> nn.Module:
    """A same-shape copy of ``model`` whose dropped channels output exactly zero: every layer
    producing a dropped channel has that channel's weights, bias and BN affine set to zero (and
    every plain conv/linear reading it has the weights of that input zeroed)."""
    order = channel_order(model, space, criterion) if isinstance(criterion, str) else criterion
    dropped = dropped_channels(space, candidate, order)
    masked = _prepared_copy(model, candidate, space, order, reconstruction)
    with torch.no_grad():
        for group in space.groups:
            if group.name not in dropped:
                continue
            channels = torch.tensor(dropped[group.name])
            for member in group.members:
                module = masked.get_submodule(member.layer)
                idx = torch.as_tensor(member.index_map)[channels].flatten().to(module.weight.device)
                if member.dim == "out":
                    for param in (module.weight, getattr(module, "bias", None)):
                        if param is not None:
                            param[idx] = 0
                elif isinstance(module, (nn.Conv2d, nn.Linear)) and getattr(module, "groups", 1) == 1:
                    module.weight[:, idx] = 0  # reads zeros anyway; zeroed so quantization scales match the materialized layer
    _quantize(masked, candidate, space)
    return masked


def _quantize(model: nn.Module, candidate: Candidate, space: SearchSpace) -> None:
    quantize_weights_(model, space.weight_bits(candidate), space.config.bit_scheme, space.config.activation_bits)
