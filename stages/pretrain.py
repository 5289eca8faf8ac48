"""Stage 2: MAE pretraining with saliency-capped (or baseline) masks.

`run(cfg)` wires data, model, optimizer and checkpoints; the epoch loop is
`pipeline.pretrain.engine.train_one_epoch`. The run folder holds `config.yaml`, `run.log`,
`metrics.jsonl`, `checkpoint-latest.pth`, `checkpoint-EEEE.pth` and `png/epoch-EEEE.png`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from timm.optim import param_groups_weight_decay

from salmae.pipeline import dist, signals
from salmae.pipeline.checkpoint import load_checkpoint, save_checkpoint
from salmae.pipeline.config import config_to_dict, require, resume_differences, save_config
from salmae.pipeline.data.transforms import normalise, pixel_stats
from salmae.pipeline.device import (default_workers, grad_scaler, loader_generator, pick_device, pin_memory,
                             resolve_precision, seed_everything, seed_worker)
from salmae.pipeline.pretrain.engine import cosine_lr, model_salience, train_one_epoch
from salmae.pipeline.pretrain.mask_plan import MaskingCollate, MaskPlan, batch_masks, resolve_strategy, step_seed
from salmae.pipeline.data.manifest import first_difference, shard_hashes
from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.files import atomic_write_json
from salmae.pipeline.logging import MetricsWriter, get_logger, setup_logging
from salmae.pipeline.pretrain.masking import RatioSpec, canonical_strategy
from salmae.pipeline.run_lock import RunLock
from salmae.pipeline.models.mae import build_mae
from salmae.pipeline.models.mae_init import init_mae, resumed_init


@dataclass
class ArchConfig:
    """Overrides of the MAE preset (None = the preset's value)."""

    img_size: int | None = None           # input side in pixels
    patch_size: int | None = None         # patch side in pixels
    embed_dim: int | None = None          # encoder width
    depth: int | None = None              # encoder blocks
    num_heads: int | None = None          # encoder heads
    decoder_embed_dim: int | None = None  # decoder width (MAE: 512)
    decoder_depth: int | None = None      # decoder blocks (MAE: 8)
    decoder_num_heads: int | None = None  # decoder heads
    norm_pix_loss: bool = True            # per-patch normalised pixel targets (MAE's best setting)


@dataclass
class MaskConfig:
    """Options of the mask strategy chosen by `mask`."""

    ratio: str = "0.75"                    # a number, or uniform:LO,HI sampled per image/batch
    ratio_per: Literal["image", "batch"] = "image"  # where a ratio distribution is sampled
    cap: float = 0.25                      # saliency: share masked by saliency (0.05, 0.1, 0.25 ...) of cap_of
    cap_of: Literal["image", "salient"] = "image"  # image: cap is a fraction of all patches; salient: of the
                                           # map's salient area, the smallest set of patches holding half the
                                           # map's mass (after crop and flip), counted per image
    map: Literal["own", "shuffled"] = "own"  # own: each image's map; shuffled (a control): another image's map
                                           # (a fixed derangement of the rows, by seed) under this image's crop
                                           # and flip, same cap
    cap_ramp_epochs: float = 0             # ramp the cap linearly from 0 over these epochs (0 = off)
    select: Literal["topk", "sample"] = "topk"  # saliency: most salient, or sampled ∝ s^(1/tau)
    tau: float = 1.0                       # temperature of select=sample
    inverse: bool = False                  # mask the least salient (ablation)
    base: float = 0.75                     # amr-capped, sbam: base ratio
    var: float = 0.1                       # amr-capped, sbam: ratio spread around base
    delta: float = 0.5                     # amr-capped, sbam: salient threshold (amr-capped: on max-normalised
                                           # maps; sbam: on min-max normalised salience)
    sbam_ratio_per: Literal["batch", "image"] = "batch"  # sbam: one ratio per batch from its mean salient
                                           # share (SBAM's released code), or one per image (the paper's wording)
    boundary_weight: float = 1.0           # loss weight of masked patches bordering visible ones
    source: Literal["store", "online"] = "store"  # saliency from the stage-1 store or the model itself
    skip_missing: bool = False             # skip samples without ok saliency (default: random mask)


@dataclass
class OptimConfig:
    """AdamW with per-iteration cosine schedule, as MAE."""

    blr: float = 1.5e-4                    # base lr; lr = blr * effective batch / 256
    lr: float | None = None                # absolute lr (overrides blr)
    min_lr: float = 0.0                    # lr at the end of the cosine
    warmup_epochs: float = 1.0             # linear warmup length
    weight_decay: float = 0.05             # not applied to norms and biases (fixed pos-embeds are not trained)
    decay_tokens: bool = True              # decay cls_token and mask_token too, as MAE does (false: exempt them)
    accum_iter: int = 1                    # gradient accumulation steps per optimizer step
    step_partial: bool = False             # step a last accumulation group cut short by the epoch's end
                                           # (MAE drops it: its gradient is cleared at the next epoch)


@dataclass
class PretrainConfig:
    """Stage 2 configuration."""

    data: str = ""                         # image shards (brace pattern, paths, pipe: URLs)
    out: Path = Path("runs/pretrain")      # run folder
    saliency: str | None = None            # stage-1 Zarr store (saliency/amr-capped masks; PNG column)
    manifest: str | None = None            # manifest of `data` (default: built by scanning the shards)
    mask: Literal["random", "block", "grid", "saliency", "amr-capped", "sbam", "adaptive"] = "saliency"  # mask
                                           # strategy; amr-capped: AMR-like ratio + capped top-k over the stored
                                           # map (`adaptive` is its deprecated name); sbam: SBAM as released
    model: Literal["tiny", "small", "base", "large", "huge"] = "tiny"  # MAE preset
    epochs: int = 10                       # total epochs
    batch_size: int = 64                   # images per process per iteration
    resume: str | None = None              # 'latest' or a checkpoint path (None or "": start fresh)
    init: str | None = None                # a new run starts from these weights (FILE, FOLDER or hf-hub:NAME): a full
                                           # MAE (strict) or an encoder (official MAE, timm ViT; decoder fresh)
    init_sha256: str | None = None         # sha256 of the init weights file: recorded by the run; if given, must match
    device: str = "auto"                   # auto | cpu | cuda
    seed: int = 0                          # model init, data order, augmentation and masks
    workers: int | None = None             # DataLoader workers per process (None: from the CPUs per process, <= 10)
    data_mode: Literal["indexed", "stream"] = "indexed"  # random access (local tars) or webdataset stream
    max_pixels: int = 64_000_000           # skip images whose header declares more pixels (as stage 1's too_large)
    cache_images: bool = False             # indexed mode: decode every image once into memory, shared by the
                                           # workers (a small set: the study's 8192 64-px images take 96 MiB; its
                                           # median CPU epoch went from 12.4 s to 10.4 s); refused above half the RAM
    shuffle_buffer: int = 1000             # stream mode shuffle buffer
    save_every: int = 5                    # also keep checkpoint-EEEE.pth every N epochs
    log_every: int = 20                    # step records (and the only host sync / all-reduce) every N iterations
    viz_samples: int = 6                   # fixed samples in each epoch's PNG grid (0 = none)
    compile: bool = False                  # torch.compile the model (after DDP wrapping, so all-reduce overlaps backward)
    check_syncs: bool = False              # CUDA: any host sync outside a logging step is an error (gpu-check)
    loss_mean: Literal["auto", "patch", "image"] = "auto"  # patch: MAE's mean over all masked patches of a batch;
                                           # image: mean of per-image means (each image weighs the same);
                                           # auto: image for plans whose masked count varies per image, else patch
    precision: str = "auto"                # auto | bf16 | fp16 | fp32 (auto: bf16 on a bf16 GPU, fp16 + loss scaling
                                           # on an older GPU, fp32 on CPU); config.yaml records the resolved one
    arch: ArchConfig = field(default_factory=ArchConfig)
    masking: MaskConfig = field(default_factory=MaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


def run(cfg: PretrainConfig) -> dict:
    """Train; returns {run, epochs, loss, checkpoint}.

    Every check (option ranges, a resume's config, the data and the saliency store) runs before
    anything is written into `out`: a refused run leaves the folder as it was.
    """
    validate(cfg)
    device = pick_device(cfg.device)
    dist.init(device)
    lock = RunLock(cfg.out, "pretrain")      # one job per run folder: rank 0 holds it for the job
    # SIGTERM/SIGUSR1 (SLURM) and Ctrl-C: every rank stops after the same step, rank 0 writes a checkpoint
    # of it, the lock is released and the job exits 75 (requeue); a second signal stops at once
    with signals.stop_signals(deferred=True):
        if dist.is_main():
            lock.acquire()
        try:
            return _train(cfg, device)
        except KeyboardInterrupt as e:
            _log_stop(Path(cfg.out), getattr(e, "name", "SIGINT"))
            raise
        finally:
            lock.release()


def _log_stop(out: Path, name: str) -> None:
    """One line in run.log when a signal ends the run: what is kept and how to continue."""
    latest = out / "checkpoint-latest.pth"
    kept = "no checkpoint yet"
    if latest.is_file():
        try:
            state = load_checkpoint(latest)
            at = state.get("position")
            kept = (f"checkpoint-latest.pth holds epoch {at['epoch']} to step {at['step']} of {at['steps']}" if at
                    else f"checkpoint-latest.pth holds epoch {int(state['epoch'])}")
        except SalmaeError as e:
            kept = f"checkpoint-latest.pth could not be read back ({str(e)[:160]})"
    get_logger().error("stage 2 stopped by %s; %s: run the same command with --resume latest to continue",
                       name, kept)


def _train(cfg: PretrainConfig, device: torch.device) -> dict:
    cfg = replace(cfg, precision=resolve_precision(cfg.precision, device),
                  workers=default_workers() if cfg.workers is None else cfg.workers)
    out = Path(cfg.out)
    log = setup_logging(None)                       # console only until the checks pass
    ckpt_path = _resume_path(cfg, out)
    state = load_checkpoint(ckpt_path, map_location="cpu") if ckpt_path is not None else None
    if state is not None:
        cfg = replace(cfg, **resumed_init(cfg.init, state.get("config") or {}))
        _check_resume(cfg, state, ckpt_path)
    plan = _mask_plan(cfg)
    if plan.reads_store and not cfg.saliency:
        raise SalmaeError(f"--mask {cfg.mask} needs a saliency store: pass --saliency STORE.zarr "
                          "(or --set masking.source=online)")
    seed_everything(cfg.seed + dist.rank())  # as MAE; DDP then copies rank 0's initial weights to every rank
    model = build_mae(cfg.model, **{f.name: getattr(cfg.arch, f.name) for f in fields(ArchConfig)
                                    if getattr(cfg.arch, f.name) is not None}).to(device)
    init = init_mae(model, cfg.init, cfg.init_sha256) if cfg.init and state is None else None
    if init is not None:
        cfg = replace(cfg, init_sha256=init.sha256)
    dataset, manifest, store = _dataset(cfg, model)
    data_identity = {"manifest_hash": manifest.hash, "shards": shard_hashes(manifest),
                     "saliency": _store_identity(store)}
    if state is not None:
        _check_same_data(cfg, state, ckpt_path, data_identity)
    loader, sampler = _loader(cfg, dataset, device, plan, model.grid)
    # the checks passed: from here on the run folder is written
    log = setup_logging(out)
    if dist.is_main():
        _settle_run_folder(out, state)
        save_config(cfg, out / "config.yaml")
        atomic_write_json(out / "data.json", {**data_identity, "given": cfg.data,   # resolved paths: information only
                                              "urls": [_resolved(u) for u in manifest.shard_urls]})
    if init is not None:
        log.info("%s", init.describe())
    world = dist.world_size()
    eff_batch = cfg.batch_size * cfg.optim.accum_iter * world
    lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.blr * eff_batch / 256
    optimizer = build_optimizer(model, lr, cfg.optim.weight_decay, device, decay_tokens=cfg.optim.decay_tokens)
    scaler = grad_scaler(device, cfg.precision)
    start_epoch, position = 0, None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"]) + 1
        position = _resume_position(cfg, state, len(loader))
        log.info("resumed from %s at epoch %d%s", ckpt_path, start_epoch,
                 f" step {position['step']}" if position else "")
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:  # after DDP, as PyTorch's DDP + compile guidance says: buckets' all-reduce overlaps backward
        train_model = torch.compile(train_model)
    cache = getattr(dataset, "cache", None)
    log.info("stage 2: %d samples%s, %s masks, %s model %s, %d x %d x %d = %d per step, lr %.3g, %s%s, %d workers",
             len(dataset), f" (decoded in memory: {cache.nbytes / 2**20:.1f} MiB)" if cache is not None else "",
             cfg.mask, cfg.model, model.model_args, cfg.batch_size, cfg.optim.accum_iter,
             world, eff_batch, lr, cfg.precision, ", compiled" if cfg.compile else "", cfg.workers)
    metrics = MetricsWriter(out / "metrics.jsonl",   # a resume's TensorBoard: no step twice
                            purge_step=start_epoch * len(loader) + (position["step"] if position else 0))
    viz = _viz_batch(cfg, dataset) if dist.is_main() and cfg.viz_samples > 0 else None
    lr_at = lambda e: cosine_lr(e, lr, cfg.optim.min_lr, cfg.optim.warmup_epochs, cfg.epochs)  # noqa: E731
    reduction = _loss_reduction(cfg, plan, model)
    stats: dict = {}
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        start_step, carried = (position["step"], position["totals"]) if position and position["epoch"] == epoch \
            else (0, None)
        if sampler is not None:           # stream mode has none: its epochs restart whole
            sampler.set_epoch(epoch, start_step)
        dataset.set_epoch(epoch)
        stats = train_one_epoch(train_model, model, loader, optimizer, device, epoch, plan, lr_at,
                                batch_size=cfg.batch_size, accum_iter=cfg.optim.accum_iter, metrics=metrics,
                                log_every=cfg.log_every, precision=cfg.precision, scaler=scaler,
                                check_syncs=cfg.check_syncs, loss_reduction=reduction,
                                step_partial=cfg.optim.step_partial, start_step=start_step, totals=carried)
        if "stopped_at" in stats:          # every rank agreed to stop after this step (a signal)
            _stop_mid_epoch(cfg, out, model, optimizer, scaler, epoch, stats, data_identity,
                            exact=sampler is not None)
        seconds = time.time() - t0
        metrics.write(kind="epoch", epoch=epoch, loss=stats["loss"], masked=stats["masked"],
                      fallback=stats["fallback"], zero_maps=stats["zero_maps"], lr=optimizer.param_groups[0]["lr"],
                      seconds=seconds, timed_steps=stats["timed_steps"], timed_seconds=round(stats["timed_seconds"], 4),
                      images=stats["steps"] * eff_batch // cfg.optim.accum_iter, precision=cfg.precision,
                      compile=cfg.compile, loss_mean={"mean": "patch", "image_mean": "image"}[reduction],
                      **(stats.get("object_check") or {}))   # the manipulation check (labelled data)
        log.info("epoch %d: loss %.4f, %.1f masked/img, %d saliency fallbacks, %.1fs", epoch, stats["loss"],
                 stats["masked"], stats["fallback"], seconds)
        if dist.is_main():
            _save(cfg, out, model, optimizer, scaler, epoch, stats, data_identity)
            if viz is not None:
                _write_png(out / "png" / f"epoch-{epoch:04d}.png", model, viz, plan, device)
        dist.barrier("rank 0 to write the checkpoint")
        if stats["stop"]:                  # the ranks agreed on the epoch's last step: its checkpoint is written
            log.info("stop requested: epoch %d is written to checkpoint-latest.pth", epoch)
            raise signals.interrupted()
    if dataset.n_skipped:
        log.info("%d samples were skipped (without ok saliency under skip_missing, or over max_pixels)",
                 dataset.n_skipped)
    dist.barrier()
    return {"run": str(out), "epochs": cfg.epochs, "loss": stats.get("loss"),
            "checkpoint": str(out / "checkpoint-latest.pth"), "object_check": stats.get("object_check")}


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device,
                    fused: bool | None = None, decay_tokens: bool = True) -> torch.optim.AdamW:
    """MAE's AdamW: betas (0.9, 0.95), no decay on norms and biases (1-d parameters), decay on
    `cls_token` and `mask_token` as MAE's `add_weight_decay` does (`decay_tokens=False` exempts
    them); the fixed sin-cos position embeddings are not trained. The fused kernel on CUDA
    (`fused=None`), which also runs on the CPU when asked for."""
    groups = param_groups_weight_decay(model, weight_decay,
                                       no_weight_decay_list=() if decay_tokens else ("cls_token", "mask_token"))
    fused = device.type == "cuda" if fused is None else fused
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused)


