"""`salmae bench scale`: a cc3m-sized rehearsal (issue 10): what each step costs at N rows, in time and memory.

Generates N cc3m-shaped samples (`pipeline.data.cc3m_like`: img2dataset's webdataset layout,
32-px JPEGs, cc3m-length captions) into a temporary folder (under `$TMPDIR`; removed at the end
unless `keep`), then runs each step once, each in a fresh process of its own so that its peak
resident memory (`VmHWM`) is its own:

- `generate`: the data itself (a process pool over shards);
- `manifest`: first build, `pipeline.data.manifest.build_manifest(shards, out)`;
- `saliency_slice`: stage 1 (`stages.saliency.run`, micro CLIP `salmae-micro`, random weights, CPU)
  on a separate store over the first `slice_rows` rows, images/s;
- `saliency_resume`: stage 1 rerun (same command) on a store of all N rows whose shards are all
  done but the last `resume_shards`: start-up, then those rows, until `run` returns. The store is
  made (untimed) with `create_store` and `write_shard`, its attrs copied from the slice store
  that stage 1 itself wrote (only the manifest hash differs), so `run` resumes it as its own;
- `inspect`: `stages.inspect.inspect_store` over the whole store;
- `pretrain_table`: stage 2's dataset: load the manifest, `load_saliency_table`, `IndexedPretrainDataset`;
- `pretrain_loader`: one pass of the stage-2 loader (`GlobalBatchSampler`, `MaskingCollate` with
  saliency masks, 2 workers) over the first `loader_rows` rows of the epoch's permutation, images/s;
  each worker's peak RSS is sampled from /proc while it runs and reported above its parent's RSS;
- `knn`: `pipeline.eval.knn.knn_predict` at ImageNet's shape (1,281,167 train x 50,000 val) on
  random features of the tiny encoder's width; `knn_val_measured` val rows are timed and the
  time is scaled linearly to all 50,000 (each val chunk costs the same).

Each step reports `seconds`, `peak_rss_mb` (the step's process, interpreter and imports included:
`rss_at_start_mb` is what it held before the step began) and `children_peak_rss_mb` (the largest
of its finished child processes: pool or loader workers). The results go into the block
`scale-N` of the markdown file `out` (other blocks kept) and, with `json_out`, into that JSON file
(`{"rows": N, "steps": {...}, "machine": {...}, "figures": [...]}`), each written atomically.
The targets are for N = 3.3 M on a 2-core machine; at smaller N the time targets are not judged
(the table gives a linear extrapolation instead), the memory targets always are.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import shlex
import shutil
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from salmae.pipeline.errors import SalmaeError

TARGET_ROWS = 3_300_000          # the targets below are for this many rows
TIME_TARGETS_S = {"saliency_resume": 60.0, "pretrain_table": 120.0}
PEAK_RSS_TARGET_MB = 8192.0      # any step
WORKER_TARGET_MB = 512.0         # each loader worker above its parent
CLIP_MODEL = "salmae-micro"      # stage-1 CLIP of the rehearsal (32 px, patch 8: a 4x4 grid)
MAE_IMG_SIZE, MAE_GRID = 32, (4, 4)
SETUP_RUN_ID = "bench-scale-setup"  # run id in the markers of the store shards the set-up marks done
STEPS = ("generate", "manifest", "saliency_slice", "saliency_resume", "inspect", "pretrain_table",
         "pretrain_loader", "knn")
# imported once by the forkserver, so each step's process starts in milliseconds, not seconds
_PRELOAD = ["torch", "numpy", "pyarrow.parquet", "zarr", "open_clip", "salmae.stages.saliency", "salmae.stages.inspect",
            "salmae.pipeline.pretrain.data", "salmae.pipeline.pretrain.mask_plan", "salmae.pipeline.eval.knn", "salmae.stages.bench.scale"]


@dataclass
class ScaleConfig:
    """`salmae bench scale` configuration."""

    rows: int = TARGET_ROWS          # samples generated (cc3m: about 3.3 M)
    out: Path = Path("BENCHMARKS.md")  # markdown file whose block `scale-ROWS` is written (other blocks kept)
    json_out: Path | None = None     # also write {"rows", "steps", "machine", "figures"} here
    keep: bool = False               # keep the generated data folder (its path is logged and in the JSON)
    shard_size: int = 10_000         # samples per tar shard (img2dataset's cc3m shards)
    quick: bool = False              # smoke sizes for the slice, loader and kNN steps (SALMAE_BENCH_QUICK)
    rows_per_store_shard: int = 1024  # stage-1 Zarr shard (stage 1's default)
    resume_shards: int = 2           # store shards saliency_resume must compute (the last ones)
    slice_rows: int = 2048           # rows of the saliency_slice store
    clip_batch: int = 64             # stage-1 batch
    clip_workers: int = 2            # stage-1 loader workers
    loader_rows: int = 20_000        # rows one pretrain_loader pass reads
    loader_batch: int = 64           # stage-2 batch
    loader_workers: int = 2          # stage-2 loader workers
    knn_train: int = 1_281_167       # kNN train rows (ImageNet-1k train)
    knn_val: int = 50_000            # kNN val rows (ImageNet-1k val)
    knn_val_measured: int = 2048     # val rows actually timed (time scaled linearly to knn_val)
    knn_dim: int = 128               # feature width (the tiny encoder's)
    knn_classes: int = 1000          # ImageNet-1k classes

    def sized(self) -> "ScaleConfig":
        """This config, checked, with the quick sizes applied if `quick`."""
        if self.rows < 1 or not 1 <= self.shard_size <= 10_000:
            raise SalmaeError(f"bench scale needs --rows >= 1 and 1 <= --shard-size <= 10000 "
                              f"(got {self.rows}, {self.shard_size})")
        if not self.quick:
            return self
        return replace(self, slice_rows=min(self.slice_rows, 256), loader_rows=min(self.loader_rows, 1024),
                       resume_shards=1, knn_train=20_000, knn_val=1_000, knn_val_measured=500)


def run_scale(cfg: ScaleConfig) -> dict[str, Any]:
    """Generate the data, run every step in its own process, write the block (and JSON); return the JSON."""
    import torch

    from salmae.pipeline.files import atomic_write_json, atomic_write_text
    from salmae.pipeline.logging import setup_logging
    from salmae.stages.bench.report import block, figure_record, machine_info, merge_blocks

    cfg = cfg.sized()
    log = setup_logging(None)
    date = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    command = ("salmae " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["bench"]
               else f"run_scale(rows={cfg.rows}, shard_size={cfg.shard_size})")
    if cfg.quick:
        command = "SALMAE_BENCH_QUICK=1 " + command
    _check_disk(cfg)
    work = Path(tempfile.mkdtemp(prefix=f"salmae-scale-{cfg.rows}-"))
    log.info("bench scale: %d rows in shards of %d under %s", cfg.rows, cfg.shard_size, work)
    try:
        steps = _run_steps(cfg, work, log)
    finally:
        if cfg.keep:
            log.info("bench scale: kept the data in %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    summary: dict[str, Any] = {
        "rows": cfg.rows, "shard_size": cfg.shard_size, "quick": cfg.quick, "date": date, "command": command,
        "machine": machine_info(torch.device("cpu")), "data": str(work) if cfg.keep else None, "steps": steps,
        "targets": {"rows": TARGET_ROWS, **{f"{k}_seconds": v for k, v in TIME_TARGETS_S.items()},
                    "peak_rss_mb": PEAK_RSS_TARGET_MB, "loader_worker_above_parent_mb": WORKER_TARGET_MB},
    }
    figures = rows(summary)
    summary["figures"] = [figure_record(r, date, cfg.quick) for r in figures]
    path = Path(cfg.out)
    old = path.read_text() if path.is_file() else ""
    name = f"scale-{cfg.rows}"
    atomic_write_text(path, merge_blocks(old, {name: block(name, render(summary))}))
    log.info("bench scale: wrote block scale-%d of %s", cfg.rows, path)
    if cfg.json_out:
        atomic_write_json(cfg.json_out, summary)
        log.info("bench scale: wrote %s", cfg.json_out)
    return summary


def _check_disk(cfg: ScaleConfig) -> None:
    from salmae.pipeline.data.cc3m_like import BYTES_PER_ROW

    need = cfg.rows * BYTES_PER_ROW * 1.1 + 2**30                # tars + parquet + store, with room
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if free < need:
        raise SalmaeError(f"bench scale needs about {need / 1e9:.1f} GB free under {tempfile.gettempdir()} for "
                          f"{cfg.rows} rows, and {free / 1e9:.1f} GB are; set TMPDIR to a bigger disk or lower --rows")


# --------------------------------------------------------------------------- the steps, in order
def _run_steps(cfg: ScaleConfig, work: Path, log) -> dict[str, dict]:
    """Each step in its own process; a step whose input failed is skipped (recorded as such)."""
    data, manifest = work / "data", work / "manifest.parquet"
    slice_store, store = work / "slice" / "store.zarr", work / "store" / "store.zarr"
    from salmae.pipeline.data.cc3m_like import shard_pattern

    n_shards = -(-cfg.rows // cfg.shard_size)
    pattern = shard_pattern([str(data / f"{s:05d}.tar") for s in range(n_shards)])
    plan: list[tuple[str, Callable, tuple, tuple[str, ...]]] = [
        ("generate", _generate, (str(data), cfg.rows, cfg.shard_size), ()),
        ("manifest", _manifest, (pattern, str(manifest)), ("generate",)),
        ("saliency_slice", _saliency_slice, (cfg, str(work / "slice"), str(slice_store)), ()),
        ("saliency_resume", _saliency_resume, (cfg, pattern, str(manifest), str(slice_store), str(store)),
         ("manifest", "saliency_slice")),
        ("inspect", _inspect, (str(store),), ("saliency_resume",)),
        ("pretrain_table", _pretrain_table, (pattern, str(manifest), str(store)), ("saliency_resume",)),
        ("pretrain_loader", _pretrain_loader, (cfg, pattern, str(manifest), str(store)), ("saliency_resume",)),
        ("knn", _knn, (cfg,), ()),
    ]
    steps: dict[str, dict] = {}
    for name, fn, args, needs in plan:
        failed = [n for n in needs if "error" in steps.get(n, {})]
        if failed:
            steps[name] = {"error": f"skipped: {failed[0]} failed"}
            continue
        log.info("bench scale: %s", name)
        steps[name] = run_in_process(fn, *args)
        if "error" in steps[name]:
            log.warning("bench scale: %s failed: %s", name, steps[name]["error"])
        else:
            log.info("bench scale: %s took %.1f s, peak RSS %.0f MB", name, steps[name]["seconds"],
                     steps[name]["peak_rss_mb"])
    return steps


def _generate(data: str, rows: int, shard_size: int) -> dict:
    from salmae.pipeline.data.cc3m_like import write_cc3m_like

    paths = write_cc3m_like(data, rows, shard_size)
    nbytes = sum(os.path.getsize(p) for p in Path(data).iterdir())
    return {"shards": len(paths), "bytes": nbytes}


def _manifest(pattern: str, out: str) -> dict:
    from salmae.pipeline.data.manifest import build_manifest

    return {"manifest_rows": len(build_manifest(pattern, out))}


def _saliency_config(cfg: ScaleConfig, data: str, out: str):
    from salmae.stages.saliency import SaliencyConfig

    return SaliencyConfig(data=data, out=Path(out), clip_model=CLIP_MODEL, clip_pretrained="none",
                          batch_size=cfg.clip_batch, workers=cfg.clip_workers, device="cpu",
                          rows_per_shard=cfg.rows_per_store_shard)


def _saliency_slice(cfg: ScaleConfig, folder: str, store: str) -> dict:
    """Stage 1 over a separate store of the first `slice_rows` rows (generated here, untimed)."""
    from salmae.pipeline.data.cc3m_like import shard_pattern, write_cc3m_like
    from salmae.stages.saliency import run

    paths = write_cc3m_like(folder, cfg.slice_rows, cfg.shard_size)
    start = time.perf_counter()
    summary = run(_saliency_config(cfg, shard_pattern(paths), store))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": summary["images_this_run"],
            "images_per_s": summary["images_this_run"] / seconds, "grid": summary["grid"]}


def _saliency_resume(cfg: ScaleConfig, pattern: str, manifest_path: str, slice_store: str, store: str) -> dict:
    """Make the store done but for its last shards (untimed), then time stage 1's rerun on it."""
    from salmae.pipeline.saliency.store import SaliencyStore
    from salmae.stages.saliency import run

    setup_start = time.perf_counter()
    pending = _finished_store(cfg, manifest_path, slice_store, store)
    setup = time.perf_counter() - setup_start
    start = time.perf_counter()
    summary = run(_saliency_config(cfg, pattern, store))
    seconds = time.perf_counter() - start
    if summary["images_this_run"] != pending:
        raise SalmaeError(f"stage 1 computed {summary['images_this_run']} rows on resume, expected the "
                          f"{pending} rows of its last {cfg.resume_shards} shards (did it reuse the store?)")
    markers = SaliencyStore.open(store).done_markers().values()
    computing = sum(m["seconds"] for m in markers if m.get("run_id") != SETUP_RUN_ID)
    return {"seconds": seconds, "setup_seconds": setup, "rows_computed": pending, "compute_seconds": computing,
            "start_up_seconds": seconds - computing, "store_shards": summary["shards"]}


