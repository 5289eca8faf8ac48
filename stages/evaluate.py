"""Stage 3: measure what a pretrained encoder learned — linear probe, kNN or fine-tune.

`salmae eval {linear,knn,logreg,finetune} --checkpoint CKPT --data ROOT --out DIR` loads the encoder
(`pipeline.models.encoder`), reads an ImageFolder root or labelled shards (`pipeline.eval.data`) and runs one
protocol with MAE's / DINO's defaults:
- `linear` is MAE's linear probe: RandomResizedCrop + flip, BatchNorm (no affine) + Linear,
  LARS, blr 0.1 at a global batch of 16384 (by gradient accumulation), 90 epochs, 10 warmup.
  `linear --no-aug` (`linear.augment=false`) is the fast variant on cached centre-crop features,
  recorded as protocol `linear-noaug` so no table can mix the two.
- `finetune` takes MAE's recipe for the encoder's size (`pipeline.eval.recipes`: layer decay,
  drop path, blr, epochs; config values override it) at a global batch of 1024, head bias 0.
- `knn` is DINO's weighted kNN (k 20, T 0.07).
- `logreg` is a multinomial logistic regression on the same cached centre-crop features, solved
  to convergence (full-batch L-BFGS in float64, deterministic; `pipeline.eval.logreg`), its L2
  strength chosen from `logreg.l2_grid` on a seeded held-out part of probe-train, then refit on
  all of it: the cheap probe without optimiser noise. results.json records the chosen L2, each
  strength's held-out top-1 and how the final fit converged.
results.json records the protocol name, epochs, the global batch asked for and used, the
accumulation, the lr (and for fine-tuning the resolved recipe). The same command runs as one process or under torchrun:
features are extracted split over ranks and all-gathered; kNN scores each rank's share of the
val rows on the device and sums the hit counts; the linear head and fine-tuning train under DDP.
Every protocol runs its encoder under the run's autocast (`precision`: bf16 on a current GPU,
fp32 on the CPU; frozen features are kept as float32, as MAE's linear probe does); a GradScaler
(fp16) and `compile` apply to fine-tuning, and results.json records both.
Rank r seeds torch, numpy and `random` with seed + r (fine-tuning reseeds per epoch, so a
resumed run repeats an uninterrupted one). Output: `DIR/results.json` (atomic),
`DIR/config.yaml`, `DIR/run.log`, `DIR/metrics.jsonl`; the frozen-feature protocols cache
features in `DIR/features-{train,val}.pt` (or in the `features` folder, which kNN and the linear
probes of one checkpoint may share: a file is used only if it was written for the same
checkpoint, files and transform), fine-tune checkpoints every epoch to
`DIR/checkpoint-latest.pth` (`--set resume=latest` continues).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch.nn.parallel import DistributedDataParallel

from salmae.pipeline import __version__, dist, signals
from salmae.pipeline.checkpoint import load_checkpoint, save_checkpoint
from salmae.pipeline.config import config_to_dict, require, resume_differences, save_config
from salmae.pipeline.device import (default_workers, grad_scaler, loader_generator, pick_device, pin_memory,
                             resolve_precision, seed_everything, seed_worker)
from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.run_lock import RunLock
from salmae.pipeline.eval.accumulation import Accumulation, plan_accumulation
from salmae.pipeline.eval.data import EvalData, open_eval_data
from salmae.pipeline.eval.features import Features, cached_features, extract_features
from salmae.pipeline.eval.finetune import evaluate_classifier, finetune_one_epoch, gather_ints, init_finetune_head
from salmae.pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from salmae.pipeline.eval.knn import knn_hits
from salmae.pipeline.eval.logreg import logreg_probe
from salmae.pipeline.eval.linear import (CachedBatches, EncoderBatches, LinearProbeHead, lars_for_head,
                                  train_linear_head)
from salmae.pipeline.eval.metrics import topk_correct
from salmae.pipeline.eval.recipes import FINETUNE_GLOBAL_BATCH, FinetuneRecipe, resolve_recipe
from salmae.pipeline.eval.transforms import eval_transform, finetune_train_transform, linear_train_transform
from salmae.pipeline.files import atomic_write_json, sha256_file
from salmae.pipeline.logging import MetricsWriter, get_logger, setup_logging
from salmae.pipeline.models.encoder import EncoderSpec, load_encoder
from salmae.pipeline.models.hub import is_hub_name
from salmae.pipeline.models.weights import weights_path

DEFAULT_EPOCHS = {"linear": 90, "knn": 0, "logreg": 0}  # finetune: the recipe's (pipeline.eval.recipes)
DEFAULT_BATCH = {"linear": 512, "knn": 256, "logreg": 256, "finetune": 64}  # linear: MAE's per-GPU 512 (the head's
                                                                            # BatchNorm batch); knn/logreg: extraction
DEFAULT_GLOBAL_BATCH = {"linear": 16384, "knn": 0, "logreg": 0, "finetune": FINETUNE_GLOBAL_BATCH}  # MAE's effective batches


@dataclass
class LinearConfig:
    blr: float = 0.1             # base lr; lr = blr * global batch / 256 (MAE linear probe)
    warmup_epochs: int = 10      # linear warmup before the half-cycle cosine
    weight_decay: float = 0.0    # LARS weight decay on the head's weight matrix
    augment: bool = True         # MAE's RandomResizedCrop + flip; False (--no-aug) = protocol linear-noaug
    cache: bool = True           # linear-noaug: extract train features once; False re-encodes each epoch


@dataclass
class KnnConfig:
    k: int = 20                  # neighbours that vote
    temperature: float = 0.07    # vote weight exp(cos / T)


@dataclass
class LogregConfig:
    l2_grid: list[float] = field(default_factory=lambda: [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0])  # L2 strengths
                                 # tried (on standardised features, mean cross-entropy + l2/2 ||W||^2)
    holdout: float = 0.2         # share of probe-train held out (per class, seeded by `seed`) to choose the L2
    max_iter: int = 1000         # L-BFGS iterations per fit (a fit that stops here is logged as not converged)
    tolerance: float = 1e-6      # converged when the gradient's largest component is this small


@dataclass
class FinetuneConfig:
    blr: float | None = None     # base lr; lr = blr * global batch / 256 (AdamW). None: recipe (B 5e-4, L/H 1e-3)
    min_lr: float = 1e-6         # floor of the cosine schedule
    warmup_epochs: int = 5       # linear warmup epochs
    weight_decay: float = 0.05   # AdamW weight decay (not on norms, biases, tokens)
    layer_decay: float | None = None  # layer-wise lr decay (timm create_optimizer_v2). None: recipe (B 0.65, L/H 0.75)
    drop_path: float | None = None    # stochastic depth rate. None: recipe (B 0.1, L 0.2, H 0.3)
    mixup: float = 0.8           # Mixup alpha (0 with cutmix 0 = off)
    cutmix: float = 1.0          # CutMix alpha
    label_smoothing: float = 0.1  # smoothing of the (mixed) targets
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # timm RandAugment policy ('' = none)
    re_prob: float = 0.25        # random-erasing probability
    clip_grad: float | None = None  # max grad norm (None = no clipping)


@dataclass
class EvalConfig:
    protocol: Literal["linear", "knn", "logreg", "finetune"] = "linear"  # which evaluation to run
    checkpoint: str = ""          # stage-2 checkpoint, official MAE checkpoint or timm ViT weights
                                  # (a FILE, a timm hub FOLDER or hf-hub:ORG/NAME)
    data: str = ""                # ImageFolder root with train/ and val/ class folders, or labelled train shards
                                  # (KEY.jpg + KEY.cls, e.g. imagenet-1k-wds; paths, patterns or s3:// URLs)
    val_data: str = ""            # val shards for labelled shards in `data` ("" = DATA/*val-*.tar, or KEY.json split)
    label_from: str = "auto"      # labelled shards: auto (KEY.cls, else KEY.json label), cls, or json:FIELD
    out: str = ""                 # output folder (results.json, config.yaml, run.log, caches)
    features: str = ""            # folder of the frozen-feature cache features-{train,val}.pt ("" = out); protocols
                                  # of one checkpoint may share it (each file is keyed by checkpoint, files, transform)
    epochs: int | None = None     # training epochs (None = protocol default: linear 90, finetune the recipe's)
    batch_size: int | None = None  # per-process (micro-)batch (None = linear 512, knn 256, finetune 64)
    global_batch: int | None = None  # images per optimiser step over all ranks (None = MAE's: linear 16384, finetune 1024)
    accum_iter: int | None = None  # micro-batches per step (None = global_batch // (batch_size * world), at least 1)
    device: str = "auto"          # auto, cpu or cuda
    global_pool: bool | None = None  # mean-pool patch tokens instead of the class token (None: finetune only)
    image_size: int | None = None  # eval input side (None = the pretraining size; pos-embed resampled otherwise)
    mean: tuple[float, ...] = IMAGENET_MEAN  # normalisation mean (as in pretraining)
    std: tuple[float, ...] = IMAGENET_STD    # normalisation std
    crop_pct: float = 0.875       # eval resize = image_size / crop_pct, then centre crop
    workers: int | None = None    # DataLoader worker processes (None: the CPUs per local process less one,
                                  # 1..10: pipeline.device.default_workers)
    check: Literal["header", "none"] = "header"  # probe every image file when opening the data (skips unreadable ones)
    seed: int = 0                 # seeds head init, batch order and augmentation (rank r draws from seed + r)
    precision: str = "auto"       # encoder autocast: auto|bf16|fp16|fp32 (auto: bf16 GPU, fp16 old GPU, fp32 CPU)
    compile: bool = False         # finetune: torch.compile the (DDP-wrapped) model
    resume: str | None = None     # finetune: 'latest' (DIR/checkpoint-latest.pth) or a checkpoint path
    timm_model: str | None = None  # build this timm model by name and load `checkpoint` into it
    num_heads: int | None = None  # attention heads for inferred architectures (None: by width, 192->3 … 1280->16)
    linear: LinearConfig = field(default_factory=LinearConfig)    # linear-probe settings
    knn: KnnConfig = field(default_factory=KnnConfig)             # kNN settings
    logreg: LogregConfig = field(default_factory=LogregConfig)    # logistic-regression probe settings
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # fine-tune settings


@dataclass
class _Context:
    """What every protocol needs, prepared once by `run`."""

    cfg: EvalConfig
    out: Path
    device: torch.device
    epochs: int
    batch_size: int
    protocol: str                 # as recorded: knn, logreg, linear, linear-noaug or finetune
    image_size: int
    checkpoint_sha256: str
    metrics: MetricsWriter
    precision: str                # resolved: bf16, fp16 or fp32 (every protocol's encoder autocast)
    data: EvalData | None = None  # opened by the protocol, once the input size is known


def run(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate `cfg.checkpoint` with `cfg.protocol`; write and return the results dict."""
    for name in ("checkpoint", "data", "out"):
        if not getattr(cfg, name):
            raise SalmaeError(f"eval needs --{name.replace('_', '-')}; pass it on the command line or with --set {name}=…")
    validate(cfg)
    weights_path(cfg.checkpoint)                          # an hf-hub: name is fetched (or found cached) here
    cfg = replace(cfg, workers=default_workers() if cfg.workers is None else cfg.workers)  # recorded: the number used
    start = time.time()
    out = Path(cfg.out)
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)  # a bad name fails before any work
    resumed = _check_resume(cfg, out)                     # a resume that would change the run: refused here
    dist.init(device)
    lock = RunLock(out, f"eval {cfg.protocol}")           # one job per output folder: rank 0 holds it
    with signals.stop_signals():                          # SIGTERM (SLURM) like Ctrl-C
        if dist.is_main():
            lock.acquire()
        try:
            return _evaluate(cfg, out, device, precision, resumed, start)
        except KeyboardInterrupt as e:
            get_logger().error("eval %s stopped by %s; %s", cfg.protocol, getattr(e, "name", "SIGINT"),
                               "run the same command with --resume latest to continue" if cfg.protocol == "finetune"
                               else "run the same command again (cached features are kept)")
            raise
        finally:
            lock.release()


