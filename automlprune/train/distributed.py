"""Training on several processes with ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Under ``torchrun`` (or ``automlprune train --nproc N``, which starts it) every process runs the
same command; :class:`~automlprune.train.trainer.Trainer` then

* starts every rank from rank 0's weights (:func:`broadcast_state`);
* gives each rank its slice of every global batch: all ranks draw the same seeded global batch
  of ``recipe.batch_size`` images, and rank r trains on the r-th of ``world`` equal chunks, so the
  data order is the one-process order whatever the number of processes;
* averages the gradients over the ranks just before every optimizer step (an all-reduce in an
  optimizer step pre-hook, :func:`average_gradients`): the step is the one-process step on the
  global batch (the mean of the per-rank means of equal chunks is the global mean). This is the
  arithmetic of ``DistributedDataParallel``; its wrapper is not used because callbacks replace
  the step and run several forward passes per step, and the hook catches every step they take;
* averages batch-norm running statistics over the ranks after every epoch (each rank's come from
  its own chunks; :func:`average_buffers`), so every rank validates the same network;
* lets rank 0 alone show progress and write checkpoints and files.

What differs from one process: batch normalization normalizes each rank's chunk with the chunk's
own statistics (no synchronized batch norm), so with batch norm the loss curve matches the
one-process curve closely but not exactly; without it, up to float rounding (the test states
both tolerances). Callbacks run on every rank with identical weights; a method whose decisions
come from per-rank statistics of the data (e.g. Gate Decorator's Taylor scores) would see its
rank's chunk only. That is why ``automlprune search --nproc N`` is offered only to the
training strategies whose decisions read weights and gradients alone (``Strategy.ddp_refusal`` is
None): every rank then makes the same decisions, and rank 0 runs the search loop, evaluates and
writes the store while the others follow it (:func:`automlprune.search.base.run_strategy`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of processes); (0, 1) outside ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes files and shows progress (rank 0, or the only process)."""
    return rank_and_world()[0] == 0


def init_from_environment() -> bool:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1): gloo
    on CPU, NCCL when CUDA is there (each rank on GPU ``LOCAL_RANK``). True when joined."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first and the other ranks after it (a barrier between): for opening
    what rank 0 creates (the run store, a measured latency table, the unpruned network's stored
    accuracy), so the others find it made instead of racing to make it. Nothing outside
    ``torch.distributed``."""
    rank, world = rank_and_world()
    if world > 1 and rank != 0:
        dist.barrier()
    yield
    if world > 1 and rank == 0:
        dist.barrier()


def broadcast_object(value: Any = None) -> Any:
    """Rank 0's ``value`` on every rank (pickled; small objects: messages, results)."""
    if rank_and_world()[1] <= 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run ``automlprune argv`` on ``nproc`` (> 1) processes of this machine through ``torchrun``
    (``torch.distributed.run --standalone``, called in this process), the machine's cores shared
    out between them (``OMP_NUM_THREADS``, unless set); its exit code. A rank that fails with a
    user's error has said it in one sentence (rank 0 alone: :func:`automlprune.cli.main.main`)
    and its exit code (2) is returned without torchrun's failure summary; any other failure adds
    one sentence naming the rank and its exit code or signal."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "automlprune", *argv])
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))  # the cores shared out
    elastic = logging.getLogger("torch.distributed.elastic")
    saved = os.environ.get("OMP_NUM_THREADS"), elastic.level
    os.environ["OMP_NUM_THREADS"] = threads
    elastic.setLevel(logging.CRITICAL)  # its warnings and summary repeat what the failing rank said
    try:
        run(args)
        return 0
    except ChildFailedError as failed:
        if any(f.exitcode == 2 for f in failed.failures.values()):  # a user's error: rank 0 said what and what to do
            return 2
        rank, failure = min(failed.failures.items())
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        print(f"automlprune: error: training process {rank} of {nproc} failed ({how}); its output above says why",
              file=sys.stderr, flush=True)
        return 1
    finally:
        elastic.setLevel(saved[1])
        if saved[0] is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved[0]


def broadcast_state(model: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers."""
    for tensor in model.state_dict().values():
        if isinstance(tensor, torch.Tensor) and tensor.numel():
            dist.broadcast(tensor, src=0)


def average_gradients(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    """Replace every gradient the optimizer is about to use by its mean over the ranks (one
    all-reduce of the flattened gradients). Usable as an optimizer step pre-hook."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return
    world = dist.get_world_size()
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def average_buffers(model: nn.Module) -> None:
    """Average the floating-point buffers (batch-norm running statistics) over the ranks."""
    world = dist.get_world_size()
    for buffer in model.buffers():
        if buffer.is_floating_point() and buffer.numel():
            dist.all_reduce(buffer)
            buffer /= world


def sum_over_ranks(values: Sequence[float], device: torch.device) -> list[float]:
    """Each value summed over the ranks (exchanged on ``device``: NCCL needs the GPU)."""
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()
