"""The Zarr store: layout, shard-wise writes with markers, read API, attrs."""

import numpy as np
import pytest

from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.saliency.store import STATUS_CODES, SaliencyStore, create_store, status_code


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
    maps = np.arange(4 * 6, dtype=np.float32).reshape(4, 2, 3) * 1e-4
    st.write_shard(1, maps, np.array([1, 1, 2, 1], np.uint8), {"images": 3})
    assert st.is_done(1) and st.done_markers()[1]["rows"] == [4, 8]
    ro = SaliencyStore.open(tmp_path / "s.zarr")
    np.testing.assert_allclose(ro.read([5, 4]), maps[[1, 0]], rtol=2.0 ** -11, atol=0)   # half a float16 step
    np.testing.assert_allclose(ro.load_all()[4:8], maps, rtol=2.0 ** -11, atol=0)
    assert ro.read([5]).dtype == np.float32
    np.testing.assert_array_equal(ro._group["scale"][4:8], maps.reshape(4, -1).max(1))   # each map's own maximum
    assert ro._group["saliency"][4:8].max(axis=(1, 2)).tolist() == [1.0] * 4            # stored scaled to max 1
    assert ro.status.tolist() == [0, 0, 0, 0, 1, 1, 2, 1, 0, 0]
    np.testing.assert_array_equal(ro.frames([3]), [[0, 0, 40, 30]])
    np.testing.assert_array_equal(ro.image_sizes([3]), [[40, 30]])
    assert ro.load_all().shape == (10, 2, 3)
    assert ro.attrs["grid"] == [2, 3] and ro.attrs["manifest_hash"] == "abc"
    assert ro.attrs["status_codes"]["8"] == "nonfinite_map"
    write_last = np.stack([np.zeros((2, 3)), np.full((2, 3), 3.0)]).astype(np.float32)
    st.write_shard(2, write_last, np.ones(2, np.uint8), {})
    np.testing.assert_array_equal(ro.read([8, 9]), write_last)                    # a zero map stays zero
    np.testing.assert_array_equal(ro._group["scale"][8:10], [0.0, 3.0])


def test_tiny_maps_keep_their_precision(tmp_path):
    """Maps peaking at 1e-4 (raw Grad-CAM of a cosine target on photos): stored raw as float16,
    nearly half the non-zero values were subnormal (46% here); scaled to
    their maximum, only values below 6.1e-5 of it are (none here)."""
    rng = np.random.default_rng(0)
    maps = (rng.random((64, 2, 3)) * 1e-4).astype(np.float32)                     # [64, 2, 3]
    maps[rng.random(maps.shape) < 0.3] = 0                                         # ReLU'd patches
    maps[:, 0, 0] = 1e-4                                                           # each map's peak
    old = maps.astype(np.float16)                                                  # format 1: raw float16
    subnormal = lambda a: float((np.abs(a[a != 0]) < 2.0 ** -14).mean())          # float16's smallest normal
    assert subnormal(old) > 0.4
    st = _make(tmp_path / "s.zarr", n=64, rows_per_shard=64)
    st.write_shard(0, maps, np.ones(64, np.uint8), {})
    stored = st._group["saliency"][:]
    assert subnormal(stored) < 0.01 and (stored == 0).sum() == (maps == 0).sum()
    back = SaliencyStore.open(tmp_path / "s.zarr").load_all()
    big = maps >= 1e-4 * 2.0 ** -14                                                # normal once scaled
    assert (np.abs(back - maps) <= 2.0 ** -11 * maps)[big].all()                  # half a step, relative
    assert (np.abs(old.astype(np.float32) - maps) > 2.0 ** -11 * maps)[big].mean() > 0.1     # measured 0.22


def test_format_1_stores_are_read_with_scale_1(tmp_path):
    """A store written before the scale array (format 1, raw float16 maps) is read as it was, not written."""
    import zarr

    st = _make(tmp_path / "s.zarr", n=4, rows_per_shard=4)
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+", zarr_format=3)
    raw = np.arange(24, dtype=np.float16).reshape(4, 2, 3) * np.float16(1e-3)
    group["saliency"][:] = raw
    del group["scale"]
    group.attrs["format"] = "salmae-saliency-store/1"
    old = SaliencyStore.open(tmp_path / "s.zarr")
    np.testing.assert_array_equal(old.load_all(), raw.astype(np.float32))
    np.testing.assert_array_equal(old.read([2, 1]), raw[[2, 1]].astype(np.float32))
    unit = old.read_unit([2, 0])                     # stage 2's view: each map over its own maximum
    assert unit.dtype == np.float16 and unit[0].max() == 1 and unit[1].max() == 1
    np.testing.assert_allclose(unit[0], raw[2].astype(np.float32) / float(raw[2].max()), rtol=1e-3)
    with pytest.raises(SalmaeError, match="older format.*--overwrite"):
        SaliencyStore.open(tmp_path / "s.zarr", mode="r+")
    assert st.attrs["format"] == "salmae-saliency-store/2"


def test_shards_are_separate_files_per_array(tmp_path):
    st = _make(tmp_path / "s.zarr")
    st.write_shard(0, np.ones((4, 2, 3)), np.ones(4, np.uint8), {})
    st.write_shard(1, np.ones((4, 2, 3)), np.ones(4, np.uint8), {})
    files = sorted(p.relative_to(tmp_path / "s.zarr" / "saliency").as_posix()
                   for p in (tmp_path / "s.zarr" / "saliency" / "c").rglob("*") if p.is_file())
    assert files == ["c/0/0/0", "c/1/0/0"]


def test_status_codes_cover_damage_reasons():
    from salmae.pipeline.data.shards import DAMAGE_REASONS

    assert set(DAMAGE_REASONS) <= set(STATUS_CODES.values())
    assert status_code("ok") == 1 and status_code("truncated_tar") == 7 and status_code("weird") == 9


def test_open_errors(tmp_path):
    with pytest.raises(SalmaeError, match="not found"):
        SaliencyStore.open(tmp_path / "missing.zarr")
    import zarr

    zarr.open_group(str(tmp_path / "other.zarr"), mode="w", zarr_format=3)
    with pytest.raises(SalmaeError, match="not a salmae saliency store"):
        SaliencyStore.open(tmp_path / "other.zarr")


def test_read_unit_of_a_format_2_store_is_the_stored_array(tmp_path):
    st = _make(tmp_path / "s.zarr", n=4, rows_per_shard=4)
    maps = np.random.default_rng(0).random((4, 2, 3)).astype(np.float32) * 1e-4
    maps[1] = 0
    st.write_shard(0, maps, np.ones(4, np.uint8), {})
    unit = st.read_unit([0, 1, 3])
    np.testing.assert_array_equal(unit, np.asarray(st._saliency[:])[[0, 1, 3]])   # no arithmetic on read
    assert unit[0].max() == 1 and not unit[1].any()
    np.testing.assert_allclose(unit[2].astype(np.float32), maps[3] / maps[3].max(), rtol=1e-3)