def _evaluate(cfg: EvalConfig, out: Path, device: torch.device, precision: str, resumed: dict | None,
              start: float) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    log = setup_logging(out)
    if dist.is_main():
        _settle_eval_folder(out, resumed)
        save_config(cfg, out / "config.yaml")
    seed_everything(cfg.seed + dist.rank())
    weights = weights_path(cfg.checkpoint)        # an hf-hub: name: from the cache run() already checked
    ckpt_sha = sha256_file(weights) if weights.is_file() else ""
    ctx = _Context(cfg=cfg, out=out, device=device,
                   epochs=cfg.epochs if cfg.epochs is not None else DEFAULT_EPOCHS.get(cfg.protocol, 0),
                   batch_size=cfg.batch_size or DEFAULT_BATCH[cfg.protocol], protocol=protocol_name(cfg), image_size=0,
                   checkpoint_sha256=ckpt_sha, precision=precision,
                   metrics=MetricsWriter(out / "metrics.jsonl", purge_step=int(resumed["epoch"]) + 1 if resumed else 0))
    protocol = {"linear": _run_linear, "knn": _run_knn, "logreg": _run_logreg, "finetune": _run_finetune}[cfg.protocol]
    outcome = protocol(ctx)
    results = _results(ctx, outcome, seconds=time.time() - start)
    if dist.is_main():
        atomic_write_json(out / "results.json", results)
    dist.barrier()
    log.info("eval %s: top-1 %.2f%%, top-5 %.2f%% -> %s", ctx.protocol, results["top1"], results["top5"],
             out / "results.json")
    return results


