"""The `salmae` command line: parses options and dispatches to stage functions, nothing more.

Every stage command takes `--config FILE.yaml` and repeatable `--set key=value`, layered over
the stage's config dataclass (see `pipeline.config`). Stage modules are imported lazily so that
`salmae --help` stays fast. `python -m salmae` (and so `torchrun -m salmae`) works too.
"""

from __future__ import annotations

import errno
import importlib
import sys
from typing import Any

import click

from salmae.pipeline import __version__
from salmae.pipeline.errors import SalmaeError


class _Group(click.Group):
    """A click group that prints a SalmaeError as one line and exits 2, without a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            try:
                return super().invoke(ctx)
            finally:
                # leave the process group before the interpreter exits: gloo's threads may otherwise
                # abort the process at exit ("terminate called without an active exception")
                from salmae.pipeline import dist

                dist.shutdown()
        except SalmaeError as e:
            click.echo(f"salmae: error: {e}", err=True)
            ctx.exit(SalmaeError.exit_code)
        except KeyboardInterrupt as e:   # Ctrl-C, or SIGTERM under `pipeline.signals` (SLURM preemption)
            name = getattr(e, "name", "SIGINT")
            if getattr(e, "saved", False):     # a safe point: exit 75, what an sbatch script requeues on
                click.echo(f"salmae: stopped by {name} at a safe point, its state written: run the same command "
                           "to continue (pretrain: with --resume latest)", err=True)
            else:
                click.echo(f"salmae: interrupted by {name}; finished work is kept: run the same command to resume "
                           "(pretrain/finetune: with --resume latest)", err=True)
            ctx.exit(getattr(e, "exit_code", 130))
        except OSError as e:
            message = _os_error_line(e)
            if message is None:
                raise
            click.echo(f"salmae: error: {message}", err=True)
            ctx.exit(SalmaeError.exit_code)


def _os_error_line(e: OSError) -> str | None:
    """One line for the file-system errors a user causes (full disk, read-only or foreign folder, a file
    where a folder must be); None for anything else (a bug: the traceback is wanted)."""
    target = e.filename or "a file"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        from salmae.pipeline.checkpoint import write_failure

        return f"could not write {target}: {write_failure(target, e)}"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "the file system is read-only" if e.errno == errno.EROFS else "permission denied"
        return f"cannot write {target} ({why}); choose an --out you can write to"
    if e.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return (f"{target}: a file stands where a folder is needed (or the reverse) ({e.strerror}); "
                "check --out: stores and run folders are folders")
    return None


class _ConfigCommand(click.Command):
    """A stage command whose `--help` ends with every key of its config dataclass (`config`:
    (module, class name)), with type, default and the field's comment, generated from the
    dataclass itself (`pipeline.config.config_key_docs`); the stage module is imported only then."""

    def __init__(self, *args: Any, config: tuple[str, str], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.config = config

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        from salmae.pipeline.config import config_key_docs

        module, name = self.config
        groups = config_key_docs(getattr(importlib.import_module(module), name))
        with formatter.section("Config keys (in --config FILE.yaml, or --set KEY=VALUE; --print-config shows them)"):
            for section, about, rows in groups:
                if section:
                    formatter.write_paragraph()
                    formatter.write_text(f"{section}.*: {about}" if about else f"{section}.*")
                formatter.write_dl([(r.key, f"{r.comment}  [{r.type}; default: {r.default}]".lstrip())
                                    for r in rows])


def _config_options(f):
    f = click.option("--print-config", "print_config", is_flag=True, default=False,
                     help="Print the resolved config as YAML and exit (nothing is run or written).")(f)
    f = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override any config field (dotted keys for nested ones, listed below); repeatable.")(f)
    f = click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                     help="YAML file with config values (applied before options and --set).")(f)
    return f


def _run_stage(module: str, config_cls: str, config_path: str | None, overrides: tuple[str, ...],
               print_config: bool = False, **named: Any) -> Any:
    """Resolve `module.config_cls` from the layers and call `module.run(cfg)` (or, with
    `print_config`, print the config as YAML and return None)."""
    from salmae.pipeline.config import resolve_config

    mod = importlib.import_module(module)
    cfg = resolve_config(getattr(mod, config_cls), config_path, overrides, **named)
    if print_config:
        return _print_config(cfg)
    return mod.run(cfg)


def _print_config(cfg: Any) -> None:
    """The config as the YAML that `--config` reads back (layers resolved; device-dependent values
    such as precision `auto` are resolved by the run itself and recorded in its config.yaml)."""
    import yaml

    from salmae.pipeline.config import config_to_dict

    click.echo(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), nl=False)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="salmae")
def cli() -> None:
    """salmae: saliency-guided MAE pretraining.

    Stages: `saliency` (CLIP + Grad-CAM into a Zarr store), `pretrain` (MAE with
    saliency-capped masks), `eval` (linear / kNN / fine-tune); `export` writes an encoder for
    timm / the HF hub. Data tools: `shapes`, `manifest`, `inspect`, `clip-train`. Whole pipeline:
    `demo`, `study`, `report`, `bench`, `gpu-check`.
    """


# --------------------------------------------------------------------------- data tools
@cli.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--n", "n", type=int, default=1024, show_default=True, help="Number of images.")
@click.option("--image-size", type=int, default=64, show_default=True, help="Square image side in pixels.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed -> identical bytes.")
@click.option("--shard-size", type=int, default=256, show_default=True, help="Samples per tar shard.")
@click.option("--imagefolder", is_flag=True, help="Also write a train/ + val/ ImageFolder split by shape class.")
@click.option("--same-colour", type=float, default=0.0, show_default=True,
              help="Share of images whose distractor has the named object's colour (then only the shape word tells them apart).")
@click.option("--task", type=click.Choice(["named", "main-object"]), default="named", show_default=True,
              help="named: a named object and a distractor; main-object: one large labelled object among small clutter.")
@click.option("--val-every", type=int, default=5, show_default=True,
              help="One image in this many of each class is marked split=val (the ImageFolder's val/).")
@click.option("--layout", type=click.Choice(["img2dataset", "timm-wds"]), default="img2dataset", show_default=True,
              help="timm-wds: caption-free classification shards (KEY.jpg + KEY.cls + KEY.json) named as timm's "
                   "imagenet-1k-wds, imagenet1k-train-NNNN.tar and imagenet1k-validation-NN.tar.")
def shapes(out: str, n: int, image_size: int, seed: int, shard_size: int, imagefolder: bool, same_colour: float,
           task: str, val_every: int, layout: str) -> None:
    """Generate captioned synthetic shapes in img2dataset's webdataset layout into OUT."""
    from salmae.pipeline.data.shapes import write_shapes

    if layout == "timm-wds":
        from salmae.pipeline.data.class_wds import write_class_shards

        if imagefolder:
            raise click.UsageError("--imagefolder goes with --layout img2dataset only")
        click.echo(write_class_shards(out, n=n, image_size=image_size, seed=seed, shard_size=shard_size,
                                      val_every=val_every))
        return
    summary = write_shapes(out, n=n, image_size=image_size, seed=seed, shard_size=shard_size,
                           imagefolder=imagefolder, same_colour_frac=same_colour, task=task, val_every=val_every)
    click.echo(summary)