# --------------------------------------------------------------------------- checks
# What a resume may change: nothing here alters what the run computes (precision and compile alter
# rounding only, and are recorded per epoch in metrics.jsonl); everything else must match.
RESUME_MAY_CHANGE = ("epochs", "out", "resume", "device", "workers", "log_every", "save_every", "viz_samples",
                     "compile", "precision", "check_syncs", "manifest", "model_args", "cache_images",
                     "init", "init_sha256")   # a resume's weights are the checkpoint's (init: mae_init.resumed_init)


# Masking keys added after runs were saved, with the value those runs computed with: a checkpoint
# that lacks one ran with it, so its resume is not refused for the key's absence.
ADDED_MASKING_KEYS = {"cap_of": "image", "map": "own", "sbam_ratio_per": "batch"}


def _as_resumed(config: dict) -> dict:
    """A config compared on resume: added masking keys filled in, `adaptive` read as `amr-capped`."""
    masking = config.get("masking")
    masking = {**ADDED_MASKING_KEYS, **masking} if isinstance(masking, dict) else masking
    return {**config, "masking": masking, "mask": canonical_strategy(str(config.get("mask")))}


def validate(cfg: PretrainConfig) -> None:
    """Every numeric option in range (one line naming the key, exit 2), before anything is created."""
    m, o = cfg.masking, cfg.optim
    require(cfg.epochs >= 1, "epochs", cfg.epochs, "at least 1")
    require(cfg.batch_size >= 1, "batch_size", cfg.batch_size, "at least 1")
    require(cfg.workers is None or cfg.workers >= 0, "workers", cfg.workers, ">= 0 (or unset for the default)")
    require(cfg.log_every >= 1, "log_every", cfg.log_every, "at least 1")
    require(cfg.save_every >= 0, "save_every", cfg.save_every, ">= 0 (0 = only checkpoint-latest.pth)")
    require(cfg.viz_samples >= 0, "viz_samples", cfg.viz_samples, ">= 0")
    require(cfg.shuffle_buffer >= 1, "shuffle_buffer", cfg.shuffle_buffer, "at least 1")
    require(cfg.max_pixels >= 1, "max_pixels", cfg.max_pixels, "at least 1")
    require(not (cfg.cache_images and cfg.data_mode == "stream"), "cache_images", cfg.cache_images,
            "only with data_mode indexed (a stream is read once per epoch in any order)")
    ratio = RatioSpec.parse(m.ratio, m.ratio_per)
    require(ratio.low > 0, "masking.ratio", m.ratio, "above 0 (with nothing masked the loss is 0)")
    require(0 <= m.cap <= 1, "masking.cap", m.cap, "between 0 and 1 (a fraction of the patches)")
    require(m.cap_ramp_epochs >= 0, "masking.cap_ramp_epochs", m.cap_ramp_epochs, ">= 0")
    require(m.tau > 0, "masking.tau", m.tau, "above 0")
    require(0 < m.base < 1, "masking.base", m.base, "between 0 and 1")
    require(m.var >= 0 and 0 < m.base - m.var and m.base + m.var < 1, "masking.var", m.var,
            f">= 0 with base ± var inside (0, 1) (base is {m.base})")
    require(0 <= m.delta <= 1, "masking.delta", m.delta, "between 0 and 1 (a threshold on normalised maps)")
    plan = _mask_plan(cfg, warn=False)
    require(m.map == "own" or plan.reads_store, "masking.map", m.map,
            "own unless the masks read the store's maps (mask saliency or amr-capped with source=store)")
    require(m.boundary_weight > 0, "masking.boundary_weight", m.boundary_weight, "above 0")
    require(o.blr > 0, "optim.blr", o.blr, "above 0")
    require(o.lr is None or o.lr > 0, "optim.lr", o.lr, "above 0 (or unset to use blr)")
    require(o.min_lr >= 0, "optim.min_lr", o.min_lr, ">= 0")
    require(o.warmup_epochs >= 0, "optim.warmup_epochs", o.warmup_epochs, ">= 0")
    require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0")
    require(o.accum_iter >= 1, "optim.accum_iter", o.accum_iter, "at least 1")
    for f in fields(ArchConfig):
        value = getattr(cfg.arch, f.name)
        if isinstance(value, int) and not isinstance(value, bool):
            require(value >= 1, f"arch.{f.name}", value, "at least 1 (or unset for the preset's value)")