# What a fine-tune resume may change: nothing that alters what it computes (precision and compile
# alter rounding only); everything else must match the checkpoint's config.
RESUME_MAY_CHANGE = ("epochs", "out", "features", "resume", "device", "workers", "check", "precision", "compile")


def validate(cfg: EvalConfig) -> None:
    """Every numeric option in range (one line naming the key, exit 2), before anything is created."""
    for key in ("epochs", "batch_size", "global_batch", "accum_iter", "image_size", "num_heads"):
        value = getattr(cfg, key)
        require(value is None or value >= 1, key, value, "at least 1 (or unset for the protocol's default)")
    require(cfg.workers is None or cfg.workers >= 0, "workers", cfg.workers, ">= 0 (or unset for the default)")
    require(0 < cfg.crop_pct <= 1, "crop_pct", cfg.crop_pct, "in (0, 1]")
    require(cfg.label_from in ("auto", "cls") or cfg.label_from.startswith("json:") and len(cfg.label_from) > 5,
            "label_from", cfg.label_from, "auto, cls or json:FIELD (e.g. json:label)")
    require(cfg.knn.k >= 1, "knn.k", cfg.knn.k, "at least 1")
    require(cfg.knn.temperature > 0, "knn.temperature", cfg.knn.temperature, "above 0")
    lc, fc, rc = cfg.linear, cfg.finetune, cfg.logreg
    require(len(rc.l2_grid) >= 1 and all(v > 0 for v in rc.l2_grid), "logreg.l2_grid", rc.l2_grid,
            "at least one L2 strength, each above 0 (e.g. [1e-4, 1e-3, 1e-2])")
    require(0 < rc.holdout < 1, "logreg.holdout", rc.holdout, "in (0, 1)")
    require(rc.max_iter >= 1, "logreg.max_iter", rc.max_iter, "at least 1")
    require(rc.tolerance > 0, "logreg.tolerance", rc.tolerance, "above 0")
    require(lc.blr > 0, "linear.blr", lc.blr, "above 0")
    require(lc.warmup_epochs >= 0, "linear.warmup_epochs", lc.warmup_epochs, ">= 0")
    require(lc.weight_decay >= 0, "linear.weight_decay", lc.weight_decay, ">= 0")
    require(fc.blr is None or fc.blr > 0, "finetune.blr", fc.blr, "above 0 (or unset for the recipe's)")
    require(fc.min_lr >= 0, "finetune.min_lr", fc.min_lr, ">= 0")
    require(fc.warmup_epochs >= 0, "finetune.warmup_epochs", fc.warmup_epochs, ">= 0")
    require(fc.weight_decay >= 0, "finetune.weight_decay", fc.weight_decay, ">= 0")
    require(fc.layer_decay is None or 0 < fc.layer_decay <= 1, "finetune.layer_decay", fc.layer_decay, "in (0, 1]")
    require(fc.drop_path is None or 0 <= fc.drop_path < 1, "finetune.drop_path", fc.drop_path, "in [0, 1)")
    require(fc.mixup >= 0 and fc.cutmix >= 0, "finetune.mixup/cutmix", (fc.mixup, fc.cutmix), ">= 0")
    require(0 <= fc.label_smoothing < 1, "finetune.label_smoothing", fc.label_smoothing, "in [0, 1)")
    require(0 <= fc.re_prob <= 1, "finetune.re_prob", fc.re_prob, "in [0, 1]")
    require(fc.clip_grad is None or fc.clip_grad > 0, "finetune.clip_grad", fc.clip_grad, "above 0 (or unset)")


