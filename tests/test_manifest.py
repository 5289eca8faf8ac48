"""Data manifests: one row per sample in a stable order, a location-independent hash, verify."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from salmae.pipeline.data.shapes import write_shapes
from salmae.pipeline.data.manifest import build_manifest, describe_manifest, load_manifest, verify_manifest
from salmae.pipeline.errors import SalmaeError


@pytest.fixture()
def shards_copy(tmp_path, shapes_dir):
    """The two generated shards copied somewhere we may damage them."""
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("00000.tar", "00001.tar"):
        shutil.copy(shapes_dir / name, folder / name)
    return folder


def test_one_row_per_sample_with_contract_columns(tmp_path, shapes_dir, shapes_pattern):
    m = build_manifest(shapes_pattern, tmp_path / "m.parquet")
    table = pq.read_table(tmp_path / "m.parquet")
    assert table.column_names == ["row", "key", "shard", "caption", "width", "height", "status",
                                 "image_offset", "image_nbytes", "image_ext", "digest"]
    assert table.schema.field("row").type == pa.int64() and table.schema.field("width").type == pa.int32()
    assert table.column("row").to_pylist() == list(range(64)) == list(range(len(m)))
    parquet_keys = [k for n in ("00000", "00001") for k in pq.read_table(shapes_dir / f"{n}.parquet").column("key").to_pylist()]
    assert list(m.keys) == parquet_keys  # shard order, then key
    assert set(m.status) == {"ok"} and set(m.column("width")) == {32}
    assert table.schema.metadata[b"salmae.hash"].decode() == m.hash
    assert not list(tmp_path.glob(".m.parquet.tmp*"))  # written through a temp file


def test_order_and_hash_stable_and_location_independent(tmp_path, shapes_pattern, shards_copy):
    a = build_manifest(shapes_pattern, tmp_path / "a.parquet")
    b = build_manifest(shapes_pattern, tmp_path / "b.parquet")
    moved = build_manifest(str(shards_copy / "{00000..00001}.tar"))
    piped = build_manifest([f"pipe:cat {shards_copy / name}" for name in ("00000.tar", "00001.tar")])
    assert a.keys == b.keys and a.table.equals(b.table)
    assert a.hash == b.hash == moved.hash == piped.hash
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_load_and_lookups(tmp_path, shapes_pattern):
    built = build_manifest(shapes_pattern, tmp_path / "m.parquet")
    m = load_manifest(tmp_path / "m.parquet")
    assert m.hash == built.hash and list(m.keys) == list(built.keys) and m.shard_urls == built.shard_urls
    assert m.row_of(m.keys[40]) == 40
    assert m.rows_of_shard("00001.tar") == list(range(32, 64))
    with pytest.raises(SalmaeError, match="'99999'"):
        m.row_of("99999")
    assert "64 rows from 2 shards; 64 ok, 0 damaged" in describe_manifest(m)


def test_damaged_samples_are_rows(tmp_path, shards_copy):
    data = (shards_copy / "00001.tar").read_bytes()
    (shards_copy / "00001.tar").write_bytes(data[: len(data) // 2])
    m = build_manifest(str(shards_copy / "{00000..00001}.tar"))
    statuses = m.status
    assert statuses.count("truncated_tar") == 1 and statuses[-1] == "truncated_tar"
    assert 32 < len(m) < 64 and statuses.count("ok") == len(m) - 1
    assert "truncated_tar 1" in describe_manifest(m)


def test_load_errors_name_the_file(tmp_path, shapes_pattern):
    with pytest.raises(SalmaeError, match="nope.parquet not found.*salmae manifest build"):
        load_manifest(tmp_path / "nope.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(SalmaeError, match="junk.parquet"):
        load_manifest(tmp_path / "junk.parquet")
    pq.write_table(pa.table({"key": ["1"]}), tmp_path / "other.parquet")
    with pytest.raises(SalmaeError, match="not a salmae manifest"):
        load_manifest(tmp_path / "other.parquet")
    m = build_manifest(shapes_pattern, tmp_path / "m.parquet")
    edited = m.table.set_column(3, "caption", pa.array(["x"] * len(m))).replace_schema_metadata(
        pq.read_table(tmp_path / "m.parquet").schema.metadata)
    pq.write_table(edited, tmp_path / "m.parquet")
    with pytest.raises(SalmaeError, match="edited"):
        load_manifest(tmp_path / "m.parquet")


def test_verify_reports_missing_extra_changed(tmp_path, shards_copy):
    pattern = str(shards_copy / "{00000..00001}.tar")
    build_manifest(pattern, tmp_path / "m.parquet")
    report = verify_manifest(tmp_path / "m.parquet", pattern)
    assert report.ok and "matches 2 shards (64 rows)" in report.describe()

    missing = verify_manifest(tmp_path / "m.parquet", str(shards_copy / "00000.tar"))
    assert not missing.ok and missing.missing == ["00001.tar"] and "missing (1): 00001.tar" in missing.describe()

    write_shapes(tmp_path / "more", n=96, image_size=32, seed=0, shard_size=32)
    extra = verify_manifest(tmp_path / "m.parquet", [pattern, str(tmp_path / "more" / "00002.tar")])
    assert extra.extra == ["00002.tar"] and not extra.missing

    write_shapes(tmp_path / "other", n=64, image_size=32, seed=9, shard_size=32)  # same keys, other bytes
    shutil.copy(tmp_path / "other" / "00001.tar", shards_copy / "00001.tar")
    changed = verify_manifest(tmp_path / "m.parquet", pattern)
    assert list(changed.changed) == ["00001.tar"] and "image bytes changed" in changed.describe()


def test_duplicate_keys_and_names_are_errors(tmp_path, shapes_dir):
    (tmp_path / "x").mkdir()
    shutil.copy(shapes_dir / "00000.tar", tmp_path / "x" / "00000.tar")
    with pytest.raises(SalmaeError, match="00000.tar appears twice"):
        build_manifest([str(shapes_dir / "00000.tar"), str(tmp_path / "x" / "00000.tar")])
    shutil.copy(shapes_dir / "00000.tar", tmp_path / "x" / "00005.tar")
    with pytest.raises(SalmaeError, match="appears in both 00000.tar and 00005.tar"):
        build_manifest(str(tmp_path / "x" / "{00000,00005}.tar"))


# --------------------------------------------------------------------------- scale (issue 10)
def _reference_hash(table: pa.Table) -> str:
    """The manifest hash as first written: a Python loop over every value (the digest must not change)."""
    import hashlib

    import numpy as np

    from salmae.pipeline.data.manifest import FORMAT_VERSION, _HASHED

    h = hashlib.sha256(f"salmae-manifest-v{FORMAT_VERSION}\n".encode())
    for name in _HASHED:
        col = table.column(name)
        h.update(name.encode() + b"\n")
        if pa.types.is_string(col.type):
            h.update(b"".join(len(v.encode()).to_bytes(4, "little") + v.encode() for v in col.to_pylist()))
        elif pa.types.is_fixed_size_binary(col.type):
            h.update(b"".join(col.to_pylist()))
        else:
            h.update(np.asarray(col.to_numpy(), dtype="<i8").tobytes())
    return h.hexdigest()


def test_vectorised_hash_equals_the_per_value_definition(shapes_pattern, monkeypatch):
    import salmae.pipeline.data.manifest as manifest_mod
    from salmae.pipeline.data.manifest import manifest_hash

    m = build_manifest(shapes_pattern)
    assert m.hash == _reference_hash(m.table)
    monkeypatch.setattr(manifest_mod, "HASH_CHUNK", 7)       # blocks that cut through the column
    assert manifest_hash(m.table) == m.hash
    # non-ASCII captions, empty strings and a sliced (offset) table hash the same way too
    odd = m.table.set_column(3, "caption", pa.array(["é ü 漢字 🙂", ""] * (len(m) // 2)))
    assert manifest_hash(odd) == _reference_hash(odd)
    assert manifest_hash(odd.slice(5, 20)) == _reference_hash(odd.slice(5, 20))
    assert manifest_hash(odd.slice(0, 0)) == _reference_hash(odd.slice(0, 0))


def test_pool_scan_equals_one_process(shapes_pattern):
    one = build_manifest(shapes_pattern, workers=1)
    two = build_manifest(shapes_pattern, workers=2)
    assert one.hash == two.hash and one.table.equals(two.table)
    assert list(one.keys)[:2] == ["0000000", "0000001"] and one.rows_of_shard("00001.tar")[0] == 32


def test_stale_reason_from_sizes_and_times(tmp_path, shards_copy):
    import os

    from salmae.pipeline.data.manifest import stale_reason

    pattern = str(shards_copy / "{00000..00001}.tar")
    m = build_manifest(pattern, tmp_path / "m.parquet")
    loaded = load_manifest(tmp_path / "m.parquet")
    assert loaded.shard_stats == m.shard_stats and set(m.shard_stats) == {"00000.tar", "00001.tar"}
    assert stale_reason(loaded, pattern) is None
    assert "1 missing" in stale_reason(loaded, str(shards_copy / "00000.tar"))
    st = os.stat(shards_copy / "00001.tar")
    os.utime(shards_copy / "00001.tar", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes
    assert "changed (size, time or file)" in stale_reason(loaded, pattern) and "00001.tar" in stale_reason(loaded, pattern)
    piped = [f"pipe:cat {shards_copy / n}" for n in ("00000.tar", "00001.tar")]
    assert stale_reason(build_manifest(piped), piped) is None        # streamed shards: names only
    old = load_manifest(tmp_path / "m.parquet")
    old.shard_stats = None                                           # as written before stats existed
    assert "older salmae" in stale_reason(old, pattern)


def test_string_columns_are_arrow_backed(shapes_pattern):
    from salmae.pipeline.data.manifest import StringColumn

    m = build_manifest(shapes_pattern)
    keys, status = m.keys, m.status
    assert isinstance(keys, StringColumn) and keys[3] == "0000003" and len(keys) == 64
    assert keys.to_bytes().dtype.kind == "S" and keys.to_bytes()[3] == b"0000003"
    assert status.equals("ok").sum() == 64 == status.count("ok")
    assert m.column("width").dtype.kind == "i" and keys.take([1, 0]) == ["0000001", "0000000"]
