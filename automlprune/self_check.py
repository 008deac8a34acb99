"""The self-check a search space passes before any search uses it: the narrowest and a few
random candidates are materialized and run, their MACs from the cost model are compared with
PyTorch's FLOP counter on the materialized network, and (where every shrunk layer allows it)
the materialized network's output with the masked one's. A channel group whose network fails
(a coupling Torch-Pruning traced wrongly, such as a split whose halves are reordered) is found
by checking the failing candidate's groups one at a time, pinned with one warning naming it and
why, and the rest of the space is checked again; only a failure no single group explains is an
error, naming the groups."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from automlprune.cost import CostModel
from automlprune.cost.model import count_macs
from automlprune.errors import UnsupportedLayerError
from automlprune.materialize import mask, materialize
from automlprune.nn import layer_types
from automlprune.space import Candidate, SearchSpace

SAMPLES = 1
"""Random candidates checked (besides the narrowest one)."""
MACS_TOLERANCE = 1e-6
"""Relative difference allowed between the cost model's and the FLOP counter's MACs."""
OUTPUT_TOLERANCE = 1e-4
"""Largest difference allowed between the materialized and the masked network's outputs, relative
to the largest output magnitude."""


@torch.no_grad()
def check_space(space: SearchSpace, model: nn.Module, example_input: torch.Tensor, cost_model: CostModel,
                samples: int = SAMPLES, seed: int = 0) -> None:
    """Check the narrowest and ``samples`` random candidates of ``space`` (see the module
    docstring); pin the groups that fail on their own (:meth:`SearchSpace.pin`), raise
    :class:`UnsupportedLayerError` naming the groups of a candidate that fails otherwise."""
    x = example_input[:1].to(next(model.parameters()).device)
    for _ in range(2):  # once more after pinning culprits
        rng = np.random.default_rng(seed)
        candidates = [_channels_and_bits(c) for c in [space.smallest()] + [space.decode(rng.uniform(-1, 1, space.ndim)) for _ in range(samples)]]
        failure = next(((c, problem) for c in candidates if (problem := _problem(space, model, x, cost_model, c))), None)
        if failure is None:
            return
        candidate, problem = failure
        culprits = {}
        for group, ratio in candidate.ratios:
            if ratio < 1 and (alone := _problem(space, model, x, cost_model, Candidate.make({group: ratio}))):
                culprits[group] = f"its pruned network fails the self-check: {alone}"
        if not culprits or len(culprits) == len(space.prunable):
            break
        space.pin(culprits)
    shrunk = ", ".join(sorted(g for g, r in candidate.ratios if r < 1)) or "none"
    raise UnsupportedLayerError(f"this model's space builds networks that fail the self-check ({problem}) when the groups "
                                f"{_few(shrunk)} shrink together; pin those groups in the search space")


def _problem(space: SearchSpace, model: nn.Module, x: torch.Tensor, cost_model: CostModel, candidate: Candidate) -> str:
    """What is wrong with ``candidate``'s materialized network ("" when nothing is)."""
    try:
        net = materialize(model, candidate, space).eval()
        out = net(x)
    except Exception as exc:  # noqa: BLE001 - any failure of a built network is the space's fault
        return f"it does not run: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    analytic, counted = cost_model(candidate).macs, count_macs(net, x)
    if abs(analytic - counted) > MACS_TOLERANCE * max(1.0, counted):
        return f"the cost model gives {analytic:.6g} MACs but PyTorch counts {counted:.6g}"
    shrunk = {g for g, r in candidate.ratios if r < 1}
    layers = {m.layer for g in shrunk for m in space.group_by_name[g].members}
    carried = space.resolve(candidate).sparsity  # an earlier pipeline stage's sparsity: made on materialized layers only
    if shrunk and not carried and all(layer_types.of(model.get_submodule(name)).exact_when_masked for name in layers):
        difference = float((out - mask(model, candidate, space).eval()(x)).abs().max())
        if difference > OUTPUT_TOLERANCE * max(1.0, float(out.abs().max())):
            return f"it computes something else than the masked network (largest difference {difference:.3g})"
    return ""


def _channels_and_bits(candidate: Candidate) -> Candidate:
    """``candidate`` without weight densities: the self-check tests the channel structure (a
    sparse layer's masks are made on the materialized layer and checked by the export tests)."""
    return Candidate.make(candidate.ratio_map, candidate.bit_map)


def _few(names: str, limit: int = 4) -> str:
    parts = names.split(", ")
    return ", ".join(parts[:limit]) + (f" (and {len(parts) - limit} more)" if len(parts) > limit else "")
