"""`salmae demo` / `make demo`: the whole pipeline on generated data with tiny models.

Steps (each one skipped when its marker `OUT/.done/STEP.json` exists, and each stage resumable
on its own, so a killed demo continues where it stopped):

1. `shapes`      captioned shapes shards + ImageFolder split            -> OUT/data/
2. `clip`        train the tiny CLIP on separate generated captions     -> OUT/clip/clip.pt
3. `saliency`    stage 1 into a Zarr store, then `inspect` it            -> OUT/saliency/
4. `pretrain-*`  tiny MAE per strategy and seed, same epochs and batch    -> OUT/runs/STRATEGY-sSEED/
5. `eval-*`      kNN and linear probe of each run                        -> OUT/runs/*/eval-*/
6. report        the comparison table, plots, overlays                   -> OUT/report.md
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from salmae.pipeline import dist
from salmae.pipeline.files import atomic_write_json, atomic_write_text
from salmae.pipeline.logging import get_logger, setup_logging
from salmae.pipeline.run_lock import RunLock
from salmae.pipeline.steps import Steps, record_config

RESUME_MAY_CHANGE = ("out", "seeds", "strategies", "workers", "device")   # a rerun may add seeds or strategies


@dataclass
class DemoConfig:
    out: Path = Path("runs/demo")      # demo folder; everything the demo writes lives here
    seeds: int = 1                     # pretrain + eval repeats per strategy (seed 0..seeds-1)
    n_images: int = 1024               # generated captioned images
    image_size: int = 64               # their side in pixels (the tiny MAE's input size)
    shard_size: int = 256              # samples per tar shard
    task: str = "main-object"          # generated task (`salmae shapes --task`): main-object's label is the
                                       # largest object, which pixels can decide; with `named` (two objects of
                                       # similar size, the caption names one) every probe sat near chance
    clip_images: int = 32768           # captioned images generated for the tiny CLIP only (seed 1): fewer
                                       # (more passes in the step budget) gave maps that pointed worse, by seed
    clip_same_colour: float = 0.0      # their share of same-colour distractors (`salmae shapes --same-colour`)
    clip_steps: int = 500              # tiny-CLIP optimisation steps (~200 s on 2 quiet cores)
    clip_seconds: float = 600.0        # wall-clock cap on those steps (a busy machine stops early)
    cam: str = "hirescam"              # stage-1 CAM for the tiny CLIP: Grad-CAM's token-averaged gradient
                                       # lights up background here (BENCHMARKS.md, stage-1 localisation)
    strategies: list[str] = field(default_factory=lambda: ["random", "saliency", "block", "amr-capped"])  # mask
                                       # strategies pretrained (each seed), compared in report.md
    cap: float = 0.25                  # saliency cap (share of patches masked by saliency)
    ratio: str = "0.75"                # mask ratio
    epochs: int = 12                   # pretraining epochs per run
    batch_size: int = 64               # pretraining batch
    blr: float = 1.5e-3                # pretraining base lr: 10x MAE's, for a short run at a tiny batch
    linear_epochs: int = 30            # linear-probe epochs (the cached-feature variant, linear-noaug)
    linear_blr: float = 50.0           # LARS base lr: MAE's 0.1 assumes batch 16384; ours is 64
    global_pool: bool = True           # probes read the mean of the patch tokens, as the study's do (MAE's
                                       # class token probed 10 points lower there: StudyConfig.global_pool)
    workers: int | None = 2            # DataLoader workers in every stage (None: each stage's default, the CPUs
                                       # per process less one, <= 10)
    device: str = "auto"               # auto | cpu | cuda


def run(cfg: DemoConfig) -> dict[str, Any]:
    """Run every demo step that has not finished yet; return the report path and timings."""
    with RunLock(cfg.out, "demo"):       # one job per demo folder (its stages inside share the lock)
        return _run_demo(cfg)


def _run_demo(cfg: DemoConfig) -> dict[str, Any]:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out)
    record_config(out, cfg, RESUME_MAY_CHANGE, "the demo")
    log = get_logger()
    start = time.time()
    data = out / "data"
    shards = str(data / f"{{00000..{(cfg.n_images - 1) // cfg.shard_size:05d}}}.tar")
    store = out / "saliency" / "store.zarr"
    clip_ckpt = out / "clip" / "clip.pt"

    step = Steps(out, "demo")
    timings = step.seconds

    from salmae.pipeline.data.shapes import write_shapes

    step("shapes", lambda: write_shapes(data, n=cfg.n_images, image_size=cfg.image_size, seed=0,
                                        shard_size=cfg.shard_size, imagefolder=True, task=cfg.task))
    clip_data = out / "clip" / "data"
    clip_shards = str(clip_data / f"{{00000..{(cfg.clip_images - 1) // 512:05d}}}.tar")
    step("clip-data", lambda: write_shapes(clip_data, n=cfg.clip_images, image_size=cfg.image_size, seed=1,
                                           shard_size=512, same_colour_frac=cfg.clip_same_colour,
                                           task=cfg.task))
    step("clip", lambda: _clip_train(cfg, clip_shards, clip_ckpt))
    step("saliency", lambda: _saliency(cfg, shards, store, clip_ckpt))
    inspect = step("inspect", lambda: _inspect(store, shards, out / "saliency" / "png"))

    runs = []
    for seed in range(cfg.seeds):
        for strategy in cfg.strategies:
            run_dir = out / "runs" / f"{strategy}-s{seed}"
            runs.append(run_dir)
            step(f"pretrain-{strategy}-s{seed}", lambda: _pretrain(cfg, shards, store, strategy, seed, run_dir))
            for protocol in ("knn", "linear"):
                step(f"eval-{protocol}-{strategy}-s{seed}",
                     lambda: _evaluate(cfg, protocol, run_dir, data / "imagefolder", seed))

    report = out / "report.md"
    _write_report(runs, report, inspect, out)
    total = round(time.time() - start, 1)
    atomic_write_json(out / "demo_time.json", {"seconds_this_invocation": total, "steps": timings})
    log.info("demo finished in %.0f s", total)
    print(f"report: {report}")
    return {"report": str(report), "seconds": total, "steps": timings}


def _clip_train(cfg: DemoConfig, shards: str, clip_ckpt: Path) -> dict:
    from salmae.stages import clip_train

    return clip_train.run(clip_train.ClipTrainConfig(data=shards, out=clip_ckpt, steps=cfg.clip_steps,
                                                     seconds=cfg.clip_seconds, threads=2, device=cfg.device))


def _saliency(cfg: DemoConfig, shards: str, store: Path, clip_ckpt: Path) -> dict:
    from salmae.stages import saliency

    return saliency.run(saliency.SaliencyConfig(
        data=shards, out=store, clip_model="salmae-tiny", clip_pretrained=str(clip_ckpt), cam=cfg.cam,
        batch_size=64, workers=cfg.workers, device=cfg.device, rows_per_shard=256))


def _inspect(store: Path, shards: str, png_dir: Path) -> dict:
    from salmae.stages.inspect import format_summary, inspect_store

    summary = inspect_store(store, data=shards, png_dir=png_dir, n_random=6, strategy="saliency")
    print(format_summary(summary))
    return {"localisation": summary.get("localisation"), "maps": summary.get("maps"),
            "png": summary.get("png", [])}


def _pretrain(cfg: DemoConfig, shards: str, store: Path, strategy: str, seed: int, run_dir: Path) -> dict:
    from salmae.pipeline.config import resolve_config
    from salmae.stages import pretrain

    pcfg = resolve_config(pretrain.PretrainConfig, None,
                          [f"masking.cap={cfg.cap}", f"masking.ratio={cfg.ratio}", f"optim.blr={cfg.blr}"],
                          data=shards, out=run_dir, saliency=str(store), mask=strategy, model="tiny",
                          epochs=cfg.epochs, batch_size=cfg.batch_size, resume="latest", seed=seed,
                          workers=cfg.workers, device=cfg.device)
    return pretrain.run(pcfg)


def _evaluate(cfg: DemoConfig, protocol: str, run_dir: Path, root: Path, seed: int) -> dict:
    from salmae.stages import evaluate

    ecfg = evaluate.EvalConfig(protocol=protocol, checkpoint=str(run_dir / "checkpoint-latest.pth"),
                               data=str(root), out=str(run_dir / f"eval-{protocol}"), device=cfg.device,
                               epochs=cfg.linear_epochs if protocol == "linear" else None,
                               batch_size=64, global_batch=64, workers=cfg.workers, seed=seed, crop_pct=1.0,
                               global_pool=cfg.global_pool,
                               linear=evaluate.LinearConfig(blr=cfg.linear_blr, warmup_epochs=3, augment=False))
    result = evaluate.run(ecfg)
    return {k: result.get(k) for k in ("protocol", "top1", "top5")} if isinstance(result, dict) else result


def _write_report(runs: list[Path], report: Path, inspect: dict | None, out: Path) -> None:
    """The comparison report of `stages.report`, plus the stage-1 section (pointing game, overlays)."""
    from salmae.stages.report import write_report

    write_report([str(r) for r in runs], str(report))
    lines = [report.read_text().rstrip(), "", "## Stage 1: saliency of the tiny CLIP", ""]
    loc = (inspect or {}).get("localisation") or {}
    if loc.get("n"):
        lines.append(f"Pointing game (argmax patch inside the captioned object's box) over {loc['n']} maps: "
                     f"**{loc['pointing_game']:.3f}**; saliency mass inside the box {loc['mass_in_box']:.3f} "
                     f"vs the box's area share {loc['box_area_share']:.3f}.")
    lines.append("")
    for png in (inspect or {}).get("png", []):
        lines.append(f"![overlay]({Path(png).resolve().relative_to(report.parent.resolve())})")
    lines += ["", "## Reconstructions (last epoch of each run)", ""]
    for run_dir in runs:
        pngs = sorted((run_dir / "png").glob("*.png"))
        if pngs:
            lines.append(f"{run_dir.name}: ![reconstruction]({pngs[-1].resolve().relative_to(report.parent.resolve())})")
            lines.append("")
    if dist.is_main():
        atomic_write_text(report, "\n".join(lines) + "\n")