@cli.group()
def manifest() -> None:
    """Build or verify a data manifest (one row per sample, identified by key)."""


@manifest.command("build")
@click.argument("shards")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Output .parquet path.")
def manifest_build(shards: str, out: str) -> None:
    """Scan SHARDS (brace pattern, paths or pipe: URLs) once and write the manifest."""
    from salmae.pipeline.data.manifest import build_manifest, describe_manifest

    click.echo(describe_manifest(build_manifest(shards, out)))


@manifest.command("verify")
@click.argument("manifest_path", metavar="MANIFEST")
@click.argument("shards")
def manifest_verify(manifest_path: str, shards: str) -> None:
    """Report missing, extra or changed shards between MANIFEST and SHARDS (exit 1 if any)."""
    from salmae.pipeline.data.manifest import verify_manifest

    report = verify_manifest(manifest_path, shards)
    click.echo(report.describe())
    if not report.ok:
        sys.exit(1)


# --------------------------------------------------------------------------- stage 1
@cli.command(cls=_ConfigCommand, config=("salmae.stages.saliency", "SaliencyConfig"))
@click.option("--data", help="Caption shards: brace pattern, paths or pipe: URLs.")
@click.option("--out", help="Output Zarr store (STORE.zarr).")
@click.option("--manifest", "manifest_path", help="Use this manifest instead of building one.")
@click.option("--clip-model", help="open_clip model config name (e.g. ViT-B-16, salmae-tiny) or hf-hub:ORG/NAME.")
@click.option("--clip-pretrained", help="open_clip pretrained tag, a local checkpoint FILE, hf-hub:ORG/NAME, or 'none'.")
@click.option("--cam", help="CAM method: gradcam (default) or hirescam (fast path), gradcam++, layercam, eigencam, ...")
@click.option("--batch-size", type=int)
@click.option("--workers", type=int, help="DataLoader worker processes (decode + resize) "
                                          "[default: the CPUs per process less one, at most 10].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--overwrite", is_flag=True, default=None, help="Replace a store made with another config.")
