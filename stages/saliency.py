"""Stage 1: CLIP + Grad-CAM saliency for every sample of caption shards, into a Zarr store.

Work is split by Zarr shard (`rows_per_shard` manifest rows): under torchrun rank 0 lists the
job's shards not yet done and each rank computes an equal contiguous block of that list
(`deal_todo`: a contiguous run of tars; after a resume no rank sits idle), and `--set shards=LO:HI`
splits a store across separate jobs; batches are formed inside a shard in row order and never
span two tars, so the numbers do not depend on the world size. A shard's completion marker is written after its rows, so a rerun
of the same command skips finished shards and ends with the same bytes as an uninterrupted run.
Ranks wait for rank 0's store and for each other's last shards with `dist.wait_for_all`, which
has no 30-minute limit and logs while it waits.

The device never waits for the host: loader workers decode, resize and tokenize, images cross as
uint8 (pinned on CUDA) and are normalised on the device, caption padding is cut on the host,
each batch's maps are copied back while the next batch runs (`_MapsToHost`), and a finished
shard is compressed, written and fsynced by a writer thread while the next batches run (`_ShardWriter`).

Safety (issue 12). Rank 0 holds a writer lock on the store for the job's shard range
(`pipeline/store_lock.py`: disjoint `--set shards=LO:HI` jobs share a store, overlapping ones
are refused; creating or `--overwrite`-replacing a store needs it to itself). A store is created
in steps (arrays, then its manifest and config moved in, then its fingerprint), so a run killed
in between leaves a store marked `creating` that the next run recreates, never accepts. A full
disk ends in one line naming the file and the free space; finished shards stay. Images with more
than `max_pixels` pixels (by their header) are never decoded: status `too_large`. JPEGs are
decoded at the smallest scale that still covers CLIP's input (PIL `draft`). The report,
`saliency_report.json`, is written inside the store and names the shard of every failure.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import queue
import shutil
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline import __version__, dist
from pipeline.config import save_config
from pipeline.data.transforms import normalise, pixel_stats
from pipeline.device import autocast, default_workers, pick_device, pin_memory, resolve_precision
from pipeline.errors import SalmaeError
from pipeline.files import atomic_path, atomic_write_json, disk_full_as_error, fsync_paths, pid_alive
from pipeline.gradcam import (CAM_METHODS, DEFAULT_LAYER, cam_normalisation, check_layer, compile_around_layer,
                              compute_cam, encode_captions, resolve_layer, trim_caption_padding)
from pipeline.host_syncs import no_host_syncs
from pipeline.logging import get_logger, setup_logging
from pipeline.models.clip import load_clip
from pipeline.store import CREATING, DONE_DIR, READABLE_FORMATS
from pipeline.store import FORMAT as STORE_FORMAT
from pipeline.store import (STATUS_CODES, STATUS_OK, CODE_OF, SaliencyStore, create_store, finish_store, read_attrs,
                            status_code)
from pipeline.store_lock import ShardRange, StoreLock

MANIFEST_NAME = "manifest.parquet"
REPORT_NAME = "saliency_report.json"
FRAME_CONVENTION = "whole image resized (squashed, aspect not kept) to input_size; frame = [0, 0, W, H]"
DEFAULT_MAX_PIXELS = 64_000_000
# fingerprint keys added after stores existed: a store without one was made with this value
FINGERPRINT_DEFAULTS = {"max_pixels": DEFAULT_MAX_PIXELS}


@dataclasses.dataclass
class SaliencyConfig:
    data: str | None = None           # caption shards: brace pattern, paths or pipe: URLs (optional on a rerun)
    out: Path = Path("runs/saliency/store.zarr")  # the Zarr store; saliency_report.json goes inside it
    manifest: Path | None = None      # use this manifest instead of building one from `data`
    clip_model: str = "ViT-B-16"      # open_clip config name (salmae-tiny for the offline CLIP)
    clip_pretrained: str = "laion2b_s34b_b88k"  # open_clip tag (needs network/cache), a checkpoint FILE, or 'none'
    cam: str = "gradcam"              # gradcam, hirescam = fast path; library methods: gradcam++, layercam, ...
    layer: str = DEFAULT_LAYER        # CAM layer, dotted path under model.visual (default: last block's ln_1)
    batch_size: int | None = None     # images per forward/backward; None: 256 on CUDA, 64 on CPU
    workers: int | None = None        # DataLoader worker processes (decode, resize, tokenize); None: the CPUs
                                      # per local process less one, 1..10 (pipeline.device.default_workers)
    device: str = "auto"              # auto | cpu | cuda
    precision: str = "auto"           # autocast: auto (bf16 GPU, fp16 older GPU, fp32 CPU) | bf16 | fp16 | fp32
    compile: bool = False             # torch.compile the visual tower around the CAM layer (fast and library CAMs)
    overwrite: bool = False           # replace a store made with another config or other data
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
    if dist.is_main():
        lock.acquire()
    try:
        return _run_locked(cfg, out, device, lock)
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
            _prepare_store(cfg, out, record, layer_path, info, provenance, lock)
    dist.wait_for_all(f"rank 0 to create or check the store {out} (and build its manifest)")
    log = setup_logging(out)
    store = SaliencyStore.open(out, mode="r+")
    manifest = _load_manifest(out / MANIFEST_NAME)
    started = time.time()
    run_id = f"{started:.6f}"
    job = job_shards(cfg.shards, store.n_shards)
    # rank 0 lists the shards still to do before any rank can write a marker; all deal the same list
    left = dist.broadcast_object([s for s in job if not store.is_done(s)] if dist.is_main() else None)
    todo = deal_todo(left, dist.world_size(), dist.rank())
    log.info("stage 1: %d rows in %d shards, %d left, %d to do on this rank (world %d); model %s/%s, cam %s at %s; "
             "batch %d, %s on %s%s", len(store), store.n_shards, len(left), len(todo), dist.world_size(),
             cfg.clip_model, record["clip_pretrained"], cfg.cam, layer_path, cfg.batch_size, cfg.precision,
             device.type, ", compiled" if cfg.compile else "")
    n_images, steady = _compute_shards(cfg, store, manifest, todo, model, info, tokenizer, layer, device, run_id,
                                       provenance)
    dist.wait_for_all("every rank to finish its shards")
    summary = _summarise(store, manifest, out, started, run_id, steady, provenance) if dist.is_main() else {}
    dist.wait_for_all("rank 0 to write the report")
    return summary


def parse_shards(spec: str, n_shards: int | None = None) -> ShardRange:
    """`--set shards=LO:HI` -> ShardRange (HI None when omitted); SalmaeError naming the spec if malformed."""
    of = f"; the store has {n_shards} shards" if n_shards is not None else ""
    if not spec:
        return ShardRange()
    try:
        lo_text, hi_text = spec.split(":")
        lo, hi = int(lo_text or 0), int(hi_text) if hi_text else None
    except ValueError:
        raise SalmaeError(f"--set shards={spec!r} is not LO:HI (e.g. 0:160){of}") from None
    if not 0 <= lo <= (hi if hi is not None else lo):
        raise SalmaeError(f"--set shards={spec!r} needs 0 <= LO <= HI{of}")
    return ShardRange(lo, hi)


def job_shards(spec: str, n_shards: int) -> range:
    """The Zarr shards this job computes: all, or `LO:HI` (HI may be omitted; clipped to the store)."""
    shards = parse_shards(spec, n_shards)
    hi = n_shards if shards.hi is None else shards.hi
    return range(min(shards.lo, n_shards), min(hi, n_shards))


def deal_todo(todo: Sequence[int], world: int, rank: int) -> list[int]:
    """Rank `rank`'s share of `todo`, the job's shards still to do in order: a contiguous slice, and
    the `world` slices differ in length by at most one.

    Dealing what is left, not the whole job, keeps every rank busy to the end after a resume
    (dealt statically, a 16-rank resume of an 8-rank run killed at 50% gave work
    [0, 202, 0, 202, ...]: half the ranks idle, the rest working twice as long). Contiguous
    because rows are in manifest order (shard by shard), so a run of Zarr shards is a contiguous
    run of tars: no tar is read by more than the two ranks that share its ends, where round-robin
    dealing made every rank open every tar.
    """
    n = len(todo)
    return list(todo[n * rank // world:n * (rank + 1) // world])


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


# ---------------------------------------------------------------------------- store set-up (rank 0)
def _prepare_store(cfg: SaliencyConfig, out: Path, record: dict, layer_path: str, info, provenance: dict,
                   lock: StoreLock) -> None:
    """Create the store, or check that an existing one was made by the same config, data and provenance."""
    _remove_dead_staging(out)
    state = _store_state(out)
    if state != "ready":
        lock.require_sole_holder("creating it")
    if state == "unfinished":
        get_logger().warning("store %s was left unfinished by a stopped run: recreating it", out)
        (out / MANIFEST_NAME).unlink(missing_ok=True)        # may be empty or half-written
    manifest, manifest_file = _resolve_manifest(cfg, out)
    try:
        _create_or_check(cfg, out, record, layer_path, info, manifest, manifest_file, provenance, state, lock)
    finally:
        for staging in (_staging_path(out, "build"), _staging_path(out, "manifest")):
            staging.unlink(missing_ok=True)


def _store_state(out: Path) -> str:
    """'absent', 'unfinished' (a run stopped while creating it: safe to recreate) or 'ready'.

    Unfinished: marked `creating`, or (stores made before that mark) without a usable manifest and with
    no finished shard. A store with finished shards but no manifest is the user's to mend.
    """
    if not (out / "zarr.json").is_file():
        return "absent"
    attrs = read_attrs(out)
    if attrs is None or attrs.get("format") not in READABLE_FORMATS:
        attrs = SaliencyStore.open(out).attrs               # raises the reader's one-line explanation
    if attrs.get(CREATING):
        return "unfinished"
    manifest = out / MANIFEST_NAME
    if manifest.is_file() and manifest.stat().st_size > 0:
        return "ready"
    done = list((out / DONE_DIR).glob("*.json"))
    if not done:
        return "unfinished"
    raise SalmaeError(f"store {out} has {len(done)} finished shards but no usable {MANIFEST_NAME}; rebuild it with "
                      f"`salmae manifest build 'SHARDS' -o {out / MANIFEST_NAME}` or pass --overwrite")


def _staging_path(out: Path, what: str) -> Path:
    """This process's staging file beside the store (named by host and PID: jobs never share one)."""
    return out.with_name(f".{out.name}.{what}-{socket.gethostname()}-{os.getpid()}.parquet")


