"""`salmae study` / `make study`: does saliency masking help MAE, and at which cap?

Every setting (a mask strategy and its cap) is pretrained and evaluated with identical data,
epochs, batch, model and probes; seed s gives every setting the same data order, initialisation
and eval split, so settings can be compared seed by seed (a paired difference). Steps, each
skipped when its marker `OUT/.done/STEP.json` exists (a killed study continues where it stopped):

1. `data`, `eval-data`  pretraining shards and a separate labelled ImageFolder (`main-object`
                        shapes, unless `data` / `eval_data` name the user's)        -> OUT/data, OUT/eval-data
2. `clip-data`, `clip`  the tiny CLIP, trained on separate captions of the same kind
                        (skipped when `clip_pretrained` names a tag or a file)     -> OUT/clip/clip.pt
3. `saliency`, `inspect` stage 1 into a Zarr store; pointing game on the labelled boxes -> OUT/saliency/
4. `floor-*`            probes of an untrained encoder (seed s's initialisation)   -> OUT/floor/sS/
5. `pretrain-*`, `eval-*` each setting and seed                                    -> OUT/runs/SETTING-sS/
6. `curve-*`            the `curve_protocols` on every checkpoint-EEEE.pth a run saved before its last
                        epoch (stage 2's `save_every`), features cached per checkpoint
                                                          -> OUT/runs/SETTING-sS/curve/epoch-NNNN/
   Before each run it logs `run K of N` and the time left at the cost per run so far (from the markers).
7. `study.md`, `study.json`, `accuracy_vs_cap.png`, `delta_vs_epoch.png`: the pre-registered analysis
   (primary protocol and comparisons, declared by the preset), per-seed values, mean with 95%
   interval, paired difference to `random` with its 95% interval and as a fraction of what
   pretraining adds (random - floor), the primary family Holm-corrected with its minimum
   detectable effect, Δ to random against the pretraining epoch, the sensitivity checks,
   reconstructions.

Presets (`PRESETS`) fix the budget: `smoke` exercises every code path in minutes, `cpu` answers
the question on a 2-core CPU in under two hours (few settings, many seeds), `cpu-full` runs the
whole cap sweep. A YAML `--config` (e.g. `configs/cc3m-vitb.yaml`) describes a GPU study instead.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from salmae.pipeline import dist
from salmae.pipeline.config import require
from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.logging import get_logger, setup_logging
from salmae.pipeline.progress import format_duration
from salmae.pipeline.run_lock import RunLock
from salmae.pipeline.steps import Steps, record_config
from salmae.stages.pretrain import ArchConfig
from salmae.stages.study_settings import parse_setting

BASELINE = "random"
# logreg's L2 grid in the cpu preset: 1e-4 and up, where every fit converges within 1000 iterations (on the
# floor's features 1e-5 and 1e-6 stopped at 1000 unconverged, 0.08 points apart from 1e-4 on the held-out rows)
LOGREG_GRID = "logreg.l2_grid=[0.0001,0.001,0.01,0.1,1]"
PROTOCOLS = ("knn", "logreg", "linear", "linear-noaug", "finetune")
SWEEP = ["random", "saliency-0.1", "saliency-0.25", "saliency-0.5", "saliency-0.75", "inverse-0.25",
         "block", "amr-capped"]


def _micro_arch() -> ArchConfig:
    # the prototype of ../DESIGN.md: 32-px input, 4-px patches (8x8 tokens), 128 x 4 encoder, 64 x 1 decoder
    return ArchConfig(img_size=32, patch_size=4, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4)


@dataclass
class StudyConfig:
    """One study: settings x seeds, all else equal. Defaults are the `cpu` preset's settings, data, models and
    probes; the preset adds its curve and probe choices (`PRESETS`), which a --config alone does not inherit."""

    out: Path = Path("runs/study")     # study folder; everything the study writes lives here
    preset: str = "cpu"                # the preset these values started from (recorded; `custom` for a --config)
    seeds: int = 5                     # seeds 0..seeds-1 for every setting (paired by seed); at the seeds'
                                       # own spread (SD 1.45 points) 4 miss the +-2 target, 5 meet it (STUDY.md)
    settings: list[str] = field(default_factory=lambda: ["random", "saliency-0.25", "shuffled-0.25", "inverse-0.25"])
                                       # H1's setting and its two controls (STUDY.md's manipulation check: object
                                       # patches hidden 79.9 / 76.9 / 73.7%, random 74.9%)
                                       # random | block | grid | amr-capped | sbam | saliency-CAP | inverse-CAP |
                                       # shuffled-CAP (another image's map); CAP@salient: a share of the map's
                                       # salient area (e.g. saliency-0.5@salient)
    # data: generated main-object shapes unless the user's are named
    data: str = ""                     # pretraining + stage-1 caption shards ("" = generate)
    eval_data: str = ""                # labelled ImageFolder root with train/ and val/ ("" = generate, own seed)
    n_images: int = 8192               # generated pretraining images
    eval_images: int = 26216           # generated labelled images, 1 in `val_every` to val: 13108 val and
                                       # 13108 probe-train (as many as 1 in 5 of 16384 gave)
    val_every: int = 2                 # at 3277 val images the val sampling alone put +-1.0 point of noise on
                                       # each seed's paired difference (STUDY.md, third version); 13108: +-0.5
    image_size: int = 64               # generated image side in pixels
    shard_size: int = 1024             # generated samples per tar shard
    # stage 1
    clip_model: str = "salmae-tiny"    # open_clip config name
    clip_pretrained: str = ""          # open_clip tag or checkpoint file ("" = train the tiny CLIP here)
    clip_images: int = 32768           # generated captioned images for the tiny CLIP (their own seed)
    clip_steps: int = 500              # tiny-CLIP optimisation steps
    clip_seconds: float = 900.0        # wall-clock cap on those steps
    cam: str = "hirescam"              # stage-1 CAM
    saliency_batch: int = 64           # stage-1 batch per process
    # stage 2 (the same for every setting)
    model: str = "tiny"                # MAE preset
    arch: ArchConfig = field(default_factory=_micro_arch)  # overrides of the preset
    epochs: int = 20                   # pretraining epochs (18 left random at 2.95x chance, 8.7 over the floor;
                                       # 25 at 9.5 over it, 35 at 10.8: STUDY.md's earlier versions); 20 pays for
                                       # four settings and the curve within the budget
    batch_size: int = 128              # pretraining batch per process
    blr: float = 1.5e-3                # base lr (10x MAE's: a short run at a small batch)
    ratio: str = "0.75"                # mask ratio of every setting
    compile: bool = True               # torch.compile every pretraining run (2-core CPU study: median
                                       # 12.4 s/epoch, eager 13.9)
    cache_images: bool = True          # decode the pretraining images once into memory (96 MiB here; 1.2 s
                                       # per epoch to load instead of 3.5); false for a large --data
    pretrain_set: list[str] = field(default_factory=list)  # extra `--set` items for every pretraining run
    # stage 3 (the same for every setting, the floor included)
    protocols: list[str] = field(default_factory=lambda: ["knn", "linear-noaug", "logreg"])  # evals of every run:
                                       # knn | logreg | linear | linear-noaug | finetune
    # the pre-registered analysis, declared here (in the preset) before any number is seen
    primary_protocol: str = "logreg"   # the protocol the answer is read from (one of `protocols`); the others
                                       # are reported as secondary. logreg: no optimiser noise in the probe
    primary_comparisons: list[str] = field(default_factory=lambda: ["saliency-0.25"])
                                       # settings compared with `random` on the primary protocol: one family,
                                       # paired t-tests Holm-corrected at family-wise alpha 0.05 (one that is
                                       # not among `settings` stays in the family as "not run", p = 1)
    curve_protocols: list[str] = field(default_factory=lambda: ["logreg"])  # also run on every checkpoint a
                                       # run saves before its last epoch (save_every): Δ to random against the
                                       # pretraining epoch; [] = no curve
    curve_epochs: list[int] = field(default_factory=list)  # the epochs whose checkpoints the curve probes
                                       # (each a multiple of stage 2's save_every, below `epochs`); [] = all saved
    curve_settings: list[str] = field(default_factory=list)  # the settings whose checkpoints the curve probes
                                       # (`random` among them: Δ is to random at the same epoch); [] = all
    linear_epochs: int | None = 30     # linear-probe epochs (None: MAE's 90)
    linear_blr: float | None = 50.0    # LARS base lr (None: MAE's 0.1, which assumes batch 16384)
    linear_global_batch: int | None = 256  # linear probe images per step (None: MAE's 16384)
    eval_batch: int | None = 256       # eval batch per process (None: each protocol's default)
    global_pool: bool = True           # kNN and linear probes read the mean of the patch tokens (MAE's linear
                                       # probe reads the class token: false). On the CPU preset's data, 13 epochs
                                       # in, the mean probed 35.0% and the class token 25.1%. Fine-tuning
                                       # always pools, as MAE's does
    eval_set: list[str] = field(default_factory=lambda: ["crop_pct=1.0"])  # extra `--set` items for every eval
                                       # (crop_pct 1.0: the generated objects reach the image's border)
    floor: bool = True                 # probe an untrained encoder too (the floor a pretraining must beat)
    viz_seed: int = 0                  # the seed whose reconstructions study.md shows
    workers: int | None = 0            # DataLoader workers in every stage (None: from the CPUs); 0 on 2 cores:
                                       # the tiny MAE is compute-bound (13.6 s/epoch with 0 workers, 14.5 with 2)
    device: str = "auto"               # auto | cpu | cuda


# cpu: the curve on H1's setting and random only, at epochs 10 and 15 (and 0 and 20: the floor and the runs'
# own evals); check=none: the study wrote the labelled set itself (probing its 26216 headers took 6 s per eval)
_CPU_CHOICES: dict[str, Any] = dict(curve_epochs=[10, 15], curve_settings=["random", "saliency-0.25"],
                                    eval_set=["crop_pct=1.0", "check=none", LOGREG_GRID])

PRESETS: dict[str, dict[str, Any]] = {
    # smoke: eval_images 320 and clip_steps 10 (were 640 and 20) pay for the logreg probes and the curve
    "smoke": dict(seeds=1, settings=["random", "saliency-0.25", "inverse-0.25", "amr-capped"],
                  n_images=512, eval_images=320, shard_size=256, clip_images=1024, clip_steps=10,
                  epochs=2, batch_size=64, linear_epochs=4, eval_batch=128, compile=False,
                  pretrain_set=["save_every=1"],           # a checkpoint after epoch 1: one point of the curve
                  eval_set=["crop_pct=1.0", "logreg.l2_grid=[0.01,0.1,1]"],  # 128 rows: weak L2s fit for long
                  primary_comparisons=["saliency-0.25"]),
    "cpu": dict(_CPU_CHOICES),
    "cpu-full": dict(_CPU_CHOICES, settings=list(SWEEP), primary_comparisons=["saliency-0.25", "saliency-0.75"]),
}


# what a rerun into the same --out may change: these add or drop steps, or do not change the numbers (the
# primary protocol and comparisons change only how study.md reads them; study.md states the ones it used)
RESUME_MAY_CHANGE = ("out", "preset", "seeds", "settings", "protocols", "floor", "viz_seed", "workers", "device",
                     "cache_images", "primary_protocol", "primary_comparisons", "curve_protocols", "curve_epochs",
                     "curve_settings")


def preset_values(name: str) -> dict[str, Any]:
    """The config values of preset `name` (over StudyConfig's defaults); unknown names are an error."""
    if name not in PRESETS:
        raise SalmaeError(f"unknown study preset {name!r}; use one of {', '.join(PRESETS)}")
    return {"preset": name, **PRESETS[name]}


def validate(cfg: StudyConfig) -> None:
    """One-line errors for values no study can run with (before anything is written)."""
    require(cfg.seeds >= 1, "seeds", cfg.seeds, "must be >= 1")
    require(len(cfg.settings) >= 1 and len(set(cfg.settings)) == len(cfg.settings), "settings", cfg.settings,
            "must name at least one setting, each once")
    for name in cfg.settings:
        parse_setting(name)
    for p in cfg.protocols:
        require(p in PROTOCOLS, "protocols", cfg.protocols, f"must be among {', '.join(PROTOCOLS)}")
    require(len(cfg.protocols) >= 1, "protocols", cfg.protocols, "must name at least one protocol")
    require(cfg.primary_protocol in cfg.protocols, "primary_protocol", cfg.primary_protocol,
            f"one of the study's protocols ({', '.join(cfg.protocols)})")
    for name in cfg.primary_comparisons:   # one left out of `settings` stays in the family, reported as not run
        parse_setting(name)
    require(BASELINE not in cfg.primary_comparisons
            and len(set(cfg.primary_comparisons)) == len(cfg.primary_comparisons), "primary_comparisons",
            cfg.primary_comparisons, f"settings other than {BASELINE} (each compared with it), each once")
    require(all(p in cfg.protocols for p in cfg.curve_protocols), "curve_protocols", cfg.curve_protocols,
            f"among the study's protocols ({', '.join(cfg.protocols)}): the last epoch's point is their eval")
    require(not cfg.curve_settings or (BASELINE in cfg.curve_settings and set(cfg.curve_settings) <= set(cfg.settings)),
            "curve_settings", cfg.curve_settings, f"[] (all) or some of the study's settings, {BASELINE} among them")
    require(all(1 <= e < cfg.epochs for e in cfg.curve_epochs), "curve_epochs", cfg.curve_epochs,
            f"epochs in 1..{cfg.epochs - 1} (the last epoch is the runs' own eval)")
    require(0 <= cfg.viz_seed < cfg.seeds, "viz_seed", cfg.viz_seed, "must be one of the study's seeds")
    require(cfg.val_every >= 2, "val_every", cfg.val_every, "must be >= 2 (one labelled image in val_every to val)")
    if not cfg.data:
        require(cfg.n_images >= 8 and cfg.eval_images >= 40, "n_images/eval_images",
                (cfg.n_images, cfg.eval_images), "must be >= 8 and >= 40 (every class in val)")
    if not cfg.clip_pretrained and cfg.data:
        raise SalmaeError("study: with your own `data`, name the CLIP for stage 1 in `clip_pretrained` "
                          "(an open_clip tag such as openai, or a checkpoint file)")


def run(cfg: StudyConfig) -> dict[str, Any]:
    """Run every study step that has not finished yet; write study.md and study.json; return their paths."""
    from salmae.pipeline.device import pick_device

    validate(cfg)
    dist.init(pick_device(cfg.device))   # under torchrun, so that rank 0's steps (data, CLIP) are waited for
    lock = RunLock(cfg.out, "study")     # one job per study folder (its runs inside share the lock)
    if dist.is_main():
        lock.acquire()
    try:
        return _run_study(cfg)
    finally:
        lock.release()


def _run_study(cfg: StudyConfig) -> dict[str, Any]:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out)
    record_config(out, cfg, RESUME_MAY_CHANGE, "the study")
    log = get_logger()
    start = time.time()
    paths = _paths(cfg, out)

    step = Steps(out, "study")

    from salmae.pipeline.data.shapes import write_shapes

    if not cfg.data:
        step("data", lambda: write_shapes(out / "data", n=cfg.n_images, image_size=cfg.image_size, seed=0,
                                          shard_size=cfg.shard_size, task="main-object"), main_only=True)
    if not cfg.eval_data:
        step("eval-data", lambda: write_shapes(out / "eval-data", n=cfg.eval_images, image_size=cfg.image_size,
                                               seed=2, shard_size=cfg.shard_size, imagefolder=True,
                                               task="main-object", val_every=cfg.val_every), main_only=True)
    if not cfg.clip_pretrained:
        clip_shards = _pattern(out / "clip" / "data", cfg.clip_images, 512)
        step("clip-data", lambda: write_shapes(out / "clip" / "data", n=cfg.clip_images, image_size=cfg.image_size,
                                               seed=1, shard_size=512, task="main-object"), main_only=True)
        step("clip", lambda: _clip_train(cfg, clip_shards, paths["clip"]), main_only=True)
    step("saliency", lambda: _saliency(cfg, paths))
    inspect = step("inspect", lambda: _inspect(paths, out / "saliency" / "png",
                                               labelled=not cfg.data), main_only=True)

    n_runs = cfg.seeds * len(cfg.settings)
    for seed in range(cfg.seeds):
        if cfg.floor:
            floor_dir = out / "floor" / f"s{seed}"
            step(f"floor-init-s{seed}", lambda: _untrained_checkpoint(cfg, paths, seed, floor_dir), main_only=True)
            for protocol in cfg.protocols:
                step(f"eval-{protocol}-floor-s{seed}", lambda: _evaluate(cfg, protocol, floor_dir, paths, seed))
        for i, setting in enumerate(cfg.settings):
            run_dir = out / "runs" / f"{setting}-s{seed}"
            if not step.is_done(f"pretrain-{setting}-s{seed}"):
                log.info("study: run %d of %d (%s, seed %d)%s", seed * len(cfg.settings) + i + 1, n_runs, setting,
                         seed, time_left_text(step.recorded_seconds(), n_runs))
            step(f"pretrain-{setting}-s{seed}", lambda: _pretrain(cfg, paths, setting, seed, run_dir))
            for protocol in cfg.protocols:
                step(f"eval-{protocol}-{setting}-s{seed}", lambda: _evaluate(cfg, protocol, run_dir, paths, seed))
            for done, ckpt in curve_checkpoints(cfg, run_dir) if on_curve(cfg, setting) else []:
                point = run_dir / "curve" / f"epoch-{done:04d}"
                for protocol in cfg.curve_protocols:
                    step(f"curve-{protocol}-{setting}-s{seed}-e{done}",
                         lambda: _evaluate(cfg, protocol, point, paths, seed, checkpoint=ckpt))

    summary = None
    if dist.is_main():
        from salmae.stages.study_report import write_study

        summary = write_study(cfg, out, inspect, wall_seconds=round(time.time() - start, 1))
        log.info("study finished: %s", summary["study_md"])
        print(f"study: {summary['study_md']}")
    return summary or {}


