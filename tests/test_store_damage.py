"""Issue 23, items 5, 6, 12 (store part) and 14: a damaged saliency store is an error naming the store,
the shard file and its rows (stage 2, `salmae inspect`), never zero or garbage maps nor a traceback;
a rerun recomputes shards whose files are missing, `--repair` also unreadable or out-of-range ones,
and nothing else."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from zarr.codecs import BloscCodec, BloscShuffle

from salmae.pipeline.cli import cli
from salmae.pipeline.data.manifest import load_manifest
from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.pretrain.data import load_saliency_table
from salmae.pipeline.saliency.store import SaliencyStore, StoreDamaged
from salmae.stages.inspect import inspect_store
from salmae.stages.saliency import run
from test_saliency_stage import _cfg

ARRAYS = ("saliency", "scale", "status", "key", "frame", "image_size")


def _array_bytes(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes()
            for name in ARRAYS for p in sorted((store / name).rglob("*")) if p.is_file()}


def _table(store: Path):
    return load_saliency_table(load_manifest(store / "manifest.parquet"), SaliencyStore.open(store))


def _run_ids(store: Path) -> dict[int, str]:
    return {s: m["run_id"] for s, m in SaliencyStore.open(store).done_markers().items()}


@pytest.fixture(scope="module")
def baseline(shapes_pattern, tmp_path_factory):
    """A finished 64-row store in 4 shards of 16 rows."""
    out = tmp_path_factory.mktemp("damage") / "store.zarr"
    run(_cfg(shapes_pattern, out))
    return out


@pytest.fixture
def copy(baseline, tmp_path):
    out = tmp_path / "store.zarr"
    shutil.copytree(baseline, out)
    return out


def _flip(path: Path, n: int = 16, seed: int = 0) -> None:
    """Flip `n` bytes of a shard file's chunk data (not its index, the last 16 bytes + crc)."""
    data = bytearray(path.read_bytes())
    for i in np.random.default_rng(seed).choice(len(data) - 20, size=n, replace=False):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_missing_shard_file_is_an_error_and_a_rerun_recomputes_exactly_it(baseline, copy, shapes_pattern):
    clean = _table(baseline)
    (copy / "saliency" / "c" / "1" / "0" / "0").unlink()
    with pytest.raises(StoreDamaged, match=rf"saliency store {copy} is damaged: shard 1 saliency file "
                                           r"saliency/c/1/0/0 is missing \(its 16 ok rows would read as zero maps\) "
                                           r"\(rows 16-31\).*--repair"):
        _table(copy)
    summary = inspect_store(copy)
    assert [(d["shard"], d["array"], d["rows"]) for d in summary["damaged"]] == [(1, "saliency", "16-31")]
    assert summary["status"]["ok"]["count"] == 48 and summary["status"]["damaged_store"]["count"] == 16
    result = CliRunner().invoke(cli, ["inspect", str(copy)])
    assert result.exit_code == 1 and "DAMAGED shard 1 saliency file saliency/c/1/0/0 is missing" in result.output
    before = _run_ids(copy)
    summary = run(_cfg(shapes_pattern, copy))                        # a plain rerun: the file is missing
    assert summary["images_this_run"] == 16
    after = _run_ids(copy)
    assert [s for s in after if after[s] != before[s]] == [1]          # only the damaged shard was recomputed
    assert _array_bytes(copy) == _array_bytes(baseline)
    repaired = _table(copy)
    np.testing.assert_array_equal(repaired.maps, clean.maps)
    np.testing.assert_array_equal(repaired.ok, clean.ok)


