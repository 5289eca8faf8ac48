"""Patch masks for MAE: random, block, grid, saliency-capped, amr-capped and SBAM, as pure functions.

Every strategy returns MAE's triple over a batch of N images with L = gh * gw patches:

- ``ids_keep``    ``[N, K]`` int64 — indices of the visible patches, in the order the encoder sees them;
- ``mask``        ``[N, L]`` float — ``1 = masked (hidden)``, ``0 = visible``, as in MAE;
- ``ids_restore`` ``[N, L]`` int64 — ``argsort(ids_shuffle)``: position of each patch in the shuffle.

All strategies are built the same way: compute a per-patch *key* whose ascending order is
"keep first, mask last" (MAE's uniform noise for `random`), ``ids_shuffle = argsort(key)``, keep
the first ``n_keep`` entries. That is exactly MAE's ``random_masking``, so `random_mask` with the
same noise reproduces MAE bit for bit, and every other strategy only changes the key.

The saliency strategies:

- ``saliency``: the top-salient patches of a map up to a cap, the rest at random up to the ratio
  (`saliency_mask`); the cap is a fraction of the image, or of the map's salient area
  (`salient_area`: the smallest set of patches holding half the map's mass).
- ``amr-capped`` (called ``adaptive`` before; the old name is a deprecated alias): an AMR-like
  per-image ratio from the share of patches above ``delta`` of the map's maximum, then the capped
  rule at that ratio (`amr_capped_mask`). It reads the stage-1 map; it is not SBAM.
- ``sbam``: SBAM as released (`sbam_salience`, `sbam_ratio`, `sbam_mask`): salience from the MAE's
  own patch + position embeddings, a ratio from the salient share, patches masked in the order
  of salience plus U(0, 0.5) noise, no cap.

Variable keep counts (``amr-capped``, ``sbam``, or a ratio sampled per image): ``ids_keep`` is padded to
``K = max_i n_keep_i``, or to a width ``keep_width >= K`` given by the caller (the plan's largest
possible count: no device value is read on the host to learn K). Row i is valid for its first
``n_keep_i = L - mask[i].sum()`` entries; the entries after them are padding (they point at masked
patches: the next ones in the shuffle). `keep_valid(ids_keep, mask)` returns the ``[N, K]`` bool
validity mask; the MAE model turns it into a key-padding attention mask, so no token attends to
padding.

Masked count convention (all strategies but `grid` and `sbam`): ``n_mask = L - int(L * (1 - ratio))``,
which is MAE's ``len_keep = int(L * (1 - mask_ratio))``; `sbam` computes SBAM's own ``len_keep`` in
float32, as its released code does.

Determinism: every random draw comes from ``generator`` (a ``torch.Generator``) and is made on
the generator's device, so a generator on the GPU never copies draws from the host (a CUDA
generator gives other numbers than a CPU one with the same seed; each is a function of its seed).
For DDP, pass ``rows=(start, total)``: randomness is drawn for a batch of ``total`` rows and rows
``start .. start + N`` are used, so a rank holding a slice of the global batch gets exactly the
masks a single process would compute for that slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from salmae.pipeline.errors import SalmaeError

Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Rows = tuple[int, int] | None
STRATEGIES = ("random", "block", "grid", "saliency", "amr-capped", "sbam")
ALIASES = {"adaptive": "amr-capped"}   # deprecated name -> strategy (configs and scripts still use it)


def canonical_strategy(name: str) -> str:
    """A strategy name with deprecated aliases resolved (`adaptive` -> `amr-capped`)."""
    return ALIASES.get(name, name)


# --------------------------------------------------------------------------- randomness
def _rand(n: int, shape: tuple[int, ...], generator: torch.Generator | None, rows: Rows,
          device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform [0, 1) of shape [n, *shape] on `device`, drawn on the generator's device (the CPU without
    one); with rows=(start, total) a slice of a [total, *shape] draw."""
    start, total = rows if rows is not None else (0, n)
    u = torch.rand((total, *shape), generator=generator, device=_draw_device(generator))
    return u[start:start + n].to(device)


def _draw_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def n_masked(length: int, ratio: float | torch.Tensor) -> torch.Tensor | int:
    """Number of masked patches for `ratio` (MAE: L - int(L * (1 - ratio))); works per image."""
    if isinstance(ratio, torch.Tensor):
        return length - torch.floor(length * (1 - ratio.double()) + 1e-9).long()
    return length - int(length * (1 - ratio) + 1e-9)


