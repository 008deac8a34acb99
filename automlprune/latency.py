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
    model = _inference_form(model.to(device))
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


def _inference_form(model: nn.Module) -> nn.Module:
    """``model`` in eval mode; a module loaded from a torch.export program (which refuses
    ``eval()`` in recent PyTorch: its graph is already fixed) as it is."""
    try:
        return model.eval()
    except NotImplementedError:
        return model


def measure_latencies(models: Sequence[nn.Module], input_shape: Sequence[int], batch_sizes: Sequence[int] = (1, 64),
                      device: torch.device | str = "cpu", rounds: int = 5, repeats: int = 20) -> list[dict[int, float]]:
    """Latency of several networks, compared fairly: they are timed in interleaved rounds
    (first, second, ..., first, second, ...; ``repeats`` passes each, 2 untimed) and each keeps
    the median of its rounds, in milliseconds per batch size, so a drift of the machine's speed
    during the measurement hits all of them alike and their ratios hold."""
    samples: list[dict[int, list[float]]] = [{int(b): [] for b in batch_sizes} for _ in models]
    for _ in range(rounds):
        for model, store in zip(models, samples):
            for b, ms in measure_latency(model, input_shape, batch_sizes, device, warmup=2, repeats=repeats).items():
                store[b].append(ms)
    return [{b: statistics.median(times) for b, times in store.items()} for store in samples]
