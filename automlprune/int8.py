"""A real int8 network through PyTorch's own quantization (FX graph mode, x86 backend), for
candidates whose every Conv2d/Linear layer is at 8 bits: int8 weights (per channel), uint8
activations with ranges calibrated on the evaluator's BN batches, int8 kernels (oneDNN / FBGEMM)
on CPU. Its accuracy and measured latency sit next to the float32 network's."""

from __future__ import annotations

import copy
import warnings
from typing import Sequence

import torch
from torch import nn

from automlprune.errors import ConfigError

BACKEND = "x86"


def all_eight_bit(bits: dict[str, int]) -> bool:
    """Whether every Conv2d/Linear layer (``bits``: layer -> weight bits) is at 8 bits."""
    return bool(bits) and all(b == 8 for b in bits.values())


@torch.no_grad()
def int8_network(model: nn.Module, example_input: torch.Tensor,
                 calibration: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """Post-training static int8 quantization of ``model`` (a float network on CPU, left
    untouched) with PyTorch's default x86 qconfig, calibrated on ``calibration`` batches."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if BACKEND not in torch.backends.quantized.supported_engines:
        raise ConfigError(f"this PyTorch build has no '{BACKEND}' quantized engine; int8 export needs an x86 CPU build")
    torch.backends.quantized.engine = BACKEND
    float_net = copy.deepcopy(model).cpu().eval()
    for module in float_net.modules():  # simulated-quantization hooks are replaced by real int8 activations
        module._forward_pre_hooks.clear()
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao; it is still the x86 int8 path
        warnings.simplefilter("ignore")
        prepared = prepare_fx(float_net, get_default_qconfig_mapping(BACKEND), (example_input[:1].cpu(),))
        for x, _ in calibration:
            prepared(x.cpu())
        return convert_fx(prepared)