# --------------------------------------------------------------------------- core
def mask_from_key(key: torch.Tensor, n_keep: int | torch.Tensor, keep_width: int | None = None) -> Triple:
    """MAE's triple from a per-patch key: ascending key = kept first.

    Args:
        key: [N, L] float; the ``n_keep`` smallest entries of each row are kept.
        n_keep: int, or [N] int64 for a per-image count (then ids_keep is padded, see module doc).
        keep_width: K for a per-image count, at least its maximum (None: the maximum, read on the
            host, which waits for the device).
    Returns:
        ids_keep [N, K], mask [N, L] (1 = masked), ids_restore [N, L].
    """
    n, length = key.shape
    ids_shuffle = torch.argsort(key, dim=1)  # ascend: small is keep, large is remove
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    if isinstance(n_keep, torch.Tensor):
        n_keep = n_keep.to(key.device).long()
        k_max = int(n_keep.max()) if keep_width is None else keep_width
        mask = (torch.arange(length, device=key.device)[None, :] >= n_keep[:, None]).float()  # shuffled order
    else:
        k_max = n_keep
        mask = torch.ones(n, length, device=key.device)
        mask[:, :n_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)  # unshuffle
    return ids_shuffle[:, :k_max], mask, ids_restore


def keep_valid(ids_keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N, K] bool: True where ids_keep holds a real visible patch, False on padding."""
    n_keep = (mask < 0.5).sum(dim=1)  # [N]
    return torch.arange(ids_keep.shape[1], device=ids_keep.device)[None, :] < n_keep[:, None]


def pad_keep(ids_restore: torch.Tensor, slots: int) -> torch.Tensor:
    """`ids_keep` padded to a fixed width: the first `slots` entries of each row's shuffle.

    ids_restore [N, L] -> [N, slots]. Valid entries are the same as `mask_from_key`'s; the rest
    point at the next (masked) patches of the shuffle, as the module doc describes for padding.
    """
    return torch.argsort(ids_restore, dim=1)[:, :slots]


def _n_keep(length: int, ratio: float | torch.Tensor) -> int | torch.Tensor:
    return length - n_masked(length, ratio)


# --------------------------------------------------------------------------- strategies
def random_mask(n: int, length: int, ratio: float | torch.Tensor = 0.75,
                generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                rows: Rows = None, device: torch.device | str = "cpu") -> Triple:
    """MAE's per-sample random masking: argsort of uniform noise [N, L]; same noise -> same mask as MAE."""
    if noise is None:
        noise = _rand(n, (length,), generator, rows, device)
    return mask_from_key(noise, _n_keep(length, ratio))


def block_mask(n: int, grid: tuple[int, int], ratio: float | torch.Tensor = 0.75,
               generator: torch.Generator | None = None, rows: Rows = None,
               min_block: int = 16, min_aspect: float = 0.3, device: torch.device | str = "cpu") -> Triple:
    """BEiT blockwise masking with an exact count.

    Rectangles of area >= `min_block` patches and aspect ratio in [min_aspect, 1/min_aspect] are
    added (BEiT's rule: a block is accepted if it adds 1..remaining new patches) until the target
    count; when no block fits any more (small grids), the rest is filled uniformly at random.
    Patches are masked in the order their blocks were added, so the count is exact.
    """
    gh, gw = grid
    length = gh * gw
    target = n_masked(length, ratio)
    targets = target.tolist() if isinstance(target, torch.Tensor) else [target] * n
    start, total = rows if rows is not None else (0, n)
    seeds = torch.randint(0, 2**31 - 1, (total,), generator=generator)[start:start + n].tolist()
    tie = _rand(n, (length,), generator, rows)
    key = torch.zeros(n, length)
    for i in range(n):
        order = _beit_blocks(gh, gw, targets[i], min_block, min_aspect, np.random.default_rng(seeds[i]))
        key[i] = 1.0 + tie[i]  # not in a block: masked last, in random order
        key[i, order] = 2.0 + torch.arange(len(order), 0, -1, dtype=torch.float) / (len(order) + 1)
    # large key = masked; flip sign so the ascending argsort keeps the small ones first
    return mask_from_key((-key).to(device), _n_keep(length, ratio))