def _check_resume(cfg: PretrainConfig, state: dict, path: Path) -> None:
    """Refuse a resume whose config would change what the run computes (one line naming each change)."""
    saved = dict(state.get("config") or {})
    if not saved:
        raise SalmaeError(f"checkpoint {path} holds no config; it was not written by `salmae pretrain`: "
                          "start a new run (--out) instead of resuming")
    # data is identified by its manifest's content hash (`_check_same_data`), not by how its path is
    # spelled; checkpoints from before that was recorded still compare the --data string
    by_content = ("data", "saliency") if state.get("data") else ()
    changed = resume_differences(_as_resumed(saved), _as_resumed(config_to_dict(cfg)), RESUME_MAY_CHANGE + by_content)
    if changed:
        raise SalmaeError(f"--resume would change the run in {cfg.out} ({'; '.join(changed)}); resume with the "
                          "saved settings (config.yaml) or start a new --out")
    done = int(state.get("epoch", -1)) + 1
    require(cfg.epochs >= done, "epochs", cfg.epochs, f"at least the {done} epochs the checkpoint holds "
            "(a resume extends a run, it cannot shorten one)")


def _check_same_data(cfg: PretrainConfig, state: dict, path: Path, now: dict) -> None:
    """Refuse a resume on data whose manifest hash differs from the one the checkpoint trained on,
    naming the first shard that differs (a relative --data from another folder, a replaced tar)."""
    recorded = state.get("data")
    if not recorded:
        return
    if recorded.get("saliency") != now["saliency"]:
        raise SalmaeError(f"--resume with another saliency store: checkpoint {path} was trained with store "
                          f"{recorded.get('saliency')}, --saliency {cfg.saliency!r} is {now['saliency']}; "
                          "pass the original store or start a new --out")
    if recorded.get("manifest_hash") == now["manifest_hash"]:
        return
    where = first_difference(recorded.get("shards") or {}, now["shards"]) or "the samples differ"
    raise SalmaeError(f"--resume on other data: checkpoint {path} was trained on data with manifest hash "
                      f"{str(recorded.get('manifest_hash'))[:12]}…, --data {cfg.data!r} has {now['manifest_hash'][:12]}… "
                      f"({where}); point --data at the original shards or start a new --out")


