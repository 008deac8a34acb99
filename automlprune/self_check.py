"""The self-check a search space passes before any search uses it: a few random candidates are
materialized and run, and their MACs from the cost model are compared with PyTorch's FLOP counter
on the materialized network, so a coupling the space got wrong (a network that does not run, or
is costed wrongly) is caught at once with the layers named, not deep inside a search."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from automlprune.cost import CostModel
from automlprune.cost.model import count_macs
from automlprune.errors import UnsupportedLayerError
from automlprune.materialize import materialize
from automlprune.space import SearchSpace

SAMPLES = 1
"""Random candidates checked (besides the narrowest one)."""
MACS_TOLERANCE = 1e-6
"""Relative difference allowed between the cost model's and the FLOP counter's MACs."""


@torch.no_grad()
def check_space(space: SearchSpace, model: nn.Module, example_input: torch.Tensor, cost_model: CostModel,
                samples: int = SAMPLES, seed: int = 0) -> None:
    """Materialize the narrowest and ``samples`` random candidates of ``space``, run each on
    ``example_input`` and compare its MACs with the cost model's; raise
    :class:`UnsupportedLayerError` naming the groups of a candidate that fails."""
    rng = np.random.default_rng(seed)
    candidates = [space.smallest()] + [space.decode(rng.uniform(-1, 1, space.ndim)) for _ in range(samples)]
    x = example_input[:1].to(next(model.parameters()).device)
    for candidate in candidates:
        shrunk = ", ".join(sorted(g for g, r in candidate.ratios if r < 1)) or "none"
        try:
            net = materialize(model, candidate, space).eval()
            net(x)
        except Exception as exc:  # noqa: BLE001 - any failure of a built network is the space's fault
            raise UnsupportedLayerError(f"this model's space builds networks that do not run ({type(exc).__name__}: "
                                        f"{str(exc).splitlines()[0][:160]}) when the groups {_few(shrunk)} shrink; "
                                        "pin those groups in the search space") from None
        analytic, counted = cost_model(candidate).macs, count_macs(net, x)
        if abs(analytic - counted) > MACS_TOLERANCE * max(1.0, counted):
            raise UnsupportedLayerError(f"the cost model gives {analytic:.6g} MACs but PyTorch counts {counted:.6g} on the network "
                                        f"built when the groups {_few(shrunk)} shrink; pin those groups in the search space")


def _few(names: str, limit: int = 4) -> str:
    parts = names.split(", ")
    return ", ".join(parts[:limit]) + (f" (and {len(parts) - limit} more)" if len(parts) > limit else "")