def _beit_blocks(gh: int, gw: int, target: int, min_block: int, min_aspect: float,
                 rng: np.random.Generator) -> list[int]:
    """Flat patch indices covered by BEiT blocks, in the order they were added (<= target of them)."""
    covered = np.zeros((gh, gw), dtype=bool)
    order: list[int] = []
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    failures = 0
    while len(order) < target and failures < 10:
        remaining = target - len(order)
        area = rng.uniform(min_block, max(min_block, remaining))
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if not (0 < h <= gh and 0 < w <= gw):
            failures += 1
            continue
        top, left = rng.integers(0, gh - h + 1), rng.integers(0, gw - w + 1)
        new = ~covered[top:top + h, left:left + w]
        if not 0 < new.sum() <= remaining:
            failures += 1
            continue
        ys, xs = np.nonzero(new)
        covered[top + ys, left + xs] = True
        order.extend(((top + ys) * gw + left + xs).tolist())
        failures = 0
    return order


def grid_mask(n: int, grid: tuple[int, int], generator: torch.Generator | None = None, rows: Rows = None,
              device: torch.device | str = "cpu") -> Triple:
    """Keep one patch of every 2x2 cell (same offset within the cells, random per image); ~75% masked."""
    gh, gw = grid
    start, total = rows if rows is not None else (0, n)
    offset = torch.randint(0, 4, (total,), generator=generator)[start:start + n]  # [N]
    yy, xx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    cell = ((yy % 2) * 2 + xx % 2).flatten()  # [L] position inside its 2x2 cell
    keep = cell[None, :] == offset[:, None]  # [N, L]
    key = (~keep).float() + torch.arange(gh * gw)[None, :] / (gh * gw)  # kept first, raster order inside
    return mask_from_key(key.to(device), keep.sum(1).to(device))


def saliency_mask(saliency: torch.Tensor, ratio: float | torch.Tensor = 0.75, cap: float | torch.Tensor = 0.25,
                  select: Literal["topk", "sample"] = "topk", tau: float = 1.0, inverse: bool = False,
                  generator: torch.Generator | None = None, rows: Rows = None,
                  keep_width: int | None = None) -> Triple:
    """Saliency-capped masking: mask the top-salient patches up to cap*L, the rest at random up to ratio*L.

    Args:
        saliency: [N, L] non-negative scores (any scale).
        ratio: masking ratio, a float or [N] per image.
        cap: fraction of L masked by saliency (clipped at the ratio); 0 -> exactly `random_mask` with
            the same generator; cap >= ratio -> only salient patches are masked.
        select: ``topk`` takes the most salient; ``sample`` draws without replacement with
            p ∝ s^(1/tau) (Gumbel top-k on log(s)/tau).
        inverse: mask the *least* salient instead (ablation).
        keep_width: fixed K for a per-image ratio, at least the largest keep count (see `mask_from_key`).
    Returns:
        ids_keep [N, K], mask [N, L], ids_restore [N, L].
    """
    n, length = saliency.shape
    device = saliency.device
    u = _rand(n, (length,), generator, rows, device)  # drawn first: cap 0 == random_mask
    score = saliency.float()
    if select == "sample":
        gumbel = -torch.log(-torch.log(_rand(n, (length,), generator, rows, device).clamp(1e-12, 1 - 1e-7)))
        logs = torch.log(score.clamp_min(1e-12))
        score = (-logs if inverse else logs) / tau + gumbel
    elif select == "topk":
        score = -score if inverse else score
    else:
        raise SalmaeError(f"mask option select={select!r} is unknown; use topk or sample")
    # Order by score; ties are broken by a draw of their own. Breaking them with `u` would make the
    # tie losers the patches with the largest `u`, which the fill below masks first: the fill
    # would then prefer tied patches over the rest instead of being uniform among unselected ones.
    tie = _rand(n, (length,), generator, rows, device)
    perm = torch.argsort(tie, dim=1)
    by_score = torch.argsort(torch.gather(score, 1, perm), dim=1, descending=True, stable=True)
    order = torch.gather(perm, 1, by_score)  # [N, L] most salient first
    rank = torch.argsort(order, dim=1)  # rank of each patch in the saliency order
    n_mask = n_masked(length, ratio)
    n_cap = _as_count(cap, length, n, device)
    n_sal = n_cap.clamp(max=n_mask) if isinstance(n_mask, int) else torch.minimum(n_cap, n_mask.to(device))
    selected = rank < n_sal[:, None]
    key = torch.where(selected, 1.0 + u, u)  # selected patches sort last = masked; others by MAE noise
    return mask_from_key(key, _n_keep(length, ratio), keep_width)