def _finished_store(cfg: ScaleConfig, manifest_path: str, slice_store: str, store: str) -> int:
    """A store of every manifest row, all shards done (random peaked maps) but the last `resume_shards`.

    Its attrs are the slice store's (written by stage 1 with the same config) with this manifest's
    hash, so stage 1 takes it for its own. Returns the number of rows left pending.
    """
    import numpy as np

    from salmae.pipeline.data.manifest import load_manifest
    from salmae.pipeline.saliency.store import STATUS_OK, SaliencyStore, create_store
    from salmae.pipeline.saliency.store_setup import MANIFEST_NAME

    manifest = load_manifest(manifest_path)
    attrs = {k: v for k, v in SaliencyStore.open(slice_store).attrs.items()
             if k not in ("format", "rows_per_shard", "n_rows", "grid", "status_codes")}
    attrs["fingerprint"] = {**attrs["fingerprint"], "manifest_hash": manifest.hash}
    attrs["manifest_hash"] = manifest.hash
    grid = tuple(SaliencyStore.open(slice_store).grid)
    sizes = np.stack([np.asarray(manifest.table.column("width")), np.asarray(manifest.table.column("height"))], 1)
    frames = np.concatenate([np.zeros_like(sizes), sizes], 1).astype(np.float32)   # [N, 4] the whole image
    create_store(store, keys=manifest.keys, image_sizes=sizes, frames=frames, grid=grid,
                 rows_per_shard=cfg.rows_per_store_shard, attrs=attrs)
    shutil.copyfile(manifest_path, Path(store) / MANIFEST_NAME)
    st = SaliencyStore.open(store, mode="r+")
    done = max(st.n_shards - cfg.resume_shards, 0)
    rng = np.random.default_rng(0)
    for s in range(done):
        n = len(st.shard_rows(s))
        maps = rng.random((n, *grid), dtype=np.float32) ** 4                       # peaked, like CAMs
        st.write_shard(s, maps, np.full(n, STATUS_OK, np.uint8),
                       {"run_id": SETUP_RUN_ID, "rank": 0, "seconds": 0.0, "images": n})
    return len(st) - (st.shard_rows(done).start if done < st.n_shards else len(st))