def _resume_checkpoint_path(cfg: EvalConfig, out: Path) -> Path | None:
    if cfg.protocol != "finetune" or not cfg.resume:
        return None
    path = out / "checkpoint-latest.pth" if cfg.resume == "latest" else Path(cfg.resume)
    return path if path.is_file() or cfg.resume != "latest" else None


def _check_resume(cfg: EvalConfig, out: Path) -> dict | None:
    """The fine-tune checkpoint being resumed (None for a fresh run), after refusing in one line a
    resume whose config would change the run."""
    path = _resume_checkpoint_path(cfg, out)
    if path is None:
        return None
    state = load_checkpoint(path)
    if "optimizer" not in state or "epoch" not in state:
        raise SalmaeError(f"resume checkpoint {path} is not a fine-tune checkpoint (no optimizer/epoch); "
                          "pass DIR/checkpoint-latest.pth of an earlier `salmae eval finetune`")
    changed = resume_differences(state.get("config") or {}, config_to_dict(cfg), RESUME_MAY_CHANGE)
    if changed:
        raise SalmaeError(f"--set resume would change the fine-tune in {out} ({'; '.join(changed)}); resume with "
                          "the saved settings (config.yaml) or start a new --out")
    return state


def _settle_eval_folder(out: Path, resumed: dict | None) -> None:
    """Remove temp files a killed save left behind; drop metrics a killed run wrote after its last
    checkpoint (a fresh run starts its metrics anew)."""
    from salmae.pipeline.checkpoint import remove_stale_temp_files
    from salmae.pipeline.logging import truncate_metrics

    remove_stale_temp_files(out)
    truncate_metrics(out / "metrics.jsonl", keep_epochs_below=int(resumed["epoch"]) + 1 if resumed else 0)