def _as_count(cap: float | torch.Tensor, length: int, n: int, device) -> torch.Tensor:
    """[N] int64 floor(cap * L); a float cap is filled in on `device` (no tensor copied from the host)."""
    if isinstance(cap, torch.Tensor):
        cap = cap.to(device, torch.float64).expand(n)
    else:
        cap = torch.full((n,), float(cap), dtype=torch.float64, device=device)
    return torch.floor(cap * length + 1e-9).long()


def salient_area(saliency: torch.Tensor) -> torch.Tensor:
    """Size of each map's salient area: the smallest number of patches holding half its mass.

    saliency: [N, L] non-negative -> [N] int64 (0 for an all-zero map). Patches are taken from the
    most salient down until their sum reaches half of the row's sum; a cap given relative to this
    area (`cap_of=salient`) hides that share of the region the map calls salient, whatever its size.
    """
    s = saliency.double().clamp_min(0)
    mass = torch.sort(s, dim=1, descending=True).values.cumsum(dim=1)      # [N, L]
    half = 0.5 * mass[:, -1:]                                               # [N, 1]
    area = (mass < half).sum(dim=1) + 1                                     # first k with mass >= half
    return torch.where(mass[:, -1] > 0, area, torch.zeros_like(area))


def amr_ratio(saliency: torch.Tensor, base: float = 0.75, var: float = 0.1, delta: float = 0.5) -> torch.Tensor:
    """The `amr-capped` per-image ratio r_i = base - var + 2*var*|{p: s_ip > delta}| / L (AMR-like).

    saliency: [N, L]; each row is scaled to [0, 1] by its max before thresholding (all-zero rows
    count no salient patch). Returns [N] float64. Unlike SBAM's released code (`sbam_ratio`), the
    map is not min-max normalised and the share is per image, not the batch's mean.
    """
    s = saliency.double()
    s = s / s.amax(dim=1, keepdim=True).clamp_min(1e-12)
    frac = (s > delta).double().mean(dim=1)
    return base - var + 2 * var * frac


def amr_capped_mask(saliency: torch.Tensor, base: float = 0.75, var: float = 0.1, delta: float = 0.5,
                    cap: float | torch.Tensor = 0.25, generator: torch.Generator | None = None, rows: Rows = None,
                    **saliency_opts) -> Triple:
    """`amr-capped`: the per-image `amr_ratio`, then the saliency-capped rule at r_i (padded ids_keep)."""
    ratio = amr_ratio(saliency, base, var, delta)
    return saliency_mask(saliency, ratio, cap=cap, generator=generator, rows=rows, **saliency_opts)


adaptive_ratio = amr_ratio           # the names before `adaptive` became `amr-capped`
adaptive_mask = amr_capped_mask


# --------------------------------------------------------------------------- SBAM, as released
# Choi et al., "Salience-Based Adaptive Masking", ECCV 2024; released code github.com/doihye/SBAM,
# models_mae.py at commit 84beb18 (`saliency_guided_masking`, lines 93-124, called from
# `forward_encoder`, lines 126-132). Our reading, line by line:
# - l.128-130: the tokens are the patch embeddings plus the position embeddings (no cls token, no
#   norm), before any masking: the salience follows the model's own embedding as it trains;
# - l.96-98: affinity x·xᵀ (no 1/sqrt(D) scale), softmax over the last axis (each token's row sums
#   to 1), then the sum over the first axis: token j's salience is how much every token draws from
#   it (the README calls it outgoing attention);
# - l.100-101: min-max normalised per image to [0, 1];
# - l.103-106: the salient share is the count above `delta` per image, *averaged over the batch*,
#   over L: one share, hence one ratio, per (per-GPU) batch;
# - l.108-109: ratio = base - var + 2*var*share, len_keep = int(L * (1 - ratio)) (line 108 reads an
#   undefined `mask_ratio`; the parameter `base_mask_ratio` is what it means);
# - l.111-122: noise U(0, 1)/2 added to the salience, ascending argsort, keep the first len_keep:
#   the most salient patches are masked first, softened by the noise; no cap.
def sbam_salience(tokens: torch.Tensor) -> torch.Tensor:
    """SBAM's token salience, min-max normalised per image.

    tokens: [N, L, D] patch + position embeddings -> [N, L] float32 in [0, 1].
    An image whose salience is the same everywhere gets all zeros (SBAM's code divides 0 by 0 there).
    """
    x = tokens.float()
    attn = torch.softmax(x @ x.transpose(1, 2), dim=2)        # [N, L, L]: row i spreads 1 over the tokens j
    s = attn.sum(dim=1)                                        # [N, L]: what token j receives
    lo, hi = s.min(dim=1, keepdim=True).values, s.max(dim=1, keepdim=True).values
    return (s - lo) / (hi - lo).clamp_min(torch.finfo(s.dtype).tiny)