def _remove_dead_staging(out: Path) -> None:
    """Delete staging files left beside the store by killed runs on this host (and by older versions,
    whose names carry no PID): a half-written one must never be read, nor pile up."""
    host = socket.gethostname()
    for path in out.parent.glob(f".{out.name}.*.parquet"):
        stem = path.name[len(f".{out.name}."):-len(".parquet")]          # build | manifest | build-HOST-PID
        what, _, owner = stem.partition("-")
        if what not in ("build", "manifest"):
            continue
        owner_host, _, pid = owner.rpartition("-")
        if not owner or (owner_host == host and pid.isdigit() and not pid_alive(int(pid))):
            path.unlink(missing_ok=True)


def _create_or_check(cfg, out: Path, record: dict, layer_path: str, info, manifest, manifest_file,
                     provenance: dict, state: str, lock: StoreLock) -> None:
    fingerprint = {"clip_model": record["clip_model"], "clip_pretrained": record["clip_pretrained"],
                   "pretrained_sha256": record["pretrained_sha256"], "cam": cfg.cam, "layer": layer_path,
                   "input_size": record["input_size"], "manifest_hash": manifest.hash,
                   "rows_per_shard": cfg.rows_per_shard, "max_pixels": cfg.max_pixels}
    if state == "ready":
        attrs = SaliencyStore.open(out).attrs
        existing = {**FINGERPRINT_DEFAULTS, **attrs.get("fingerprint", {})}
        if attrs.get("format") != STORE_FORMAT and not cfg.overwrite:
            raise SalmaeError(f"store {out} has the older format {attrs.get('format')} (maps without a scale); "
                              "pass --overwrite to recompute it, or choose another --out")
        if existing == fingerprint:
            _check_provenance(cfg, out, attrs.get("provenance") or {}, provenance)
            return
        if not cfg.overwrite:
            changed = sorted(k for k in fingerprint if existing.get(k) != fingerprint[k])
            what = ", ".join(f"{k}: {existing.get(k)!r} -> {fingerprint[k]!r}" for k in changed)
            raise SalmaeError(f"store {out} was made with another config or data ({what}); "
                              "pass --overwrite to recompute it, or choose another --out")
        lock.require_sole_holder("replacing it (--overwrite)")
    if manifest_file is None or not Path(manifest_file).is_file():
        raise SalmaeError(f"no manifest for store {out}; pass --data SHARDS (or --manifest FILE)")
    widths = np.asarray(manifest.column("width"), dtype=np.int32)
    heights = np.asarray(manifest.column("height"), dtype=np.int32)
    sizes = np.stack([widths, heights], axis=1)                        # [N, 2] (W, H)
    frames = np.concatenate([np.zeros_like(sizes), sizes], 1).astype(np.float32)  # [N, 4] whole image
    attrs = {**record, "cam": cfg.cam, "layer": layer_path,
             "input_size": record["input_size"], "frame": FRAME_CONVENTION, "manifest_hash": manifest.hash,
             "salmae_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "normalisation": cam_normalisation(cfg.cam), "provenance": provenance, "max_pixels": cfg.max_pixels,
             "target": "cosine similarity of the image embedding to its own caption's text embedding"}
    staged = _staging_path(out, "manifest")
    with atomic_path(staged) as tmp:                                   # survives create_store's clearing of `out`
        shutil.copyfile(manifest_file, tmp)
        fsync_paths([tmp])
    create_store(out, keys=manifest.keys, image_sizes=sizes, frames=frames, grid=info.grid,
                 rows_per_shard=cfg.rows_per_shard, attrs=attrs, finished=False)
    staged.replace(out / MANIFEST_NAME)
    save_config(cfg, out / "config.yaml")
    fsync_paths([out / MANIFEST_NAME, out / "config.yaml"])
    finish_store(out, {"fingerprint": fingerprint})                    # last: only now is the store accepted