def protocol_name(cfg: EvalConfig) -> str:
    """The protocol as results.json names it: the linear probe without augmentation is `linear-noaug`."""
    if cfg.protocol == "linear" and not cfg.linear.augment:
        return "linear-noaug"
    return cfg.protocol


def _accumulation(ctx: _Context, micro_batches: int) -> Accumulation:
    cfg = ctx.cfg
    acc = plan_accumulation(cfg.global_batch or DEFAULT_GLOBAL_BATCH[cfg.protocol], ctx.batch_size,
                            dist.world_size(), micro_batches, cfg.accum_iter)
    capped = cfg.accum_iter is not None and acc.accum_iter < cfg.accum_iter
    if acc.global_batch < acc.requested_global_batch or capped:
        get_logger().warning("%s: global batch %d asked for, %d used (batch %d x %d process(es) x accum_iter %d; "
                             "an epoch has %d micro-batches)", ctx.protocol, acc.requested_global_batch,
                             acc.global_batch, ctx.batch_size, dist.world_size(), acc.accum_iter, micro_batches)
    return acc


# --------------------------------------------------------------------------- protocols
def _load(ctx: _Context, *, global_pool: bool = False, drop_path: float | Callable[[int], float] = 0.0):
    cfg = ctx.cfg
    encoder, spec = load_encoder(cfg.checkpoint, img_size=cfg.image_size, global_pool=global_pool,
                                 drop_path_rate=drop_path, num_heads=cfg.num_heads, timm_model=cfg.timm_model)
    ctx.image_size = cfg.image_size or spec.pretrain_img_size
    return encoder.to(ctx.device), spec


def _open_data(ctx: _Context, train_transform, val_transform) -> EvalData:
    cfg = ctx.cfg
    ctx.data = open_eval_data(cfg.data, train_transform, val_transform, ctx.image_size, check=cfg.check,
                              val_data=cfg.val_data, label_from=cfg.label_from)
    get_logger().info("eval %s of %s on %s: %d train / %d val images, %d classes, %d skipped, %d process(es)",
                      cfg.protocol, cfg.checkpoint, cfg.data, len(ctx.data.train), len(ctx.data.val),
                      len(ctx.data.classes), len(ctx.data.skipped), dist.world_size())
    return ctx.data


def _frozen_features(ctx: _Context, encoder, split: str) -> Features:
    """Features of one split through the frozen encoder, from FEATURES/features-SPLIT.pt when still valid."""
    cfg = ctx.cfg
    key = {"checkpoint_sha256": ctx.checkpoint_sha256, "split": split, "image_size": ctx.image_size,
           "global_pool": bool(cfg.global_pool), "mean": list(cfg.mean), "std": list(cfg.std),
           "crop_pct": cfg.crop_pct, "timm_model": cfg.timm_model, "num_heads": cfg.num_heads,
           "files": ctx.data.fingerprint(split), "precision": ctx.precision}
    dataset = ctx.data.train if split == "train" else ctx.data.val
    path = Path(cfg.features or ctx.out) / f"features-{split}.pt"
    feats, hit = cached_features(path, key, lambda: extract_features(
        encoder, dataset, batch_size=ctx.batch_size, device=ctx.device, workers=cfg.workers, desc=split,
        precision=ctx.precision))
    if hit:
        get_logger().info("%s features reused from %s", split, path)
    readable = feats.feats[feats.ok]
    if not bool(torch.isfinite(readable).all()):   # once per split, on the host: no step waits for it
        bad = int((~torch.isfinite(readable).all(dim=1)).sum())
        raise SalmaeError(f"{bad} of {len(readable)} {split} features of checkpoint {cfg.checkpoint} are not finite "
                          "(NaN or inf weights, or an overflow at this precision); no accuracy is reported: check "
                          "the checkpoint (its pretraining loss) or use --set precision=fp32")
    return feats


def _run_knn(ctx: _Context) -> dict[str, Any]:
    cfg = ctx.cfg
    encoder, spec = _load(ctx, global_pool=bool(cfg.global_pool))
    tf = eval_transform(ctx.image_size, cfg.mean, cfg.std, cfg.crop_pct)
    data = _open_data(ctx, tf, tf)
    train, val = _frozen_features(ctx, encoder, "train"), _frozen_features(ctx, encoder, "val")
    tr, va = train.readable(), val.readable()
    top1, top5 = knn_hits(tr.feats, tr.labels, va.feats, va.labels, len(data.classes), device=ctx.device,
                          k=cfg.knn.k, temperature=cfg.knn.temperature)
    n = max(va.labels.numel(), 1)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "epochs": 0, "spec": spec,
            "train_unreadable": _bad(train), "val_unreadable": _bad(val)}


