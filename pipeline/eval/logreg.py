"""Multinomial logistic regression on frozen features, trained to convergence (protocol `logreg`).

The cached-feature linear probe (`linear-noaug`: LARS, a fixed number of epochs, shuffled
batches) leaves optimiser noise in every number; this probe has none. The loss is convex:

    min_{W, b}  mean_i CE(W x_i + b, y_i) + (l2 / 2) * ||W||^2      (the bias is not penalised)

solved full batch by L-BFGS (strong-Wolfe line search) in float64, so two runs on the same
features give the same weights bit for bit, and for l2 > 0 the optimum is unique: what is left
between seeds is the encoder, the held-out split and the val set, not the optimiser.

`logreg_probe` is the protocol: features standardised with the fitting rows' mean and SD; the
L2 strength chosen from a grid by top-1 on a held-out part of probe-train (a fixed, seeded,
per-class split; ties go to the stronger L2); then refit with that strength on all of
probe-train and scored on val. The grid is solved from the strongest L2 down, each fit starting
at the previous one's solution (a regularisation path: the optimum does not depend on the start,
which only saves iterations: near-separable features at a weak L2 took 1000 iterations from zero
and did not converge, and converge in under 1000 from the stronger neighbour); the final fit
starts at the chosen strength's solution. Every fit records its iterations, loss and gradient norm.

On the CPU the fits run with one intra-op thread (restored afterwards): every op is small (rows x
features x classes), and on the 2-core study machine one objective-and-gradient took 0.5 ms with
one thread and 56 ms with two while the other core was busy. One thread also makes the CPU result
independent of the machine's thread count.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

DTYPE = torch.float64   # fits run in double precision: a small gradient norm is then a meaningful stop


@dataclass
class LogregFit:
    """One solved problem: weights in the standardised feature space and how the solver ended."""

    weight: torch.Tensor        # [C, D]
    bias: torch.Tensor          # [C]
    l2: float                   # the L2 strength it was solved with
    iterations: int             # L-BFGS iterations taken
    loss: float                 # final objective (mean cross-entropy + l2/2 ||W||^2)
    grad_norm: float            # L2 norm of the objective's gradient at the solution
    converged: bool             # grad_norm's largest component reached the tolerance

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: [M, D] (standardised like the fitting rows) -> [M, C]."""
        return x.to(self.weight) @ self.weight.T + self.bias