def time_left_text(seconds: dict[str, float], n_runs: int) -> str:
    """'; about 2h35m00s left at 15m30s a run so far' from the study's step markers ({step: seconds}): the
    per-seed steps recorded (floors, pretraining, probes, curve points; names ending -sS or -sS-eE) over
    the runs pretrained, times the runs not yet pretrained. '' before the first run is done."""
    import re

    per_seed = [s for name, s in seconds.items() if re.search(r"-s\d+(-e\d+)?$", name)]
    done = sum(name.startswith("pretrain-") for name in seconds)
    if not done or done >= n_runs:
        return ""
    per_run = sum(per_seed) / done
    return f"; about {format_duration(per_run * (n_runs - done))} left at {format_duration(per_run)} a run so far"


def saved_checkpoints(run_dir: Path, before: int) -> list[tuple[int, Path]]:
    """(epochs done, path) of each checkpoint-EEEE.pth in `run_dir` saved before epoch `before` (the
    run's last epoch is checkpoint-latest.pth, which the run's evals probe). EEEE counts from 0."""
    import re

    found = ((int(m.group(1)) + 1, p) for p in run_dir.glob("checkpoint-*.pth")
             if (m := re.fullmatch(r"checkpoint-(\d+)\.pth", p.name)))
    return sorted((done, p) for done, p in found if done < before)


