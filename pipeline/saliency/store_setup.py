"""A stage-1 store's life cycle: create it, or check that an existing one was made by the same
config, data and provenance; resolve its manifest; clear staging files of killed runs.

A store is created in steps (arrays, then its manifest and config moved in, then its fingerprint),
so a run killed in between leaves a store marked `creating` that the next run recreates, never
accepts. Creating or `--overwrite`-replacing a store needs the writer lock to itself.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np

from salmae.pipeline import __version__
from salmae.pipeline.config import save_config
from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.files import atomic_path, fsync_paths, pid_alive
from salmae.pipeline.logging import get_logger
from salmae.pipeline.saliency.gradcam import cam_normalisation
from salmae.pipeline.saliency.preprocess import FRAME_CONVENTIONS, store_frames
from salmae.pipeline.saliency.store import CREATING, DONE_DIR, READABLE_FORMATS
from salmae.pipeline.saliency.store import FORMAT as STORE_FORMAT
from salmae.pipeline.saliency.store import SaliencyStore, create_store, finish_store, read_attrs
from salmae.pipeline.saliency.store_lock import StoreLock

MANIFEST_NAME = "manifest.parquet"
DEFAULT_MAX_PIXELS = 64_000_000
# fingerprint keys added after stores existed: a store without one was made with this value
FINGERPRINT_DEFAULTS = {"max_pixels": DEFAULT_MAX_PIXELS, "resize": "squash", "interpolation": "bicubic"}


def prepare_store(cfg, out: Path, record: dict, layer_path: str, info, provenance: dict,
                   lock: StoreLock) -> None:
    """Create the store, or check that an existing one was made by the same config, data and provenance.

    cfg: the stage's `SaliencyConfig` (read: data, manifest, cam, rows_per_shard, max_pixels, resize,
    overwrite, allow_mixed; saved into the store as config.yaml). Rank 0 only, holding `lock`.
    """
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
                   "rows_per_shard": cfg.rows_per_shard, "max_pixels": cfg.max_pixels, "resize": cfg.resize,
                   "interpolation": info.interpolation}
    if state == "ready":
        try:
            attrs = SaliencyStore.open(out).attrs
        except SalmaeError:              # damaged attrs or arrays: --overwrite replaces the store
            if not cfg.overwrite:
                raise
            attrs = {"fingerprint": {"damaged": True}}
        existing = {**FINGERPRINT_DEFAULTS, **attrs.get("fingerprint", {})}
        if attrs.get("format") != STORE_FORMAT and not cfg.overwrite:
            raise SalmaeError(f"store {out} has the older format {attrs.get('format')} (maps without a scale); "
                              "pass --overwrite to recompute it, or choose another --out")
        compared = [k for k in fingerprint if not (k == "clip_pretrained" and existing.get("pretrained_sha256")
                                                   and fingerprint["pretrained_sha256"])]  # a file: its sha256
        changed = sorted(k for k in compared if existing.get(k) != fingerprint[k])
        if not changed:
            _check_provenance(cfg, out, attrs.get("provenance") or {}, provenance)
            return
        if not cfg.overwrite:
            what = ", ".join(f"{k}: {existing.get(k)!r} -> {fingerprint[k]!r}" for k in changed)
            raise SalmaeError(f"store {out} was made with another config or data ({what}); "
                              "pass --overwrite to recompute it, or choose another --out")
        lock.require_sole_holder("replacing it (--overwrite)")
    if manifest_file is None or not Path(manifest_file).is_file():
        raise SalmaeError(f"no manifest for store {out}; pass --data SHARDS (or --manifest FILE)")
    sizes, frames = _geometry(manifest, tuple(info.input_size), cfg.resize)
    attrs = {**record, "cam": cfg.cam, "layer": layer_path, "resize": cfg.resize,
             "input_size": record["input_size"], "frame": FRAME_CONVENTIONS[cfg.resize], "manifest_hash": manifest.hash,
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


def _geometry(manifest, input_size: tuple[int, int], resize: str) -> tuple[np.ndarray, np.ndarray]:
    """The store's image_size [N, 2] (W, H) and frame [N, 4] columns for `manifest`: the frame the map's
    grid covers, in image pixels (squash: the whole image; letterbox: the CLIP input, padding included)."""
    widths = np.asarray(manifest.column("width"), dtype=np.int32)
    heights = np.asarray(manifest.column("height"), dtype=np.int32)
    sizes = np.stack([widths, heights], axis=1)                        # [N, 2] (W, H)
    return sizes, store_frames(sizes, input_size, resize)             # [N, 4] x0, y0, x1, y1


def shards_to_compute(cfg, store: SaliencyStore, manifest, job: range, provenance: dict) -> list[int]:
    """The job's shards to compute: those not finished, and finished ones that are damaged.

    Every run checks its finished shards' files (a status file, and saliency and scale files where
    a shard has ok rows: O(shards) file checks and the status bytes). With `repair` it decodes every
    finished shard of the job (checksums, map ranges: reads every byte) and rewrites key, frame and
    image_size shards that are unreadable or differ from the store's manifest. A damaged shard's
    marker is removed before anything is recomputed, so a run stopped on the way still sees it as
    not done; recomputing them with other settings than the store's is refused as any resume is
    (`allow_mixed`). cfg: the stage's `SaliencyConfig` (read: repair, allow_mixed). Rank 0 only,
    holding the lock for `job`.
    """
    log = get_logger()
    if cfg.repair:
        sizes, frames = _geometry(manifest, tuple(store.attrs["input_size"]), store.attrs.get("resize", "squash"))
        keys = np.asarray(manifest.keys.tolist(), dtype=str)
        for shard in job:
            rows = store.shard_rows(shard)
            fixed = store.repair_columns(shard, keys[rows.start:rows.stop], frames[rows.start:rows.stop],
                                         sizes[rows.start:rows.stop])
            if fixed:
                log.warning("store %s: shard %d: rewrote its %s from the manifest (--repair)", store.path, shard,
                            " and ".join(fixed))
    damaged = store.damaged_shards([s for s in job if store.is_done(s)], thorough=cfg.repair)
    for d in damaged:
        log.warning("store %s: %s: recomputing the shard", store.path, d.describe(store.path))
    for shard in sorted({d.shard for d in damaged}):
        store.marker_path(shard).unlink(missing_ok=True)
    if damaged:
        fsync_paths([store.marker_path(0).parent])
        _check_provenance(cfg, store.path, store.attrs.get("provenance") or {}, provenance)
    return [s for s in job if not store.is_done(s)]


def _check_provenance(cfg, out: Path, begun: dict, now: dict) -> None:
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


def _resolve_manifest(cfg, out: Path):
    """The manifest this run describes, and a file holding it (None if it must still be written)."""
    from salmae.pipeline.data.manifest import build_manifest, load_manifest, stale_reason, verify_manifest

    if cfg.manifest is not None:
        manifest = open_manifest(cfg.manifest)
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


def open_manifest(path: Path):
    from salmae.pipeline.data.manifest import load_manifest

    if not Path(path).is_file():
        raise SalmaeError(f"manifest {path} not found; build one with `salmae manifest build SHARDS -o {path}`")
    return load_manifest(path)
