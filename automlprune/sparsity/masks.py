"""Applying weight sparsity to a network, and keeping it while the network trains.

:func:`sparsify_` zeroes the weights a candidate's patterns remove and records every mask on the
network (attribute ``automlprune_sparsity``: {layer: {"pattern", "density", "mask"}}), which the
packed export (:mod:`automlprune.export`) and fine-tuning (:class:`KeepSparse`) read. Masks are
made after the channels are cut, on the materialized layer: a density is a fraction of the
weights the layer still has.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.ao.pruning import FakeSparsity
from torch.nn.utils import parametrize

from automlprune.sparsity.patterns import Geometry, Pattern, from_matrix, matrix_view
from automlprune.train.trainer import Callback, Trainer

SPARSITY_ATTRIBUTE = "automlprune_sparsity"


def sparsity_record(model: nn.Module) -> dict[str, dict]:
    """The sparse layers of ``model``: {layer: {"pattern", "density", "mask"}} (empty when dense)."""
    return getattr(model, SPARSITY_ATTRIBUTE, {})


def realized_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{layer: its weight mask} of ``model``'s sparse layers, for costs of what they really keep
    (:meth:`automlprune.cost.CostModel.__call__`)."""
    return {layer: info["mask"] for layer, info in sparsity_record(model).items()}


@torch.no_grad()
def sparsify_(model: nn.Module, sparsity: Mapping[str, tuple[Pattern, float]], scores: Mapping[str, torch.Tensor] | None = None) -> None:
    """In place: each layer of ``sparsity`` (layer -> (pattern, density)) keeps the weights its
    pattern picks by ``scores`` (per weight, the layer's current shape; |w| when absent); the
    others become exactly zero, and the masks are recorded (:func:`sparsity_record`)."""
    record = dict(sparsity_record(model))
    for layer, (pattern, density) in sparsity.items():
        weight = model.get_submodule(layer).weight
        geometry = Geometry.of(weight)
        pattern.check(layer, geometry)
        score = weight.abs() if scores is None or layer not in scores else scores[layer].to(weight.device)
        if score.shape != weight.shape:
            raise ValueError(f"scores of layer '{layer}' have shape {tuple(score.shape)}, its weight {tuple(weight.shape)}")
        mask = from_matrix(pattern.mask_layer(matrix_view(score), density, geometry), weight.shape)
        weight.mul_(mask)
        record[layer] = {"pattern": pattern.name, "density": float(density), "mask": mask.cpu()}
    if record:
        setattr(model, SPARSITY_ATTRIBUTE, record)


class KeepSparse(Callback):
    """Keeps removed weights removed while a sparse network trains: each masked layer computes
    with ``mask x weight`` (``torch.ao.pruning``'s ``FakeSparsity`` parametrization, so the removed
    weights get no gradient); at the end the masks are folded into the weights. Register it
    before :class:`~automlprune.train.callbacks.QuantizationAware`, so layers quantize their
    masked weights."""

    def on_start(self, trainer: Trainer) -> None:
        for layer, info in sparsity_record(trainer.model).items():
            module = trainer.model.get_submodule(layer)
            parametrize.register_parametrization(module, "weight", FakeSparsity(info["mask"].to(module.weight.device)))

    def on_end(self, trainer: Trainer) -> None:
        for layer in sparsity_record(trainer.model):
            module = trainer.model.get_submodule(layer)
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
