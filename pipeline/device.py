"""Device selection, mixed precision, loader workers and seeding.

Precision is one name per run, recorded in the run's config and metrics:
- ``auto``: bf16 autocast on a GPU that supports bf16, fp16 autocast with a GradScaler on one
  that does not, fp32 on the CPU (CPU runs stay exact for tests);
- ``bf16`` / ``fp16`` / ``fp32``: asked for explicitly (bf16 and fp16 autocast also run on the
  CPU, which is how the tests cover them).
"""

from __future__ import annotations

import contextlib
import os
import random
from typing import Literal

import numpy as np
import torch

from salmae.pipeline import dist, signals
from salmae.pipeline.errors import SalmaeError

Precision = Literal["auto", "bf16", "fp16", "fp32"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MAX_WORKERS_PER_PROCESS = 10  # MAE used 10 loader workers per GPU


def pick_device(name: str = "auto") -> torch.device:
    """`auto` -> this process's CUDA device if one exists, else CPU; `cpu`/`cuda` force it.

    On CUDA it also sets the math a GPU run should use (`configure_cuda_math`)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SalmaeError("--device cuda was asked for but no CUDA device is visible; use --device auto or cpu")
        configure_cuda_math()
        return torch.device("cuda", dist.local_rank() % torch.cuda.device_count())
    if name == "cpu":
        return torch.device("cpu")
    raise SalmaeError(f"unknown device {name!r}; use auto, cpu or cuda")


def configure_cuda_math() -> None:
    """TF32 for float32 matmuls and convolutions, and cuDNN autotuning, as MAE's mains do.

    fp32 work that autocast leaves alone (norms, the loss, probes on float32 features) then runs
    on tensor cores; TF32 keeps float32's range with a 10-bit mantissa. `cudnn.benchmark` picks
    the fastest convolution for the patch embedding's fixed shape once. No effect on the CPU.
    """
    torch.set_float32_matmul_precision("high")      # matmuls: TF32
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto|bf16|fp16|fp32` -> the concrete precision (bf16, fp16 or fp32) this device runs."""
    if name not in ("auto", *DTYPES):
        raise SalmaeError(f"unknown precision {name!r}; use --set precision=auto, bf16, fp16 or fp32")
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    if name == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if bf16_ok else "fp16"
    if name == "bf16" and not bf16_ok:
        raise SalmaeError(f"GPU {torch.cuda.get_device_name(device)} has no bf16; use --set precision=fp16 "
                          "(loss scaling) or --set precision=fp32")
    return name


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """Autocast to `precision` (resolved for `device`); fp32 is a no-op."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 training (None for bf16/fp32, which need none)."""
    if resolve_precision(precision, device) != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def pin_memory(device: torch.device) -> bool:
    """Whether DataLoaders should pin host memory (only worth it when copying to a GPU)."""
    return device.type == "cuda"


def default_workers() -> int:
    """Loader workers per process: the CPUs this process may use, shared by the processes of its
    node, less one for the main process; between 1 and 10 (MAE's per-GPU count)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    per_process = cpus // max(dist.local_world_size(), 1)
    return max(1, min(MAX_WORKERS_PER_PROCESS, per_process - 1))


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and `random` (timm's Mixup draws from numpy, RandAugment from `random`)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: seed numpy and `random` from the worker's torch seed, which the
    loader derives from its `generator` (so the same seed gives the same augmentations); and ignore
    SIGTERM/SIGINT, so that a signal sent to the whole process group (SLURM, `timeout`) is the main
    process's to handle (one line, lock released) instead of a worker's death ending it in a traceback."""
    signals.ignore_in_worker()
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def loader_generator(seed: int) -> torch.Generator:
    """The generator a DataLoader draws its worker seeds (and shuffles) from: `seed + rank`, as MAE."""
    return torch.Generator().manual_seed(seed + dist.rank())