def _inspect(store: str) -> dict:
    from salmae.stages.inspect import inspect_store

    summary = inspect_store(store)
    counts = summary["status"]
    return {"store_rows": summary["rows"], "ok_rows": counts.get("ok", {}).get("count", 0),
            "zero_map_rows": counts.get("zero_map", {}).get("count", 0)}


def _stage2_dataset(pattern: str, manifest_path: str, store: str):
    from salmae.pipeline.pretrain.data import IndexedPretrainDataset, load_saliency_table
    from salmae.pipeline.data.shards import expand_shards
    from salmae.pipeline.data.manifest import load_manifest
    from salmae.pipeline.saliency.store import SaliencyStore

    manifest = load_manifest(manifest_path)
    table = load_saliency_table(manifest, SaliencyStore.open(store))
    dataset = IndexedPretrainDataset(manifest, expand_shards(pattern), img_size=MAE_IMG_SIZE, grid=MAE_GRID,
                                     saliency=table, seed=0)
    return dataset, table


def _pretrain_table(pattern: str, manifest_path: str, store: str) -> dict:
    dataset, table = _stage2_dataset(pattern, manifest_path, store)
    return {"dataset_rows": len(dataset), "saliency_ok": int(table.ok.sum()), "zero_maps": table.n_zero}