def _run_logreg(ctx: _Context) -> dict[str, Any]:
    cfg, rc = ctx.cfg, ctx.cfg.logreg
    encoder, spec = _load(ctx, global_pool=bool(cfg.global_pool))
    tf = eval_transform(ctx.image_size, cfg.mean, cfg.std, cfg.crop_pct)
    data = _open_data(ctx, tf, tf)
    train, val = _frozen_features(ctx, encoder, "train"), _frozen_features(ctx, encoder, "val")
    tr, va = train.readable(), val.readable()

    def on_fit(stage: str, fit, holdout_top1: float | None) -> None:
        ctx.metrics.write(protocol=ctx.protocol, stage=stage, l2=fit.l2, holdout_top1=holdout_top1,
                          iterations=fit.iterations, loss=fit.loss, grad_norm=fit.grad_norm, converged=fit.converged)

    # every rank solves the same deterministic problem on the same gathered features: no collective needed
    result = logreg_probe(tr.feats, tr.labels, va.feats, len(data.classes), l2_grid=rc.l2_grid, holdout=rc.holdout,
                          seed=cfg.seed, device=ctx.device, max_iter=rc.max_iter, tolerance=rc.tolerance,
                          on_fit=on_fit)
    fit = result.fit
    log = get_logger()
    log.info("logreg: l2 %g chosen (held-out top-1 %s over %d rows); final fit %d iterations, gradient norm %.2e",
             fit.l2, ", ".join(f"{k:g}: {v:.2f}" for k, v in result.holdout_top1.items()), result.holdout_rows,
             fit.iterations, fit.grad_norm)
    if not fit.converged:
        log.warning("logreg: the final fit stopped after %d iterations with gradient norm %.2e (tolerance %g); "
                    "raise logreg.max_iter", fit.iterations, fit.grad_norm, rc.tolerance)
    top1, top5 = topk_correct(result.val_logits.cpu(), va.labels)
    n = max(va.labels.numel(), 1)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "epochs": 0, "spec": spec,
            "train_unreadable": _bad(train), "val_unreadable": _bad(val),
            "logreg": {"l2": fit.l2, "holdout_top1": {f"{k:g}": round(v, 4) for k, v in result.holdout_top1.items()},
                       "holdout_rows": result.holdout_rows, "iterations": fit.iterations, "loss": fit.loss,
                       "grad_norm": fit.grad_norm, "converged": fit.converged}}


def _run_linear(ctx: _Context) -> dict[str, Any]:
    cfg, lc = ctx.cfg, ctx.cfg.linear
    encoder, spec = _load(ctx, global_pool=bool(cfg.global_pool))
    encoder.requires_grad_(False)
    use_cache = lc.cache and not lc.augment
    tf_eval = eval_transform(ctx.image_size, cfg.mean, cfg.std, cfg.crop_pct)
    tf_train = linear_train_transform(ctx.image_size, cfg.mean, cfg.std, cfg.crop_pct, augment=lc.augment)
    data = _open_data(ctx, tf_train, tf_eval)
    val = _frozen_features(ctx, encoder, "val")
    if use_cache:
        train = _frozen_features(ctx, encoder, "train")
        batches = CachedBatches(train.feats, train.labels, train.ok, ctx.batch_size, cfg.seed, ctx.device)
    else:
        batches = EncoderBatches(encoder, data.train, ctx.batch_size, cfg.seed, ctx.device, workers=cfg.workers,
                                 precision=ctx.precision)
    torch.manual_seed(cfg.seed)  # same head init whichever path
    head = LinearProbeHead(encoder.num_features, len(data.classes)).to(ctx.device)
    acc = _accumulation(ctx, len(batches))
    lr = lc.blr * acc.global_batch / 256
    optimizer = lars_for_head(head, lr, lc.weight_decay)
    trained = DistributedDataParallel(head) if dist.world_size() > 1 else head
    train_linear_head(trained, batches, optimizer, epochs=ctx.epochs, base_lr=lr, warmup_epochs=lc.warmup_epochs,
                      accum_iter=acc.accum_iter, on_epoch=lambda e, loss: _log_epoch(ctx, e, loss))
    head.eval()
    va = val.readable()
    with torch.no_grad():
        logits = head(va.feats.to(ctx.device)).cpu()
    top1, top5 = topk_correct(logits, va.labels)
    n = max(va.labels.numel(), 1)
    train_bad = _bad(train) if use_cache else gather_ints(sorted(batches.unreadable))
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "epochs": ctx.epochs, "spec": spec,
            "train_unreadable": train_bad, "val_unreadable": _bad(val), "cached_features": use_cache, "lr": lr,
            "blr": lc.blr, "accumulation": acc}


