"""Random normalization statistics for checking networks: so no channel is inert and no block an identity."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int = 0, spread: float = 0.1) -> nn.Module:
    """Give every batch norm random running statistics (means uniform in +-``spread``, variances
    in [0.5, 1.5)) and affines (scales in [0.5, 1.5), shifts in +-``spread``), and every parameter
    outside layers (ConvNeXt's layer scales start at 1e-6) values in [0.5, 1.5), so a freshly
    built network behaves like a trained one where it matters to a check: a wrongly coupled or
    wrongly removed channel changes the output. Returns ``model`` in eval mode."""
    from automlprune.space.graph import fixed_parameters

    g = torch.Generator().manual_seed(seed)
    uniform = lambda n, low, high: torch.rand(n, generator=g) * (high - low) + low  # noqa: E731
    for name in fixed_parameters(model):
        p = model.get_parameter(name)
        p.copy_(uniform(p.shape, 0.5, 1.5))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(uniform(m.num_features, -spread, spread))
            m.running_var.copy_(uniform(m.num_features, 0.5, 1.5))
            if m.affine:
                m.weight.copy_(uniform(m.num_features, 0.5, 1.5))
                m.bias.copy_(uniform(m.num_features, -spread, spread))
    return model.eval()
