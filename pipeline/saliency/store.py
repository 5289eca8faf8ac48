"""The saliency store: a Zarr v3 group that stage 1 writes and stage 2 / `salmae inspect` read.

Layout of `STORE.zarr` (rows in manifest order, N rows):
    saliency    float16 [N, gh, gw]  each CAM divided by its own maximum (so in [0, 1]; 0 for a zero map)
    scale       float32 [N]          that maximum: map = saliency * scale (normalisation in attrs)
    status      uint8   [N]          0 pending, 1 ok, >= 2 a named failure (`STATUS_CODES`)
    key         str     [N]          img2dataset key, leading zeros kept
    frame       float32 [N, 4]       x0, y0, x1, y1 of the image region the map covers (pixels; a
                                     letterbox store's reaches past the image by the padding)
    image_size  int32   [N, 2]       W, H of the original image
    _done/NNNNN.json                 completion marker of Zarr shard NNNNN (written last, atomically)
    _locks/HOST-PID.json             the writers at work now (pipeline/saliency/store_lock.py); kept by `create_store`
    manifest.parquet, config.yaml, run.log, saliency_report.json   written by stage 1 beside the arrays

Status codes (`STATUS_CODES`, also in the attrs): 0 pending, 1 ok; 2-7 the data layer's damage
reasons (unreadable_image, missing_image, missing_caption, empty_caption, bad_json,
truncated_tar); 8 nonfinite_map, 9 damaged (any other data-layer reason), 10 zero_map (a finite
map that is zero everywhere), 11 too_large (more pixels than stage 1's `max_pixels`: not decoded).

Every array is sharded along rows with the same `rows_per_shard`, so Zarr shard i of every
array holds rows [i*R, (i+1)*R): one writer owns a whole shard, and a shard is complete exactly
when its marker exists. A shard's files are fsynced before its marker is written, so a marker
never names bytes that a power cut could still take.

Why a scale: raw Grad-CAM values of a cosine target are tiny (~1e-4 with ViT-B-16 on photos),
and float16 keeps full precision only above 6.1e-5, so raw maps stored as float16 were largely
subnormal (a few significant bits, or zero). Scaled to their maximum, a map's values keep 11
bits down to 6.1e-5 of that maximum. Readers (`read`, `load_all`) return maps in the original
units. Format 1 stores (no `scale` array) are still read, with scale 1.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.files import atomic_write_json, fsync_paths
from salmae.pipeline.saliency.store_lock import LOCK_DIR

FORMAT = "salmae-saliency-store/2"
READABLE_FORMATS = ("salmae-saliency-store/1", FORMAT)   # 1: maps stored raw, no `scale` array
DONE_DIR = "_done"
CREATING = "creating"      # attr: True while `create_store` (and its caller) are still making the store
ARRAYS = ("saliency", "status", "key", "frame", "image_size")   # in every format; `scale` from format 2

STATUS_PENDING, STATUS_OK = 0, 1
# code -> reason; 2.. are the data layer's DAMAGE_REASONS codes, then stage 1's own failures.
STATUS_CODES: dict[int, str] = {
    0: "pending",
    1: "ok",
    2: "unreadable_image",
    3: "missing_image",
    4: "missing_caption",
    5: "empty_caption",
    6: "bad_json",
    7: "truncated_tar",
    8: "nonfinite_map",
    9: "damaged",          # any other damage reason the data layer reports
    10: "zero_map",        # a finite map that is zero everywhere: no patch is salient (stage 2 masks at random)
    11: "too_large",       # more pixels than stage 1's max_pixels: never decoded (decompression-bomb guard)
}
CODE_OF: dict[str, int] = {reason: code for code, reason in STATUS_CODES.items()}


def status_code(reason: str | None) -> int:
    """Manifest/sample status ('ok' or a damage reason) -> store status code."""
    if reason in (None, "ok"):
        return STATUS_OK
    return CODE_OF.get(reason, CODE_OF["damaged"])


def scale_to_max(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """maps [n, gh, gw] -> (float16 maps divided by their own max |value| [n, gh, gw], float32 scale [n]).

    A zero map gets scale 0 and stays zero; `stored * scale[:, None, None]` gives the map back.
    """
    maps = np.asarray(maps, dtype=np.float32)
    scale = np.abs(maps.reshape(len(maps), -1)).max(1, initial=0).astype(np.float32)    # [n]
    safe = np.where(scale > 0, scale, 1)[:, None, None]
    return (maps / safe).astype(np.float16), scale


def _chunk_rows(rows_per_shard: int, target: int = 64) -> int:
    """Largest divisor of `rows_per_shard` not above `target` (rows per compressed chunk)."""
    return max(d for d in range(1, min(target, rows_per_shard) + 1) if rows_per_shard % d == 0)


def create_store(path: str | Path, *, keys: Sequence[str], image_sizes: np.ndarray, frames: np.ndarray,
                 grid: tuple[int, int], rows_per_shard: int, attrs: dict[str, Any], finished: bool = True) -> None:
    """Create (replacing any existing) store at `path` with per-row keys/geometry and empty maps.

    image_sizes: [N, 2] int (W, H); frames: [N, 4] float (x0, y0, x1, y1). Everything already in
    `path` goes except the writers' locks (`_locks/`): the caller holds one while it creates.
    The group is marked `creating` from its first byte until the end (or, with `finished=False`,
    until `finish_store`, after the caller has put its own files in): a store killed half-way
    is never opened as a finished one (`SaliencyStore.open` refuses it, stage 1 recreates it).
    """
    path = Path(path)
    if path.exists():
        for child in path.iterdir():
            if child.name == LOCK_DIR:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    n, (gh, gw) = len(keys), grid
    c = _chunk_rows(rows_per_shard)
    compressor = BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.shuffle)
    group = zarr.create_group(str(path), zarr_format=3,      # not mode="w": that would delete `_locks/`
                              attributes={"format": FORMAT, CREATING: True})

    def array(name, shape, dtype, chunks, fill):
        return group.create_array(name, shape=shape, dtype=dtype, chunks=chunks,
                                  shards=(rows_per_shard, *shape[1:]), compressors=compressor, fill_value=fill)

    array("saliency", (n, gh, gw), "float16", (c, gh, gw), 0)
    array("scale", (n,), "float32", (rows_per_shard,), 0)
    array("status", (n,), "uint8", (rows_per_shard,), STATUS_PENDING)
    keys_arr = array("key", (n,), str, (rows_per_shard,), "")
    frame_arr = array("frame", (n, 4), "float32", (rows_per_shard, 4), 0)
    size_arr = array("image_size", (n, 2), "int32", (rows_per_shard, 2), 0)
    if n:
        keys_arr[:] = np.asarray(list(keys), dtype=str)
        frame_arr[:] = np.asarray(frames, dtype=np.float32)
        size_arr[:] = np.asarray(image_sizes, dtype=np.int32)
    (path / DONE_DIR).mkdir()
    group.attrs.update({"format": FORMAT, "rows_per_shard": rows_per_shard, "n_rows": n, "grid": [gh, gw],
                        "status_codes": {str(k): v for k, v in STATUS_CODES.items()}, **attrs,
                        CREATING: not finished})


def finish_store(path: str | Path, attrs: dict[str, Any] | None = None) -> None:
    """Add `attrs` and clear the `creating` mark of a store made with `create_store(..., finished=False)`."""
    group = zarr.open_group(str(path), mode="r+", zarr_format=3)
    group.attrs.update({**(attrs or {}), CREATING: False})


def read_attrs(path: str | Path) -> dict[str, Any] | None:
    """A store's attrs straight from its `zarr.json` (no array opened); None if there is none or it is unreadable."""
    try:
        return dict(json.loads((Path(path) / "zarr.json").read_text()).get("attributes") or {})
    except (OSError, ValueError, AttributeError):
        return None