def _run_finetune(ctx: _Context) -> dict[str, Any]:
    from timm.optim import create_optimizer_v2

    cfg, fc = ctx.cfg, ctx.cfg.finetune
    global_pool = True if cfg.global_pool is None else cfg.global_pool
    model, spec = _load(ctx, global_pool=global_pool, drop_path=lambda width: _recipe(fc, width).drop_path)
    recipe = _recipe(fc, spec.arch["embed_dim"])
    ctx.epochs = cfg.epochs if cfg.epochs is not None else recipe.epochs
    data = _open_data(ctx, finetune_train_transform(ctx.image_size, cfg.mean, cfg.std, fc.auto_augment, fc.re_prob),
                      eval_transform(ctx.image_size, cfg.mean, cfg.std, cfg.crop_pct))
    num_classes = len(data.classes)
    torch.manual_seed(cfg.seed)  # the same head on every rank (DDP would broadcast rank 0's anyway)
    init_finetune_head(model, num_classes)
    model.to(ctx.device)
    sampler, loader, generator = _finetune_loader(ctx, data.train)
    acc = _accumulation(ctx, len(loader))
    lr = recipe.blr * acc.global_batch / 256
    optimizer = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=fc.weight_decay,
                                    layer_decay=recipe.layer_decay)
    scaler = grad_scaler(ctx.device, ctx.precision)  # fp16 only
    mixup, criterion = _finetune_objective(fc, num_classes)
    start_epoch = _resume_finetune(ctx, model, optimizer, scaler)
    trained = DistributedDataParallel(model) if dist.world_size() > 1 else model
    if cfg.compile:  # after DDP, so DDP's bucketed all-reduce still overlaps the compiled backward
        trained = torch.compile(trained)
    steps = len(loader)
    train_bad: list[int] = []
    for epoch in range(start_epoch, ctx.epochs):
        _seed_epoch(cfg.seed, epoch, generator)
        sampler.set_epoch(epoch)
        loss, bad = finetune_one_epoch(trained, loader, optimizer, criterion, ctx.device, epoch=epoch,
                                       total_steps=ctx.epochs * steps, warmup_steps=fc.warmup_epochs * steps,
                                       base_lr=lr, min_lr=fc.min_lr, mixup=mixup, clip_grad=fc.clip_grad,
                                       precision=ctx.precision, scaler=scaler, accum_iter=acc.accum_iter)
        train_bad += bad
        _log_epoch(ctx, epoch, loss)
        if dist.is_main():
            save_checkpoint(ctx.out / "checkpoint-latest.pth", model=model.state_dict(),
                            optimizer=optimizer.state_dict(), scaler=scaler.state_dict() if scaler else None,
                            epoch=epoch, config=config_to_dict(cfg))
        dist.barrier()
    top1, top5, _, val_bad = evaluate_classifier(model, data.val, batch_size=ctx.batch_size, device=ctx.device,
                                                 workers=cfg.workers, precision=ctx.precision)
    return {"top1": top1, "top5": top5, "epochs": ctx.epochs, "spec": spec,
            "train_unreadable": sorted(set(gather_ints(train_bad))), "val_unreadable": val_bad,
            "lr": lr, "resumed_from_epoch": start_epoch, "precision": ctx.precision, "compile": cfg.compile,
            "blr": recipe.blr, "accumulation": acc, "recipe": recipe.as_dict()}


def _recipe(fc: FinetuneConfig, embed_dim: int) -> FinetuneRecipe:
    """MAE's recipe for this width, with the config's non-None values put in."""
    return resolve_recipe(embed_dim, layer_decay=fc.layer_decay, drop_path=fc.drop_path, blr=fc.blr)


def _finetune_loader(ctx: _Context, train):
    """(sampler, loader, generator): DDP-split shuffled batches; workers seeded from `generator`."""
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(train, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=True,
                                 seed=ctx.cfg.seed)
    drop_last = len(train) >= ctx.batch_size * dist.world_size()
    generator = loader_generator(ctx.cfg.seed)
    loader = DataLoader(train, batch_size=ctx.batch_size, sampler=sampler, drop_last=drop_last,
                        num_workers=ctx.cfg.workers, pin_memory=pin_memory(ctx.device),
                        worker_init_fn=seed_worker, generator=generator)
    return sampler, loader, generator


