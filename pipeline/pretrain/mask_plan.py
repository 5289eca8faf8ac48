"""A stage-2 mask plan, and the masks it gives one batch: built in the loader workers, on the CPU.

`MaskPlan` is the stage config's masking section resolved into one object. `batch_masks` turns
it, a batch's pooled saliency and the step's seed into MAE's triple for that batch. It runs
inside DataLoader workers (`MaskingCollate`), so the training process only moves tensors to
the device; every random draw comes from a generator seeded by (seed, epoch, step) and is drawn
for the *global* batch (`rows=`), so a mask does not depend on where it is built: the worker
count, the number of processes, or whether the run was resumed.

The exceptions are `sbam` and `source=online`, whose salience comes from the model: their masks are
built in the step, on the device, from a generator on that device. Nothing is then read back to the
host or copied from it (a CUDA step need not wait); a CUDA generator draws other numbers than the
CPU's for the same seed, so online masks are a function of the seed on each kind of device.

Plans whose keep count varies per image (`amr-capped`, `sbam`, a ratio distribution) pad `ids_keep` to
one fixed width, the plan's largest possible keep count (`keep_slots`), and mark the padding in
`valid`: the encoder then always sees the same shape (a compiled model never recompiles) and the
decision to use an attention mask is made here, on the host, never by reading a device tensor.
At the batch sizes of real runs the padding costs little: the largest keep count of 256 images
is already close to the plan's maximum.

The manipulation check: where a batch carries its main objects' patches (`object`, labelled proxy
data, see `pipeline.pretrain.object_check`), the masks' effect on them is counted beside the masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from salmae.pipeline.pretrain import masking
from salmae.pipeline.pretrain.object_check import object_stats

_warned: set[str] = set()


def resolve_strategy(name: str) -> str:
    """The strategy a config names, deprecated aliases resolved; an alias is logged once per process."""
    strategy = masking.canonical_strategy(name)
    if strategy != name and name not in _warned:
        from salmae.pipeline.logging import get_logger

        _warned.add(name)
        get_logger().warning("mask strategy %r is the deprecated name of %r (an AMR-like ratio and a capped top-k "
                             "over the stored map, not SBAM; SBAM as released is `sbam`): use %r",
                             name, strategy, strategy)
    return strategy


@dataclass(frozen=True)
class MaskPlan:
    """How to mask each batch (resolved from the stage config)."""

    strategy: str = "random"           # random | block | grid | saliency | amr-capped | sbam
    ratio: masking.RatioSpec = masking.RatioSpec(0.75, 0.75)
    cap: float = 0.25                  # saliency cap (fraction of L, or of the salient area: cap_of)
    cap_of: str = "image"              # image | salient (`masking.salient_area` of each pooled map)
    cap_ramp_epochs: float = 0         # linear ramp 0 -> cap over these epochs (0 = off)
    select: str = "topk"               # topk | sample
    tau: float = 1.0                   # sampling temperature for select=sample
    inverse: bool = False              # mask the least salient (ablation)
    base: float = 0.75                 # amr-capped, sbam: base ratio
    var: float = 0.1                   # amr-capped, sbam: ratio spread
    delta: float = 0.5                 # amr-capped, sbam: salient threshold on normalised maps
    sbam_per: str = "batch"            # sbam: one ratio per batch (as released) or per image
    boundary_weight: float = 1.0       # loss weight of masked patches touching a visible one
    source: str = "store"              # store | online (salience from the model's patch embeddings)
    seed: int = 0

    def __post_init__(self):   # a plan built from an old name (`adaptive`) is the strategy it names
        object.__setattr__(self, "strategy", masking.canonical_strategy(self.strategy))

    @property
    def uses_saliency(self) -> bool:
        """The masks read a salience map (the store's, or one made from the model)."""
        return self.strategy in ("saliency", "amr-capped", "sbam")

    @property
    def model_salience(self) -> bool:
        """The salience comes from the model in the step: `sbam` always, the others with source=online."""
        return self.strategy == "sbam" or (self.uses_saliency and self.source == "online")

    @property
    def reads_store(self) -> bool:
        """The masks read the stage-1 store's maps."""
        return self.uses_saliency and not self.model_salience

    @property
    def in_loader(self) -> bool:
        """Masks are built in the loader workers (all but those whose salience needs the model)."""
        return not self.model_salience

    def keep_slots(self, length: int) -> int | None:
        """Fixed width of `ids_keep` for plans with a per-image keep count; None when it is constant."""
        if self.strategy == "sbam":
            return masking.sbam_keep_slots(length, self.base, self.var)
        if self.strategy == "amr-capped":
            return int(length - masking.n_masked(length, max(self.base - self.var, 0.0)))
        if self.strategy != "grid" and not self.ratio.constant:
            return int(length - masking.n_masked(length, self.ratio.low))
        return None


def step_seed(seed: int, epoch: int, step: int) -> int:
    """Seed of one training step's masks: depends only on (seed, epoch, step)."""
    return (seed * 1_000_003 + epoch * 100_003 + step * 7 + 1) % (2**63 - 1)


def batch_masks(plan: MaskPlan, n: int, grid: tuple[int, int], progress: float, seed: int,
                rows: tuple[int, int], saliency: torch.Tensor | None = None,
                saliency_ok: torch.Tensor | None = None,
                saliency_zero: torch.Tensor | None = None,
                objects: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
    """Masks for one (rank-local slice of a global) batch of `n` images.

    Args:
        plan: the run's mask plan.
        grid: (gh, gw) MAE patch grid; L = gh * gw.
        progress: fractional epoch (for the cap ramp).
        seed: `step_seed(plan.seed, epoch, step)`.
        rows: (start, total): this slice's first row in the global batch of `total` rows.
        saliency: [n, L] pooled maps (saliency/amr-capped plans) or SBAM's salience (`sbam`), on the
            CPU or the device.
        saliency_ok: [n] bool; images without a usable map get a random mask (cap 0 with the same
            generator, exactly `random_mask`'s rule) and are counted as fallbacks.
        saliency_zero: [n] bool; the fallbacks whose map was all zero (counted on their own too).
        objects: [n, L] bool main-object patches (labelled data), or None.
    Returns:
        ids_keep [n, K] int64, mask [n, L] float (1 = masked), ids_restore [n, L] int64,
        valid [n, K] bool or None (None: no padding), weight [n, L] or None,
        n_fallback [] int64, n_zero [] int64, masked [] float64 (masked patches summed over the batch),
        object_stats [4] float64 (`object_check.object_stats`) or None without `objects`.
    """
    length = grid[0] * grid[1]
    slots = plan.keep_slots(length)
    device = saliency.device if saliency is not None else torch.device("cpu")
    # saliency plans draw where the saliency is (the device, for source=online); the others on the CPU
    g = torch.Generator(device=device if plan.uses_saliency else "cpu").manual_seed(seed)
    ratio = plan.ratio.sample(n, g, rows)
    n_fallback = torch.zeros((), dtype=torch.int64, device=device)
    n_zero = (saliency_zero.sum() if (plan.uses_saliency and saliency_zero is not None)
              else torch.zeros((), dtype=torch.int64, device=device))
    if not plan.uses_saliency:
        ids_keep, mask, ids_restore = masking.make_mask(plan.strategy, n, grid, ratio, generator=g, rows=rows,
                                                        device=device)
    elif plan.strategy == "sbam":
        ids_keep, mask, ids_restore = masking.sbam_mask(saliency.float(), plan.base, plan.var, plan.delta,
                                                        plan.sbam_per, generator=g, rows=rows, keep_width=slots)
    else:
        sal = saliency.float()
        ok = saliency_ok.bool() if saliency_ok is not None else torch.ones(n, dtype=torch.bool, device=sal.device)
        n_fallback = (~ok).sum()
        cap = torch.full((n,), masking.scheduled_cap(plan.cap, progress, plan.cap_ramp_epochs),
                         dtype=torch.float64, device=sal.device)
        if plan.cap_of == "salient":  # the same share of every map's salient area
            cap = cap * masking.salient_area(sal).to(cap.device) / length
        cap = torch.where(ok, cap, torch.zeros_like(cap))  # cap 0 == random masking
        if plan.strategy == "amr-capped":
            ratio = torch.where(ok, masking.amr_ratio(sal, plan.base, plan.var, plan.delta),
                                torch.full_like(cap, plan.base))
        ids_keep, mask, ids_restore = masking.saliency_mask(sal, ratio, cap, select=plan.select, tau=plan.tau,
                                                            inverse=plan.inverse, generator=g, rows=rows,
                                                            keep_width=slots)
    valid = None
    if slots is not None:
        if ids_keep.shape[1] != slots:  # built at the batch's own largest count (random with a ratio range)
            ids_keep = masking.pad_keep(ids_restore, slots)
        valid = masking.keep_valid(ids_keep, mask)
    weight = masking.boundary_weights(mask, grid, plan.boundary_weight) if plan.boundary_weight != 1.0 else None
    return {"ids_keep": ids_keep, "mask": mask, "ids_restore": ids_restore, "valid": valid, "weight": weight,
            "n_fallback": n_fallback, "n_zero": n_zero, "masked": mask.double().sum(),
            "object_stats": object_stats(mask, objects.to(mask.device)) if objects is not None else None}


class MaskingCollate:
    """DataLoader collate_fn: batch the items (`collate`), then add the step's masks (`batch_masks`).

    The step comes with the items (indexed mode: `GlobalBatchSampler` hands each sample its step);
    in stream mode a worker numbers its own batches (batch j of worker w is step j * workers + w,
    the order in which the DataLoader returns them).
    """

    def __init__(self, collate, plan: MaskPlan, grid: tuple[int, int], rank: int, batch_size: int, world: int,
                 steps_per_epoch: int):
        self.collate, self.plan, self.grid = collate, plan, grid
        self.rows = (rank * batch_size, batch_size * world)
        self.steps_per_epoch = steps_per_epoch
        self._counted: tuple[int, int] = (-1, 0)  # (epoch, batches made) for stream mode

    def __call__(self, items: list[dict]) -> dict:
        batch = self.collate(items)
        epoch = int(items[0]["epoch"])
        step = int(items[0]["step"]) if "step" in items[0] else self._next_stream_step(epoch)
        batch["step"] = step
        masks = batch_masks(self.plan, len(items), self.grid, epoch + step / self.steps_per_epoch,
                            step_seed(self.plan.seed, epoch, step), self.rows,
                            batch.get("saliency"), batch.get("saliency_ok"), batch.get("saliency_zero"),
                            batch.get("object"))
        batch.update({k: v for k, v in masks.items() if v is not None})
        return batch

    def _next_stream_step(self, epoch: int) -> int:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        last_epoch, made = self._counted
        made = made if last_epoch == epoch else 0
        self._counted = (epoch, made + 1)
        return made * workers + worker