def on_curve(cfg: StudyConfig, setting: str) -> bool:
    """Whether the curve probes `setting`'s saved checkpoints (`curve_protocols` and `curve_settings`)."""
    return bool(cfg.curve_protocols) and (not cfg.curve_settings or setting in cfg.curve_settings)


def curve_checkpoints(cfg: StudyConfig, run_dir: Path) -> list[tuple[int, Path]]:
    """The (epochs done, checkpoint) pairs the curve probes in one run: `curve_epochs`, or every one saved."""
    saved = saved_checkpoints(run_dir, cfg.epochs)
    if not cfg.curve_epochs:
        return saved
    found = dict(saved)
    missing = [e for e in cfg.curve_epochs if e not in found]
    if missing:
        raise SalmaeError(f"study: {run_dir} has no checkpoint-{missing[0] - 1:04d}.pth for curve_epochs {missing}; "
                          "choose multiples of stage 2's save_every (pretrain_set: [save_every=N]) or curve_epochs: []")
    return [(e, found[e]) for e in sorted(cfg.curve_epochs)]


def _pattern(folder: Path, n: int, shard_size: int) -> str:
    return str(folder / f"{{00000..{(n - 1) // shard_size:05d}}}.tar")


def _paths(cfg: StudyConfig, out: Path) -> dict[str, Any]:
    return {
        "data": cfg.data or _pattern(out / "data", cfg.n_images, cfg.shard_size),
        "eval": Path(cfg.eval_data) if cfg.eval_data else out / "eval-data" / "imagefolder",
        "store": out / "saliency" / "store.zarr",
        "clip": Path(cfg.clip_pretrained) if cfg.clip_pretrained else out / "clip" / "clip.pt",
    }