@click.option("--repair", is_flag=True, default=None,
              help="Decode every finished shard (checksums, map ranges) and recompute the damaged ones.")
@click.option("--compile/--no-compile", "compile", default=None, help="torch.compile the CLIP tower (default: off).")
@_config_options
def saliency(config_path, overrides, manifest_path, **named) -> None:
    """Stage 1: CLIP + Grad-CAM saliency per image into a resumable Zarr store."""
    _run_stage("salmae.stages.saliency", "SaliencyConfig", config_path, overrides, manifest=manifest_path, **named)


@cli.command("clip-train", cls=_ConfigCommand, config=("salmae.stages.clip_train", "ClipTrainConfig"))
@click.option("--data", help="Caption shards to train on.")
@click.option("--out", help="Output checkpoint file (clip.pt).")
@click.option("--clip-model", help="open_clip model config name (default: salmae-tiny).")
@click.option("--seconds", type=float, help="Wall-clock training budget.")
@click.option("--batch-size", type=int)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]))
@_config_options
def clip_train(config_path, overrides, **named) -> None:
    """Train a tiny open_clip model contrastively on caption shards (the offline CLIP)."""
    _run_stage("salmae.stages.clip_train", "ClipTrainConfig", config_path, overrides, **named)


@cli.command()
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--data", help="Shards of the store's data, to score maps against metadata bboxes.")
@click.option("--png", "png_dir", type=click.Path(file_okay=False), help="Write overlay PNGs here.")
@click.option("--keys", help="Comma-separated keys to draw.")
@click.option("--random", "n_random", type=int, help="Draw N random ok rows.")
@click.option("--strategy", default="saliency", show_default=True, help="Mask strategy drawn in the overlays.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--boxes", type=click.Path(), help="Object boxes to score the maps against (pointing game): PASCAL VOC "
                                                 "XML (ImageNet val's), a folder of them, or a CSV key,x0,y0,x1,y1.")
@click.option("--boxes-resize", type=click.Choice(["scale", "border", "center_crop"]), default="scale",
              show_default=True, help="How VOC boxes (in the pixels of their <size>) reach a stored image of another "
                                      "aspect: the shards' img2dataset resize_mode (scale: same aspect only).")
def inspect(store, as_json, data, png_dir, keys, n_random, strategy, seed, boxes, boxes_resize) -> None:
    """Summarise a saliency store: rows, status counts, grid, attrs, map statistics; damaged shards (exit 1)."""
    from salmae.stages.inspect import format_summary, inspect_store

    summary = inspect_store(store, data=data, png_dir=png_dir,
                            keys=keys.split(",") if keys else None, n_random=n_random,
                            strategy=strategy, seed=seed, boxes=boxes, boxes_resize=boxes_resize)
    click.echo(format_summary(summary, as_json=as_json))
    if summary["damaged"]:
        sys.exit(1)


# --------------------------------------------------------------------------- stage 2
@cli.command(cls=_ConfigCommand, config=("salmae.stages.pretrain", "PretrainConfig"))
@click.option("--data", help="Image shards to pretrain on.")
@click.option("--out", help="Run folder (created; holds config.yaml, checkpoints, metrics.jsonl).")
@click.option("--saliency", help="Stage-1 Zarr store (needed for saliency/amr-capped masks).")
@click.option("--mask", type=click.Choice(["random", "block", "grid", "saliency", "amr-capped", "sbam", "adaptive"]),
              help="Mask strategy (adaptive: the deprecated name of amr-capped).")
@click.option("--model", type=click.Choice(["tiny", "small", "base", "large", "huge"]))
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int)
@click.option("--resume", help="'latest' or a checkpoint path.")
@click.option("--init", help="Start a new run from official MAE weights (full: strict; encoder only: fresh decoder) "
                             "or a timm ViT: FILE, timm hub FOLDER or hf-hub:NAME.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--compile/--no-compile", "compile", default=None, help="torch.compile the MAE (default: off).")
@_config_options
def pretrain(config_path, overrides, **named) -> None:
    """Stage 2: MAE pretraining with saliency-capped (or baseline) masks.

    SIGTERM, SIGUSR1 or Ctrl-C stop every rank after the same step and write a checkpoint of it; the exit
    status is then 75 (requeue), and --resume latest continues as if the run had never stopped.
    """
    _run_stage("salmae.stages.pretrain", "PretrainConfig", config_path, overrides, **named)