def _pretrain_loader(cfg: ScaleConfig, pattern: str, manifest_path: str, store: str) -> dict:
    """One pass of the stage-2 loader over `loader_rows` rows; seconds are the pass only."""
    from torch.utils.data import DataLoader

    from salmae.pipeline.pretrain.data import GlobalBatchSampler
    from salmae.pipeline.device import loader_generator, seed_worker
    from salmae.pipeline.pretrain.mask_plan import MaskingCollate, MaskPlan

    dataset, _ = _stage2_dataset(pattern, manifest_path, store)
    b = cfg.loader_batch
    sampler = GlobalBatchSampler(len(dataset), b, seed=0)
    plan = MaskPlan(strategy="saliency", cap=0.25)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.loader_workers, pin_memory=False,
                        persistent_workers=False, generator=loader_generator(0), worker_init_fn=seed_worker,
                        collate_fn=MaskingCollate(dataset.collate, plan, MAE_GRID, 0, b, 1, len(sampler)))
    steps = max(1, min(cfg.loader_rows // b, len(sampler)))
    parent_rss = _proc_status_mb(os.getpid(), "VmRSS")
    start = time.perf_counter()
    batches = iter(loader)                                   # the workers start here
    with ChildMemory() as workers:
        images = sum(len(next(batches)["row"]) for _ in range(steps))
        workers.sample()
    seconds = time.perf_counter() - start
    del batches
    peaks = workers.peaks()
    return {"seconds": seconds, "images": images, "images_per_s": images / seconds, "batch_size": b,
            "workers": cfg.loader_workers, "parent_rss_mb": parent_rss,
            "worker_peak_rss_mb": [p["VmHWM"] for p in peaks],
            "worker_peak_private_mb": [p["private"] for p in peaks],
            "worker_above_parent_mb": [p["VmHWM"] - parent_rss for p in peaks]}


def _knn(cfg: ScaleConfig) -> dict:
    import torch

    from salmae.pipeline.eval.knn import knn_predict

    g = torch.Generator().manual_seed(0)
    train = torch.randn(cfg.knn_train, cfg.knn_dim, generator=g)
    labels = torch.randint(cfg.knn_classes, (cfg.knn_train,), generator=g)
    measured = min(cfg.knn_val_measured, cfg.knn_val)
    val = torch.randn(measured, cfg.knn_dim, generator=g)
    start = time.perf_counter()
    scores = knn_predict(train, labels, val, cfg.knn_classes)
    seconds_measured = time.perf_counter() - start
    if scores.shape != (measured, cfg.knn_classes):
        raise SalmaeError(f"knn_predict returned scores of shape {tuple(scores.shape)}")
    return {"seconds": seconds_measured * cfg.knn_val / measured, "seconds_measured": seconds_measured,
            "val_rows_measured": measured, "val_rows": cfg.knn_val, "train_rows": cfg.knn_train,
            "dim": cfg.knn_dim, "classes": cfg.knn_classes}


# --------------------------------------------------------------------------- one process per step
def run_in_process(fn: Callable[..., dict], *args) -> dict:
    """Run `fn(*args)` in a fresh process (forked from a server that has the heavy imports done).

    Returns fn's dict with `seconds` (fn's own, unless it set them), `peak_rss_mb`, `rss_at_start_mb`
    and `children_peak_rss_mb`; or `{"error": ...}` if it raised or its process died.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    receive, send = ctx.Pipe(duplex=False)
    start_method = mp.get_start_method()    # the step's own workers start as a plain `salmae` process's would
    proc = ctx.Process(target=_measured, args=(send, fn, args, start_method), name=f"salmae-scale-{fn.__name__.strip('_')}")
    proc.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:
        proc.join()
        result = {"error": f"its process died with exit code {proc.exitcode}"
                           + (" (killed: out of memory?)" if proc.exitcode == -9 else "")}
    proc.join()
    return result


def _measured(conn, fn: Callable[..., dict], args: tuple, start_method: str) -> None:
    import logging

    mp.set_start_method(start_method, force=True)       # a forkserver child would default to forkserver
    logging.disable(logging.WARNING)                     # the stages' INFO lines would drown the bench's
    rss_start = _proc_status_mb(os.getpid(), "VmRSS")
    start = time.perf_counter()
    try:
        out = fn(*args)
        out.setdefault("seconds", time.perf_counter() - start)
        out.update(peak_rss_mb=_proc_status_mb(os.getpid(), "VmHWM"), rss_at_start_mb=rss_start,
                   children_peak_rss_mb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    except BaseException as e:                           # reported, so the other steps still run
        out = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    conn.send(out)
    conn.close()


def _proc_status_mb(pid: int, field: str) -> float:
    """A `kB` line of /proc/PID/status (VmRSS, VmHWM) in MB; 0.0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _private_mb(pid: int) -> float:
    """Private (not shared with the parent) resident memory of a process, MB (smaps_rollup)."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1])
    except OSError:
        pass
    return total / 1024


def _children(pid: int) -> list[int]:
    """Pids whose parent is `pid` (scanning /proc: no psutil)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()    # after the command name: state, ppid, ...
        except OSError:
            continue
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry))
    return found


