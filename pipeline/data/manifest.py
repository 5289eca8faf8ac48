"""Data manifests: one parquet row per sample of a set of img2dataset shards, damaged ones included.

`build_manifest` scans the shards once (image headers only, no full decode) and writes, in
shard order then key order, the columns

    row (int64 0..N-1)  key  shard (file name)  caption  width height (int32, 0 if unreadable)
    status ("ok" or a DAMAGE_REASONS code)  image_offset image_nbytes (int64, -1 if none)  image_ext
    digest (16 bytes: the first half of the image member's sha256; zeros if there is none)

The file metadata holds `salmae.hash`, a sha256 over those columns that does not depend on
where the shards live (shards are named by file name), `salmae.shards`, the URLs scanned, and
`salmae.shard_stats`, each local shard's size, modification time and inode. Later stages record
the hash and refuse data whose manifest hash differs; a restart trusts a stored manifest after
comparing those stats (`stale_reason`, O(shards)), instead of reading every shard again; another
file (a copy, another folder) is scanned again and compared by content.

Content. The digest makes the hash cover what each sample *is*: two equal-size JPEGs swapped
inside a tar (format 1 hashed keys, sizes and offsets only) now change the hash, so a saliency
store or a run refuses the swapped data instead of giving each image the other's map.
img2dataset's own `sha256` field is not used: it is the hash of the downloaded original, before
img2dataset re-encodes and resizes it, so it does not identify the bytes in the shard. The scan
already reads every member; the digest adds its hashing time (BENCHMARKS.md). Manifests of
format 1 (no digest column) still load, with their own hash, so existing stores keep working.

Scale: shards are scanned by a process pool (`workers`); columns stay Arrow arrays (numeric
columns come out as numpy arrays, string columns as `StringColumn`, one Python string only when
asked for), so a 3.3-million-row manifest costs its Arrow bytes, not millions of Python objects
in every rank and loader worker.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from salmae.pipeline.data.shards import expand_shards, iter_shard, shard_name
from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.files import atomic_path

FORMAT_VERSION = "2"
DIGEST_BYTES = 16
SCHEMA = pa.schema([
    ("row", pa.int64()), ("key", pa.string()), ("shard", pa.string()), ("caption", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("status", pa.string()),
    ("image_offset", pa.int64()), ("image_nbytes", pa.int64()), ("image_ext", pa.string()),
    ("digest", pa.binary(DIGEST_BYTES)),
])
SCHEMA_V1 = SCHEMA.remove(SCHEMA.get_field_index("digest"))
_HASHED = [name for name in SCHEMA.names if name != "row"]  # row is implied by the order
_HASHED_BY_FORMAT = {"1": [n for n in _HASHED if n != "digest"], "2": _HASHED}
HASH_CHUNK = 65_536  # string values hashed per block


class StringColumn:
    """A read-only sequence of str over an Arrow string column (no Python object per row until read)."""

    def __init__(self, array: pa.ChunkedArray | pa.Array):
        self.array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: int) -> str:
        return self.array[int(i)].as_py()

    def __iter__(self):
        return iter(self.array.to_pylist())

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.array.to_pylist(), dtype=dtype if dtype is not None else object)

    def __eq__(self, other) -> bool:  # sequence equality, as a list would compare
        other = other.array.to_pylist() if isinstance(other, StringColumn) else list(other)
        return self.array.to_pylist() == other

    __hash__ = None  # type: ignore[assignment]

    def tolist(self) -> list[str]:
        return self.array.to_pylist()

    def count(self, value: str) -> int:
        return int(self.equals(value).sum())

    def equals(self, value: str) -> np.ndarray:
        """[N] bool: rows equal to `value` (vectorised in Arrow)."""
        return np.asarray(pc.equal(self.array, value).fill_null(False))

    def take(self, rows: np.ndarray) -> list[str]:
        return self.array.take(pa.array(np.asarray(rows, dtype=np.int64))).to_pylist()

    def to_bytes(self) -> np.ndarray:
        """[N] fixed-width bytes ('S'), e.g. keys: a few bytes per row, shareable with forked workers."""
        return np.asarray(self.array.cast(pa.binary()).to_numpy(zero_copy_only=False), dtype="S")


@dataclass
class Manifest:
    """An in-memory manifest: the table plus its hash and the shard URLs it was built from."""

    table: pa.Table
    hash: str
    shard_urls: list[str]
    path: Path | None = None
    shard_stats: dict[str, list[int] | None] | None = None  # name -> [size, mtime_ns, inode] (`stale_reason`)
    format: str = FORMAT_VERSION                             # "1": written before the digest column
    _rows_by_key: dict[str, int] | None = field(default=None, init=False, repr=False)

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def keys(self) -> StringColumn:
        return self.column("key")

    @property
    def status(self) -> StringColumn:
        return self.column("status")

    def column(self, name: str) -> np.ndarray | StringColumn:
        """A numeric column as a numpy array, a string column as a `StringColumn`."""
        if name not in self.table.column_names:
            raise SalmaeError(f"manifest has no column '{name}'; columns are {', '.join(self.table.column_names)}")
        col = self.table.column(name)
        if pa.types.is_string(col.type):
            return StringColumn(col)
        return col.to_numpy()

    def row_of(self, key: str) -> int:
        """The row of `key`; SalmaeError naming the key if the manifest does not hold it."""
        if self._rows_by_key is None:
            self._rows_by_key = {k: i for i, k in enumerate(self.keys) if k}
        try:
            return self._rows_by_key[key]
        except KeyError:
            where = f" {self.path}" if self.path else ""
            raise SalmaeError(f"key {key!r} is not in manifest{where}; check the key "
                              "or rebuild the manifest for these shards") from None

    def rows_of_shard(self, name: str) -> list[int]:
        """Rows whose shard file name is `name` (e.g. "00003.tar"), in row order."""
        return np.nonzero(self.column("shard").equals(name))[0].tolist()

    def shard_url(self, name: str) -> str | None:
        """The URL this manifest scanned for shard file `name`, if any."""
        return next((u for u in self.shard_urls if shard_name(u) == name), None)


@dataclass
class VerifyReport:
    """What differs between a manifest and a set of shards (by shard file name)."""

    manifest: str
    missing: list[str]  # in the manifest, not among the shards given
    extra: list[str]  # among the shards given, not in the manifest
    changed: dict[str, str]  # same name, different keys / statuses / image sizes -> what differs
    n_shards: int = 0
    n_rows: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.changed)

    def describe(self) -> str:
        if self.ok:
            return f"manifest {self.manifest} matches {self.n_shards} shards ({self.n_rows} rows)"
        lines = [f"manifest {self.manifest} does not match the shards given; "
                 f"rebuild it with `salmae manifest build` if the data changed on purpose"]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}): {_short_list(self.missing)}")
        if self.extra:
            lines.append(f"  extra ({len(self.extra)}): {_short_list(self.extra)}")
        for name, why in self.changed.items():
            lines.append(f"  changed: {name}: {why}")
        return "\n".join(lines)


def _short_list(items: Sequence[str], limit: int = 10) -> str:
    more = f" … and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# --------------------------------------------------------------------------- build / load
def _scan_shard(url: str) -> list[dict]:
    """One record per sample of a shard, sorted by key."""
    name = shard_name(url)
    records = [{
        "key": s.key, "shard": name, "caption": s.caption or "", "width": s.width, "height": s.height,
        "status": s.error or "ok", "image_offset": s.image_offset, "image_nbytes": s.image_nbytes,
        "image_ext": s.image_ext, "digest": content_digest(s.image_bytes),
    } for s in iter_shard(url, decode=False)]
    return sorted(records, key=lambda r: r["key"])


def content_digest(data: bytes | None) -> bytes:
    """The first 16 bytes of the sha256 of a member's bytes (16 zero bytes when there is no member).
    sha256, not BLAKE2b: with the CPU's SHA instructions it hashed 1.06 GB/s here against 0.51."""
    if data is None:
        return bytes(DIGEST_BYTES)
    return hashlib.sha256(data).digest()[:DIGEST_BYTES]


