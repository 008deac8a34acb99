"""Turning a candidate into a network.

:func:`materialize` returns a physically narrower copy: every layer side a removed channel
touches is cut through the table of layer types (:mod:`automlprune.nn.layer_types`), at the
indices the search space's channel groups recorded once from Torch-Pruning's dependency graph
(no tracing per candidate); then the sparse layers lose the weights their patterns remove
(:mod:`automlprune.sparsity.masks`, masks recorded on the module), and the weights are
snapped to the candidate's bits with the space's quantization scheme and the bits and scales
recorded on the module (see :mod:`automlprune.quantization`). :func:`mask` returns a same-shape copy whose dropped channels
are forced to zero. The two compute the same function (the tests check it), which is what
makes masked training and physical removal interchangeable.
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import nn

from automlprune.errors import ConfigError
from automlprune.importance import channel_order
from automlprune.nn import layer_types
from automlprune.quantization import quantize_weights_
from automlprune.reconstruction import Reconstruction
from automlprune.space.candidate import Candidate
from automlprune.space.search_space import Resolved, SearchSpace
from automlprune.sparsity.criteria import WEIGHT_CRITERIA, WeightScores
from automlprune.sparsity.masks import sparsify_

ChannelOrder = Mapping[str, torch.Tensor]


def kept_channels_by_group(space: SearchSpace, candidate: Candidate | Resolved, order: ChannelOrder) -> dict[str, torch.Tensor]:
    """Group name -> indices of the channels ``candidate`` keeps (the most important by
    ``order``), for the groups it shrinks."""
    kept = space.resolve(candidate).kept
    return {g.name: order[g.name][: int(k)] for g, k in zip(space.groups, kept) if k < g.channels}


def _prepared_copy(model: nn.Module, kept: Mapping[str, torch.Tensor], reconstruction: Reconstruction | None) -> nn.Module:
    copied = copy.deepcopy(model)
    if reconstruction is not None:
        reconstruction.fold_(copied, kept)
    return copied


def materialize(model: nn.Module, candidate: Candidate | Resolved, space: SearchSpace,
                criterion: str | ChannelOrder = "l1", reconstruction: Reconstruction | None = None,
                weight_criterion: str | WeightScores = "magnitude") -> nn.Module:
    """A pruned, quantized copy of ``model``; ``model`` itself is untouched.

    ``criterion`` names a weight-only importance criterion, or is a precomputed
    :func:`channel_order` of ``model`` (required for data-driven criteria, which need batches;
    reuse it across candidates: it is the same for all). With ``reconstruction``, the removed
    channels are first folded into the kept ones at the layers reading them (least squares, see
    :mod:`automlprune.reconstruction`). Kept channels stay in their original order.
    The result is an ordinary module of the original classes with narrower layers; it needs
    no automlprune to run, and exports with ``torch.export`` / ONNX like the original.
    """
    resolved = space.resolve(candidate)
    order = channel_order(model, space, criterion) if isinstance(criterion, str) else criterion
    kept = kept_channels_by_group(space, resolved, order)
    pruned = _prepared_copy(model, kept, reconstruction)
    surviving = space.surviving_indices(kept)
    for (layer, side), keep in surviving.items():
        module = pruned.get_submodule(layer)
        layer_types.of(module).select_(module, side, keep)
    if resolved.sparsity:
        sparsify_(pruned, resolved.sparsity, _weight_scores(model, pruned, resolved, surviving, weight_criterion))
    _quantize(pruned, resolved, space)
    return pruned


def _weight_scores(model: nn.Module, pruned: nn.Module, resolved: Resolved, surviving: Mapping[tuple[str, str], torch.Tensor],
                   criterion: str | WeightScores) -> dict[str, torch.Tensor]:
    """Scores per weight of the sparse layers of ``pruned``: computed on it for a criterion of
    the network, else ``model``'s scores cut to the kept channels through the table of layer types."""
    layers = list(resolved.sparsity)
    if isinstance(criterion, str):
        entry = WEIGHT_CRITERIA.get(criterion)
        if not entry.of_network:
            raise ConfigError(f"weight criterion '{criterion}' is scored on the starting network; "
                              "pass its scores (automlprune.sparsity.criteria.weight_scores) instead of its name")
        return entry.score(pruned, None, layers, None)
    out = {}
    for layer in layers:
        holder = copy.deepcopy(model.get_submodule(layer))
        holder.weight = nn.Parameter(criterion[layer].detach().clone().to(holder.weight.device), requires_grad=False)
        for side in ("out", "in"):
            if (layer, side) in surviving:
                layer_types.of(holder).select_(holder, side, surviving[(layer, side)])
        out[layer] = holder.weight.detach()
    return out


def mask(model: nn.Module, candidate: Candidate | Resolved, space: SearchSpace,
         criterion: str | ChannelOrder = "l1", reconstruction: Reconstruction | None = None) -> nn.Module:
    """A same-shape copy of ``model`` whose dropped channels output exactly zero: every layer
    producing a dropped channel has that channel's weights, bias and BN affine set to zero (and
    every plain conv/linear reading it has the weights of that input zeroed, so quantization
    scales match the materialized layer)."""
    resolved = space.resolve(candidate)
    if resolved.sparsity:
        raise ConfigError("a candidate with weight densities is built with materialize(), not as a full-shape masked network")
    order = channel_order(model, space, criterion) if isinstance(criterion, str) else criterion
    kept = kept_channels_by_group(space, resolved, order)
    masked = _prepared_copy(model, kept, reconstruction)
    zero_dropped_(masked, space, kept)
    _quantize(masked, resolved, space)
    return masked


@torch.no_grad()
def zero_dropped_(model: nn.Module, space: SearchSpace, kept: Mapping[str, torch.Tensor]) -> None:
    """Zero, in place, the channels each group of ``kept`` (group -> kept channel indices; groups
    absent stay whole) drops, on every coupled layer: producers' filters and biases, batch-norm
    affine, and the weight columns of plain conv/linear readers (:mod:`automlprune.nn.layer_types`)."""
    for name, keep in kept.items():
        group = space.group_by_name[name]
        dropped = torch.as_tensor(sorted(set(range(group.channels)) - set(torch.as_tensor(keep).tolist())), dtype=torch.long)
        if not len(dropped):
            continue
        for member in group.members:
            module = model.get_submodule(member.layer)
            layer_types.of(module).zero_(module, member.dim, torch.as_tensor(member.index_map)[dropped].flatten())


def _quantize(model: nn.Module, resolved: Resolved, space: SearchSpace) -> None:
    quantize_weights_(model, resolved.bits, space.config.bit_scheme, space.config.activation_bits)
