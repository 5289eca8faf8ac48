"""The img2dataset shard reader: generated shards, shard specs, and every kind of damage."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from salmae.pipeline.data.shards import (DAMAGE_REASONS, DamagedSampleError, decode_image, expand_shards, iter_samples,
                                  iter_shard, read_member, shard_name)
from salmae.pipeline.errors import SalmaeError


def _jpeg(mode: str = "RGB", size=(20, 16), fmt: str = "JPEG") -> bytes:
    colour = {"RGB": (200, 30, 30), "L": 128, "CMYK": (0, 200, 200, 0)}.get(mode)
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format=fmt)
    return buf.getvalue()


def _write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _triple(key: str, image: bytes | None = None, caption: bytes | None = b"a red square",
            meta: bytes | None = b'{"url": "u"}', ext: str = "jpg") -> list[tuple[str, bytes]]:
    members = [(f"{key}.{ext}", _jpeg() if image is None else image)]
    if caption is not None:
        members.append((f"{key}.txt", caption))
    if meta is not None:
        members.append((f"{key}.json", meta))
    return members


# --------------------------------------------------------------------------- generated shards
def test_reader_matches_parquet(shapes_dir, shapes_pattern):
    samples = list(iter_samples(shapes_pattern))
    rows = [r for name in ("00000", "00001") for r in pq.read_table(shapes_dir / f"{name}.parquet").to_pylist()]
    assert len(samples) == len(rows) == 64
    assert [s.key for s in samples] == [r["key"] for r in rows]
    assert [s.caption for s in samples] == [r["caption"] for r in rows]
    assert all(s.error is None and s.image.mode == "RGB" and s.image.size == (32, 32) for s in samples)
    assert [s.shard for s in samples][:1] == [str(shapes_dir / "00000.tar")]
    assert samples[0].meta["key"] == samples[0].key and samples[0].meta["caption"] == samples[0].caption


def test_decode_false_probes_size_and_keys_filter(shapes_pattern):
    urls = expand_shards(shapes_pattern)
    lazy = list(iter_shard(urls[1], decode=False))
    assert all(s.image is None and s.image_bytes and (s.width, s.height) == (32, 32) for s in lazy)
    picked = list(iter_shard(urls[1], keys={lazy[3].key, lazy[7].key}))
    assert [s.key for s in picked] == [lazy[3].key, lazy[7].key]


def test_pipe_url_reads_the_same(shapes_pattern):
    urls = expand_shards(shapes_pattern)
    direct = [(s.key, s.caption) for s in iter_shard(urls[0], decode=False)]
    piped = list(iter_shard(f"pipe:cat {urls[0]}", decode=False))
    assert [(s.key, s.caption) for s in piped] == direct
    assert all(s.error is None for s in piped)


def test_read_member_returns_the_image_bytes(shapes_pattern):
    url = expand_shards(shapes_pattern)[0]
    for s in list(iter_shard(url, decode=False))[:5]:
        assert read_member(url, s.image_offset, s.image_nbytes) == s.image_bytes
    with pytest.raises(SalmaeError, match="shorter"):
        read_member(url, 10**9, 10)


# --------------------------------------------------------------------------- shard specs
def test_expand_shards_patterns(shapes_dir, shapes_pattern):
    a, b = str(shapes_dir / "00000.tar"), str(shapes_dir / "00001.tar")
    assert expand_shards(shapes_pattern) == [a, b]
    assert expand_shards([a, b]) == [a, b]
    assert expand_shards(f"{a}::{b}") == [a, b]
    assert expand_shards(str(shapes_dir / "*.tar")) == [a, b]
    assert expand_shards("pipe:gsutil cat gs://bkt/x/{00000..00002}.tar")[2] == "pipe:gsutil cat gs://bkt/x/00002.tar"
    with pytest.raises(SalmaeError, match="00002.tar not found"):
        expand_shards(str(shapes_dir / "{00000..00002}.tar"))


@pytest.mark.parametrize("url, name", [
    ("data/cc3m/00003.tar", "00003.tar"),
    ("file:///data/00003.tar", "00003.tar"),
    ("gs://bucket/00003.tar?generation=1", "00003.tar"),
    ("pipe:gsutil cat gs://host/00003.tar", "00003.tar"),
    ("pipe:aws s3 cp s3://bucket/cc3m/00007.tar -", "00007.tar"),
])
def test_shard_name(url, name):
    assert shard_name(url) == name


# --------------------------------------------------------------------------- damage
def test_damaged_samples_reported_by_key(tmp_path):
    good = _jpeg()
    members = (_triple("000")
               + _triple("001", image=good[: len(good) // 2])            # truncated JPEG bytes
               + _triple("002", caption=None)                             # missing .txt
               + _triple("003", caption=b"  \n")                          # empty caption
               + _triple("004", meta=b"{not json")                        # bad json
               + [("005.txt", b"caption without image")]                  # missing image
               + _triple("006", image=b"not an image at all"))            # undecodable
    _write_tar(tmp_path / "00000.tar", members)
    expected = {"000": None, "001": "unreadable_image", "002": "missing_caption", "003": "empty_caption",
                "004": "bad_json", "005": "missing_image", "006": "unreadable_image"}
    for decode in (True, False):
        got = {s.key: s.error for s in iter_shard(str(tmp_path / "00000.tar"), decode=decode)}
        assert got == expected
    assert set(expected.values()) - {None} <= set(DAMAGE_REASONS)
    damaged = [s for s in iter_shard(str(tmp_path / "00000.tar")) if s.error]
    assert all(s.image is None for s in damaged if s.error in ("unreadable_image", "missing_image"))
    assert next(s for s in damaged if s.key == "004").caption == "a red square"


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "CMYK", "I;16", "1"])
def test_any_mode_decodes_to_rgb(mode):
    image = Image.new("RGBA", (12, 10), (255, 0, 0, 0))  # fully transparent red: composited on black
    image.paste((0, 255, 0, 255), (0, 0, 6, 10))
    if mode == "I;16":
        image = Image.fromarray(np.full((10, 12), 65535, dtype=np.uint16))
    elif mode == "P":
        image = image.convert("RGB").quantize(4)
    elif mode != "RGBA":
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="JPEG" if mode == "CMYK" else "PNG")
    rgb = decode_image(buf.getvalue())
    assert rgb.mode == "RGB" and rgb.size == (12, 10)
    if mode == "RGBA":
        assert rgb.getpixel((11, 5)) == (0, 0, 0) and rgb.getpixel((0, 0)) == (0, 255, 0)
    if mode == "I;16":
        assert rgb.getpixel((0, 0)) == (255, 255, 255)


def test_decode_image_raises_damaged_sample_error():
    with pytest.raises(DamagedSampleError) as info:
        decode_image(b"\xff\xd8garbage", key="000123")
    assert info.value.reason == "unreadable_image" and "000123" in str(info.value)


def test_webp_and_png_members(tmp_path):
    members = _triple("000", image=_jpeg(fmt="PNG"), ext="png") + _triple("001", image=_jpeg(fmt="WEBP"), ext="webp")
    _write_tar(tmp_path / "a.tar", members)
    samples = list(iter_shard(str(tmp_path / "a.tar")))
    assert [(s.image_ext, s.error, s.image.size) for s in samples] == [("png", None, (20, 16)), ("webp", None, (20, 16))]


def test_truncated_tar_yields_good_samples_then_one_marker(tmp_path, shapes_dir):
    data = (shapes_dir / "00000.tar").read_bytes()
    full = [s.key for s in iter_shard(str(shapes_dir / "00000.tar"), decode=False)]
    for cut in (len(data) // 2, len(data) - 11000, 700):
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        samples = list(iter_shard(str(tmp_path / "cut.tar")))
        assert samples[-1].error == "truncated_tar"
        assert all(s.error is None for s in samples[:-1])
        assert [s.key for s in samples] == full[: len(samples)]
    (tmp_path / "empty.tar").write_bytes(b"")
    assert [(s.key, s.error) for s in iter_shard(str(tmp_path / "empty.tar"))] == [("", "truncated_tar")]
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    piped = list(iter_shard(f"pipe:cat {tmp_path / 'cut.tar'}", decode=False))
    assert piped[-1].error == "truncated_tar" and len(piped) == len(list(iter_shard(str(tmp_path / "cut.tar"))))


def test_tar_cut_on_a_member_boundary_is_truncated(tmp_path, shapes_dir):
    with tarfile.open(shapes_dir / "00000.tar") as tar:
        last = tar.getmembers()[8]  # the .json of the third sample
    end = last.offset_data + (last.size + 511) // 512 * 512
    (tmp_path / "cut.tar").write_bytes((shapes_dir / "00000.tar").read_bytes()[:end])
    samples = list(iter_shard(str(tmp_path / "cut.tar")))
    assert [s.error for s in samples] == [None, None, "truncated_tar"]


def test_failing_pipe_command_is_a_salmae_error():
    with pytest.raises(SalmaeError, match="shard command 'pipe:cat /nonexistent/00000.tar' failed"):
        list(iter_shard("pipe:cat /nonexistent/00000.tar"))