def _clip_train(cfg: StudyConfig, shards: str, clip_ckpt: Path) -> dict:
    from salmae.stages import clip_train

    return clip_train.run(clip_train.ClipTrainConfig(data=shards, out=clip_ckpt, clip_model=cfg.clip_model,
                                                     steps=cfg.clip_steps, seconds=cfg.clip_seconds, threads=2,
                                                     device=cfg.device))


def _saliency(cfg: StudyConfig, paths: dict[str, Any]) -> dict:
    from salmae.stages import saliency

    return saliency.run(saliency.SaliencyConfig(
        data=paths["data"], out=paths["store"], clip_model=cfg.clip_model, clip_pretrained=str(paths["clip"]),
        cam=cfg.cam, batch_size=cfg.saliency_batch, workers=cfg.workers, device=cfg.device))


def _inspect(paths: dict[str, Any], png_dir: Path, labelled: bool) -> dict:
    from salmae.stages.inspect import inspect_store

    summary = inspect_store(paths["store"], data=paths["data"], png_dir=png_dir, n_random=6, strategy="saliency",
                            localise=labelled)   # the user's data: no boxes to score, images read by byte range
    return {"localisation": summary.get("localisation"), "png": summary.get("png", [])}


def pretrain_config(cfg: StudyConfig, paths: dict[str, Any], setting: str, seed: int, run_dir: Path):
    """The stage-2 config of one (setting, seed): only the mask differs between settings."""
    from salmae.pipeline.config import resolve_config
    from salmae.stages import pretrain

    spec = parse_setting(setting)
    items = [f"masking.ratio={cfg.ratio}", f"optim.blr={cfg.blr}", f"masking.inverse={spec['inverse']}",
             f"masking.map={spec['map']}", f"masking.cap_of={spec['cap_of']}"]
    if spec["cap"] is not None:
        items.append(f"masking.cap={spec['cap']}")
    return resolve_config(pretrain.PretrainConfig, None, items + list(cfg.pretrain_set),
                          data=paths["data"], out=run_dir, saliency=str(paths["store"]), mask=spec["mask"],
                          model=cfg.model, arch=asdict(cfg.arch), epochs=cfg.epochs, batch_size=cfg.batch_size,
                          resume="latest", seed=seed, workers=cfg.workers, device=cfg.device, compile=cfg.compile,
                          cache_images=cfg.cache_images)


