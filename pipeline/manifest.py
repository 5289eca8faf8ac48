"""Data manifests: one parquet row per sample of a set of img2dataset shards, damaged ones included.

`build_manifest` scans the shards once (image headers only, no full decode) and writes, in
shard order then key order, the columns

    row (int64 0..N-1)  key  shard (file name)  caption  width height (int32, 0 if unreadable)
    status ("ok" or a DAMAGE_REASONS code)  image_offset image_nbytes (int64, -1 if none)  image_ext

The file metadata holds `salmae.hash`, a sha256 over those columns that does not depend on
where the shards live (shards are named by file name), and `salmae.shards`, the URLs scanned.
Later stages record the hash and refuse data whose manifest hash differs.
"""

from __future__ import annotations

import collections
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.shards import expand_shards, iter_shard, shard_name
from pipeline.errors import SalmaeError
from pipeline.files import atomic_path

FORMAT_VERSION = "1"
SCHEMA = pa.schema([
    ("row", pa.int64()), ("key", pa.string()), ("shard", pa.string()), ("caption", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("status", pa.string()),
    ("image_offset", pa.int64()), ("image_nbytes", pa.int64()), ("image_ext", pa.string()),
])
_HASHED = [name for name in SCHEMA.names if name != "row"]  # row is implied by the order


@dataclass
class Manifest:
    """An in-memory manifest: the table plus its hash and the shard URLs it was built from."""

    table: pa.Table
    hash: str
    shard_urls: list[str]
    path: Path | None = None
    _rows_by_key: dict[str, int] | None = field(default=None, init=False, repr=False)

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def keys(self) -> list[str]:
        return self.table.column("key").to_pylist()

    @property
    def status(self) -> list[str]:
        return self.table.column("status").to_pylist()

    def column(self, name: str) -> list:
        if name not in self.table.column_names:
            raise SalmaeError(f"manifest has no column '{name}'; columns are {', '.join(self.table.column_names)}")
        return self.table.column(name).to_pylist()

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
        return [i for i, s in enumerate(self.column("shard")) if s == name]

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
        "image_ext": s.image_ext,
    } for s in iter_shard(url, decode=False)]
    return sorted(records, key=lambda r: r["key"])


def build_manifest(shards: str | Sequence[str], out: str | Path | None = None) -> Manifest:
    """Scan `shards` once and build the manifest; write it atomically to `out` if given.

    Raises SalmaeError if two shards share a file name or a key appears twice.
    """
    urls = expand_shards(shards)
    names = [shard_name(u) for u in urls]
    dupes = [n for n, c in collections.Counter(names).items() if c > 1]
    if dupes:
        raise SalmaeError(f"shard name {dupes[0]} appears twice in {shards!r}; manifests match shards by "
                          "file name, so build one manifest per folder")
    records = [r for url in _progress(urls) for r in _scan_shard(url)]
    _check_unique_keys(records)
    columns = {name: [r[name] for r in records] for name in _HASHED}
    table = pa.table({"row": np.arange(len(records), dtype=np.int64), **columns}, schema=SCHEMA)
    manifest = Manifest(table=table, hash=manifest_hash(table), shard_urls=urls)
    if out is not None:
        manifest.path = Path(out)
        _write(manifest, manifest.path)
    return manifest


def _progress(urls: list[str]):
    from tqdm import tqdm

    return tqdm(urls, desc="manifest", unit="shard", disable=len(urls) < 2, leave=False)


def _check_unique_keys(records: list[dict]) -> None:
    seen: dict[str, str] = {}
    for r in records:
        if not r["key"]:  # a truncated shard's marker row with no key
            continue
        if r["key"] in seen:
            raise SalmaeError(f"key {r['key']} appears in both {seen[r['key']]} and {r['shard']}; keys must be "
                              "unique, so build one manifest per img2dataset output folder")
        seen[r["key"]] = r["shard"]


def manifest_hash(table: pa.Table) -> str:
    """sha256 over the content columns in order; independent of where the shards live."""
    h = hashlib.sha256(f"salmae-manifest-v{FORMAT_VERSION}\n".encode())
    for name in _HASHED:
        col = table.column(name)
        h.update(name.encode() + b"\n")
        if pa.types.is_string(col.type):
            values = col.to_pylist()
            h.update(b"".join(len(v.encode()).to_bytes(4, "little") + v.encode() for v in values))
        else:
            h.update(np.asarray(col.to_numpy(), dtype="<i8").tobytes())
    return h.hexdigest()


def _write(manifest: Manifest, path: Path) -> None:
    meta = {
        b"salmae.hash": manifest.hash.encode(),
        b"salmae.shards": json.dumps(manifest.shard_urls).encode(),
        b"salmae.format": FORMAT_VERSION.encode(),
    }
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
    if b"salmae.hash" not in meta or set(SCHEMA.names) - set(table.column_names):
        raise SalmaeError(f"{path} is not a salmae manifest (no salmae.hash or missing columns); {build}")
    table = table.select(SCHEMA.names).cast(SCHEMA)
    recorded = meta[b"salmae.hash"].decode()
    if manifest_hash(table) != recorded:
        raise SalmaeError(f"manifest {path} was edited after it was built (content hash differs); {build}")
    urls = json.loads(meta.get(b"salmae.shards", b"[]"))
    return Manifest(table=table, hash=recorded, shard_urls=urls, path=path)


# --------------------------------------------------------------------------- verify / describe
def verify_manifest(path: str | Path, shards: str | Sequence[str]) -> VerifyReport:
    """Compare a manifest with `shards` (matched by file name): missing, extra, changed shards.

    A shard has changed when its keys, statuses or image byte sizes differ from the manifest's.
    """
    manifest = load_manifest(path)
    urls = expand_shards(shards)
    by_shard: dict[str, list[tuple]] = collections.defaultdict(list)
    for key, name, status, nbytes in zip(manifest.keys, manifest.column("shard"), manifest.status,
                                         manifest.column("image_nbytes")):
        by_shard[name].append((key, status, nbytes))
    given = {shard_name(u): u for u in urls}
    report = VerifyReport(manifest=str(path), missing=[n for n in by_shard if n not in given],
                          extra=[n for n in given if n not in by_shard], changed={},
                          n_shards=len(given), n_rows=len(manifest))
    for name, url in given.items():
        if name in by_shard:
            now = [(r["key"], r["status"], r["image_nbytes"]) for r in _scan_shard(url)]
            why = _difference(sorted(by_shard[name]), sorted(now))
            if why:
                report.changed[name] = why
    return report


def _difference(before: list[tuple], now: list[tuple]) -> str:
    if [k for k, _, _ in before] != [k for k, _, _ in now]:
        gone = {k for k, _, _ in before} - {k for k, _, _ in now}
        new = {k for k, _, _ in now} - {k for k, _, _ in before}
        return f"keys differ ({len(before)} -> {len(now)} samples, {len(gone)} gone, {len(new)} new)"
    statuses = [k for (k, s0, _), (_, s1, _) in zip(before, now) if s0 != s1]
    if statuses:
        return f"status changed for {len(statuses)} samples (first {statuses[0]})"
    sizes = [k for (k, _, b0), (_, _, b1) in zip(before, now) if b0 != b1]
    if sizes:
        return f"image bytes changed for {len(sizes)} samples (first {sizes[0]})"
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
