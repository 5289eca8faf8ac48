"""Distributed helpers that read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), or srun's.

The same command runs as one plain process, as K processes under torchrun, or as K tasks that
SLURM's `srun` starts itself (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, with MASTER_ADDR
and MASTER_PORT set by the sbatch script): without either set of variables every helper here
answers as rank 0 of a world of 1. srun passes each task's exit status on (torchrun turns any
worker's failure into its own status 1), so an sbatch script that requeues on stage 2's exit 75
starts its ranks with srun.

One process group serves both devices: on a CUDA machine it is created with
``backend="cpu:gloo,cuda:nccl"``, so a collective runs over NCCL when its tensor lives on the
GPU and over gloo when it lives on the CPU (NCCL alone refuses CPU tensors). On a CPU-only
machine the group is plain gloo. Every collective helper here therefore works whatever device
its tensor is on; tests exercise them under 2-process gloo.

Waits that may legitimately be long (rank 0 building a manifest, ranks finishing unequal work)
go through `wait_for_all`, on a second, gloo-only group made by `init` whose timeout is a year:
the main group's `TIMEOUT` would otherwise kill a healthy job whose ranks simply finish apart.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from salmae.pipeline.errors import SalmaeError

LOGGER_NAME = "salmae"   # pipeline.logging's logger (which imports this module, so not from there)

# NCCL's own timeout: how long one collective of the main group may wait for a slow rank.
TIMEOUT = datetime.timedelta(minutes=30)
# The timeout of `wait_for_all`'s group: longer than any job (gloo adds it to a nanosecond clock,
# so not timedelta.max). A rank that dies is seen at once (its sockets close), not after this.
WAIT_TIMEOUT = datetime.timedelta(days=365)

_wait_group: tuple[Any, Any] | None = None   # (the main group it was made in, the gloo group `wait_for_all` uses)


def launch_env(env: dict | None = None) -> dict[str, int]:
    """{RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE} of this process: torchrun's variables, else those
    of an srun step with more than one task (SLURM_STEP_NUM_TASKS: set by srun, not in the batch
    script itself, whose SLURM_NTASKS counts the tasks it may start), else one process."""
    env = os.environ if env is None else env
    srun = int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1 and "SLURM_PROCID" in env
    if srun and not ("RANK" in env and "WORLD_SIZE" in env):
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE", "1").split("(")[0].split(",")[0]   # "4(x2)" or "4,3"
        return {"RANK": int(env["SLURM_PROCID"]), "WORLD_SIZE": int(env["SLURM_STEP_NUM_TASKS"]),
                "LOCAL_RANK": int(env.get("SLURM_LOCALID", 0)), "LOCAL_WORLD_SIZE": int(per_node or 1)}
    return {k: int(env.get(k, default)) for k, default in
            (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0), ("LOCAL_WORLD_SIZE", 1))}


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else launch_env()["RANK"]


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else launch_env()["WORLD_SIZE"]


def local_rank() -> int:
    return launch_env()["LOCAL_RANK"]


def local_world_size() -> int:
    """Processes on this node (torchrun's LOCAL_WORLD_SIZE or srun's tasks per node; 1 alone)."""
    return launch_env()["LOCAL_WORLD_SIZE"]


def is_main() -> bool:
    """True on the process that writes shared files and logs to the console."""
    return rank() == 0


def launched_as_group() -> bool:
    """Started as one of several processes, by torchrun or by srun (see `launch_env`)."""
    return launch_env()["WORLD_SIZE"] > 1


def backend_for(device: torch.device) -> str:
    """The process-group backend: gloo for CPU tensors, plus NCCL for CUDA ones on a GPU machine."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init(device: torch.device) -> None:
    """Join the process group if torchrun or srun started us with more than one process (idempotent)."""
    if dist.is_initialized() or not launched_as_group():
        return
    launch = launch_env()
    if not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):   # torchrun sets them; sbatch for srun
        raise SalmaeError(f"rank {launch['RANK']} of {launch['WORLD_SIZE']} (srun) needs MASTER_ADDR and "
                          "MASTER_PORT: in the sbatch script, export MASTER_ADDR=$(scontrol show hostnames "
                          "$SLURM_JOB_NODELIST | head -n1) MASTER_PORT=29500 before srun")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend=backend_for(device), timeout=TIMEOUT, rank=launch["RANK"],
                                world_size=launch["WORLD_SIZE"])
    except (RuntimeError, ValueError, OSError) as e:   # DistNetworkError and DistStoreError are RuntimeErrors
        raise SalmaeError(init_failure(e)) from None
    _make_wait_group()


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


def _make_wait_group() -> Any:
    """The gloo group of `wait_for_all` (every rank must call this at the same point: `init` does)."""
    global _wait_group
    if _wait_group is None or _wait_group[0] is not dist.group.WORLD:   # none yet, or the main group was remade
        _wait_group = (dist.group.WORLD, dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT))
    return _wait_group[1]


def barrier(waiting_for: str | None = None) -> None:
    """Wait for every rank; ranks other than 0 log what they wait for (rank 0 usually does the work).

    One collective of the main group: it fails after `TIMEOUT`. For waits as long as the work, use `wait_for_all`."""
    if not dist.is_initialized():
        return
    if waiting_for and not is_main():
        logging.getLogger(LOGGER_NAME).info("rank %d waits for rank 0: %s", rank(), waiting_for)
    dist.barrier()


def wait_for_all(what: str, poll_s: float = 60.0) -> None:
    """Wait, however long it takes, until every rank has called this; log a line every `poll_s` seconds.

    For waits whose length depends on the work: rank 0 creating a store and building its manifest
    while the others wait, or ranks that finish their shards at different times. A plain
    `barrier()` there is one collective of the main group and fails after `TIMEOUT` (30 min),
    after which torchrun kills the ranks still working. Here the barrier runs on a gloo-only
    group whose timeout is `WAIT_TIMEOUT` (a year), issued asynchronously: this thread polls
    `is_completed()` and logs "rank R waits for WHAT (N min)" every `poll_s` seconds, so a long
    wait is visible in the log rather than a silent hang. Gloo bounds each collective by its
    group's timeout (a timed-out wait fails; it is not retried), hence a group of its own rather
    than a longer main timeout, which would also lengthen NCCL's hang detection in training. The
    group is gloo whatever the main backend (`gloo` or `cpu:gloo,cuda:nccl`), so the wait needs
    no device. A rank that crashes closes its sockets, so the others fail at once, not after a year
    (and torchrun stops them anyway). Public APIs only; the main group's store is private.

    `what` completes "rank R waits for ...", e.g. "rank 0 to create the store". No-op in one process.
    """
    if not dist.is_initialized():
        return
    work = dist.barrier(group=_make_wait_group(), async_op=True)   # made here if another `init` made the group
    started = last_log = time.monotonic()
    pause = 0.001
    while not work.is_completed():
        time.sleep(pause)
        pause = min(pause * 2, 0.5, poll_s)
        now = time.monotonic()
        if now - last_log >= poll_s:
            logging.getLogger(LOGGER_NAME).info("rank %d waits for %s (%s)", rank(), what, _minutes(now - started))
            last_log = now
    work.wait()                                                    # raises a failed barrier's error


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


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
    global _wait_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _wait_group = None