def _pretrain(cfg: StudyConfig, paths: dict[str, Any], setting: str, seed: int, run_dir: Path) -> dict:
    from salmae.stages import pretrain

    result = pretrain.run(pretrain_config(cfg, paths, setting, seed, run_dir))
    return {k: result.get(k) for k in ("epochs", "loss", "object_check")} if isinstance(result, dict) else result


def _untrained_checkpoint(cfg: StudyConfig, paths: dict[str, Any], seed: int, folder: Path) -> dict:
    """Seed s's initial MAE weights (what every setting's pretraining starts from), as a checkpoint."""
    from salmae.pipeline.checkpoint import save_checkpoint
    from salmae.pipeline.device import seed_everything
    from salmae.pipeline.models.mae import build_mae

    arch = pretrain_config(cfg, paths, BASELINE, seed, folder).arch   # pretrain_set's arch.* included
    seed_everything(seed)                                              # as stage 2 seeds, then builds
    model = build_mae(cfg.model, **{k: v for k, v in asdict(arch).items() if v is not None})
    save_checkpoint(folder / "checkpoint-latest.pth", model=model.state_dict(), epoch=-1,
                    config={"model_args": dict(model.model_args), "seed": seed, "mask": "untrained"})
    return {"checkpoint": str(folder / "checkpoint-latest.pth")}