@cli.command()
@click.argument("checkpoint")
@click.option("--out", help="Folder for model.safetensors + config.json.")
@click.option("--format", "format_", type=click.Choice(["timm"]), default=None, help="Layout (timm's hub layout).")
@_config_options
def export(config_path, overrides, checkpoint, format_, **named) -> None:
    """Export the encoder of CHECKPOINT (stage 2, MAE, timm; FILE or hf-hub:NAME) for timm and the HF hub."""
    result = _run_stage("salmae.stages.export", "ExportConfig", config_path, overrides, checkpoint=checkpoint,
                        format=format_, **named)
    click.echo(f"{result['out']}: timm {result['architecture']} {result['model_args']}, "
               f"source sha256 {result['source_sha256'][:12]}")


# --------------------------------------------------------------------------- stage 3
def _eval_command(protocol: str):
    @click.option("--checkpoint", help="Stage-2 checkpoint, official MAE checkpoint or timm ViT weights "
                                       "(FILE, timm hub FOLDER or hf-hub:NAME).")
    @click.option("--data", help="ImageFolder root (train/, val/), or labelled train shards with "
                                 "--set val_data=VAL_SHARDS (KEY.cls, e.g. imagenet-1k-wds; paths or s3:// URLs).")
    @click.option("--out", help="Output folder for results.json.")
    @click.option("--epochs", type=int)
    @click.option("--batch-size", type=int)
    @click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]))
    @click.option("--global-pool/--cls-token", "global_pool", default=None,
                  help="Mean-pool patch tokens (default for finetune) or use the class token (linear/knn/logreg default).")
    @_config_options
    def command(config_path, overrides, **named) -> None:
        if "augment" in named:  # --aug/--no-aug sets linear.augment
            named["linear.augment"] = named.pop("augment")
        _run_stage("salmae.stages.evaluate", "EvalConfig", config_path, overrides, protocol=protocol, **named)

    if protocol in ("linear", "finetune"):
        command = click.option("--accum-iter", "accum_iter", type=int, default=None,
                               help="Micro-batches per optimiser step (default: global batch / (batch x processes); "
                                    "MAE's global batch is 16384 for linear, 1024 for finetune).")(command)
    if protocol == "linear":
        command = click.option("--aug/--no-aug", "augment", default=None,
                               help="MAE's probe with RandomResizedCrop + flip (default), or the fast variant on "
                                    "cached centre-crop features, recorded as protocol linear-noaug.")(command)
    if protocol == "finetune":
        command = click.option("--compile/--no-compile", "compile", default=None,
                               help="torch.compile the ViT (default: off).")(command)

    command.__doc__ = {
        "linear": "MAE's linear probe (crop + flip, BatchNorm + Linear, LARS, global batch 16384, 90 epochs); "
                  "--no-aug: cached features (linear-noaug).",
        "knn": "Weighted kNN on L2-normalised frozen features (k=20, T=0.07).",
        "logreg": "Logistic regression on cached frozen features, solved to convergence (L-BFGS), its L2 chosen "
                  "on a held-out part of the train split.",
        "finetune": "End-to-end fine-tuning with MAE's recipe for the encoder's size (layer decay, drop path, "
                    "blr, epochs), global batch 1024, mixup/cutmix, RandAugment.",
    }[protocol]
    return command


@cli.group("eval")
def eval_group() -> None:
    """Stage 3: evaluate a pretrained encoder (linear, knn, logreg, finetune)."""


for _protocol in ("linear", "knn", "logreg", "finetune"):
    eval_group.command(_protocol, cls=_ConfigCommand, config=("salmae.stages.evaluate", "EvalConfig"))(
        _eval_command(_protocol))


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Output markdown file.")
@click.option("--baseline", default=None, metavar="STRATEGY",
              help="Mask strategy (e.g. random) each row is compared with, seed by seed (paired difference).")
def report(runs, out, baseline) -> None:
    """Compare pretraining runs (and their evals) in markdown tables with PNG plots."""
    from salmae.stages.report import write_report

    click.echo(write_report(list(runs), out, baseline=baseline))


# --------------------------------------------------------------------------- whole pipeline
@cli.command(cls=_ConfigCommand, config=("salmae.stages.demo", "DemoConfig"))
@click.option("--out", default="runs/demo", show_default=True, help="Demo folder (resumable).")
@click.option("--seeds", type=int, default=1, show_default=True, help="Pretrain+eval seeds per strategy.")
@_config_options
def demo(config_path, overrides, print_config, out, seeds) -> None:
    """Run the whole pipeline on generated data with tiny models and write report.md."""
    _run_stage("salmae.stages.demo", "DemoConfig", config_path, overrides, print_config, out=out, seeds=seeds)