@dataclass
class Standardiser:
    """Per-dimension mean and SD of the fitting rows (an SD of 0 counts as 1)."""

    mean: torch.Tensor          # [D]
    sd: torch.Tensor            # [D]

    @classmethod
    def of(cls, x: torch.Tensor) -> "Standardiser":
        """x: [N, D] -> mean and (population) SD per dimension, in float64."""
        x = x.to(DTYPE)
        sd = x.std(dim=0, unbiased=False)
        return cls(x.mean(dim=0), torch.where(sd > 0, sd, torch.ones_like(sd)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(DTYPE) - self.mean) / self.sd


def objective(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """Mean cross-entropy plus (l2 / 2) ||W||^2. weight: [C, D], bias: [C], x: [N, D], y: [N] -> scalar."""
    return F.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()


def fit_logreg(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, *, max_iter: int = 1000,
               tolerance: float = 1e-6, history: int = 20, start: LogregFit | None = None) -> LogregFit:
    """Minimise `objective` over W [C, D] and b [C] by full-batch L-BFGS, from zeros or from `start`.

    x: [N, D] (already standardised), y: [N] int64 class indices < num_classes. Runs on x's device
    in float64. Stops when the gradient's largest component is <= `tolerance`, when the objective
    stops changing (1e-14), or after `max_iter` iterations (then `converged` is False).
    """
    x, y = x.to(DTYPE), y.to(x.device, torch.long)
    if start is None:
        weight = torch.zeros(num_classes, x.shape[1], dtype=DTYPE, device=x.device)
        bias = torch.zeros(num_classes, dtype=DTYPE, device=x.device)
    else:
        weight, bias = start.weight.to(x.device, DTYPE).clone(), start.bias.to(x.device, DTYPE).clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    solver = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter,
                               tolerance_grad=tolerance, tolerance_change=1e-14, history_size=history,
                               line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        solver.zero_grad()
        loss = objective(weight, bias, x, y, l2)
        loss.backward()
        return loss

    solver.step(closure)
    loss = closure()                                              # gradient at the point the solver stopped
    grad = torch.cat([weight.grad.flatten(), bias.grad])
    return LogregFit(weight=weight.detach(), bias=bias.detach(), l2=float(l2),
                     iterations=int(solver.state[weight].get("n_iter", 0)), loss=float(loss.detach()),
                     grad_norm=float(grad.norm()), converged=bool(grad.abs().max() <= tolerance))


def holdout_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit rows, held-out rows) of `labels` [N]: per class, a seeded `fraction` of its rows held out
    (at least one where the class has two or more rows, never all of them). Sorted index tensors."""
    gen = torch.Generator().manual_seed(seed)
    held = []
    for c in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == c).flatten()
        rows = rows[torch.randperm(len(rows), generator=gen)]
        k = min(max(round(fraction * len(rows)), 1), len(rows) - 1) if len(rows) >= 2 else 0
        held.append(rows[:k])
    held_out = torch.sort(torch.cat(held)).values if held else torch.zeros(0, dtype=torch.long)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held_out] = False
    return torch.nonzero(keep).flatten(), held_out


@dataclass
class LogregResult:
    """The protocol's outcome: the final fit, its val logits, and how the L2 strength was chosen."""

    fit: LogregFit                                   # refit on all of probe-train with the chosen l2
    val_logits: torch.Tensor                         # [M, C]
    holdout_top1: dict[float, float] = field(default_factory=dict)  # l2 -> held-out top-1 (%)
    holdout_rows: int = 0                            # rows held out of probe-train for the choice


def logreg_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, num_classes: int, *,
                 l2_grid: Sequence[float], holdout: float, seed: int, device: torch.device | str = "cpu",
                 max_iter: int = 1000, tolerance: float = 1e-6, on_fit=None) -> LogregResult:
    """Choose l2 on a held-out part of probe-train, refit on all of it, score val.

    train_x: [N, D], train_y: [N], val_x: [M, D] -> LogregResult. `on_fit(stage, fit, top1)` is
    called after each fit (stage "select" with its held-out top-1, strongest L2 first, then "final" with None).
    """
    with _one_thread_on_cpu(torch.device(device)):
        return _probe(train_x, train_y.long(), val_x, num_classes, l2_grid, holdout, seed, device, max_iter,
                      tolerance, on_fit)


@contextlib.contextmanager
def _one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _probe(train_x, train_y, val_x, num_classes, l2_grid, holdout, seed, device, max_iter, tolerance,
           on_fit) -> LogregResult:
    fit_rows, held_rows = holdout_split(train_y, holdout, seed)
    scale = Standardiser.of(train_x[fit_rows].to(device))
    xf, xh = scale(train_x[fit_rows].to(device)), scale(train_x[held_rows].to(device))
    yf, yh = train_y[fit_rows].to(device), train_y[held_rows].to(device)
    scores: dict[float, float] = {}
    fits: dict[float, LogregFit] = {}
    previous = None
    for l2 in sorted({float(v) for v in l2_grid}, reverse=True):       # the path, strongest L2 first
        fit = previous = fit_logreg(xf, yf, num_classes, l2, max_iter=max_iter, tolerance=tolerance, start=previous)
        top1 = 100.0 * float((fit.logits(xh).argmax(dim=1) == yh).double().mean()) if len(yh) else 0.0
        scores[l2], fits[l2] = top1, fit
        if on_fit:
            on_fit("select", fit, top1)
    best = max(scores.values())
    chosen = max(l2 for l2, top1 in scores.items() if top1 == best)   # ties: the stronger L2
    scale = Standardiser.of(train_x.to(device))
    final = fit_logreg(scale(train_x.to(device)), train_y.to(device), num_classes, chosen, max_iter=max_iter,
                       tolerance=tolerance, start=fits[chosen])
    if on_fit:
        on_fit("final", final, None)
    return LogregResult(fit=final, val_logits=final.logits(scale(val_x.to(device))).float(),
                        holdout_top1={float(v): scores[float(v)] for v in l2_grid}, holdout_rows=len(held_rows))