def _scan_columns(url: str) -> pa.Table:
    """One shard's rows as an Arrow table (without `row`): what a pool worker sends back."""
    records = _scan_shard(url)
    return pa.table({name: [r[name] for r in records] for name in _HASHED}, schema=SCHEMA.remove(0))


def default_scan_workers(n_shards: int) -> int:
    """Processes that scan shards: every CPU this process may use, at most one per shard."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, n_shards))


def build_manifest(shards: str | Sequence[str], out: str | Path | None = None,
                   workers: int | None = None) -> Manifest:
    """Scan `shards` once and build the manifest; write it atomically to `out` if given.

    Shards are scanned by `workers` processes (default: one per CPU, at most one per shard), in
    order. Raises SalmaeError if two shards share a file name or a key appears twice.
    """
    urls = expand_shards(shards)
    names = [shard_name(u) for u in urls]
    dupes = [n for n, c in collections.Counter(names).items() if c > 1]
    if dupes:
        raise SalmaeError(f"shard name {dupes[0]} appears twice in {shards!r}; manifests match shards by "
                          "file name, so build one manifest per folder")
    workers = default_scan_workers(len(urls)) if workers is None else max(1, min(workers, len(urls)))
    parts = list(_progress(_scan_all(urls, workers), len(urls)))
    body = pa.concat_tables(parts) if parts else SCHEMA.remove(0).empty_table()
    _check_unique_keys(body)
    table = pa.Table.from_arrays([pa.array(np.arange(body.num_rows, dtype=np.int64)), *body.columns],
                                 schema=SCHEMA)
    manifest = Manifest(table=table, hash=manifest_hash(table), shard_urls=urls)
    manifest.shard_stats = shard_stats(urls)
    if out is not None:
        manifest.path = Path(out)
        _write(manifest, manifest.path)
    return manifest


def _scan_all(urls: list[str], workers: int):
    """Per-shard tables in shard order, from a process pool when `workers` > 1."""
    if workers == 1:
        yield from map(_scan_columns, urls)
        return
    import multiprocessing as mp

    # fork: the workers need no re-import; each scan opens its own shard (no state is shared)
    with mp.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(_scan_columns, urls)


def _progress(items, total: int):
    from salmae.pipeline.progress import progress_bar

    return progress_bar(items, total=total, desc="manifest", unit="shard", disable=total < 2, leave=False)


def shard_stats(urls: Sequence[str]) -> dict[str, list[int] | None]:
    """name -> [size in bytes, mtime in ns] of each local shard; None for streamed (pipe:, remote) ones."""
    stats: dict[str, list[int] | None] = {}
    for url in urls:
        path = url[len("file://"):] if url.startswith("file://") else url
        if url.startswith("pipe:") or ("://" in url and not url.startswith("file://")):
            stats[shard_name(url)] = None
            continue
        st = os.stat(path)
        stats[shard_name(url)] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return stats


def stale_reason(manifest: "Manifest", shards: str | Sequence[str]) -> str | None:
    """Why `manifest` may not describe `shards` any more (None: it does), from names, sizes and
    modification times alone: O(shards), no shard is read. Streamed shards are matched by name.

    A manifest written before shard stats were recorded is always stale (rebuild or verify it).
    """
    urls = expand_shards(shards)
    if manifest.shard_stats is None:
        return "it records no shard sizes/times (built by an older salmae)"
    recorded = manifest.shard_stats
    now = shard_stats(urls)
    missing = sorted(set(recorded) - set(now))
    extra = sorted(set(now) - set(recorded))
    if missing or extra:
        return f"shards differ ({len(missing)} missing, e.g. {missing[:1]}; {len(extra)} extra, e.g. {extra[:1]})"
    # [size, mtime] in manifests before the inode was recorded
    changed = [name for name, st in now.items() if st is not None and recorded[name] != st[:len(recorded[name] or [])]]
    if changed:
        return f"{len(changed)} shards changed (size, time or file) since it was built (e.g. {changed[0]})"
    return None


def _check_unique_keys(table: pa.Table) -> None:
    keys = table.column("key").combine_chunks()
    real = pc.not_equal(keys, "")          # a truncated shard's marker row has no key
    counts = pc.value_counts(keys.filter(real))
    dupes = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
    if len(dupes):
        key = dupes[0].as_py()
        shards = table.column("shard").filter(pc.equal(table.column("key"), key)).to_pylist()
        raise SalmaeError(f"key {key} appears in both {shards[0]} and {shards[1]}; keys must be "
                          "unique, so build one manifest per img2dataset output folder")


def manifest_hash(table: pa.Table, format: str = FORMAT_VERSION) -> str:
    """sha256 over the content columns in order; independent of where the shards live.

    A string column is hashed as each value's 4-byte little-endian UTF-8 length then its bytes,
    built with numpy from the Arrow buffers (no Python object per row); the digest column as its
    16 bytes per row; numbers as little-endian int64.
    """
    h = hashlib.sha256(f"salmae-manifest-v{format}\n".encode())
    for name in _HASHED_BY_FORMAT[format]:
        col = table.column(name)
        h.update(name.encode() + b"\n")
        if pa.types.is_string(col.type):
            for lo in range(0, len(col), HASH_CHUNK):   # bounded memory: ~30 bytes per string byte at once
                h.update(_length_prefixed(col.slice(lo, HASH_CHUNK)))
        elif pa.types.is_fixed_size_binary(col.type):
            h.update(_fixed_bytes(col))
        else:
            h.update(np.asarray(col.to_numpy(), dtype="<i8").tobytes())
    return h.hexdigest()


def _fixed_bytes(col: pa.ChunkedArray) -> bytes:
    """The values of a fixed-size binary column back to back (nulls as zeros)."""
    arr = col.combine_chunks()
    width = arr.type.byte_width
    if len(arr) == 0:
        return b""
    data = np.frombuffer(arr.buffers()[1], dtype=np.uint8)[arr.offset * width:(arr.offset + len(arr)) * width]
    if arr.null_count:
        data = data.copy().reshape(len(arr), width)
        data[np.asarray(arr.is_null())] = 0
    return data.tobytes()


def shard_hashes(manifest: "Manifest") -> dict[str, str]:
    """Shard file name -> sha256 (hex, 16 digits) of that shard's rows: says *which* shard differs
    when two manifests' hashes do. Rows are in shard order, so each shard is one slice."""
    names = manifest.column("shard")
    out: dict[str, str] = {}
    if len(manifest) == 0:
        return out
    arr = names.array
    starts = [0, *(np.nonzero(np.asarray(pc.not_equal(arr.slice(1), arr.slice(0, len(arr) - 1))))[0] + 1).tolist()]
    for lo, hi in zip(starts, [*starts[1:], len(arr)]):
        out[arr[lo].as_py()] = manifest_hash(manifest.table.slice(lo, hi - lo), manifest.format)[:16]
    return out


