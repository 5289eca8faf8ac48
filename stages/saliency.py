"""Stage 1: CLIP + Grad-CAM saliency for every sample of caption shards, into a Zarr store.

This file wires; the machinery is in `pipeline/saliency/`: the store's life cycle
(`store_setup`: create or check, manifest, staging), the batch engine (`engine`: dealing shards
to ranks, the row dataset, the CAM loop, the shard writer) and the report (`report`).

Under torchrun rank 0 lists the job's shards not yet done and each rank computes an equal
contiguous block of them; `--set shards=LO:HI` splits a store across separate jobs. Ranks wait for
rank 0's store and for each other's last shards with `dist.wait_for_all`, which has no 30-minute
limit and logs while it waits. A rerun of the same command skips finished shards and ends with the
same bytes as an uninterrupted run; it recomputes finished shards whose files are missing, and
`--repair` also those that are unreadable or out of range (`store_setup.shards_to_compute`).

Safety. Rank 0 holds a writer lock on the store for the job's shard range
(`pipeline/saliency/store_lock.py`: disjoint `--set shards=LO:HI` jobs share a store, overlapping
ones are refused). A full disk ends in one line naming the file and the free space; finished
shards stay. Images with more than `max_pixels` pixels (by their header) are never decoded:
status `too_large`. The report, `saliency_report.json`, is written inside the store and names the
shard of every failure.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Literal

import torch

from salmae.pipeline import dist, signals
from salmae.pipeline.device import default_workers, pick_device, resolve_precision
from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.files import disk_full_as_error
from salmae.pipeline.logging import get_logger, setup_logging
from salmae.pipeline.models.clip import load_clip
from salmae.pipeline.saliency.engine import compute_shards, deal_todo, job_shards, parse_shards
from salmae.pipeline.saliency.gradcam import CAM_METHODS, DEFAULT_LAYER, check_layer, compile_around_layer, resolve_layer
from salmae.pipeline.saliency.report import summarise
from salmae.pipeline.saliency.store import SaliencyStore
from salmae.pipeline.saliency.store_lock import StoreLock
from salmae.pipeline.saliency.store_setup import (DEFAULT_MAX_PIXELS, MANIFEST_NAME, open_manifest, prepare_store,
                                                  shards_to_compute)


@dataclasses.dataclass
class SaliencyConfig:
    data: str | None = None           # caption shards: brace pattern, paths or pipe: URLs (optional on a rerun)
    out: Path = Path("runs/saliency/store.zarr")  # the Zarr store; saliency_report.json goes inside it
    manifest: Path | None = None      # use this manifest instead of building one from `data`
    clip_model: str = "ViT-B-16"      # open_clip config name (salmae-tiny for the offline CLIP) or hf-hub:ORG/NAME
    clip_pretrained: str = "laion2b_s34b_b88k"  # open_clip tag (needs network/cache), a checkpoint FILE,
                                      # hf-hub:ORG/NAME, or 'none' (a tag is ignored for an hf-hub: clip_model)
    cam: str = "gradcam"              # gradcam, hirescam = fast path; library methods: gradcam++, layercam, ...
    layer: str = DEFAULT_LAYER        # CAM layer, dotted path under model.visual (default: last block's ln_1)
    resize: Literal["squash", "letterbox"] = "squash"  # image into CLIP's input: squash (aspect not kept) or
                                      # letterbox (longest side, padded; frames reach past the image)
    batch_size: int | None = None     # images per forward/backward; None: 256 on CUDA, 64 on CPU
    workers: int | None = None        # DataLoader worker processes (decode, resize, tokenize); None: the CPUs
                                      # per local process less one, 1..10 (pipeline.device.default_workers)
    device: str = "auto"              # auto | cpu | cuda
    precision: str = "auto"           # autocast: auto (bf16 GPU, fp16 older GPU, fp32 CPU) | bf16 | fp16 | fp32
    compile: bool = False             # torch.compile the visual tower around the CAM layer (fast and library CAMs)
    overwrite: bool = False           # replace a store made with another config or other data
    repair: bool = False              # decode every finished shard (checksums, map ranges); recompute damaged ones
    rows_per_shard: int = 1024        # rows per Zarr shard = unit of work, resume and writing
    seed: int = 0                     # seeds torch (only library CAMs with randomness use it)
    shards: str = ""                  # LO:HI = compute only Zarr shards LO..HI-1 (split one store across jobs)
    allow_mixed: bool = False         # resume a store begun on another device/precision/batch/seed/library (recorded)
    max_pixels: int = DEFAULT_MAX_PIXELS  # images with more pixels (by header) are not decoded: status too_large
    check_syncs: bool = False         # a host sync in a batch's CAM work is an error (gpu-check; pipeline.host_syncs)


def run(cfg: SaliencyConfig) -> dict[str, Any]:
    """Compute (or finish) the store at `cfg.out`; returns the summary also written to `cfg.out`/saliency_report.json."""
    if cfg.cam not in CAM_METHODS:
        raise SalmaeError(f"unknown --cam {cfg.cam!r}; choose one of {', '.join(CAM_METHODS)}")
    if cfg.rows_per_shard < 1 or (cfg.batch_size is not None and cfg.batch_size < 1):
        raise SalmaeError("rows_per_shard and batch_size must be positive; fix --set rows_per_shard / --batch-size")
    if cfg.max_pixels < 1:
        raise SalmaeError(f"--set max_pixels={cfg.max_pixels} must be positive (default {DEFAULT_MAX_PIXELS:,})")
    if cfg.workers is not None and cfg.workers < 0:
        raise SalmaeError(f"--workers {cfg.workers} must be >= 0 (or unset: the CPUs per process less one, <= 10)")
    out = Path(cfg.out)
    setup_logging(None)
    device = pick_device(cfg.device)
    cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size or default_batch_size(device),
                              precision=resolve_precision(cfg.precision, device),
                              workers=default_workers() if cfg.workers is None else cfg.workers)
    dist.init(device)
    lock = StoreLock(out, parse_shards(cfg.shards))       # one writer per shard range: rank 0 holds it for the job
    # SIGTERM (SLURM) like Ctrl-C: stop at the next batch boundary, finished shards written, lock released
    with signals.stop_signals(deferred=True):
        if dist.is_main():
            lock.acquire()
        try:
            return _run_locked(cfg, out, device, lock)
        except KeyboardInterrupt as e:
            get_logger().error("stage 1 stopped by %s at a batch boundary; finished shards are kept and the same "
                               "command resumes", getattr(e, "name", "SIGINT"))
            raise
        finally:
            lock.release()


def _run_locked(cfg: SaliencyConfig, out: Path, device: torch.device, lock: StoreLock) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    model, info, tokenizer, record = load_clip(cfg.clip_model, cfg.clip_pretrained, device)
    layer, layer_path = resolve_layer(model, cfg.layer)
    check_layer(model, layer, layer_path, info.grid, info.input_size, cfg.cam)   # its own RNG: seeding unchanged
    if cfg.compile:
        compile_around_layer(model, layer)
    provenance = run_provenance(cfg, device)
    if dist.is_main():
        with disk_full_as_error(out, "the store is unchanged or still marked unfinished"):
            prepare_store(cfg, out, record, layer_path, info, provenance, lock)
    dist.wait_for_all(f"rank 0 to create or check the store {out} (and build its manifest)")
    log = setup_logging(out)
    store = SaliencyStore.open(out, mode="r+")
    manifest = open_manifest(out / MANIFEST_NAME)
    started = time.time()
    run_id = f"{started:.6f}"
    job = job_shards(cfg.shards, store.n_shards)
    # rank 0 lists the shards still to do (or damaged) before any rank can write a marker; all deal the same list
    left = dist.broadcast_object(shards_to_compute(cfg, store, manifest, job, provenance)
                                 if dist.is_main() else None)
    todo = deal_todo(left, dist.world_size(), dist.rank())
    log.info("stage 1: %d rows in %d shards, %d left, %d to do on this rank (world %d); model %s/%s, cam %s at %s; "
             "batch %d, %s on %s%s", len(store), store.n_shards, len(left), len(todo), dist.world_size(),
             cfg.clip_model, record["clip_pretrained"], cfg.cam, layer_path, cfg.batch_size, cfg.precision,
             device.type, ", compiled" if cfg.compile else "")
    n_images, steady = compute_shards(cfg, store, manifest, todo, model, info, tokenizer, layer, device, run_id,
                                      provenance)
    dist.wait_for_all("every rank to finish its shards")
    summary = summarise(store, manifest, out, started, run_id, steady, provenance) if dist.is_main() else {}
    dist.wait_for_all("rank 0 to write the report")
    return summary


def default_batch_size(device: torch.device) -> int:
    """Images per batch when none is asked for.

    Maps do not depend on which images share a batch (each image's target and gradient are its
    own), but float rounding may: on the CPU, batches of 5 and 1 against 8 changed 1 of 1024
    stored float16 values by one step and the last bits of the float32 scale of 28 and 56 of 64
    maps. So the batch is part of a store's provenance and a resume keeps it (on the same device
    the default does)."""
    return 256 if device.type == "cuda" else 64


def run_provenance(cfg: SaliencyConfig, device: torch.device) -> dict[str, Any]:
    """What, besides the config and data, decides a map's bytes: a resume must not mix these silently."""
    import open_clip
    from importlib.metadata import PackageNotFoundError, version

    try:
        grad_cam = version("grad-cam")
    except PackageNotFoundError:
        grad_cam = None
    return {"device": device.type, "precision": cfg.precision, "batch_size": cfg.batch_size, "compile": cfg.compile,
            "seed": cfg.seed, "torch": torch.__version__, "open_clip": open_clip.__version__, "grad_cam": grad_cam,
            "jpeg_draft": True}     # JPEGs decoded at a reduced scale (PIL draft): changes the pixels CLIP sees
