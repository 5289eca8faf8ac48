"""Batches with unreadable images: their readable rows, and the loss of a batch with none.

Under DDP every rank must run forward and backward at every step: the gradient all-reduce is a
collective, so a rank that skipped a step would leave the others waiting (or, with a later
step, pair up mismatched buckets). A rank whose whole batch is unreadable therefore runs the
model on one stand-in input and returns `output.sum() * 0`: every parameter gets an exactly zero
gradient, DDP reduces as usual (the others' gradients are averaged with these zeros), and the
optimiser steps on every rank. The stand-in runs in eval mode, so BatchNorm statistics, dropout
and drop-path are left alone. An empty batch is rare (all images of a batch damaged), so the
extra forward costs nothing that matters; under torch.compile it may add one recompilation.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def zero_loss(model: nn.Module, stand_in: torch.Tensor) -> torch.Tensor:
    """A scalar 0 connected to every parameter of `model` (DDP wrapper or bare module).

    stand_in: one input row, e.g. [1, 3, H, W] images or [1, D] features (values do not matter
    beyond being finite) -> scalar loss 0.0 whose backward gives zero gradients.
    """
    was_training = model.training
    model.eval()
    try:
        out = model(stand_in)
    finally:
        model.train(was_training)
    return out.float().sum() * 0.0


def readable_rows(ok: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rows of each tensor where `ok` ([B] bool, on the host) is True; the tensors themselves,
    uncopied, when every row is readable (the usual case: indexing would copy each batch)."""
    if bool(ok.all()):
        return tensors
    return tuple(t[ok] for t in tensors)