def first_difference(recorded: dict[str, str], now: dict[str, str]) -> str | None:
    """'shard NAME changed' / 'is missing' / 'is new' for the first shard (by name) whose rows differ; None if none."""
    for name in sorted(set(recorded) | set(now)):
        if name not in now:
            return f"shard {name} is missing"
        if name not in recorded:
            return f"shard {name} is new"
        if recorded[name] != now[name]:
            return f"shard {name} changed (its samples' keys, sizes or bytes differ)"
    return None


def _length_prefixed(col: pa.ChunkedArray) -> bytes:
    """b"".join(len(v).to_bytes(4, "little") + v for v in utf8 values), vectorised."""
    arr = col.combine_chunks().cast(pa.large_string())
    n = len(arr)
    if n == 0:
        return b""
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset:arr.offset + n + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]] if offsets[-1] > offsets[0] \
        else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    out = np.empty(4 * n + len(data), dtype=np.uint8)
    starts = offsets[:-1] - offsets[0] + 4 * np.arange(n)                 # where each value's length goes
    out[(starts[:, None] + np.arange(4)).ravel()] = lengths.astype("<u4").view(np.uint8)
    owner = np.repeat(np.arange(n), lengths)                                # value index of each data byte
    out[np.arange(len(data)) + 4 * (owner + 1)] = data
    return out.tobytes()