def _check_provenance(cfg: SaliencyConfig, out: Path, begun: dict, now: dict) -> None:
    """Refuse to resume with another device, precision, batch, seed or library versions, unless
    `allow_mixed`; then the mix is recorded in the store's attrs (`mixed_runs`)."""
    differs = {k: [begun.get(k), now[k]] for k in now if begun.get(k) != now[k]}
    store = SaliencyStore.open(out)
    if not differs or len(store.done_markers()) == store.n_shards:   # nothing left to compute: nothing to mix
        return
    what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in differs.items())
    if not cfg.allow_mixed:
        raise SalmaeError(f"store {out} was begun with precision {begun.get('precision')} on {begun.get('device')}; "
                          f"this run uses {now['precision']} on {now['device']} ({what}): finish it with the same "
                          "settings, pass --set allow_mixed=true to mix them (recorded in the store), or --overwrite")
    store = SaliencyStore.open(out, mode="r+")
    mixed = list(store.attrs.get("mixed_runs", [])) + [{"provenance": now, "differs": differs,
                                                         "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]
    store.update_attrs({"allow_mixed": True, "mixed_runs": mixed})
    get_logger().warning("store %s: resuming with %s (allow_mixed; recorded in its attrs)", out, what)


def _resolve_manifest(cfg: SaliencyConfig, out: Path):
    """The manifest this run describes, and a file holding it (None if it must still be written)."""
    from pipeline.manifest import build_manifest, load_manifest, stale_reason, verify_manifest

    if cfg.manifest is not None:
        manifest = _load_manifest(cfg.manifest)
        if cfg.data:
            why = stale_reason(manifest, cfg.data)       # O(shards): sizes and times, no shard read
            if why is not None and manifest.shard_stats is None:  # an older manifest: read the shards
                report = verify_manifest(cfg.manifest, cfg.data)
                why = None if report.ok else report.describe().splitlines()[0]
            if why is not None:
                raise SalmaeError(f"manifest {cfg.manifest} does not match --data ({why}); "
                                  f"rebuild it with `salmae manifest build '{cfg.data}' -o {cfg.manifest}`")
        return manifest, cfg.manifest
    stored = out / MANIFEST_NAME
    if cfg.data and stored.is_file():
        manifest = load_manifest(stored)
        if stale_reason(manifest, cfg.data) is None:     # a restart: trust the store's own manifest
            return manifest, stored
    if cfg.data:
        staging = _staging_path(out, "build")
        manifest = build_manifest(cfg.data, staging)
        if stored.is_file() and load_manifest(stored).hash != manifest.hash and not cfg.overwrite:
            staging.unlink()
            raise SalmaeError(f"store {out} was built from other data (manifest hash differs from --data {cfg.data}); "
                              "pass --overwrite to recompute, or point --data at the original shards")
        return manifest, staging
    if stored.is_file():
        return load_manifest(stored), stored
    raise SalmaeError(f"store {out} does not exist yet; pass --data SHARDS (or --manifest FILE) to create it")


def _load_manifest(path: Path):
    from pipeline.manifest import load_manifest

    if not Path(path).is_file():
        raise SalmaeError(f"manifest {path} not found; build one with `salmae manifest build SHARDS -o {path}`")
    return load_manifest(path)


# ---------------------------------------------------------------------------- data loading
class _RowImages(Dataset):
    """Manifest row -> (row, image uint8 [3, H, W] or None, caption tokens [T] or None, damage reason or None).

    Workers decode, resize and tokenize; images cross to the device as bytes and are normalised
    there. Local tars are read by byte offset (random access); streamed shards (pipe: URLs) are
    read whole once per worker and cached by key.
    """

    def __init__(self, rows: dict[int, tuple[str, str, int, int, str]], info, tokenizer, max_pixels: int):
        self.rows = rows                      # row -> (key, shard url, image offset, image bytes, caption)
        self.size_wh = (info.input_size[1], info.input_size[0])
        self.max_pixels = max_pixels          # refuse (too_large) before decoding, whatever the manifest said
        self.tokenizer = tokenizer            # open_clip's tokenizers are plain picklable objects
        self._cached_url: str | None = None
        self._cache: dict[str, bytes | None] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, row: int):
        from pipeline.data.shards import DamagedSampleError, decode_image

        key, url, offset, nbytes, caption = self.rows[row]
        try:
            image = decode_image(self._image_bytes(key, url, offset, nbytes), key, max_pixels=self.max_pixels,
                                 draft_size=self.size_wh)
        except DamagedSampleError as e:
            return row, None, None, e.reason
        image = image.resize(self.size_wh, Image.BICUBIC)    # squash the whole image into the CLIP input
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)   # [3, H, W]
        return row, pixels, self.tokenizer([caption])[0], None

    def _image_bytes(self, key: str, url: str, offset: int, nbytes: int) -> bytes:
        from pipeline.data.shards import DamagedSampleError, iter_shard, read_member

        if _is_local_tar(url) and offset >= 0:
            return read_member(url, offset, nbytes)
        if url != self._cached_url:
            self._cache = {s.key: s.image_bytes for s in iter_shard(url, decode=False)}
            self._cached_url = url
        data = self._cache.get(key)
        if data is None:
            raise DamagedSampleError("missing_image", key)
        return data