def _store_identity(store) -> str | None:
    """A saliency store by what made it (its fingerprint: CLIP weights' sha256, CAM, layer, data hash), not its path."""
    if store is None:
        return None
    import hashlib
    import json

    fingerprint = json.dumps(store.attrs.get("fingerprint") or dict(store.attrs), sort_keys=True, default=str)
    return "fingerprint " + hashlib.sha256(fingerprint.encode()).hexdigest()[:16]


def _resolved(url: str) -> str:
    return url if ("://" in url or url.startswith("pipe:")) else str(Path(url).resolve())


def _settle_run_folder(out: Path, state: dict | None) -> None:
    """Before a (resumed) run writes: remove temp files that a killed save left behind, and drop the
    metrics a killed run wrote after its last checkpoint (they would be written again)."""
    from salmae.pipeline.checkpoint import remove_stale_temp_files
    from salmae.pipeline.logging import truncate_metrics

    out.mkdir(parents=True, exist_ok=True)
    if _staged_manifest(out).is_file():
        os.replace(_staged_manifest(out), out / "manifest.parquet")
    removed = remove_stale_temp_files(out)
    if removed:
        get_logger().info("removed %d temp files a killed run left in %s", len(removed), out)
    if state is not None:
        at = state.get("position")     # a stop inside an epoch: its steps before the stop stay
        truncate_metrics(out / "metrics.jsonl", keep_epochs_below=int(state["epoch"]) + 1,
                         keep_steps_below=int(state["step"]) if at else None)
    elif (out / "metrics.jsonl").exists():
        truncate_metrics(out / "metrics.jsonl", keep_epochs_below=0)   # a fresh start in a folder without checkpoints