def test_flipped_bytes_are_a_checksum_error_and_repair_recomputes_exactly_that_shard(baseline, copy, shapes_pattern):
    _flip(copy / "saliency" / "c" / "2" / "0" / "0")
    with pytest.raises(StoreDamaged, match=r"shard 2 saliency file saliency/c/2/0/0 is unreadable \(checksum "
                                           r"mismatch\) \(rows 32-47\)"):
        _table(copy)
    with pytest.raises(StoreDamaged, match="rows 32-47"):
        SaliencyStore.open(copy).read([40])                           # every reader, not only stage 2
    assert [d["shard"] for d in inspect_store(copy)["damaged"]] == [2]
    assert run(_cfg(shapes_pattern, copy))["images_this_run"] == 0   # a plain rerun only checks that files exist
    before = _run_ids(copy)
    summary = run(_cfg(shapes_pattern, copy, repair=True))
    assert summary["images_this_run"] == 16
    after = _run_ids(copy)
    assert [s for s in after if after[s] != before[s]] == [2]
    assert _array_bytes(copy) == _array_bytes(baseline)
    assert inspect_store(copy)["damaged"] == []
    assert SaliencyStore.open(baseline).has_checksums


def _without_checksums(store: Path) -> None:
    """Rewrite the saliency array as stores made before checksums had it (blosc only), same values."""
    group = zarr.open_group(str(store), mode="r+", zarr_format=3)
    old = group["saliency"]
    values = old[:]
    del group["saliency"]
    new = group.create_array("saliency", shape=old.shape, dtype=old.dtype, chunks=old.chunks, shards=old.shards,
                             compressors=BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.shuffle),
                             fill_value=0)
    new[:] = values


def test_a_store_without_checksums_loads_and_gets_the_range_check(baseline, copy, shapes_pattern):
    clean = _table(baseline)
    _without_checksums(copy)
    np.testing.assert_array_equal(_table(copy).maps, clean.maps)       # still readable as before
    group = zarr.open_group(str(copy), mode="r+", zarr_format=3)
    garbage = group["saliency"][16:32]
    garbage[1:7, 0, 0] = np.linspace(-3072, 6084, 6)                    # what 16 flipped bytes once gave
    group["saliency"][16:32] = garbage
    with pytest.raises(StoreDamaged, match=r"shard 1 saliency file saliency/c/1/0/0 holds 6 maps no writer wrote "
                                           r"\(values from -3072 to 6084.*\(rows 17-22\)"):
        _table(copy)
    group["saliency"][16:32] = 0                                        # zeros: no file at all, ...
    assert not (copy / "saliency" / "c" / "1" / "0" / "0").exists()
    group["saliency"][48:49] = 0                                        # ... or one ok map zeroed in a file
    with pytest.raises(StoreDamaged, match=r"shard 1 saliency file .* is missing .*rows 16-31"):
        _table(copy)
    damage = SaliencyStore.open(copy).damaged_shards(thorough=True)
    assert [(d.shard, d.problem.split(" (")[0]) for d in damage] == [(1, "is missing"),
                                                                      (3, "holds 1 maps no writer wrote")]
    _flip(copy / "saliency" / "c" / "0" / "0" / "0")                    # no crc: blosc's own error, still one line
    with pytest.raises(StoreDamaged, match=r"shard 0 saliency file saliency/c/0/0/0 is unreadable \(RuntimeError"):
        SaliencyStore.open(copy).read([3])
    summary = run(_cfg(shapes_pattern, copy, repair=True))
    assert summary["images_this_run"] == 48                             # shards 0, 1 and 3
    np.testing.assert_array_equal(_table(copy).maps, clean.maps)
    assert not SaliencyStore.open(copy).has_checksums                  # repaired in the array's own format


def test_a_lost_status_file_is_fixed_by_a_rerun_and_a_lost_key_file_by_repair(baseline, copy, shapes_pattern):
    (copy / "status" / "c" / "1").unlink()
    with pytest.raises(StoreDamaged) as err:
        _table(copy)
    assert "shard 1 status file status/c/1 is missing" in str(err.value) and "--repair" in str(err.value)
    assert "finish it with" not in str(err.value)                       # a plain `salmae saliency` skipped it
    assert run(_cfg(shapes_pattern, copy))["images_this_run"] == 16
    (copy / "key" / "c" / "2").unlink()
    with pytest.raises(SalmaeError, match=r"16 keys of its manifest do not read back .*key column damaged in shards "
                                          r"2\).*--repair.*rewrites keys"):
        _table(copy)
    assert run(_cfg(shapes_pattern, copy, repair=True))["images_this_run"] == 0   # keys come from the manifest
    assert _array_bytes(copy) == _array_bytes(baseline)


