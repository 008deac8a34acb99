"""Weight-level importance criteria: which individual weights of a layer a sparsity pattern keeps.

One registry beside the channel criteria (:mod:`automlprune.importance`), one signature: a
criterion maps (model, space, layers, a few training batches when it needs data) to a score per
weight of each layer (the weight's shape; higher = keep). Within a layer only the order of the
scores matters; patterns pick the top ones (:mod:`automlprune.sparsity.patterns`).

* ``magnitude``: |w|.
* ``lap``: lookahead pruning (Park et al., ICLR 2020; alinlab/lookahead_pruning ``lap_bn``):
  w^2 x P[input channel] x N[output channel], where P sums the squared weights of every layer
  producing that input channel (each times its batch norm's (gamma / sigma)^2) and N sums the
  squared weights every consumer of the output channel reads it with, times the layer's own
  batch norm's (gamma / sigma)^2. Producers and consumers come from the dependency graph's
  channel groups, so residual additions, shortcuts and concatenations count all their layers
  (the official code chains layers in module order and skips shortcuts; see the reference
  notes). A channel with no producer (the image) or no consumer (the logits) has factor 1.
  Scored once on the network the search starts from (LAP's ``base`` mode), then cut to the
  kept channels like the weights.
* ``hessian``: w^2 x E[x^2] over the weight's own input column (the im2col second moment, with
  the layer's padding and stride), from the evaluator's batches: the diagonal Gauss-Newton
  Hessian of the layer's output error, the covariance-scaled importance of Li, Sattar,
  Thrampoulidis and Oymak ("Exploring weight importance and Hessian bias in model pruning",
  2020). Their derivation is for linear models; the per-layer network form and the exact im2col
  moment are this implementation's reading (BatchNorm is not folded first: rows are ranked
  within a layer, where a row's BN scale does not change the order of unstructured or N:M
  choices).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from automlprune.errors import ConfigError
from automlprune.nn import layer_types
from automlprune.nn.hooks import Batch, run_reading_inputs
from automlprune.registry import Registry
from automlprune.space.search_space import SearchSpace

WeightScores = Mapping[str, torch.Tensor]
"""Layer name -> a score per weight (the weight's shape)."""


@dataclass(frozen=True)
class WeightCriterion:
    """``score``: (model, space, layers, batches) -> {layer: scores}; ``needs_data``: it reads
    batches; ``of_network``: it is computed on the very network being sparsified (after its
    channels are cut), not once on the starting network."""

    score: Callable[[nn.Module, SearchSpace, Sequence[str], Optional[Sequence[Batch]]], dict[str, torch.Tensor]]
    needs_data: bool = False
    of_network: bool = False


WEIGHT_CRITERIA: Registry[WeightCriterion] = Registry("weight criterion")


def _magnitude(model, space, layers, batches=None):
    return {name: model.get_submodule(name).weight.detach().abs() for name in layers}


def _squared_rows(module: nn.Module) -> torch.Tensor:
    """Per output channel: the sum of its squared weights."""
    return layer_types.of(module).out_weights(module).float().pow(2).sum(1)


def _squared_columns(module: nn.Module) -> torch.Tensor:
    """Per input channel: the sum of the squared weights reading it (a depthwise conv reads
    channel c with filter c)."""
    table = layer_types.of(module)
    columns = table.in_weights(module)
    return (columns if columns is not None else table.out_weights(module)).float().pow(2).sum(1)


def _norm_factor(module: nn.Module) -> torch.Tensor:
    """(gamma / sqrt(running_var + eps))^2 of a batch norm; ones for a layer without one."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_var is not None:
        gamma = module.weight.detach() if module.weight is not None else torch.ones_like(module.running_var)
        return (gamma.float() / torch.sqrt(module.running_var.float() + module.eps)).pow(2)
    return None


def _lap(model, space, layers, batches=None):
    weighted = {l.name for l in space.layers if l.has_weights}
    previous = {n: torch.ones(space.layer_by_name[n].in_channels) for n in weighted}
    following = {n: torch.ones(space.layer_by_name[n].out_channels) for n in weighted}
    for group in space.groups:
        outs = [m for m in group.members if m.dim == "out" and m.layer in weighted]
        ins = [m for m in group.members if m.dim == "in" and m.layer in weighted]
        if not outs and not ins:
            continue
        channels = group.channels
        produced, consumed = torch.zeros(channels), torch.zeros(channels)
        factors = {}
        for member, feature in zip(outs, space.feature_layers(group)):
            factor = _norm_factor(model.get_submodule(feature.layer))
            index = torch.as_tensor(feature.index_map if factor is not None else member.index_map)
            factor = factor[index].mean(1) if factor is not None else torch.ones(channels)
            factors[member.layer] = (factor, torch.as_tensor(member.index_map))
            rows = _squared_rows(model.get_submodule(member.layer))
            produced += rows[torch.as_tensor(member.index_map)].sum(1) * factor
        for member in ins:
            consumed += _squared_columns(model.get_submodule(member.layer))[torch.as_tensor(member.index_map)].sum(1)
        for member in ins:
            index = torch.as_tensor(member.index_map)
            previous[member.layer][index] = produced[:, None].expand_as(index).float() if outs else 1.0
        for layer, (factor, index) in factors.items():
            reach = consumed if ins else torch.ones(channels)
            following[layer][index] = (reach * factor)[:, None].expand_as(index).float()
    out = {}
    for name in layers:
        module = model.get_submodule(name)
        w = module.weight.detach().float()
        rows, per_group = w.shape[0], w.shape[1]
        groups = space.layer_by_name[name].groups
        owner = torch.arange(rows) // max(rows // groups, 1)
        inputs = owner[:, None] * per_group + torch.arange(per_group)[None, :]  # global input channel of w[o, j]
        shape = (rows, per_group) + (1,) * (w.dim() - 2)
        p = previous[name][inputs.clamp_max(previous[name].numel() - 1)].reshape(shape)
        n = following[name].reshape((rows,) + (1,) * (w.dim() - 1))
        out[name] = w.pow(2) * p * n
    return out


def _hessian(model, space, layers, batches=None):
    if not batches:
        raise ConfigError("weight criterion 'hessian' needs a few training batches; the evaluator passes its BN batches")
    moments: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def accumulate(name: str, x: torch.Tensor) -> None:
        module = model.get_submodule(name)
        x = x.float()
        if isinstance(module, nn.Conv2d):
            columns = F.unfold(x.pow(2), module.kernel_size, module.dilation, module.padding, module.stride)  # (B, C k k, L)
            total, n = columns.sum(dim=(0, 2)), columns.shape[0] * columns.shape[2]
        else:
            flat = x.reshape(-1, x.shape[-1])
            total, n = flat.pow(2).sum(0), flat.shape[0]
        moments[name] = moments.get(name, 0) + total
        counts[name] = counts.get(name, 0) + n

    run_reading_inputs(model, layers, batches, accumulate)
    out = {}
    for name in layers:
        module = model.get_submodule(name)
        w = module.weight.detach().float()
        second = moments[name] / counts[name]
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            second = second.reshape(module.in_channels, kh, kw)
            rows, per_group = w.shape[0], w.shape[1]
            owner = torch.arange(rows) // (rows // module.groups)
            second = second[owner[:, None] * per_group + torch.arange(per_group)[None, :]]  # (out, in/groups, kh, kw)
        out[name] = w.pow(2) * second
    return out


WEIGHT_CRITERIA.register("magnitude", WeightCriterion(_magnitude, of_network=True), description="|w|")
WEIGHT_CRITERIA.register("lap", WeightCriterion(_lap), description="lookahead pruning: w^2 x producers' and consumers' squared norms, BN-scaled (Park et al. 2020)")
WEIGHT_CRITERIA.register("hessian", WeightCriterion(_hessian, needs_data=True),
                         description="w^2 x the input's second moment: diagonal Gauss-Newton Hessian (Li et al. 2020)")


def weight_scores(model: nn.Module, space: SearchSpace, criterion: str, layers: Iterable[str],
                  batches: Sequence[Batch] | None = None) -> dict[str, torch.Tensor]:
    """Scores per weight of ``layers`` of ``model`` under ``criterion`` (data-driven ones need ``batches``)."""
    entry = WEIGHT_CRITERIA.get(criterion)
    layers = list(layers)
    if not layers:
        return {}
    return entry.score(model, space, layers, batches)