class SaliencyStore:
    """Read (and, for stage 1, shard-wise write) access to a saliency store."""

    def __init__(self, path: str | Path, group: zarr.Group):
        self.path = Path(path)
        self._group = group
        self.attrs: dict[str, Any] = dict(group.attrs)
        self.grid: tuple[int, int] = tuple(self.attrs["grid"])
        self.rows_per_shard: int = int(self.attrs["rows_per_shard"])
        self._saliency = group["saliency"]
        self._scale = group["scale"] if "scale" in group else None    # None: a format-1 store, scale 1
        self._status = group["status"]
        self._keys: np.ndarray | None = None
        self._row_of: dict[str, int] | None = None

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "SaliencyStore":
        """Open a store (`mode='r'` read-only, `'r+'` for stage 1's writers)."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise SalmaeError(f"saliency store {path} not found; create it with `salmae saliency --out {path}`")
        try:
            group = zarr.open_group(str(path), mode=mode, zarr_format=3)
        except Exception as e:
            raise SalmaeError(f"{path} is not a readable Zarr v3 group ({e.__class__.__name__}); "
                              "recreate it with `salmae saliency --overwrite`") from e
        if group.attrs.get(CREATING):
            raise SalmaeError(f"store {path} is unfinished (stage 1 stopped while creating it); run the same "
                              "`salmae saliency` command again to recreate it")
        if group.attrs.get("format") not in READABLE_FORMATS or any(name not in group for name in ARRAYS):
            raise SalmaeError(f"{path} is not a salmae saliency store; point to the --out of `salmae saliency`")
        if mode != "r" and group.attrs.get("format") != FORMAT:
            raise SalmaeError(f"store {path} has the older format {group.attrs.get('format')} (maps without a scale); "
                              "it can be read but not written: recompute it with `salmae saliency --overwrite`")
        return cls(path, group)

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return int(self._status.shape[0])

    @property
    def keys(self) -> np.ndarray:
        """[N] keys in row order (object array of str)."""
        if self._keys is None:
            self._keys = np.array([str(k) for k in self._group["key"][:]], dtype=object)
        return self._keys

    @property
    def status(self) -> np.ndarray:
        """[N] uint8 status codes (read fresh each time: stage 1 may still be writing)."""
        return np.asarray(self._status[:], dtype=np.uint8)

    def row_of(self, key: str) -> int | None:
        if self._row_of is None:
            self._row_of = {k: i for i, k in enumerate(self.keys.tolist())}
        return self._row_of.get(key)

    def read(self, rows: Sequence[int]) -> np.ndarray:
        """Maps of `rows` -> [n, gh, gw] float32, in the CAM's own units (stored map * scale)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return np.zeros((0, *self.grid), dtype=np.float32)
        maps = np.asarray(_take(self._saliency, rows), dtype=np.float32)
        if self._scale is None:
            return maps
        return maps * np.asarray(_take(self._scale, rows), dtype=np.float32)[:, None, None]

    def read_unit(self, rows: Sequence[int]) -> np.ndarray:
        """Maps of `rows` scaled to their own maximum |value| (zero maps stay zero): [n, gh, gw] float16.

        What stage 2 keeps in memory (it uses a map's order and proportions, never its scale). A
        format-2 store holds exactly this, so it is read as is; a format-1 store is scaled here.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return np.zeros((0, *self.grid), dtype=np.float16)
        stored = np.asarray(_take(self._saliency, rows))
        return stored.astype(np.float16, copy=False) if self._scale is not None else scale_to_max(stored)[0]

    def frames(self, rows: Sequence[int]) -> np.ndarray:
        """[n, 4] float32 (x0, y0, x1, y1) in image pixels."""
        return np.asarray(_take(self._group["frame"], np.asarray(rows, dtype=np.int64)))

    def image_sizes(self, rows: Sequence[int]) -> np.ndarray:
        """[n, 2] int32 (W, H)."""
        return np.asarray(self._group["image_size"].get_orthogonal_selection((np.asarray(rows, dtype=np.int64),)))

    def load_all(self) -> np.ndarray:
        """[N, gh, gw] float32, every map in memory, in the CAM's own units (stored map * scale)."""
        maps = np.asarray(self._saliency[:], dtype=np.float32)
        if self._scale is not None:
            maps *= np.asarray(self._scale[:], dtype=np.float32)[:, None, None]
        return maps

    # ------------------------------------------------------------------ shards (stage 1)
    @property
    def n_shards(self) -> int:
        return -(-len(self) // self.rows_per_shard)

    def shard_rows(self, shard: int) -> range:
        lo = shard * self.rows_per_shard
        return range(lo, min(lo + self.rows_per_shard, len(self)))

    def marker_path(self, shard: int) -> Path:
        return self.path / DONE_DIR / f"{shard:05d}.json"

    def is_done(self, shard: int) -> bool:
        return self.marker_path(shard).is_file()

    def done_markers(self) -> dict[int, dict[str, Any]]:
        out = {}
        for p in sorted((self.path / DONE_DIR).glob("*.json")):
            try:
                out[int(p.stem)] = json.loads(p.read_text())
            except (ValueError, json.JSONDecodeError):
                continue
        return out

    def write_shard(self, shard: int, saliency: np.ndarray, status: np.ndarray, marker: dict[str, Any]) -> None:
        """Write one whole Zarr shard (maps + statuses), then its completion marker.

        saliency: [rows, gh, gw] maps in their own units (float32, kept until `scale_to_max`);
        status: [rows] uint8. The marker is written atomically after the data, so a killed writer
        leaves the shard unmarked and a rerun rewrites it from scratch. The shard's files are
        fsynced before the marker, and the marker itself before this returns.
        """
        rows = self.shard_rows(shard)
        self._clear_shard(shard)
        scaled, scale = scale_to_max(saliency)
        self._saliency[rows.start:rows.stop] = scaled
        self._scale[rows.start:rows.stop] = scale
        self._status[rows.start:rows.stop] = np.asarray(status, dtype=np.uint8)
        fsync_paths(self.shard_files(shard))
        atomic_write_json(self.marker_path(shard), {"shard": shard, "rows": [rows.start, rows.stop], **marker},
                          fsync=True)
        fsync_paths([self.marker_path(shard)])           # the marker's folder entry too

    def shard_files(self, shard: int) -> list[Path]:
        """The files of Zarr shard `shard` that stage 1 writes (saliency, scale, status)."""
        files = []
        for name, arr in (("saliency", self._saliency), ("scale", self._scale), ("status", self._status)):
            path = self.path / name / "c" / str(shard)
            for _ in range(arr.ndim - 1):
                path = path / "0"
            files.append(path)
        return files

    def _clear_shard(self, shard: int) -> None:
        """Delete shard files a killed writer may have left half-written (Zarr would read-modify-write them)."""
        for path in self.shard_files(shard):
            if path.is_file():
                path.unlink()

    def array_nbytes(self, name: str = "saliency") -> int:
        """Bytes on disk of one array (all its shard files); 0 for an array the store does not have."""
        root = self.path / name
        return sum(os.path.getsize(p) for p in root.rglob("*") if p.is_file() and p.name != "zarr.json")

    def update_attrs(self, attrs: dict[str, Any]) -> None:
        """Add or replace top-level attrs (stage 1's rank 0, e.g. to record a mixed resume)."""
        self._group.attrs.update(attrs)
        self.attrs.update(attrs)


def _take(array, rows: np.ndarray) -> np.ndarray:
    """array[rows] along the first axis: a slice when the rows are contiguous (the usual case, a
    store read in its own order), which zarr reads chunk by chunk without index bookkeeping."""
    if len(rows) > 1 and rows[-1] - rows[0] + 1 == len(rows) and bool(np.all(np.diff(rows) == 1)):
        return array[int(rows[0]):int(rows[-1]) + 1]
    return array.get_orthogonal_selection((rows,))