def _write(manifest: Manifest, path: Path) -> None:
    meta = {
        b"salmae.hash": manifest.hash.encode(),
        b"salmae.shards": json.dumps(manifest.shard_urls).encode(),
        b"salmae.format": manifest.format.encode(),
    }
    if manifest.shard_stats is not None:
        meta[b"salmae.shard_stats"] = json.dumps(manifest.shard_stats).encode()
    table = manifest.table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def load_manifest(path: str | Path) -> Manifest:
    """Read a manifest written by `build_manifest`; SalmaeError if missing, foreign or edited."""
    path = Path(path)
    build = f"build it with `salmae manifest build 'SHARDS' -o {path}`"
    if not path.is_file():
        raise SalmaeError(f"manifest {path} not found; {build}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise SalmaeError(f"manifest {path} is not a readable parquet file ({type(e).__name__}); {build}") from None
    meta = table.schema.metadata or {}
    if b"salmae.hash" not in meta:
        raise SalmaeError(f"{path} is not a salmae manifest (no salmae.hash or missing columns); {build}")
    fmt = meta.get(b"salmae.format", b"1").decode()
    if fmt not in _HASHED_BY_FORMAT:
        raise SalmaeError(f"manifest {path} has format {fmt!r}, newer than this salmae reads "
                          f"({', '.join(_HASHED_BY_FORMAT)}); upgrade salmae or {build}")
    schema = SCHEMA if fmt == FORMAT_VERSION else SCHEMA_V1
    if set(schema.names) - set(table.column_names):
        raise SalmaeError(f"{path} is not a salmae manifest (missing columns); {build}")
    table = table.select(schema.names).cast(schema)
    recorded = meta[b"salmae.hash"].decode()
    if manifest_hash(table, fmt) != recorded:
        raise SalmaeError(f"manifest {path} was edited after it was built (content hash differs); {build}")
    urls = json.loads(meta.get(b"salmae.shards", b"[]"))
    manifest = Manifest(table=table, hash=recorded, shard_urls=urls, path=path, format=fmt)
    if b"salmae.shard_stats" in meta:
        manifest.shard_stats = json.loads(meta[b"salmae.shard_stats"])
    return manifest


# --------------------------------------------------------------------------- verify / describe
def verify_manifest(path: str | Path, shards: str | Sequence[str]) -> VerifyReport:
    """Compare a manifest with `shards` (matched by file name): missing, extra, changed shards.

    A shard has changed when its keys, statuses, image byte sizes or (format 2) image bytes differ
    from the manifest's.
    """
    manifest = load_manifest(path)
    urls = expand_shards(shards)
    digests = manifest.table.column("digest").to_pylist() if manifest.format != "1" else [None] * len(manifest)
    by_shard: dict[str, list[tuple]] = collections.defaultdict(list)
    for key, name, status, nbytes, digest in zip(manifest.keys, manifest.column("shard"), manifest.status,
                                                 manifest.column("image_nbytes").tolist(), digests):
        by_shard[name].append((key, status, nbytes, digest))
    given = {shard_name(u): u for u in urls}
    report = VerifyReport(manifest=str(path), missing=[n for n in by_shard if n not in given],
                          extra=[n for n in given if n not in by_shard], changed={},
                          n_shards=len(given), n_rows=len(manifest))
    for name, url in given.items():
        if name in by_shard:
            now = [(r["key"], r["status"], r["image_nbytes"], r["digest"] if manifest.format != "1" else None)
                   for r in _scan_shard(url)]
            why = _difference(sorted(by_shard[name]), sorted(now))
            if why:
                report.changed[name] = why
    return report


def _difference(before: list[tuple], now: list[tuple]) -> str:
    if [r[0] for r in before] != [r[0] for r in now]:
        gone = {r[0] for r in before} - {r[0] for r in now}
        new = {r[0] for r in now} - {r[0] for r in before}
        return f"keys differ ({len(before)} -> {len(now)} samples, {len(gone)} gone, {len(new)} new)"
    for column, what in ((1, "status changed"), (2, "image bytes changed"), (3, "image content changed")):
        differ = [b[0] for b, n in zip(before, now) if b[column] != n[column]]
        if differ:
            return f"{what} for {len(differ)} samples (first {differ[0]})"
    return ""


def describe_manifest(m: Manifest) -> str:
    """One paragraph: where, how many rows and shards, the damage by reason, the hash."""
    counts = collections.Counter(m.status)
    ok = counts.pop("ok", 0)
    damage = ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items())) or "none"
    where = f"manifest {m.path}" if m.path else "manifest (not written)"
    n_shards = len(set(m.column("shard")))
    return (f"{where}: {len(m)} rows from {n_shards} shards; {ok} ok, {len(m) - ok} damaged ({damage}); "
            f"hash {m.hash[:16]}")
