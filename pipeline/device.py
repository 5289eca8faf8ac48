"""Device selection and mixed precision: CUDA when present, bf16 autocast there, fp32 on CPU."""

from __future__ import annotations

import contextlib

import torch

from pipeline import dist
from pipeline.errors import SalmaeError


def pick_device(name: str = "auto") -> torch.device:
    """`auto` -> this process's CUDA device if one exists, else CPU; `cpu`/`cuda` force it."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SalmaeError("--device cuda was asked for but no CUDA device is visible; use --device auto or cpu")
        return torch.device("cuda", dist.local_rank() % torch.cuda.device_count())
    if name == "cpu":
        return torch.device("cpu")
    raise SalmaeError(f"unknown device {name!r}; use auto, cpu or cuda")


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; a no-op elsewhere (CPU runs stay in fp32 for exact tests)."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pin_memory(device: torch.device) -> bool:
    """Whether DataLoaders should pin host memory (only worth it when copying to a GPU)."""
    return device.type == "cuda"