def deal_tars_to_workers(batch_tars: list[str], workers: int) -> list[int]:
    """Order batches so that a DataLoader (batch i -> worker i % workers) gives each tar to one worker.

    A streamed tar (`pipe:`) can only be read whole, so a worker that needs one row of it reads
    all of it: dealt round-robin, every worker would read every tar. Tars go, in order, to the
    worker with the fewest batches so far; if a worker's queue runs dry first, another's tail
    batch takes its turn (that tar is then read by two workers). Local tars are read by byte
    range and need none of this. Returns a permutation of range(len(batch_tars)).
    """
    queues: list[list[int]] = [[] for _ in range(workers)]
    owner: dict[str, int] = {}
    for i, tar in enumerate(batch_tars):
        if tar not in owner:
            owner[tar] = min(range(workers), key=lambda w: len(queues[w]))
        queues[owner[tar]].append(i)
    order: list[int] = []
    for turn in range(len(batch_tars)):
        queue = queues[turn % workers] or max(queues, key=len)
        order.append(queue.pop(0))
    return order


def _is_local_tar(url: str) -> bool:
    return not url.startswith("pipe:") and ("://" not in url or url.startswith("file://"))


def _collate(items):
    """-> rows, images uint8 [n, 3, H, W] | None, tokens [n, T'] | None (padding after the longest cut), errors."""
    rows = [r for r, _, _, _ in items]
    errors = [e for _, _, _, e in items]
    good = [(x, t) for _, x, t, _ in items if x is not None]
    if not good:
        return rows, None, None, errors
    tokens = trim_caption_padding(torch.stack([t for _, t in good])).contiguous()  # contiguous: pinned whole
    return rows, torch.stack([x for x, _ in good]), tokens, errors


