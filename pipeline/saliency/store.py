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
    (each array's chunks end in a crc32c checksum inside their shard: stores made before it have none)
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

Damage. A shard file that is missing, unreadable (checksum or blosc error) or holds values a
writer cannot have written (outside [-1, 1], an ok map whose peak is not 1) is never read as
maps: readers raise `StoreDamaged`, one line naming the store, the array's shard file and its
rows; stage 1 (`damaged_shards`) recomputes exactly those shards. A shard whose rows are all
zero has no file (Zarr writes none for fill values), so a missing file is damage only where the
shard's statuses say it held maps. A store without checksums (made before them) gets the same
file and range checks.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

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
    # crc32c after blosc: each compressed chunk carries its checksum, so a flipped byte is an error, never a map
    codecs = (BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.shuffle), Crc32cCodec())
    group = zarr.create_group(str(path), zarr_format=3,      # not mode="w": that would delete `_locks/`
                              attributes={"format": FORMAT, CREATING: True})

    def array(name, shape, dtype, chunks, fill):
        return group.create_array(name, shape=shape, dtype=dtype, chunks=chunks,
                                  shards=(rows_per_shard, *shape[1:]), compressors=codecs, fill_value=fill)

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


REPAIR_HINT = "recompute them with the `salmae saliency` command that made the store plus --repair"
MAP_ARRAYS = ("saliency", "scale", "status")           # written per shard by stage 1 (`write_shard`)
COLUMN_ARRAYS = ("key", "frame", "image_size")          # written from the manifest when the store is made


@dataclass(frozen=True)
class ShardDamage:
    """What is wrong with one array's file in one Zarr shard: `rows` are the store rows it spoils."""

    shard: int
    array: str          # one of MAP_ARRAYS or COLUMN_ARRAYS
    rows: np.ndarray    # [k] int64 store rows
    problem: str        # e.g. 'is missing (its 16 ok rows would read as zero maps)'

    def describe(self, store: Path) -> str:
        file = _shard_file(store, self.array, self.shard, self.ndim).relative_to(store).as_posix()
        return f"shard {self.shard} {self.array} file {file} {self.problem} (rows {rows_text(self.rows)})"

    @property
    def ndim(self) -> int:
        return {"saliency": 3, "frame": 2, "image_size": 2}.get(self.array, 1)


class StoreDamaged(SalmaeError):
    """Shard files of a store are missing, unreadable or hold values no writer wrote (`damages`)."""

    def __init__(self, store: Path, damages: list[ShardDamage]):
        self.damages = damages
        shown = "; ".join(d.describe(store) for d in damages[:4])
        more = f"; and {len(damages) - 4} more" if len(damages) > 4 else ""
        super().__init__(f"saliency store {store} is damaged: {shown}{more}; {REPAIR_HINT} (--out {store})")