def sbam_ratio(salience: torch.Tensor, base: float = 0.75, var: float = 0.1, delta: float = 0.5,
               per: Literal["batch", "image"] = "batch") -> torch.Tensor:
    """SBAM's masking ratio, in float32 as its code computes it.

    salience: [N, L] (`sbam_salience`) -> [N] float32. per="batch": one ratio from the batch's mean
    salient share (the released code; under DDP each process's own batch); per="image": the share of
    each image (the paper's "per image" wording).
    """
    if per not in ("batch", "image"):
        raise SalmaeError(f"sbam ratio per={per!r} is unknown; use batch or image")
    length = salience.shape[1]
    count = (salience > delta).sum(dim=1).float()                       # [N] salient patches per image
    share = count.mean() / length if per == "batch" else count / length
    ratio = (base - var) + (2 * var) * share                            # the released code's order of operations
    return ratio.expand(salience.shape[0]).contiguous() if ratio.dim() == 0 else ratio


def sbam_keep(length: int, ratio: torch.Tensor) -> torch.Tensor:
    """SBAM's keep count int(L * (1 - ratio)), in the ratio's float32: [N] -> [N] int64."""
    return (length * (1 - ratio)).long()


def sbam_keep_slots(length: int, base: float, var: float) -> int:
    """The largest keep count `sbam_mask` can give (no salient patch: ratio base - var)."""
    return int(sbam_keep(length, sbam_ratio(torch.zeros(1, length), base, var, delta=1.0))[0])


def sbam_mask(salience: torch.Tensor, base: float = 0.75, var: float = 0.1, delta: float = 0.5,
              per: Literal["batch", "image"] = "batch", generator: torch.Generator | None = None,
              rows: Rows = None, keep_width: int | None = None) -> Triple:
    """SBAM's masking: ratio from the salient share, patches ordered by salience + U(0, 0.5), no cap.

    Args:
        salience: [N, L] in [0, 1] (`sbam_salience` of the MAE's patch + position embeddings).
        base, var, delta: SBAM's base ratio, ratio spread and salience threshold.
        per: "batch" (as released) or "image" (see `sbam_ratio`).
        keep_width: fixed K, at least `sbam_keep_slots` (None: the batch's largest, read on the host).
    Returns:
        ids_keep [N, K] (padded, see module doc), mask [N, L], ids_restore [N, L].
    """
    n, length = salience.shape
    ratio = sbam_ratio(salience, base, var, delta, per)                          # [N] float32
    noise = _rand(n, (length,), generator, rows, salience.device)                # [N, L] U(0, 1)
    key = salience.float() + noise / 2                                           # ascending: least salient kept
    return mask_from_key(key, sbam_keep(length, ratio), keep_width)


# --------------------------------------------------------------------------- ratios, caps, weights
@dataclass(frozen=True)
class RatioSpec:
    """A mask ratio: a constant, or ``uniform:lo,hi`` sampled per image or per batch."""

    low: float
    high: float
    per: Literal["image", "batch"] = "image"

    @classmethod
    def parse(cls, text: str | float, per: str = "image") -> "RatioSpec":
        if isinstance(text, (int, float)):
            return cls(float(text), float(text), per)
        text = str(text).strip()
        try:
            if text.startswith("uniform:"):
                lo, hi = (float(v) for v in text[len("uniform:"):].split(","))
            else:
                lo = hi = float(text)
        except ValueError:
            raise SalmaeError(f"mask ratio {text!r} is not understood; use a number (0.75) or uniform:LO,HI") from None
        if not 0 <= lo <= hi < 1:
            raise SalmaeError(f"mask ratio {text!r} must satisfy 0 <= lo <= hi < 1")
        if per not in ("image", "batch"):
            raise SalmaeError(f"mask ratio_per={per!r} is unknown; use image or batch")
        return cls(lo, hi, per)  # type: ignore[arg-type]

    @property
    def constant(self) -> bool:
        return self.low == self.high

    def sample(self, n: int, generator: torch.Generator | None = None, rows: Rows = None) -> float | torch.Tensor:
        """A float when constant; else [N] ratios (one shared value when per='batch') on the generator's device."""
        if self.constant:
            return self.low
        if self.per == "batch":
            u = torch.rand((1,), generator=generator, device=_draw_device(generator)).expand(n)
        else:
            u = _rand(n, (), generator, rows, _draw_device(generator))
        return (self.low + (self.high - self.low) * u.double()).contiguous()


