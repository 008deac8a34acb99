"""Forward hooks that read a network as it runs: recorded outputs, layer inputs."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]
"""(images (N, C, H, W), labels (N,)) on the model's device."""


@contextlib.contextmanager
def recording(model: nn.Module, layers: Sequence[str], keep_grad: bool = False) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record the outputs of ``layers`` during forward passes (with their gradients when ``keep_grad``)."""
    store: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if keep_grad:
                output.retain_grad()
                store[name].append(output)
            else:
                store[name].append(output.detach())
        return fn

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in layers]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def run_reading_inputs(model: nn.Module, layers: Iterable[str], batches: Sequence[Batch],
                       read: Callable[[str, torch.Tensor], None]) -> None:
    """Run ``model`` in eval mode without gradients over ``batches``, calling ``read(layer, input)``
    with the (detached) input of each of ``layers`` as it runs; the model's mode is restored."""
    def hook(name: str):
        def fn(module: nn.Module, args: tuple) -> None:
            read(name, args[0].detach())
        return fn

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in layers]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, _ in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
