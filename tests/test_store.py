"""The Zarr store: layout, shard-wise writes with markers, read API, attrs."""

import numpy as np
import pytest

from pipeline.errors import SalmaeError
from pipeline.store import STATUS_CODES, SaliencyStore, create_store, status_code


def _make(path, n=10, rows_per_shard=4):
    keys = [f"{i:09d}" for i in range(n)]
    sizes = np.tile([[40, 30]], (n, 1))
    frames = np.concatenate([np.zeros((n, 2)), sizes], 1)
    create_store(path, keys=keys, image_sizes=sizes, frames=frames, grid=(2, 3), rows_per_shard=rows_per_shard,
                 attrs={"clip_model": "m", "manifest_hash": "abc"})
    return SaliencyStore.open(path, mode="r+")


def test_create_write_read_roundtrip(tmp_path):
    st = _make(tmp_path / "s.zarr")
    assert len(st) == 10 and st.n_shards == 3 and list(st.shard_rows(2)) == [8, 9]
    assert st.keys[0] == "000000000" and st.row_of("000000007") == 7 and st.row_of("x") is None
    assert (st.status == 0).all() and not st.is_done(1)
    maps = np.arange(4 * 6, dtype=np.float32).reshape(4, 2, 3)
    st.write_shard(1, maps, np.array([1, 1, 2, 1], np.uint8), {"images": 3})
    assert st.is_done(1) and st.done_markers()[1]["rows"] == [4, 8]
    ro = SaliencyStore.open(tmp_path / "s.zarr")
    np.testing.assert_array_equal(ro.read([5, 4]), maps[[1, 0]])
    assert ro.read([5]).dtype == np.float32
    assert ro.status.tolist() == [0, 0, 0, 0, 1, 1, 2, 1, 0, 0]
    np.testing.assert_array_equal(ro.frames([3]), [[0, 0, 40, 30]])
    np.testing.assert_array_equal(ro.image_sizes([3]), [[40, 30]])
    assert ro.load_all().shape == (10, 2, 3)
    assert ro.attrs["grid"] == [2, 3] and ro.attrs["manifest_hash"] == "abc"
    assert ro.attrs["status_codes"]["8"] == "nonfinite_map"
    write_last = np.ones((2, 2, 3), np.float32)
    st.write_shard(2, write_last, np.ones(2, np.uint8), {})
    np.testing.assert_array_equal(ro.read([9])[0], write_last[1])


def test_shards_are_separate_files_per_array(tmp_path):
    st = _make(tmp_path / "s.zarr")
    st.write_shard(0, np.ones((4, 2, 3)), np.ones(4, np.uint8), {})
    st.write_shard(1, np.ones((4, 2, 3)), np.ones(4, np.uint8), {})
    files = sorted(p.relative_to(tmp_path / "s.zarr" / "saliency").as_posix()
                   for p in (tmp_path / "s.zarr" / "saliency" / "c").rglob("*") if p.is_file())
    assert files == ["c/0/0/0", "c/1/0/0"]


def test_status_codes_cover_damage_reasons():
    from pipeline.data.shards import DAMAGE_REASONS

    assert set(DAMAGE_REASONS) <= set(STATUS_CODES.values())
    assert status_code("ok") == 1 and status_code("truncated_tar") == 7 and status_code("weird") == 9


def test_open_errors(tmp_path):
    with pytest.raises(SalmaeError, match="not found"):
        SaliencyStore.open(tmp_path / "missing.zarr")
    import zarr

    zarr.open_group(str(tmp_path / "other.zarr"), mode="w", zarr_format=3)
    with pytest.raises(SalmaeError, match="not a salmae saliency store"):
        SaliencyStore.open(tmp_path / "other.zarr")