@cli.command(cls=_ConfigCommand, config=("salmae.stages.study", "StudyConfig"))
@click.option("--preset", type=click.Choice(["smoke", "cpu", "cpu-full"]), default=None,
              help="Budget: smoke (minutes, every code path), cpu (about 2 h on the reference 2-core CPU: random, "
                   "cap 0.25 and its shuffled-map and inverse controls, 5 seeds x 20 epochs, the curve at epochs "
                   "10 and 15), cpu-full (the whole cap sweep, as many seeds and epochs). "
                   "Default cpu; a --config is layered over --preset when given, else over the config keys' defaults.")
@click.option("--out", default=None, help="Study folder (resumable) [default: runs/study/PRESET].")
@click.option("--seeds", type=int, default=None, help="Seeds 0..K-1 for every setting (default: the preset's).")
@_config_options
def study(config_path, overrides, print_config, preset, out, seeds) -> None:
    """Does saliency masking help, and at which cap? Settings x seeds, paired, into study.md/json."""
    from pathlib import Path

    from salmae.pipeline.config import resolve_config
    from salmae.stages import study as study_stage

    name = preset or "cpu"
    # a --config alone starts from StudyConfig's defaults, not from the cpu preset's curve and probe choices
    base = {"preset": Path(config_path).stem} if config_path and not preset else study_stage.preset_values(name)
    cfg = resolve_config(study_stage.StudyConfig, config_path, overrides, base=base,
                         out=out or (None if config_path else f"runs/study/{name}"), seeds=seeds)
    if print_config:
        return _print_config(cfg)
    study_stage.run(cfg)


@cli.command()
@click.argument("which", type=click.Choice(["all", "saliency", "pretrain", "eval", "scale"]), default="all")
@click.option("--out", default="BENCHMARKS.md", show_default=True, help="Markdown file to (re)write.")
@click.option("--repeats", type=int, default=5, show_default=True, help="Repeats per timing (median reported).")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False),
              help="Also write the figures as JSON ({\"figures\": [{\"id\", \"value\", \"target\", \"verdict\", ...}]}).")
@click.option("--rows", type=int, default=3_300_000, show_default=True,
              help="scale: cc3m-shaped rows to generate (data under $TMPDIR; markdown block scale-ROWS).")
@click.option("--shard-size", type=int, default=10_000, show_default=True, help="scale: samples per tar shard.")
@click.option("--keep", is_flag=True, help="scale: keep the generated data folder.")
def bench(which, out, repeats, json_out, rows, shard_size, keep) -> None:
    """Measure the stage speed ratios and rewrite BENCHMARKS.md (`scale`: time and memory of each step at N rows)."""
    if which == "scale":
        from salmae.stages.bench.scale import ScaleConfig, render, run_scale
        from salmae.stages.bench.workspace import _quick_from_env

        click.echo(render(run_scale(ScaleConfig(rows=rows, out=out, json_out=json_out, keep=keep,
                                                shard_size=shard_size, quick=_quick_from_env()))))
        return
    from salmae.stages.bench import run_bench

    click.echo(run_bench(which=which, out=out, repeats=repeats, json_out=json_out))


@cli.command("gpu-check", cls=_ConfigCommand, config=("salmae.stages.bench.gpu_check", "GpuCheckConfig"))
@click.option("--out", default="runs/gpu-check", show_default=True, help="Folder for gpu-check.json and .md.")
@click.option("--clip-pretrained", default=None, help="Stage-1 CLIP checkpoint FILE (default: random weights).")
@click.option("--device", default=None, help="auto | cuda | cpu (cpu: smallest configuration).  [default: auto]")
@_config_options
def gpu_check(config_path, overrides, print_config, out, clip_pretrained, device) -> None:
    """Measure images/s and peak memory of stages 1-3 on this machine's GPU into OUT/gpu-check.json."""
    from salmae.stages.bench.gpu_check import render

    result = _run_stage("salmae.stages.bench.gpu_check", "GpuCheckConfig", config_path, overrides, print_config,
                        out=out, clip_pretrained=clip_pretrained, device=device)
    if result is not None:
        click.echo(render(result))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (`salmae`)."""
    cli.main(args=argv, prog_name="salmae")


if __name__ == "__main__":
    main()
