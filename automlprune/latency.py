"""Measured inference latency of a network.

Every measurement first calls :func:`steady_allocator`: on Linux with glibc, the process's
``malloc`` stops handing freed memory back to the operating system. Without it a network's
time depends on what ran before it in the process: glibc trims the heap and serves large
blocks with fresh ``mmap`` calls, and the page faults of re-touching that memory cost in
proportion to the activations a pass writes, which favours small networks. Measured on this
project's 2-core VM (``results/benchmarks/fmnist-latency/discrepancy_probe.py``): the unpruned
ResNet-20 at batch 64 took 22.4 ms timed alone and 28.4 ms timed among twelve other networks,
so one pruned network's ratio read 0.70 alone and 0.57 in company; with the allocator held
steady both read 0.70. A deployed process that runs one network over and over reaches the
steady state on its own, so the steady figure is the one a user sees.
"""

from __future__ import annotations

import ctypes
import functools
import platform
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
    steady_allocator()
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


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
"""glibc's ``mallopt`` parameters (malloc.h)."""
STEADY_TRIM_BYTES = 1 << 30
"""Free memory at the top of the heap kept, not returned to the OS, while timing (bytes)."""
STEADY_MMAP_BYTES = 32 << 20
"""Blocks up to this size come from the heap rather than a fresh ``mmap`` (bytes; glibc's
largest accepted value on 64-bit systems)."""


@functools.cache
def steady_allocator() -> bool:
    """Hold the process's ``malloc`` steady for timing (module docstring): glibc's trim
    threshold raised to :data:`STEADY_TRIM_BYTES` and its mmap threshold to
    :data:`STEADY_MMAP_BYTES`, once per process, for the rest of the process (the process keeps
    up to that much freed memory instead of returning it). True when applied; False where the
    C library is not glibc (other allocators, other systems), where it does nothing."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_TRIM_THRESHOLD, STEADY_TRIM_BYTES) and mallopt(M_MMAP_THRESHOLD, STEADY_MMAP_BYTES))


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