# --------------------------------------------------------------------------- wiring helpers
def _resume_path(cfg: PretrainConfig, out: Path) -> Path | None:
    latest = out / "checkpoint-latest.pth"
    if not cfg.resume:   # None, or "" from `--set resume=` / a YAML `resume: ""`: a fresh run
        if latest.exists():
            raise SalmaeError(f"run folder {out} already holds checkpoints; pass --resume latest to continue "
                              "or choose a new --out")
        return None
    if cfg.resume == "latest":
        return latest if latest.exists() else None
    return Path(cfg.resume)


def _dataset(cfg: PretrainConfig, model):
    from salmae.pipeline.pretrain.data import (IndexedPretrainDataset, StreamPretrainDataset,
                                             load_saliency_table, shuffle_maps)
    from salmae.pipeline.pretrain.object_check import read_object_boxes
    from salmae.pipeline.data.shards import expand_shards
    from salmae.pipeline.saliency.store import SaliencyStore

    if not cfg.data:
        raise SalmaeError("no training data: pass --data SHARDS (brace pattern, paths or pipe: URLs)")
    urls = expand_shards(cfg.data)
    manifest = _manifest(cfg, urls)
    table = store = None
    if cfg.saliency and cfg.masking.source == "store":
        store = SaliencyStore.open(cfg.saliency)
        table = load_saliency_table(manifest, store)
        get_logger().info("saliency store %s: %d of %d rows usable, %d (%d of them all-zero maps) fall back to %s",
                          cfg.saliency, int(table.ok.sum()), len(table.ok), table.n_failed, table.n_zero,
                          "being skipped" if cfg.masking.skip_missing else "random masks")
        if cfg.masking.map == "shuffled":
            table = shuffle_maps(table, cfg.seed)
            get_logger().info("masking.map=shuffled: each of the %d usable rows masks by another row's map "
                              "(a fixed derangement for seed %d), under its own crop and flip", int(table.ok.sum()),
                              cfg.seed)
    boxes = read_object_boxes(manifest, urls)
    if boxes is not None:
        get_logger().info("manipulation check: main-object boxes (KEY.json bbox) for %d of %d rows; metrics.jsonl "
                          "records per epoch the share of object patches hidden", int(np.isfinite(boxes[:, 0]).sum()),
                          len(boxes))
    common = dict(img_size=model.model_args["img_size"], grid=model.grid, saliency=table,
                  skip_missing=cfg.masking.skip_missing, seed=cfg.seed, max_pixels=cfg.max_pixels,
                  need_caption=needs_captions(cfg), boxes=boxes)
    if cfg.data_mode == "stream":
        return StreamPretrainDataset(manifest, urls, shuffle_buffer=cfg.shuffle_buffer, batch_size=cfg.batch_size,
                                     world=dist.world_size(), **common), manifest, store
    return IndexedPretrainDataset(manifest, urls, cache_images=cfg.cache_images, **common), manifest, store


