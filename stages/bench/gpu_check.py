"""`salmae gpu-check`: images/s and peak memory of the real stages on this machine, into DIR/gpu-check.json.

Where `salmae bench` tracks ratios on a laptop, this measures absolute throughput of the GPU
path by running the stages themselves (`stages.saliency.run`, `stages.pretrain.run`,
`stages.evaluate.run`) on generated shapes:

0. preflight (`pipeline.preflight`): Python, torch, torchvision, timm and numpy at least the
   versions salmae needs (else one line naming the package and the version, nothing run), and a
   C compiler for torch.compile (else compile is off, and the table says why);
1. stage 1: fast Grad-CAM with open_clip ViT-B-16 (random weights unless `clip_pretrained`) with
   the stage's own defaults (batch, loader workers) on 8,192 images of each of three kinds:
   generated 224-px shapes, and cc3m-like JPEGs at img2dataset's 256-px output and at cc3m's
   typical original size (500x375), whose decoding costs what a user's does; images/s in the
   steady state (the stage's own figure: after the first batch) and end to end;
2. stage 2: MAE ViT-B (`base`) at batch 256 with saliency masks from the shapes store, at least
   200 steps after a first epoch that is left out (it holds torch.compile's compile time), once
   with compile off and once on; images/s from `metrics.jsonl`'s steady-state times (each
   epoch's first logging window, with worker start-up and the first batch, is left out); every
   step runs under `check_syncs` (`pipeline.host_syncs`: CUDA's sync debug mode, and on every
   device the recorder of host syncs in salmae's code, eager runs only);
3. stage 3: kNN on the stage-2 encoder's features over the generated ImageFolder, end to end.

Targets on one H100: stage 1 >= 1,100 img/s (clip-retrieval reports ~1,100 img/s of CLIP
ViT-B/16 inference per A100), stage 2 >= 1,000 img/s (official MAE ViT-B: ~313 img/s per A6000).
Without CUDA the smallest configuration runs on the CPU (salmae-tiny CLIP, tiny MAE, 48 images of
each kind, a few steps) so CI and the tests exercise it; the table and the JSON say so.

Generated data and stage runs go to DIR/work (deleted afterwards unless `keep`); the results
are DIR/gpu-check.json and DIR/gpu-check.md, each written atomically.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.files import atomic_write_json, atomic_write_text
from salmae.pipeline.logging import get_logger, read_metrics, setup_logging
from salmae.stages.bench.report import Row, figure_record, judge, markdown_table
from salmae.stages.bench.workspace import _quiet

CPU_NOTE = "no CUDA: smallest configuration, not a GPU measurement"
TARGETS = {"saliency": 1100, "pretrain": 1000}   # images/s on one H100
JPEG_KINDS = {"saliency_jpeg256": (256, 256), "saliency_jpeg500": (500, 375)}   # cc3m-like (width, height)
ANCHORS = {"saliency": "clip-retrieval: ~1,100 img/s CLIP ViT-B/16 inference per A100",
           "pretrain": "official MAE ViT-B: ~313 img/s per A6000"}


@dataclass
class GpuCheckConfig:
    """`salmae gpu-check` configuration (None = the size of the device's configuration)."""

    out: Path = Path("runs/gpu-check")   # folder for gpu-check.json / .md and (during the run) work/
    device: str = "auto"                 # auto | cuda | cpu (cpu runs the smallest configuration)
    clip_pretrained: str = "none"        # stage-1 CLIP weights: 'none' (random) or a checkpoint FILE
    precision: str = "auto"              # auto | bf16 | fp16 | fp32, given to every stage that takes it
    compile: Literal["auto", "off", "on", "both"] = "auto"  # stage-2 torch.compile runs (auto: GPU both, CPU off)
    images: int | None = None            # generated images (GPU 8192, CPU 48)
    steps: int | None = None             # stage-2 steps measured per run, after the first epoch (GPU 200, CPU 6)
    batch_size: int | None = None        # stage-2 batch (GPU 256, CPU 16); stage 1 and kNN use the same
    workers: int | None = None           # loader workers per stage (GPU pipeline.device.default_workers(), CPU 0)
    keep: bool = False                   # keep DIR/work (generated data, store, checkpoints) afterwards


@dataclass
class CheckSizes:
    """Every size one gpu-check uses (recorded in the JSON)."""

    images: int          # generated shapes, all used by every stage
    image_size: int      # generated side in pixels
    clip_model: str      # open_clip config of stage 1
    mae_model: str       # MAE preset of stage 2 (its encoder is stage 3's)
    batch_size: int      # per step / forward, every stage
    rows_per_shard: int  # stage-1 store shard = its timing unit (the first is left out)
    steps: int           # stage-2 steps measured per run
    epochs: int          # stage-2 epochs: one warm-up epoch + enough for `steps`
    steps_per_epoch: int
    workers: int


def check_sizes(cfg: GpuCheckConfig, gpu: bool) -> CheckSizes:
    """The GPU or CPU configuration, with `cfg`'s overrides."""
    from salmae.pipeline.device import default_workers

    images = cfg.images or (8192 if gpu else 48)
    batch = cfg.batch_size or (256 if gpu else 16)
    steps = cfg.steps or (200 if gpu else 6)
    if min(images, batch, steps) < 1:
        raise SalmaeError("gpu-check needs images, steps and batch_size of at least 1; fix the --set values")
    steps_per_epoch = images // batch   # the stage-2 loader drops the last partial batch
    if steps_per_epoch < 1:
        raise SalmaeError(f"gpu-check: {images} images make no batch of {batch}; raise images or lower batch_size")
    workers = cfg.workers if cfg.workers is not None else (default_workers() if gpu else 0)
    return CheckSizes(images=images, image_size=224 if gpu else 64, clip_model="ViT-B-16" if gpu else "salmae-tiny",
                      mae_model="base" if gpu else "tiny", batch_size=batch,
                      rows_per_shard=1024 if gpu else max(batch, images // 3), steps=steps,
                      epochs=1 + math.ceil(steps / steps_per_epoch), steps_per_epoch=steps_per_epoch, workers=workers)


def preflight() -> None:
    """Refuse, in one line naming each package and the version it needs, a box salmae cannot run on."""
    from salmae.pipeline.preflight import version_problems

    problems = version_problems()
    if problems:
        raise SalmaeError("gpu-check: " + "; ".join(problems))


def compile_runs(choice: str, gpu: bool, compiler: str | None) -> tuple[list[bool], str | None]:
    """The stage-2 compile settings to measure, and why compile was left out (None if it was not)."""
    runs = {"auto": [False, True] if gpu else [False], "off": [False], "on": [True], "both": [False, True]}[choice]
    if True in runs and compiler is None:
        missing = "no C compiler (CC, cc, gcc or clang) for torch.compile's Triton/inductor kernels"
        if choice == "on":
            raise SalmaeError(f"gpu-check --set compile=on: {missing}; install one (e.g. apt-get install gcc) "
                              "or use compile=auto")
        note = f"compile off: {missing}"
        return [False], note
    return runs, None


def run(cfg: GpuCheckConfig) -> dict[str, Any]:
    """Measure the three stages; write and return the summary (the content of gpu-check.json)."""
    from salmae.pipeline.device import pick_device, resolve_precision
    from salmae.pipeline.preflight import compiler_for_compile

    start = time.perf_counter()
    preflight()
    device = pick_device(cfg.device)
    gpu = device.type == "cuda"
    precision = resolve_precision(cfg.precision, device)
    sizes = check_sizes(cfg, gpu)
    compiles, compile_note = compile_runs(cfg.compile, gpu, compiler_for_compile())
    out = Path(cfg.out)
    work = out / "work"
    if work.exists():   # our own scratch folder from an earlier check: the stages refuse to overwrite
        shutil.rmtree(work)
    log = setup_logging(None)
    log.info("gpu-check on %s: %s", device, sizes)
    try:
        data = _generate(work / "shapes", sizes)
        stages = {"saliency": _stage1(cfg, sizes, data, work / "store.zarr", device, precision, "shapes")}
        for name, (width, height) in JPEG_KINDS.items():
            jpegs = _generate_jpegs(work / name, sizes, (width, height))
            stages[name] = _stage1(cfg, sizes, jpegs, work / f"{name}.zarr", device, precision,
                                   f"cc3m-like {width}x{height} JPEG")
        for compiled in compiles:
            name = "pretrain_compiled" if compiled else "pretrain"
            stages[name] = _stage2(sizes, data, work / "store.zarr", work / name, device, precision, compiled)
        # the one plan whose masks are built inside the step (from the model's salience): its syncs checked too
        stages["pretrain_online"] = _stage2(sizes, data, None, work / "pretrain_online", device, precision, False,
                                            mask="amr-capped")
        ckpt = work / ("pretrain" if False in compiles else "pretrain_compiled") / "checkpoint-latest.pth"
        stages["knn"] = _stage3(sizes, work / "shapes" / "imagefolder", ckpt, work / "knn", device, precision)
    finally:
        setup_logging(None)   # drop the stages' file handlers before work/ goes
        if not cfg.keep and work.exists():
            shutil.rmtree(work)
    summary = _summary(cfg, device, precision, sizes, compiles, stages, time.perf_counter() - start)
    if compile_note:
        summary["compile_note"] = compile_note
    atomic_write_json(out / "gpu-check.json", summary)
    atomic_write_text(out / "gpu-check.md", render(summary))
    log.info("gpu-check: wrote %s", out / "gpu-check.json")
    return summary


# --------------------------------------------------------------------------- the stages
def _generate(folder: Path, s: CheckSizes) -> str:
    """Shapes shards (+ ImageFolder) for every stage; returns the brace pattern over the shards."""
    from salmae.pipeline.data.shapes import write_shapes

    get_logger().info("gpu-check: generating %d %d-px images", s.images, s.image_size)
    write_shapes(folder, n=s.images, image_size=s.image_size, seed=0, shard_size=s.rows_per_shard, imagefolder=True)
    names = sorted(p.stem for p in folder.glob("*.tar"))
    return str(folder / (f"{{{names[0]}..{names[-1]}}}.tar" if len(names) > 1 else f"{names[0]}.tar"))


def _generate_jpegs(folder: Path, s: CheckSizes, size: tuple[int, int]) -> str:
    """cc3m-like shards of `size` (width, height) JPEGs, as many as the shapes; returns their pattern."""
    from salmae.pipeline.data.cc3m_like import shard_pattern, write_cc3m_like

    get_logger().info("gpu-check: generating %d cc3m-like %dx%d JPEGs", s.images, *size)
    return shard_pattern(write_cc3m_like(folder, s.images, shard_size=min(s.rows_per_shard, 10_000), image_size=size))


def _known(cls, **values: Any) -> dict[str, Any]:
    """`values` restricted to `cls`'s fields: `compile`/`precision` reach only stages that take them."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    """Peak bytes torch allocated on the GPU since the last `_reset_peak` (None on the CPU)."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _stage1(cfg: GpuCheckConfig, s: CheckSizes, data: str, store_path: Path, device: torch.device,
            precision: str, images_kind: str) -> dict[str, Any]:
    from salmae.stages.saliency import SaliencyConfig, run as saliency_run

    get_logger().info("gpu-check: stage 1, %s, batch %d, %s", s.clip_model, s.batch_size, images_kind)
    passed = _known(SaliencyConfig, compile=False, precision=precision, check_syncs=True)
    scfg = SaliencyConfig(data=data, out=store_path, clip_model=s.clip_model, clip_pretrained=cfg.clip_pretrained,
                          cam="gradcam", batch_size=s.batch_size, workers=s.workers, device=device.type,
                          rows_per_shard=s.rows_per_shard, **passed)
    _reset_peak(device)
    with _quiet():
        summary = saliency_run(scfg)
    peak = _peak(device)
    steady = summary["steady_state"]
    return {"images_per_s": _rate(steady["images"], steady["seconds"]),
            "images_per_s_end_to_end": summary["images_per_s"], "images_timed": steady["images"],
            "seconds_timed": round(steady["seconds"], 3), "images": summary["images_this_run"],
            "seconds": summary["seconds"], "warmup_excluded": "the first batch (model load, loader start-up)",
            "images_kind": images_kind, "peak_gpu_memory_bytes": peak, "clip_model": s.clip_model,
            "clip_pretrained": cfg.clip_pretrained, "cam": "gradcam", "batch_size": s.batch_size,
            "grid": summary["grid"], "rows_per_shard": s.rows_per_shard, "workers": s.workers, "compile": False,
            "host_syncs_checked": "check_syncs" in passed, "stage_fields_given": sorted(passed)}


def _stage2(s: CheckSizes, data: str, store_path: Path | None, out: Path, device: torch.device, precision: str,
            compiled: bool, mask: str = "saliency") -> dict[str, Any]:
    """One stage-2 run; without `store_path` the masks come from the model's own salience (source=online)."""
    from salmae.stages.pretrain import MaskConfig, PretrainConfig, run as pretrain_run

    source = "store" if store_path is not None else "online"
    get_logger().info("gpu-check: stage 2, MAE %s, %s masks (%s), batch %d, %d epochs, compile %s", s.mae_model,
                      mask, source, s.batch_size, s.epochs, "on" if compiled else "off")
    passed = _known(PretrainConfig, precision=precision)
    pcfg = PretrainConfig(data=data, out=out, saliency=str(store_path) if store_path else None, mask=mask,
                          masking=MaskConfig(source=source), model=s.mae_model,
                          epochs=s.epochs, batch_size=s.batch_size, workers=s.workers, device=device.type,
                          compile=compiled, viz_samples=0, save_every=0, check_syncs=True,
                          **passed)  # default log_every: a sync every 20 steps, as a real run; none in between
    _reset_peak(device)
    with _quiet():
        pretrain_run(pcfg)
    peak = _peak(device)
    records = read_metrics(out / "metrics.jsonl")
    epochs = [r for r in records if r.get("kind") == "epoch"]
    steps = {e["epoch"]: e["images"] // s.batch_size for e in epochs}
    timed = [e for e in epochs if e["epoch"] > 0] or epochs   # epoch 0 holds compile time and cold caches
    n_steps = sum(e["timed_steps"] for e in timed)            # each epoch's steady state (`steady_state`)
    seconds = sum(e["timed_seconds"] for e in timed)
    return {"images_per_s": _rate(n_steps * s.batch_size, seconds), "steps_timed": n_steps,
            "images_timed": n_steps * s.batch_size, "seconds_timed": round(seconds, 3),
            "warmup_excluded": (f"epoch 0 ({steps.get(0, 0)} steps, {epochs[0]['seconds']:.1f} s) and each "
                                "later epoch's first logging window" if len(epochs) > 1
                                else "the first logging window"),
            "steps": sum(steps.values()), "epochs": len(epochs), "peak_gpu_memory_bytes": peak,
            "model": s.mae_model, "mask": mask, "source": source, "batch_size": s.batch_size,
            "image_size": _mae_size(s),
            "workers": s.workers, "compile": compiled,
            "host_syncs_checked": "CUDA sync debug mode" + ("" if compiled else " + recorder") if device.type == "cuda"
            else ("recorder" if not compiled else "no (compiled on the CPU)"),
            "stage_fields_given": sorted([*passed, "compile"])}


def _stage3(s: CheckSizes, root: Path, ckpt: Path, out: Path, device: torch.device, precision: str) -> dict[str, Any]:
    from salmae.stages.evaluate import EvalConfig, run as eval_run

    get_logger().info("gpu-check: stage 3, kNN on %s", root)
    passed = _known(EvalConfig, precision=precision)
    ecfg = EvalConfig(protocol="knn", checkpoint=str(ckpt), data=str(root), out=str(out), batch_size=s.batch_size,
                      device=device.type, workers=s.workers, **passed)
    _reset_peak(device)
    with _quiet():
        results = eval_run(ecfg)
    peak = _peak(device)
    images = results["counts"]["train"] + results["counts"]["val"]
    return {"images_per_s": _rate(images, results["seconds"]), "images": images, "seconds": results["seconds"],
            "warmup_excluded": "nothing (end to end: encoder load, both splits' features, the vote)",
            "top1": results["top1"], "peak_gpu_memory_bytes": peak, "model": s.mae_model,
            "batch_size": s.batch_size, "image_size": results["encoder"]["eval_img_size"], "workers": s.workers,
            "compile": False, "stage_fields_given": sorted(passed)}


def _rate(images: int, seconds: float) -> float | None:
    return round(images / seconds, 2) if seconds > 0 and images > 0 else None


def _mae_size(s: CheckSizes) -> int:
    from salmae.pipeline.models.mae import PRESETS

    return int(PRESETS[s.mae_model]["img_size"])


# --------------------------------------------------------------------------- summary + table
def _summary(cfg: GpuCheckConfig, device: torch.device, precision: str, sizes: CheckSizes, compiles: list[bool],
             stages: dict[str, dict], wall: float) -> dict[str, Any]:
    gpu = device.type == "cuda"
    summary: dict[str, Any] = {
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if gpu else None,
        "gpu_memory_bytes": torch.cuda.get_device_properties(device).total_memory if gpu else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if gpu else None,
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "salmae " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["gpu-check"] else f"run({cfg!r})",
        "precision": precision, "compile": ["on" if c else "off" for c in compiles],
        "sizes": dataclasses.asdict(sizes), "wall_seconds": round(wall, 1), "stages": stages,
    }
    if not gpu:
        summary["note"] = CPU_NOTE
    date = summary["date"]
    summary["figures"] = [figure_record(r, date, quick=not gpu) for r in rows(summary)]
    return summary


def rows(summary: dict[str, Any]) -> list[Row]:
    """One table row per measured stage run, judged against the H100 targets on a GPU only."""
    gpu = summary["device"] == "cuda"
    names = {"saliency": ("saliency", "stage 1 fast Grad-CAM, 224-px shapes"),
             "saliency_jpeg256": ("saliency", "stage 1 fast Grad-CAM, 256-px JPEGs"),
             "saliency_jpeg500": ("saliency", "stage 1 fast Grad-CAM, 500x375 JPEGs"),
             "pretrain": ("pretrain", "stage 2 MAE, compile off"),
             "pretrain_compiled": ("pretrain", "stage 2 MAE, compile on"),
             "pretrain_online": ("pretrain", "stage 2 MAE, online amr-capped masks"), "knn": ("eval", "stage 3 kNN features")}
    out = []
    for key, stage in summary["stages"].items():
        section, figure = names[key]
        rate = stage["images_per_s"]
        target = f"≥ {TARGETS[section]} img/s" if section in TARGETS else "—"
        if not gpu and target != "—":
            target = f"— (GPU: {target} on one H100)"
        peak = stage["peak_gpu_memory_bytes"]
        detail = (f"{_what(key, stage)}; warm-up left out: {stage['warmup_excluded']}; peak GPU memory "
                  + (f"{peak / 2**30:.1f} GiB" if peak is not None else "n/a (CPU)")
                  + (f"; target anchor: {ANCHORS[section]}, target is for one H100" if section in ANCHORS and gpu else ""))
        out.append(Row(section, figure, f"{rate:.0f} img/s" if rate else "not measured", target,
                       judge(rate, target) if rate and gpu else "—", detail, id=f"gpu_check.{key}_images_per_s",
                       number=rate, unit="img/s"))
    return out


def _what(key: str, st: dict[str, Any]) -> str:
    if key.startswith("saliency"):
        return (f"{st['clip_model']} ({st['clip_pretrained']} weights), {st['images_kind']}, batch {st['batch_size']}, "
                f"{st['workers']} workers, {st['images_timed']} of {st['images']} images timed; end to end "
                f"{st['images_per_s_end_to_end']} img/s")
    if key.startswith("pretrain"):
        return (f"MAE {st['model']} {st['image_size']} px, {st['mask']} masks ({st['source']}), batch {st['batch_size']}, "
                f"{st['workers']} workers, {st['steps_timed']} of {st['steps']} steps timed")
    return (f"MAE {st['model']} encoder, {st['image_size']} px, batch {st['batch_size']}, {st['images']} images, "
            f"end to end, top-1 {st['top1']:.1f}%")


def render(summary: dict[str, Any]) -> str:
    """The check as markdown: what ran where, then the table."""
    head = [f"# gpu-check {summary['date']}", "",
            f"- Device: {summary['gpu'] or 'CPU'}; torch {summary['torch']} (CUDA {summary['cuda']}), "
            f"precision {summary['precision']}, compile {'/'.join(summary['compile'])}",
            f"- Sizes: {summary['sizes']['images']} images of {summary['sizes']['image_size']} px; "
            f"wall time {summary['wall_seconds']} s"]
    if "note" in summary:
        head.append(f"- **{summary['note']}**")
    if "compile_note" in summary:
        head.append(f"- {summary['compile_note']}")
    return "\n".join(head) + "\n\n" + markdown_table(rows(summary), value_header="Images/s (warm-up left out)")
