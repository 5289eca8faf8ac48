"""Distributed helpers that read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

The same command runs as one plain process or as K processes under torchrun: without
torchrun's variables every helper here answers as rank 0 of a world of 1. The backend is NCCL
when the process drives a CUDA device and gloo otherwise (CPU tests).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """True on the process that writes shared files and logs to the console."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: torch.device) -> None:
    """Join the process group if torchrun started us with more than one process (idempotent)."""
    if dist.is_initialized() or not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor across ranks (identity in a single process)."""
    if not dist.is_initialized():
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / world_size()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