def needs_captions(cfg: PretrainConfig) -> bool:
    """Captions matter only where masks read stage-1 saliency (made from them); random, block and grid
    masks (and saliency from the model itself) also train on caption-free shards (e.g. imagenet-1k-wds)."""
    return _mask_plan(cfg, warn=False).reads_store


def _loss_reduction(cfg: PretrainConfig, plan: MaskPlan, model) -> str:
    """The model's loss reduction for `loss_mean` (auto: per-image means when masked counts vary, except
    for `sbam`, which keeps MAE's mean over masked patches as SBAM's released code does)."""
    mode = cfg.loss_mean
    if mode == "auto":
        mode = "image" if plan.keep_slots(model.num_patches) is not None and plan.strategy != "sbam" else "patch"
    return {"patch": "mean", "image": "image_mean"}[mode]


def _manifest(cfg: PretrainConfig, urls: list[str]):
    """The manifest of `--data`: `--manifest`, else the saliency store's, else the run folder's
    `manifest.parquet`, built once by rank 0 (a process pool scans the shards) while the other
    ranks wait. A stored manifest is trusted after an O(shards) check of shard sizes and times."""
    from salmae.pipeline.data.manifest import build_manifest, load_manifest, stale_reason

    if cfg.manifest:
        manifest = load_manifest(cfg.manifest)
        why = stale_reason(manifest, urls) if manifest.shard_stats is not None else None  # older: as given
        if why is not None:
            raise SalmaeError(f"manifest {cfg.manifest} does not describe --data: {why}; rebuild it with "
                              f"`salmae manifest build '{cfg.data}' -o {cfg.manifest}` or drop --manifest")
        return manifest
    if cfg.saliency and (Path(cfg.saliency) / "manifest.parquet").is_file():
        manifest = load_manifest(Path(cfg.saliency) / "manifest.parquet")
        if stale_reason(manifest, urls) is None:
            return manifest
    out = Path(cfg.out)
    cached = out / "manifest.parquet"
    if cached.is_file() and stale_reason(load_manifest(cached), urls) is None:
        return load_manifest(cached)
    staged = _staged_manifest(out)
    if dist.is_main() and not (staged.is_file() and stale_reason(load_manifest(staged), urls) is None):
        get_logger().info("building the manifest of %d shards into %s", len(urls), staged)
        build_manifest(urls, staged)
    dist.barrier(f"rank 0 to build the manifest of --data into {staged}")
    manifest = load_manifest(staged)
    dist.barrier("every rank to read the staged manifest")    # rank 0 renames it once the checks pass
    return manifest