def test_a_pending_shard_still_says_finish_it(baseline, copy):
    (copy / "_done" / "00003.json").unlink()
    group = zarr.open_group(str(copy), mode="r+", zarr_format=3)
    group["status"][48:64] = 0
    with pytest.raises(SalmaeError, match=r"misses 16 of 64 rows \(pending\).*finish it with the `salmae saliency` "
                                          r"command that made it"):
        _table(copy)


@pytest.mark.parametrize("attr,value,what", [("grid", [3, 3], "grid [3, 3]"), ("grid", "eight", "grid 'eight'"),
                                              ("grid", None, "grid None"), ("rows_per_shard", "x", "rows_per_shard 'x'"),
                                              ("rows_per_shard", 32, "rows_per_shard 32")])
def test_damaged_attrs_are_one_line(baseline, copy, shapes_pattern, attr, value, what):
    meta = json.loads((copy / "zarr.json").read_text())
    grid = meta["attributes"]["grid"]
    meta["attributes"][attr] = value
    (copy / "zarr.json").write_text(json.dumps(meta))
    message = re.escape(f"saliency store {copy}: attribute {what}")
    with pytest.raises(SalmaeError, match=message):
        _table(copy)
    with pytest.raises(SalmaeError, match=message):
        inspect_store(copy)
    result = CliRunner().invoke(cli, ["inspect", str(copy)])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "Traceback" not in result.output
    if attr == "grid":
        assert f"set it back to {grid}" in result.output
        with pytest.raises(SalmaeError, match=message):
            run(_cfg(shapes_pattern, copy))
        run(_cfg(shapes_pattern, copy, overwrite=True))                  # --overwrite replaces it
        assert _array_bytes(copy) == _array_bytes(baseline)


def test_repairing_with_other_settings_is_refused_as_a_resume_is(baseline, copy, shapes_pattern):
    (copy / "scale" / "c" / "3").unlink()
    with pytest.raises(SalmaeError, match=r"begun with precision fp32 on cpu.*batch_size 8 -> 4.*allow_mixed"):
        run(_cfg(shapes_pattern, copy, batch_size=4))                  # the maps would differ in their last bits
    assert not SaliencyStore.open(copy).is_done(3)                     # left for a rerun with the store's settings
    assert run(_cfg(shapes_pattern, copy))["images_this_run"] == 16
    assert _array_bytes(copy) == _array_bytes(baseline)


def test_the_cli_repairs(baseline, copy, shapes_pattern):
    _flip(copy / "status" / "c" / "0", n=4)
    result = CliRunner().invoke(cli, ["saliency", "--data", shapes_pattern, "--out", str(copy), "--clip-model",
                                      "salmae-micro", "--clip-pretrained", "none", "--batch-size", "8", "--workers",
                                      "0", "--device", "cpu", "--set", "rows_per_shard=16", "--repair"])
    assert result.exit_code == 0, result.output
    assert _array_bytes(copy) == _array_bytes(baseline)


@pytest.mark.parametrize("damage,message", [
    (lambda store: (store / "saliency" / "zarr.json").write_text("{garbage"),
     r"saliency/zarr.json is unreadable \(JSONDecodeError"),
    (lambda store: (store / "scale" / "zarr.json").unlink(), r"has lost its scale array \(no scale/zarr.json\)")])
def test_damaged_array_metadata_is_one_line(baseline, copy, shapes_pattern, damage, message):
    damage(copy)
    result = CliRunner().invoke(cli, ["inspect", str(copy)])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "Traceback" not in result.output
    assert re.search(message, result.output) and "--overwrite" in result.output
    with pytest.raises(SalmaeError, match=message):
        _table(copy)
    run(_cfg(shapes_pattern, copy, overwrite=True))
    assert _array_bytes(copy) == _array_bytes(baseline)