def _finetune_objective(fc: FinetuneConfig, num_classes: int):
    """(mixup or None, criterion): timm's Mixup/CutMix with soft targets, else (smoothed) cross-entropy."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if fc.mixup > 0 or fc.cutmix > 0:
        return Mixup(mixup_alpha=fc.mixup, cutmix_alpha=fc.cutmix, label_smoothing=fc.label_smoothing,
                     num_classes=num_classes), SoftTargetCrossEntropy()
    if fc.label_smoothing > 0:
        return None, LabelSmoothingCrossEntropy(fc.label_smoothing)
    return None, torch.nn.CrossEntropyLoss()


def _seed_epoch(seed: int, epoch: int, generator: torch.Generator) -> None:
    """Reseed torch, numpy (Mixup), `random` (RandAugment) and the loader's worker seeds for `epoch`.

    Seeding per epoch (from seed, epoch and rank) makes a resumed run draw exactly what an
    uninterrupted one draws from its resume epoch on.
    """
    epoch_seed = seed + 100_003 * epoch + dist.rank()
    seed_everything(epoch_seed)
    generator.manual_seed(epoch_seed)


def _resume_finetune(ctx: _Context, model, optimizer, scaler) -> int:
    """Restore model, optimizer (and fp16 scaler) from `resume`; return the first epoch still to run."""
    resume = ctx.cfg.resume
    if not resume:
        return 0
    path = ctx.out / "checkpoint-latest.pth" if resume == "latest" else Path(resume)
    if resume == "latest" and not path.is_file():
        return 0  # nothing to resume: a fresh run
    state = load_checkpoint(path)
    if "optimizer" not in state or "epoch" not in state:
        raise SalmaeError(f"resume checkpoint {path} is not a fine-tune checkpoint (no optimizer/epoch); "
                          "pass DIR/checkpoint-latest.pth of an earlier `salmae eval finetune`")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    get_logger().info("resumed fine-tune from %s after epoch %d", path, state["epoch"])
    return int(state["epoch"]) + 1


# --------------------------------------------------------------------------- results
def _bad(feats: Features) -> list[int]:
    return torch.nonzero(~feats.ok).flatten().tolist()


def _log_epoch(ctx: _Context, epoch: int, loss: float) -> None:
    ctx.metrics.write(protocol=ctx.protocol, epoch=epoch, loss=loss)
    if dist.is_main():
        get_logger().info("%s epoch %d/%d: loss %.4f", ctx.protocol, epoch + 1, ctx.epochs, loss)


def _results(ctx: _Context, outcome: dict[str, Any], seconds: float) -> dict[str, Any]:
    spec: EncoderSpec = outcome["spec"]
    data = ctx.data
    late = [data.train.name(i) for i in outcome["train_unreadable"]] + \
           [data.val.name(i) for i in outcome["val_unreadable"]]
    skipped = data.skipped + late
    extra = {k: outcome[k] for k in ("cached_features", "lr", "blr", "resumed_from_epoch", "recipe", "logreg")
             if k in outcome}
    if "accumulation" in outcome:  # batch_size, accum_iter, global_batch (used), requested_global_batch, steps
        extra.update(batch_size=ctx.batch_size, **outcome["accumulation"].as_dict())
    return {
        "protocol": ctx.protocol,
        "top1": round(float(outcome["top1"]), 4),
        "top5": round(float(outcome["top5"]), 4),
        "epochs": outcome["epochs"],
        "checkpoint": ctx.cfg.checkpoint if is_hub_name(ctx.cfg.checkpoint)
        else str(Path(ctx.cfg.checkpoint).resolve()),
        "checkpoint_sha256": ctx.checkpoint_sha256,
        "pretrain_epoch": _pretrain_epoch(ctx.cfg.checkpoint),
        "counts": {"train": len(data.train) - len(outcome["train_unreadable"]),
                   "val": len(data.val) - len(outcome["val_unreadable"]),
                   "skipped": len(skipped), "skipped_files": skipped, "classes": len(data.classes)},
        "encoder": {"source": spec.source, **spec.arch, "pretrain_img_size": spec.pretrain_img_size,
                    "eval_img_size": ctx.image_size, "dropped_keys": spec.dropped_keys},
        "config": config_to_dict(ctx.cfg),
        "world_size": dist.world_size(),
        # What the numbers were computed at: every protocol runs its encoder under the run's autocast.
        "precision": ctx.precision,
        "compile": outcome.get("compile", False),
        "seconds": round(seconds, 3),
        "salmae_version": __version__,
        **extra,
    }


def _pretrain_epoch(path: str) -> int | None:
    """The checkpoint dict's `epoch` (stage 2 and MAE: the last finished epoch, from 0), None if absent.

    Memory-mapped, so the tensors are not read a second time; MAE's own checkpoints hold an
    `argparse.Namespace`, the one non-plain type allowed here.
    """
    import argparse

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # timm weights in the legacy format, safetensors, …: no epoch to report
        return None
    epoch = state.get("epoch") if isinstance(state, dict) else None
    return int(epoch) if isinstance(epoch, (int, float)) and not isinstance(epoch, bool) else None
