"""Distributed helpers that read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

The same command runs as one plain process or as K processes under torchrun: without
torchrun's variables every helper here answers as rank 0 of a world of 1.

One process group serves both devices: on a CUDA machine it is created with
``backend="cpu:gloo,cuda:nccl"``, so a collective runs over NCCL when its tensor lives on the
GPU and over gloo when it lives on the CPU (NCCL alone refuses CPU tensors). On a CPU-only
machine the group is plain gloo. Every collective helper here therefore works whatever device
its tensor is on; tests exercise them under 2-process gloo.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from pipeline.errors import SalmaeError

# NCCL's own timeout; long enough for rank 0 to build a manifest of a few hundred shards.
TIMEOUT = datetime.timedelta(minutes=30)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def local_world_size() -> int:
    """Processes on this node (torchrun's LOCAL_WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def is_main() -> bool:
    """True on the process that writes shared files and logs to the console."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def backend_for(device: torch.device) -> str:
    """The process-group backend: gloo for CPU tensors, plus NCCL for CUDA ones on a GPU machine."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init(device: torch.device) -> None:
    """Join the process group if torchrun started us with more than one process (idempotent)."""
    if dist.is_initialized() or not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend=backend_for(device), timeout=TIMEOUT)
    except (RuntimeError, ValueError, OSError) as e:   # DistNetworkError and DistStoreError are RuntimeErrors
        raise SalmaeError(init_failure(e)) from None


def init_failure(error: BaseException) -> str:
    """One line for a process group that could not form, naming what to set (multi-node: the interfaces)."""
    import socket

    host = socket.gethostname()
    try:
        address = socket.gethostbyname(host)
    except OSError:
        address = "unresolvable"
    first = " ".join(str(error).split())[:300]
    return (f"rank {rank()} of {world_size()} could not join the process group via MASTER_ADDR="
            f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')} ({type(error).__name__}: "
            f"{first}); this host {host} resolves to {address}. Across nodes, gloo connects every pair of ranks by "
            "that address: set GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME) to the interface the nodes share "
            "(e.g. ib0 or eth0; `ip -br addr` lists them), and check that MASTER_ADDR is reachable")


def barrier(waiting_for: str | None = None) -> None:
    """Wait for every rank; ranks other than 0 log what they wait for (rank 0 usually does the work)."""
    if not dist.is_initialized():
        return
    if waiting_for and not is_main():
        from pipeline.logging import get_logger

        get_logger().info("rank %d waits for rank 0: %s", rank(), waiting_for)
    dist.barrier()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor across ranks, on the tensor's own device (identity in a single process)."""
    if not dist.is_initialized():
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor across ranks (identity in a single process)."""
    if not dist.is_initialized():
        return value
    return all_reduce_sum(value) / world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` as rank `src` holds it, on every rank (a picklable object; identity in one process)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