def _staged_manifest(out: Path) -> Path:
    """Where rank 0 builds the manifest of --data: inside the run folder, hidden; it becomes
    `manifest.parquet` once every check has passed (a refused run keeps it for the next try)."""
    return out / ".manifest.parquet.staged"


def _loader(cfg: PretrainConfig, dataset, device, plan: MaskPlan, grid: tuple[int, int]):
    """DataLoader whose workers decode, augment, pool the maps and build the step's masks."""
    from torch.utils.data import DataLoader

    from salmae.pipeline.pretrain.data import GlobalBatchSampler

    world, rank = dist.world_size(), dist.rank()
    kw = dict(num_workers=cfg.workers, pin_memory=pin_memory(device), persistent_workers=False,
              generator=loader_generator(cfg.seed), worker_init_fn=seed_worker)
    if cfg.data_mode == "stream":
        steps = len(dataset) // cfg.batch_size
        collate = MaskingCollate(dataset.collate, plan, grid, rank, cfg.batch_size, world, steps) if plan.in_loader \
            else dataset.collate
        return DataLoader(dataset, batch_size=cfg.batch_size, drop_last=True, collate_fn=collate, **kw), None
    sampler = GlobalBatchSampler(len(dataset), cfg.batch_size, world, rank, cfg.seed)
    collate = MaskingCollate(dataset.collate, plan, grid, rank, cfg.batch_size, world, len(sampler)) \
        if plan.in_loader else dataset.collate
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, **kw), sampler