def rows_text(rows: Sequence[int], limit: int = 8) -> str:
    """Rows as '16-31' when contiguous, else '17, 20, 22 … (6 rows)'."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
        return f"{rows[0]}-{rows[-1]}" if len(rows) > 1 else str(rows[0])
    shown = ", ".join(str(r) for r in rows[:limit])
    return f"{shown} … ({len(rows)} rows)" if len(rows) > limit else shown


def invalid_maps(stored: np.ndarray, scale: np.ndarray | None, status: np.ndarray) -> np.ndarray:
    """[n] True where a stored map cannot be what stage 1 wrote.

    stored: [n, gh, gw] as stored; scale: [n] (None: a format-1 store of raw maps, where only
    finiteness is known); status: [n]. Format 2 stores each map over its own peak |value|, so every
    value lies in [-1, 1] and an ok map peaks at exactly 1 (x / x is exact) with a positive scale;
    an ok map that is zero with scale 0 is what stage 1 wrote before the zero_map status, and stays
    valid (stage 2 counts it as a zero map). A zero map with a positive scale is a lost chunk.
    """
    n = len(stored)
    if np.asarray(stored).dtype == np.float16:       # on the bits: |v| is bits & 0x7fff, ordered like |v|
        magnitude = np.asarray(stored).view(np.uint16).reshape(n, -1) & 0x7FFF                 # [n, L]
        peak_bits = magnitude.max(1, initial=0)                                                # [n]
        finite = peak_bits < 0x7C00                  # exponent all ones: inf or NaN
        peak = np.where(finite, peak_bits.astype(np.uint16).view(np.float16).astype(np.float32), np.inf)
    else:
        flat = np.asarray(stored, dtype=np.float32).reshape(n, -1)
        finite = np.isfinite(flat).all(1)
        peak = np.abs(np.where(np.isfinite(flat), flat, np.inf)).max(1, initial=0)
    if scale is None:
        return ~finite
    scale = np.asarray(scale, dtype=np.float32)
    ok = np.asarray(status) == STATUS_OK
    written = ((peak == 1) & (scale > 0)) | ((peak == 0) & (scale == 0))
    return ~finite | (peak > 1) | ~np.isfinite(scale) | (scale < 0) | (ok & ~written)


def _why(error: BaseException) -> str:
    """A short reason for a failed chunk read (the library's own words, cut)."""
    text = str(error).split("\n")[0]
    if "checksum" in text.lower():
        return "checksum mismatch"
    return f"{error.__class__.__name__}: {text[:80]}"


def _shard_file(store: Path, name: str, shard: int, ndim: int) -> Path:
    """The file of Zarr shard `shard` of array `name` (rows are the only sharded axis)."""
    path = store / name / "c" / str(shard)
    for _ in range(ndim - 1):
        path = path / "0"
    return path


class SaliencyStore:
    """Read (and, for stage 1, shard-wise write) access to a saliency store.

    Every read of the arrays raises `StoreDamaged` (one line: store, shard file, rows) where zarr
    fails on a chunk (checksum, blosc, truncated file), never the library's traceback.
    """

    def __init__(self, path: str | Path, group: zarr.Group):
        self.path = Path(path)
        self._group = group
        self.attrs: dict[str, Any] = dict(group.attrs)
        self._arrays = {name: group[name] for name in (*ARRAYS, "scale") if name in group}
        self._saliency = self._arrays["saliency"]
        self._scale = self._arrays.get("scale")    # None: a format-1 store, scale 1
        self._status = self._arrays["status"]
        self.grid, self.rows_per_shard = self._checked_layout()
        self._keys: np.ndarray | None = None
        self._row_of: dict[str, int] | None = None

    def _checked_layout(self) -> tuple[tuple[int, int], int]:
        """(grid, rows_per_shard) from the attrs, checked against the arrays (a hand-edited or damaged
        zarr.json must be one line, not a shape error deep in a reader)."""
        shape, shards = self._saliency.shape, self._saliency.shards
        grid, rps = self.attrs.get("grid"), self.attrs.get("rows_per_shard")
        fix = f"or recompute the store with `salmae saliency --overwrite --out {self.path}`"
        if not (isinstance(grid, list) and [type(g) for g in grid] == [int, int] and tuple(grid) == shape[1:]):
            raise SalmaeError(f"saliency store {self.path}: attribute grid {_cut(grid)} in {self.path / 'zarr.json'} "
                              f"does not match its saliency array ({shape[1]}x{shape[2]}); set it back to "
                              f"[{shape[1]}, {shape[2]}] {fix}")
        if type(rps) is not int or shards is None or rps != shards[0]:
            raise SalmaeError(f"saliency store {self.path}: attribute rows_per_shard {_cut(rps)} in "
                              f"{self.path / 'zarr.json'} does not match its arrays' shards "
                              f"({shards[0] if shards else 'none'} rows); set it back {fix}")
        lengths = {name: int(a.shape[0]) for name, a in self._arrays.items()}
        if len(set(lengths.values())) != 1 or any(a.shards is None or a.shards[0] != rps
                                                  for a in self._arrays.values()):
            raise SalmaeError(f"saliency store {self.path}: its arrays disagree on rows or shards ({lengths}); "
                              f"recompute it with `salmae saliency --overwrite --out {self.path}`")
        return (grid[0], grid[1]), rps

    @property
    def has_checksums(self) -> bool:
        """Whether the maps' chunks carry a crc32c (stores made before checksums do not)."""
        inner = getattr(self._saliency.metadata.codecs[0], "codecs", ())
        return any(isinstance(c, Crc32cCodec) for c in inner)

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
        fmt = group.attrs.get("format")
        if fmt not in READABLE_FORMATS:
            raise SalmaeError(f"{path} is not a salmae saliency store; point to the --out of `salmae saliency`")
        if mode != "r" and fmt != FORMAT:
            raise SalmaeError(f"store {path} has the older format {fmt} (maps without a scale); "
                              "it can be read but not written: recompute it with `salmae saliency --overwrite`")
        try:
            lost = [name for name in ARRAYS + (("scale",) if fmt == FORMAT else ()) if name not in group]
            if lost:                     # a format-2 store without `scale` must not read as format 1
                raise SalmaeError(f"saliency store {path} has lost its {' and '.join(lost)} array (no "
                                  f"{lost[0]}/zarr.json); recompute it with `salmae saliency --overwrite --out {path}`")
            return cls(path, group)
        except SalmaeError:
            raise
        except Exception as e:           # an array's zarr.json damaged: one line, not zarr's traceback
            names = [name for name in (*ARRAYS, "scale") if read_attrs(path / name) is None
                     and (path / name / "zarr.json").exists()]
            which = f"{names[0]}/zarr.json" if names else "an array's zarr.json"
            raise SalmaeError(f"saliency store {path}: {which} is unreadable ({_why(e)}); recompute the store "
                              f"with `salmae saliency --overwrite --out {path}`") from e

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return int(self._status.shape[0])

    @property
    def keys(self) -> np.ndarray:
        """[N] keys in row order (object array of str)."""
        if self._keys is None:
            self._keys = np.array([str(k) for k in self._get("key", slice(None))], dtype=object)
        return self._keys

    @property
    def status(self) -> np.ndarray:
        """[N] uint8 status codes (read fresh each time: stage 1 may still be writing)."""
        return np.asarray(self._get("status", slice(None)), dtype=np.uint8)

    def status_of(self, rows: range) -> np.ndarray:
        """[n] uint8 status codes of a contiguous range of rows."""
        return np.asarray(self._get("status", slice(rows.start, rows.stop)), dtype=np.uint8)

    def row_of(self, key: str) -> int | None:
        if self._row_of is None:
            self._row_of = {k: i for i, k in enumerate(self.keys.tolist())}
        return self._row_of.get(key)

    def read(self, rows: Sequence[int]) -> np.ndarray:
        """Maps of `rows` -> [n, gh, gw] float32, in the CAM's own units (stored map * scale)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return np.zeros((0, *self.grid), dtype=np.float32)
        maps = np.asarray(self._get("saliency", rows), dtype=np.float32)
        if self._scale is None:
            return maps
        return maps * np.asarray(self._get("scale", rows), dtype=np.float32)[:, None, None]

    def read_unit(self, rows: Sequence[int]) -> np.ndarray:
        """Maps of `rows` scaled to their own maximum |value| (zero maps stay zero): [n, gh, gw] float16.

        What stage 2 keeps in memory (it uses a map's order and proportions, never its scale). A
        format-2 store holds exactly this, so it is read as is; a format-1 store is scaled here.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return np.zeros((0, *self.grid), dtype=np.float16)
        stored = np.asarray(self._get("saliency", rows))
        return stored.astype(np.float16, copy=False) if self._scale is not None else scale_to_max(stored)[0]

    def read_unit_checked(self, rows: Sequence[int], status: np.ndarray) -> np.ndarray:
        """`read_unit` of `rows` (status: [n], theirs), refusing maps that cannot be what stage 1 wrote
        (`invalid_maps`: out of range, an ok map that reads as zero): StoreDamaged naming shards and rows."""
        rows = np.asarray(rows, dtype=np.int64)
        stored = np.asarray(self._get("saliency", rows))
        scale = np.asarray(self._get("scale", rows)) if self._scale is not None else None
        bad = invalid_maps(stored, scale, status)
        if bad.any():
            raise StoreDamaged(self.path, self._damage_of_rows(rows[bad], stored[bad], status[bad]))
        return stored.astype(np.float16, copy=False) if scale is not None else scale_to_max(stored)[0]

    def _damage_of_rows(self, rows: np.ndarray, stored: np.ndarray, status: np.ndarray) -> list[ShardDamage]:
        """One ShardDamage per shard of `rows` whose maps failed `invalid_maps` (stored: [k, gh, gw])."""
        out = []
        flat = np.asarray(stored, dtype=np.float32).reshape(len(stored), -1)
        for shard in np.unique(rows // self.rows_per_shard):
            pick = rows // self.rows_per_shard == shard
            values = flat[pick]
            finite = values[np.isfinite(values)]
            zero_ok = int(((status[pick] == STATUS_OK) & (np.abs(values).max(1, initial=0) == 0)).sum())
            what = (f"values from {finite.min():g} to {finite.max():g}" if finite.size else "no finite value")
            if not np.isfinite(values).all():
                what += ", non-finite values"
            if zero_ok:
                what += f", {zero_ok} ok maps that read as zero"
            out.append(ShardDamage(int(shard), "saliency", rows[pick],
                                   f"holds {int(pick.sum())} maps no writer wrote ({what}; stored maps lie in [-1, 1] "
                                   "with peak 1)"))
        return out

    def frames(self, rows: Sequence[int]) -> np.ndarray:
        """[n, 4] float32 (x0, y0, x1, y1) in image pixels."""
        return np.asarray(self._get("frame", np.asarray(rows, dtype=np.int64)))

    def image_sizes(self, rows: Sequence[int]) -> np.ndarray:
        """[n, 2] int32 (W, H)."""
        return np.asarray(self._get("image_size", np.asarray(rows, dtype=np.int64)))

    def load_all(self) -> np.ndarray:
        """[N, gh, gw] float32, every map in memory, in the CAM's own units (stored map * scale)."""
        maps = np.asarray(self._get("saliency", slice(None)), dtype=np.float32)
        if self._scale is not None:
            maps *= np.asarray(self._get("scale", slice(None)), dtype=np.float32)[:, None, None]
        return maps

    def _get(self, name: str, rows: np.ndarray | slice) -> np.ndarray:
        """array `name` at `rows` (a slice or row indices); StoreDamaged naming the shards zarr cannot read."""
        array = self._arrays[name]
        try:
            return array[rows] if isinstance(rows, slice) else _take(array, rows)
        except Exception as e:           # checksum, blosc or a truncated shard: which shards, not a traceback
            if isinstance(rows, slice):
                lo, hi, _ = rows.indices(len(self))
                rows = np.arange(lo, hi)
            shards = np.unique(np.asarray(rows, dtype=np.int64) // self.rows_per_shard).tolist()
            damages = [d for s in shards if (d := self._read_shard(name, s)[1]) is not None]
            raise StoreDamaged(self.path, damages or [ShardDamage(shards[0], name, np.asarray(rows), f"is unreadable "
                                                                  f"({_why(e)})")]) from e

    def _read_shard(self, name: str, shard: int) -> tuple[np.ndarray | None, ShardDamage | None]:
        """Shard `shard` of array `name` -> (its values, None), or (None, a ShardDamage) if zarr cannot read it."""
        rows = self.shard_rows(shard)
        try:
            return np.asarray(self._arrays[name][rows.start:rows.stop]), None
        except Exception as e:
            return None, ShardDamage(shard, name, np.arange(rows.start, rows.stop), f"is unreadable ({_why(e)})")

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
        return [self.shard_file(name, shard) for name in MAP_ARRAYS]

    def shard_file(self, name: str, shard: int) -> Path:
        return _shard_file(self.path, name, shard, self._arrays[name].ndim if name in self._arrays else 1)

    def damaged_shards(self, shards: Sequence[int] | None = None, thorough: bool = False,
                       status: np.ndarray | None = None) -> list[ShardDamage]:
        """Damage in the finished (marked) shards among `shards` (default: all).

        Always: a status file missing or unreadable; a saliency or scale file missing where the
        shard has ok rows (Zarr writes no file for an all-zero shard, so only then is it damage).
        With `thorough`, every array's shard is decoded (checksums) and the maps range-checked
        (`invalid_maps`): it reads every byte. status: the whole [N] status, if already read.
        """
        shards = [s for s in (range(self.n_shards) if shards is None else shards) if self.is_done(s)]
        if status is None and shards:
            try:
                status = self.status               # one read (1 byte a row), not one per shard
            except StoreDamaged:
                pass                               # read shard by shard: the unreadable ones are damage
        return [d for s in shards for d in self._shard_damage(s, thorough, status)]

    def _shard_damage(self, shard: int, thorough: bool, all_status: np.ndarray | None) -> list[ShardDamage]:
        rows = self.shard_rows(shard)
        every = np.arange(rows.start, rows.stop)
        if not self.shard_file("status", shard).is_file():
            return [ShardDamage(shard, "status", every, "is missing (its rows read as pending although the shard "
                                                        "is marked done)")]
        if all_status is not None:
            status = all_status[rows.start:rows.stop]
        else:
            status, unreadable = self._read_shard("status", shard)
            if unreadable is not None:
                return [unreadable]
        ok = every[status == STATUS_OK]
        damage = [ShardDamage(shard, name, ok, f"is missing (its {len(ok)} ok rows would read as zero maps)")
                  for name in ("saliency", "scale") if name in self._arrays and len(ok)
                  and not self.shard_file(name, shard).is_file()]
        unknown = every[~np.isin(status, list(STATUS_CODES))]
        if len(unknown):
            damage.append(ShardDamage(shard, "status", unknown, f"holds codes no writer wrote "
                                                                f"({sorted(set(status[unknown - rows.start].tolist()))})"))
        if damage or not thorough:
            return damage
        read = {name: self._read_shard(name, shard) for name in ("saliency", "scale", *COLUMN_ARRAYS)
                if name in self._arrays}                 # decodes every chunk: checksums, blosc
        damage = [d for _, d in read.values() if d is not None]
        if damage:
            return damage
        stored, scale = read["saliency"][0], read["scale"][0] if "scale" in read else None
        bad = invalid_maps(stored, scale, status)
        return self._damage_of_rows(every[bad], stored[bad], status[bad]) if bad.any() else []

    def repair_columns(self, shard: int, keys: np.ndarray, frames: np.ndarray, image_sizes: np.ndarray) -> list[str]:
        """Rewrite those of shard `shard`'s key/frame/image_size files that are unreadable or differ from
        `keys` [R] str, `frames` [R, 4], `image_sizes` [R, 2] (what the store was made with, from its
        manifest: stage 1's `--repair`); returns the names of the arrays rewritten."""
        rows = self.shard_rows(shard)
        rewritten = []
        for name, want in (("key", np.asarray(keys, dtype=str)), ("frame", np.asarray(frames, dtype=np.float32)),
                           ("image_size", np.asarray(image_sizes, dtype=np.int32))):
            try:
                have = np.asarray(self._arrays[name][rows.start:rows.stop])
                if np.array_equal(have.astype(want.dtype), want):
                    continue
            except Exception:            # unreadable: rewritten below
                pass
            self.shard_file(name, shard).unlink(missing_ok=True)     # never read-modify-write a damaged file
            self._arrays[name][rows.start:rows.stop] = want
            rewritten.append(name)
        fsync_paths([self.shard_file(name, shard) for name in rewritten])
        self._keys = self._row_of = None
        return rewritten

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


def _cut(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _take(array, rows: np.ndarray) -> np.ndarray:
    """array[rows] along the first axis: a slice when the rows are contiguous (the usual case, a
    store read in its own order), which zarr reads chunk by chunk without index bookkeeping."""
    if len(rows) > 1 and rows[-1] - rows[0] + 1 == len(rows) and bool(np.all(np.diff(rows) == 1)):
        return array[int(rows[0]):int(rows[-1]) + 1]
    return array.get_orthogonal_selection((rows,))