class ChildMemory:
    """Samples the peak RSS (VmHWM) and private memory of this process's children in a thread.

    Used around a DataLoader pass: its workers are this process's children while they live.
    """

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self._peak: dict[int, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "ChildMemory":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        for pid in _children(os.getpid()):
            hwm, private = _proc_status_mb(pid, "VmHWM"), _private_mb(pid)
            peak = self._peak.setdefault(pid, {"VmHWM": 0.0, "private": 0.0})
            peak["VmHWM"], peak["private"] = max(peak["VmHWM"], hwm), max(peak["private"], private)

    def peaks(self) -> list[dict[str, float]]:
        """Per child seen (in pid order): its largest VmHWM and private memory, MB."""
        return [self._peak[pid] for pid in sorted(self._peak)]


# --------------------------------------------------------------------------- table
def _extrapolated(seconds: float, rows: int) -> float:
    return seconds * TARGET_ROWS / rows


def rows(summary: dict[str, Any]):
    """The table: one row per step, then the largest peak RSS and the largest loader worker."""
    from salmae.stages.bench.report import Row, judge

    n, steps = summary["rows"], summary["steps"]
    full = n >= TARGET_ROWS
    out = []
    for name in STEPS:
        st = steps.get(name, {"error": "not run"})
        rate = name in ("saliency_slice", "pretrain_loader")
        target, verdict = "—", "—"
        if name in TIME_TARGETS_S:
            target = f"≤ {TIME_TARGETS_S[name]:.0f} s" + ("" if full else " at 3.3 M rows")
        if "error" in st:
            out.append(Row("scale", _FIGURES[name], "failed", target, "MISS" if target != "—" else "—",
                           st["error"].splitlines()[0], id=f"scale.{name}_{'images_per_s' if rate else 'seconds'}"))
            continue
        if name in TIME_TARGETS_S:
            verdict = judge(st["seconds"], f"≤ {TIME_TARGETS_S[name]}") if full else "— (N < 3.3 M)"
        value, number, unit = ((f"{st['images_per_s']:.0f} img/s", st["images_per_s"], "img/s") if rate
                               else (f"{st['seconds']:.1f} s", st["seconds"], "s"))
        detail = _detail(name, st, n)
        if name in TIME_TARGETS_S and not full:
            fixed = st.get("compute_seconds", 0.0)      # the pending shards' work does not grow with N
            what = "start-up linear in rows, the pending shards' work fixed" if "compute_seconds" in st else "linear in rows"
            detail += f"; {what}: ≈ {fixed + _extrapolated(st['seconds'] - fixed, n):.0f} s at 3.3 M"
        out.append(Row("scale", _FIGURES[name], value, target, verdict, detail,
                       id=f"scale.{name}_{'images_per_s' if rate else 'seconds'}", number=number, unit=unit))
    measured = {k: v for k, v in steps.items() if "peak_rss_mb" in v}
    if measured:
        worst = max(measured, key=lambda k: max(measured[k]["peak_rss_mb"], measured[k]["children_peak_rss_mb"]))
        peak = max(measured[worst]["peak_rss_mb"], measured[worst]["children_peak_rss_mb"])
        out.append(Row("scale", "peak RSS of any step (or its workers)", f"{peak:.0f} MB",
                       f"≤ {PEAK_RSS_TARGET_MB:.0f} MB", judge(peak, f"≤ {PEAK_RSS_TARGET_MB}"),
                       f"in {worst}; " + ", ".join(f"{k} {v['peak_rss_mb']:.0f}" for k, v in measured.items()),
                       id="scale.peak_rss_mb", number=peak, unit="MB"))
    loader = steps.get("pretrain_loader", {})
    if loader.get("worker_above_parent_mb"):
        above = max(loader["worker_above_parent_mb"])
        out.append(Row("scale", "stage-2 loader worker, peak RSS above its parent", f"{above:.0f} MB",
                       f"≤ {WORKER_TARGET_MB:.0f} MB", judge(above, f"≤ {WORKER_TARGET_MB}"),
                       f"parent {loader['parent_rss_mb']:.0f} MB when the workers started; workers' peak RSS "
                       + ", ".join(f"{x:.0f}" for x in loader["worker_peak_rss_mb"]) + " MB, private "
                       + ", ".join(f"{x:.0f}" for x in loader["worker_peak_private_mb"]) + " MB",
                       id="scale.loader_worker_above_parent_mb", number=above, unit="MB"))
    return out


_FIGURES = {"generate": "generate the data", "manifest": "manifest, first build",
            "saliency_slice": "stage 1 on a slice (micro CLIP)", "saliency_resume": "stage 1 resume on a finished store",
            "inspect": "inspect the whole store", "pretrain_table": "stage-2 dataset with the saliency table",
            "pretrain_loader": "stage-2 loader, one pass over a slice", "knn": "kNN at ImageNet's shape"}


def _detail(name: str, st: dict, n: int) -> str:
    mem = f"peak RSS {st['peak_rss_mb']:.0f} MB (at start {st['rss_at_start_mb']:.0f})"
    if st.get("children_peak_rss_mb"):
        mem += f", children {st['children_peak_rss_mb']:.0f} MB"
    what = {
        "generate": lambda: f"{n} rows, {st['shards']} shards, {st['bytes'] / 1e9:.2f} GB, {n / st['seconds']:.0f} rows/s",
        "manifest": lambda: f"{st['manifest_rows']} rows",
        "saliency_slice": lambda: f"{st['images']} images, grid {st['grid'][0]}×{st['grid'][1]}, {st['seconds']:.1f} s",
        "saliency_resume": lambda: (f"{st['rows_computed']} rows left in the last of {st['store_shards']} shards, "
                                    f"computed in {st['compute_seconds']:.1f} s, the rest start-up "
                                    f"{st['start_up_seconds']:.1f} s; store set-up (untimed) {st['setup_seconds']:.0f} s"),
        "inspect": lambda: f"{st['store_rows']} rows, {st['ok_rows']} ok",
        "pretrain_table": lambda: f"{st['dataset_rows']} usable rows, {st['saliency_ok']} with saliency",
        "pretrain_loader": lambda: (f"{st['images']} images, batch {st['batch_size']}, {st['workers']} workers, "
                                    f"saliency masks in the workers, {st['seconds']:.1f} s"),
        "knn": lambda: (f"{st['train_rows']} train × {st['val_rows']} val, dim {st['dim']}, {st['classes']} classes; "
                        f"{st['val_rows_measured']} val rows timed ({st['seconds_measured']:.1f} s), scaled linearly"),
    }[name]()
    return f"{what}; {mem}"


def render(summary: dict[str, Any]) -> str:
    """The `scale-N` block's text: what ran, where, then the table."""
    from salmae.stages.bench.report import markdown_table

    m = summary["machine"]
    lines = [f"## Scale rehearsal — {summary['rows']:,} rows", "",
             f"Measured {summary['date']} by `{summary['command']}`; one run of each step, each in its own process "
             f"(peak RSS is that process's VmHWM, imports included). {m.get('CPU')}, {m.get('cores')} cores, "
             f"torch {m.get('torch')}. Shards of {summary['shard_size']:,}, 32-px JPEGs. Time targets are for "
             f"3.3 M rows."]
    if summary["quick"]:
        lines.append("\n**QUICK run (SALMAE_BENCH_QUICK): reduced slice, loader and kNN sizes — smoke test only**")
    return "\n".join(lines) + "\n\n" + markdown_table(rows(summary), value_header="Value (one run)")