def _mask_plan(cfg: PretrainConfig, warn: bool = True) -> MaskPlan:
    """The config's masking resolved; `warn`: log once that a deprecated strategy name was used."""
    m = cfg.masking
    strategy = resolve_strategy(cfg.mask) if warn else canonical_strategy(cfg.mask)
    return MaskPlan(strategy=strategy, ratio=RatioSpec.parse(m.ratio, m.ratio_per), cap=m.cap, cap_of=m.cap_of,
                    cap_ramp_epochs=m.cap_ramp_epochs, select=m.select, tau=m.tau, inverse=m.inverse,
                    base=m.base, var=m.var, delta=m.delta, sbam_per=m.sbam_ratio_per,
                    boundary_weight=m.boundary_weight, source=m.source, seed=cfg.seed)


def _stop_mid_epoch(cfg, out: Path, model, optimizer, scaler, epoch: int, stats: dict, data_identity: dict,
                    exact: bool) -> None:
    """The ranks agreed to stop after step `stats['stopped_at']` of `epoch`: rank 0 writes that position
    (indexed mode; a stream cannot seek, so there the last epoch's checkpoint is what resumes), then
    every rank raises the deferred `Interrupted` (exit 75: requeue)."""
    log = get_logger()
    if exact:
        if dist.is_main():
            _save(cfg, out, model, optimizer, scaler, epoch - 1, stats, data_identity,
                  position={"epoch": epoch, "step": stats["stopped_at"], "steps": stats["steps"],
                            "totals": stats["totals"]})
        dist.barrier("rank 0 to write the checkpoint")
        log.info("stop requested: epoch %d step %d of %d is written to checkpoint-latest.pth", epoch,
                 stats["stopped_at"], stats["steps"])
    else:
        log.info("stop requested at epoch %d step %d: stream mode cannot resume inside an epoch, so the run "
                 "resumes from the last epoch's checkpoint", epoch, stats["stopped_at"])
    raise signals.interrupted()


def _resume_position(cfg: PretrainConfig, state: dict, steps: int) -> dict | None:
    """Where inside an epoch a stopped run resumes (None: at the epoch's start). The epoch's steps must be
    those the position was saved with (the same data and batch, as the resume checks have made sure)."""
    at = state.get("position")
    if not at:
        return None
    if cfg.data_mode == "stream" or int(at["steps"]) != steps:
        now = "stream mode, which cannot seek" if cfg.data_mode == "stream" else f"{steps} steps per epoch"
        raise SalmaeError(f"checkpoint {cfg.resume} stopped at step {at['step']} of {at['steps']} in epoch "
                          f"{at['epoch']}, but this run has {now}; resume with the --batch-size, world size "
                          "and data_mode it ran with")
    return at


def _save(cfg, out: Path, model, optimizer, scaler, epoch: int, stats: dict, data_identity: dict,
          position: dict | None = None) -> None:
    """Rank 0: checkpoint-latest.pth after `epoch` (the last whole epoch), or at `position` inside the
    next one ({epoch, step, steps, totals}: a stop's), and every `save_every` epochs a numbered copy."""
    config = config_to_dict(cfg)
    config["model_args"] = dict(model.model_args)
    done = (epoch + 1) * stats["steps"] + (position["step"] if position else 0)
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                 scaler=scaler.state_dict() if scaler is not None else None,
                 epoch=epoch, step=done, config=config,
                 loss=float(stats["loss"]) if "loss" in stats else None, data=data_identity, position=position)
    save_checkpoint(out / "checkpoint-latest.pth", **state)
    if position is not None:
        return
    if cfg.save_every > 0 and (epoch + 1) % cfg.save_every == 0:
        save_checkpoint(out / f"checkpoint-{epoch:04d}.pth", **state)


def _viz_batch(cfg: PretrainConfig, dataset) -> dict | None:
    """The same first samples every epoch, without augmentation."""
    if not hasattr(dataset, "augment"):  # stream mode: no random access
        return None
    keep = dataset.augment
    dataset.augment = False
    items = [dataset[i] for i in range(min(cfg.viz_samples, len(dataset)))]
    dataset.augment = keep
    return dataset.collate(items) if items else None


@torch.no_grad()
def _write_png(path: Path, model, batch: dict, plan: MaskPlan, device) -> None:
    from salmae.pipeline.figures.mae_grid import save_mae_grid

    was_training = model.training
    model.eval()
    n = batch["image"].shape[0]
    imgs = normalise(batch["image"].to(device), pixel_stats(device))
    sal = model_salience(model, plan, imgs) if plan.model_salience else batch["saliency"]
    m = batch_masks(plan, n, model.grid, 1e9, step_seed(plan.seed, -1, 0), (0, n), sal.to(device),
                    batch["saliency_ok"].to(device) if not plan.model_salience else None)
    _, pred, mask = model(imgs, masking=(m["ids_keep"], m["mask"], m["ids_restore"]), valid=m["valid"])
    save_mae_grid(path, model, imgs.cpu(), sal.cpu(), pred.cpu(), mask.cpu())
    model.train(was_training)
