"""Data-parallel training across processes (DDP under `torchrun`): the process's place, its process group,
the DDP wrapper and skipping gradient synchronisation on all but a step's last micro-batch."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn


def distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as set by torchrun; (0, 1, 0) for a single process."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


@contextmanager
def process_group(device: torch.device, world: int) -> Iterator[None]:
    """Within the block a process group of `world` processes exists (NCCL on CUDA, else gloo): one already set
    up by the caller is used, else one is made here and destroyed at the end. One process needs none."""
    owns_group = world > 1 and not dist.is_initialized()
    if owns_group:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        if owns_group:
            dist.destroy_process_group()


def data_parallel(module: nn.Module, device: torch.device, world: int) -> nn.Module:
    """`module` wrapped in DistributedDataParallel when there are several processes, else itself."""
    if world == 1:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


@contextmanager
def maybe_no_sync(net: nn.Module, sync: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on all but the last micro-batch of a step."""
    if sync or not isinstance(net, nn.parallel.DistributedDataParallel):
        yield
    else:
        with net.no_sync():
            yield