def eval_config(cfg: StudyConfig, protocol: str, run_dir: Path, paths: dict[str, Any], seed: int,
                checkpoint: Path | None = None):
    """The stage-3 config of one probe: the same for every setting and the floor. The frozen-feature
    probes of one checkpoint share RUN/features/ (kNN extracts, the other probes reuse). `checkpoint`
    (default RUN/checkpoint-latest.pth) probes another checkpoint into RUN (a point of the curve)."""
    from salmae.pipeline.config import resolve_config
    from salmae.stages import evaluate

    name = "linear" if protocol == "linear-noaug" else protocol
    items = ([f"global_pool={cfg.global_pool}"] if protocol != "finetune" else []) + list(cfg.eval_set)
    if name == "linear":
        items.append(f"linear.augment={protocol != 'linear-noaug'}")
        if cfg.linear_blr is not None:
            items.append(f"linear.blr={cfg.linear_blr}")
        if cfg.linear_global_batch is not None:
            items.append(f"global_batch={cfg.linear_global_batch}")
    return resolve_config(evaluate.EvalConfig, None, items, protocol=name,
                          checkpoint=str(checkpoint or run_dir / "checkpoint-latest.pth"), data=str(paths["eval"]),
                          out=str(run_dir / f"eval-{protocol}"), device=cfg.device,
                          features=str(run_dir / "features") if name != "finetune" else "",
                          epochs=cfg.linear_epochs if name == "linear" else None, batch_size=cfg.eval_batch,
                          workers=cfg.workers, seed=seed)


def _evaluate(cfg: StudyConfig, protocol: str, run_dir: Path, paths: dict[str, Any], seed: int,
              checkpoint: Path | None = None) -> dict:
    from salmae.stages import evaluate

    result = evaluate.run(eval_config(cfg, protocol, run_dir, paths, seed, checkpoint))
    return {k: result.get(k) for k in ("protocol", "top1", "top5")} if isinstance(result, dict) else result