class _MapsToHost:
    """Maps [n, gh, gw] on their way from the device to host memory; read them one batch later.

    On CUDA the host buffer is pinned and the copy is queued behind the CAM kernels without
    waiting (`non_blocking`), and an event marks its end: the loop launches the next batch before
    `numpy()` waits on the event, so the GPU is never idle waiting for the host. On the CPU the
    same lines make a plain copy and there is no event; the pinned buffer, the asynchronous copy
    and the event wait are the part only CUDA exercises.
    """

    def __init__(self, maps: torch.Tensor):
        cuda = maps.device.type == "cuda"
        self.host = torch.empty(maps.shape, dtype=torch.float32, pin_memory=cuda)
        self.host.copy_(maps.float(), non_blocking=cuda)
        self.ready = torch.cuda.Event() if cuda else None
        if self.ready is not None:
            self.ready.record()

    def numpy(self) -> np.ndarray:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.numpy()


def _shard_urls(cfg: SaliencyConfig, manifest) -> dict[str, str]:
    from pipeline.data.shards import expand_shards, shard_name

    urls = expand_shards(cfg.data) if cfg.data else list(manifest.shard_urls)
    return {shard_name(u): u for u in urls}


# ---------------------------------------------------------------------------- compute
def _compute_shards(cfg, store: SaliencyStore, manifest, todo: list[int], model, info, tokenizer, layer,
                    device, run_id: str, provenance: dict) -> tuple[int, dict[str, float]]:
    """Compute and write every shard in `todo`; returns the number of images run through CLIP and this
    rank's steady state {images, seconds}: from the first batch's maps on the host to the last's (the
    first batch holds loader start-up and CUDA warm-up; shard writes overlap it in their thread)."""
    from tqdm import tqdm

    urls = _shard_urls(cfg, manifest)
    keys, shards, captions = manifest.keys, manifest.column("shard"), manifest.column("caption")
    offsets, nbytes, statuses = manifest.column("image_offset"), manifest.column("image_nbytes"), manifest.status
    image_pixels = manifest.column("width").astype(np.int64) * manifest.column("height").astype(np.int64)  # [N]
    plans: dict[int, dict[str, Any]] = {}
    batches, batch_shard, rows_info = [], [], {}
    for s in todo:
        rows = store.shard_rows(s)
        status = np.array([status_code(statuses[r]) for r in rows], dtype=np.uint8)
        for i, r in enumerate(rows):
            if status[i] == STATUS_OK and not (captions[r] or "").strip():
                status[i] = CODE_OF["empty_caption"]
            if status[i] == STATUS_OK and image_pixels[r] > cfg.max_pixels:     # by the header: never read nor decoded
                status[i] = CODE_OF["too_large"]
        ok_rows = [r for i, r in enumerate(rows) if status[i] == STATUS_OK]
        missing = sorted({shards[r] for r in ok_rows} - set(urls))
        if missing:
            raise SalmaeError(f"shard {missing[0]} of the store's manifest is not in --data; pass the original shards")
        for r in ok_rows:
            rows_info[r] = (keys[r], urls[shards[r]], int(offsets[r]), int(nbytes[r]), captions[r])
        bs = []  # a batch never spans two tars (maps do not depend on the batch: test_batch_size_changes_no_map)
        for _, group in itertools.groupby(ok_rows, key=lambda r: shards[r]):
            group = list(group)
            bs += [group[i:i + cfg.batch_size] for i in range(0, len(group), cfg.batch_size)]
        plans[s] = {"saliency": np.zeros((len(rows), *store.grid), np.float32), "status": status,
                    "left": len(bs), "started": None}
        batches += bs
        batch_shard += [s] * len(bs)
    if cfg.workers > 1 and not all(_is_local_tar(u) for u in urls.values()):
        order = deal_tars_to_workers([shards[b[0]] for b in batches], cfg.workers)
        batches, batch_shard = [batches[i] for i in order], [batch_shard[i] for i in order]
    loader = DataLoader(_RowImages(rows_info, info, tokenizer, cfg.max_pixels), batch_sampler=batches, num_workers=cfg.workers,
                        collate_fn=_collate, pin_memory=pin_memory(device),
                        persistent_workers=False, multiprocessing_context="fork" if cfg.workers else None)
    loaded = iter(loader) if batches else iter(())  # forks the workers: before the writer's thread exists
    with _ShardWriter(store, run_id, provenance) as writer:
        for s in todo:
            if plans[s]["left"] == 0:
                writer.submit(s, plans.pop(s))
        if not batches:
            return 0, {"images": 0, "seconds": 0.0}
        cam_fn = compute_cam(cfg.cam)
        bar = tqdm(total=len(rows_info), unit="img", disable=not dist.is_main(), dynamic_ncols=True, desc="saliency")
        n_images, steady_from = 0, None               # steady state: from the first batch's maps on the host
        stats = pixel_stats(device, info.mean, info.std)   # once: a batch makes no tensor from Python lists
        in_flight: tuple | None = None             # the previous batch, its maps still on their way to the host
        for step, ((rows, images, tokens, errors), s) in enumerate(zip(loaded, batch_shard)):
            plan = plans[s]
            plan["started"] = plan["started"] or time.time()
            lo = store.shard_rows(s).start
            for r, e in zip(rows, errors):
                if e is not None:
                    plan["status"][r - lo] = status_code(e)
            maps = None
            if images is not None:
                with no_host_syncs(device, cfg.check_syncs, f"stage 1 batch {step}"):
                    pixels = normalise(images.to(device, non_blocking=True), stats)   # [n, 3, H, W] float32
                    with autocast(device, cfg.precision):
                        text_emb = encode_captions(model, tokens, trimmed=True)   # the loader cut the padding
                        cams = cam_fn(model, pixels, text_emb, layer, info.grid)   # [n, gh, gw] on the device
                maps = _MapsToHost(cams)
            if in_flight is not None:
                n_images += _store_maps(store, plans, writer, *in_flight)
                if steady_from is None:
                    steady_from = (n_images, time.perf_counter())
            in_flight = (s, [r for r, e in zip(rows, errors) if e is None], maps)
            bar.update(len(rows))
        if in_flight is not None:
            n_images += _store_maps(store, plans, writer, *in_flight)
        bar.close()
        first_images, first_done = steady_from or (n_images, time.perf_counter())
        steady = {"images": n_images - first_images, "seconds": time.perf_counter() - first_done}
    return n_images, steady