def scheduled_cap(cap: float, epoch: float, ramp_epochs: float = 0) -> float:
    """Curriculum: the saliency cap ramps linearly 0 -> cap over the first `ramp_epochs` (0 = off)."""
    if ramp_epochs <= 0:
        return cap
    return cap * min(1.0, max(0.0, epoch / ramp_epochs))


def boundary_weights(mask: torch.Tensor, grid: tuple[int, int], weight: float) -> torch.Tensor:
    """Per-patch loss weights [N, L]: `weight` on masked patches with a visible 4-neighbour, else 1."""
    n = mask.shape[0]
    m = mask.view(n, 1, *grid)
    visible = 1 - m
    # a masked patch borders a visible one if any 4-neighbour is visible (max-pool of a cross)
    pad = torch.nn.functional.pad(visible, (1, 1, 1, 1))
    near = torch.stack([pad[..., :-2, 1:-1], pad[..., 2:, 1:-1], pad[..., 1:-1, :-2], pad[..., 1:-1, 2:]]).amax(0)
    border = (m > 0.5) & (near > 0.5)
    return torch.where(border, torch.full_like(m, weight), torch.ones_like(m)).view(n, -1)


def online_saliency(tokens: torch.Tensor) -> torch.Tensor:
    """Token salience from patch embeddings for `source=online`, no precompute needed.

    An SBAM-like variant, not SBAM's (`sbam_salience` is): a token's salience is the attention it
    *receives* under one parameter-free self-attention over the layer-normalised patch embeddings
    (no position embeddings), A = softmax(x x^T / sqrt(D)), s_j = sum_i A_ij. It needs no stage-1
    store and costs one [L, L] product per image; it follows the model's own embedding as it trains.

    tokens: [N, L, D] -> [N, L] (non-negative, sums to L per row).
    """
    x = torch.nn.functional.layer_norm(tokens.float(), tokens.shape[-1:])
    attn = torch.softmax(x @ x.transpose(1, 2) / math.sqrt(x.shape[-1]), dim=-1)  # [N, L, L]
    return attn.sum(dim=1)


# --------------------------------------------------------------------------- dispatcher
def make_mask(strategy: str, n: int, grid: tuple[int, int], ratio: float | torch.Tensor = 0.75,
              saliency: torch.Tensor | None = None, generator: torch.Generator | None = None,
              rows: Rows = None, device: torch.device | str = "cpu", **opts) -> Triple:
    """Dispatch to a strategy. `saliency` [N, L] is needed for saliency/amr-capped/sbam (for `sbam`,
    `sbam_salience` of the model's tokens).

    opts: saliency -> cap, select, tau, inverse; amr-capped -> base, var, delta, cap, select, tau,
    inverse (`ratio` is ignored: the ratio is computed per image); sbam -> base, var, delta, per;
    block -> min_block, min_aspect. `adaptive` is the deprecated name of `amr-capped`.
    """
    strategy = canonical_strategy(strategy)
    length = grid[0] * grid[1]
    if strategy == "random":
        return random_mask(n, length, ratio, generator=generator, rows=rows, device=device)
    if strategy == "block":
        return block_mask(n, grid, ratio, generator=generator, rows=rows, device=device, **opts)
    if strategy == "grid":
        return grid_mask(n, grid, generator=generator, rows=rows, device=device)
    if strategy in ("saliency", "amr-capped", "sbam"):
        if saliency is None:
            raise SalmaeError(f"mask strategy {strategy!r} needs saliency; pass --saliency STORE.zarr "
                              "or set mask.source=online")
        saliency = saliency.reshape(n, length).to(device)
        if strategy == "saliency":
            return saliency_mask(saliency, ratio, generator=generator, rows=rows, **opts)
        if strategy == "sbam":
            return sbam_mask(saliency, generator=generator, rows=rows, **opts)
        return amr_capped_mask(saliency, generator=generator, rows=rows, **opts)
    raise SalmaeError(f"unknown mask strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
