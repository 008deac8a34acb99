"""Measured inference latency of a network."""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch
from torch import nn


@torch.inference_mode()
def measure_latency(model: nn.Module, input_shape: Sequence[int], batch_sizes: Sequence[int] = (1, 64),
                    device: torch.device | str = "cpu", warmup: int = 5, repeats: int = 20,
                    min_seconds: float = 0.0) -> dict[int, float]:
    """Median wall time of one forward pass, in milliseconds, per batch size.

    ``input_shape`` is (C, H, W). Each batch size gets ``warmup`` untimed passes, then
    ``repeats`` timed ones (more, until ``min_seconds`` have passed); CUDA is synchronised
    around every pass.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    result = {}
    for batch in batch_sizes:
        x = torch.randn(batch, *input_shape, device=device)
        for _ in range(warmup):
            model(x)
        times: list[float] = []
        start_all = time.perf_counter()
        while len(times) < repeats or time.perf_counter() - start_all < min_seconds:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - start) * 1000)
        result[int(batch)] = statistics.median(times)
    return result