def _store_maps(store: SaliencyStore, plans: dict[int, dict], writer: _ShardWriter, shard: int, good: list[int],
                maps: _MapsToHost | None) -> int:
    """Put one batch's maps into its shard's plan (handing the shard to the writer when it is complete); -> images."""
    plan = plans[shard]
    lo = store.shard_rows(shard).start
    if maps is not None:
        for r, cam in zip(good, maps.numpy()):                  # [gh, gw] float32 each
            finite = bool(np.isfinite(cam).all())
            plan["saliency"][r - lo] = cam if finite else 0
            plan["status"][r - lo] = (CODE_OF["nonfinite_map"] if not finite
                                      else CODE_OF["zero_map"] if not cam.max() > 0 else STATUS_OK)
    plan["left"] -= 1
    if plan["left"] == 0:
        writer.submit(shard, plans.pop(shard))
    return len(good) if maps is not None else 0


class _ShardWriter:
    """Writes finished shards (`SaliencyStore.write_shard`: compress, write, fsync, then the marker)
    on a thread of its own, in the order submitted, while the batch loop goes on launching CAM
    batches: written on the main thread, every shard's compression and fsyncs left the device idle.

    At most `depth` shards wait in the queue (bounded host memory; the loop waits when the disk is
    slower than the device). The first error (a full disk: one SalmaeError line) ends the writing:
    shards queued after it are dropped, unmarked, for a rerun to compute, and the error itself is
    raised on the main thread by the next `submit` or by `close`. As a context manager, leaving the
    block writes what is queued (on an exception too: those shards are complete) and joins the
    thread. The thread starts on the first `submit`, after the DataLoader has forked its workers.
    """

    def __init__(self, store: SaliencyStore, run_id: str, provenance: dict, depth: int = 2):
        self.store, self.run_id, self.provenance = store, run_id, provenance
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None       # the writer's first error; it writes nothing after it
        self._error_raised = False

    def __enter__(self) -> "_ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(raise_error=exc_type is None)     # an exception already on its way keeps precedence

    def submit(self, shard: int, plan: dict) -> None:
        """Queue a finished shard (its plan's maps and statuses are the writer's from now on)."""
        self._raise_error()
        status = plan["status"]
        seconds = time.time() - plan["started"] if plan["started"] else 0.0
        marker = {"run_id": self.run_id, "rank": dist.rank(), "seconds": round(seconds, 3),
                  "images": int(np.isin(status, [STATUS_OK, CODE_OF["nonfinite_map"], CODE_OF["zero_map"]]).sum()),
                  **{k: self.provenance[k] for k in ("device", "precision", "batch_size", "compile")}}
        if self._thread is None:
            self._thread = threading.Thread(target=self._write_queued, name="salmae-shard-writer", daemon=True)
            self._thread.start()
        self._queue.put((shard, plan["saliency"], status, marker))

    def close(self, raise_error: bool = True) -> None:
        """Write what is queued, join the thread, then raise the writer's error (unless `raise_error` is False)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if raise_error:
            self._raise_error()
        elif self._error is not None and not self._error_raised:
            get_logger().error("writing shards failed too: %s", self._error)

    def _raise_error(self) -> None:
        if self._error is not None and not self._error_raised:
            self._error_raised = True
            raise self._error

    def _write_queued(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue                               # dropped: unmarked, so a rerun computes it
            shard, saliency, status, marker = item
            try:
                with disk_full_as_error(self.store.shard_files(shard)[0],
                                        f"shard {shard} is not marked done, finished shards are kept"):
                    self.store.write_shard(shard, saliency, status, marker)
            except BaseException as e:                 # surfaces on the main thread
                self._error = e


# ---------------------------------------------------------------------------- report (rank 0)
def _summarise(store: SaliencyStore, manifest, out: Path, started: float, run_id: str, steady: dict[str, float],
               provenance: dict) -> dict[str, Any]:
    status = store.status
    keys = store.keys
    counts = {STATUS_CODES[int(c)]: int(n) for c, n in zip(*np.unique(status, return_counts=True))}
    failures = _failures(store, manifest, status, keys)
    markers = store.done_markers()
    seconds = time.time() - started
    this_run = sum(m.get("images", 0) for m in markers.values() if m.get("run_id") == run_id)
    nbytes = store.array_nbytes("saliency") + store.array_nbytes("scale")
    summary = {
        "store": str(out), "rows": len(store), "grid": list(store.grid), "counts": counts,
        "damaged": len(failures), "failures": failures,
        "shards": store.n_shards, "shards_done": len(markers),
        "images_this_run": this_run, "seconds": round(seconds, 3),
        "images_per_s": round(this_run / seconds, 2) if seconds > 0 else None,
        "bytes_per_image": round(nbytes / max(len(store), 1), 2), "saliency_bytes": nbytes,
        "manifest_hash": store.attrs.get("manifest_hash"), "clip_model": store.attrs.get("clip_model"),
        "clip_pretrained": store.attrs.get("clip_pretrained"), "cam": store.attrs.get("cam"),
        "max_pixels": store.attrs.get("max_pixels"),
        "this_run": provenance, "allow_mixed": bool(store.attrs.get("allow_mixed", False)),
        "steady_state": {"images": steady["images"], "seconds": round(steady["seconds"], 4), "of": "rank 0",
                         "images_per_s": round(steady["images"] / steady["seconds"], 2) if steady["seconds"] > 0
                         else None},
    }
    report = out / REPORT_NAME           # inside the store: two stores in one folder keep their own reports
    with disk_full_as_error(report, "the store itself is complete; only its report is missing"):
        atomic_write_json(report, summary)
    log = get_logger()
    _log_damaged_shards(log, failures)
    log.info("stage 1 done: %d rows, %s; %.1f img/s this run, %.0f bytes/image; report %s",
             len(store), counts, summary["images_per_s"] or 0, summary["bytes_per_image"], report)
    return summary


def _failures(store: SaliencyStore, manifest, status: np.ndarray, keys: np.ndarray) -> list[dict[str, Any]]:
    """One entry per damaged row: key ('' when a garbage tar has none), shard file, reason (+ detail)."""
    rows = np.flatnonzero(status >= 2)
    shard_of = manifest.column("shard").take(rows) if len(manifest) == len(store) else [None] * len(rows)
    sizes = store.image_sizes(rows) if len(rows) else np.zeros((0, 2), np.int32)
    out = []
    for r, shard, (w, h) in zip(rows.tolist(), shard_of, sizes.tolist()):
        entry = {"key": str(keys[r]), "shard": shard, "reason": STATUS_CODES[int(status[r])]}
        if entry["reason"] == "too_large":
            limit = store.attrs.get("max_pixels")
            entry["detail"] = f"{w}x{h} = {w * h / 1e6:.1f} MP > max_pixels {limit / 1e6:g} MP" if limit else f"{w}x{h}"
        elif entry["reason"] == "truncated_tar" and not entry["key"]:
            entry["detail"] = "no sample of this tar could be read (not a tar, or cut before its first member)"
        out.append(entry)
    return out


def _log_damaged_shards(log, failures: list[dict[str, Any]], limit: int = 20) -> None:
    """One warning line per shard with damaged rows (the first `limit` shards), naming the shard file."""
    by_shard: dict[str, list[dict]] = {}
    for f in failures:
        by_shard.setdefault(str(f["shard"]), []).append(f)
    for shard, items in list(by_shard.items())[:limit]:
        reasons = sorted({f["reason"] for f in items})
        keys = ", ".join(repr(f["key"]) for f in items[:3]) + (" ..." if len(items) > 3 else "")
        log.warning("shard %s: %d damaged rows (%s; keys %s)", shard, len(items), ", ".join(reasons), keys)
    if len(by_shard) > limit:
        log.warning("... and %d more shards with damaged rows (all listed in %s)", len(by_shard) - limit, REPORT_NAME)
