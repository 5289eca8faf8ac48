"""The generated shapes dataset: img2dataset layout, determinism, content of images and captions."""

from __future__ import annotations

import collections
import json
import tarfile
import time

import pyarrow.parquet as pq
import pytest

from salmae.pipeline.data.shapes import COLOURS, SHAPES, write_shapes
from salmae.pipeline.data.shards import iter_samples


def _members(path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def test_img2dataset_layout(shapes_dir):
    for name in ("00000", "00001"):
        assert {p.name for p in shapes_dir.glob(f"{name}*")} == {f"{name}.tar", f"{name}.parquet", f"{name}_stats.json"}
        table = pq.read_table(shapes_dir / f"{name}.parquet")
        assert table.column_names == ["url", "caption", "key", "status", "error_message", "width", "height",
                                      "original_width", "original_height", "exif", "sha256"]
        keys = table.column("key").to_pylist()
        assert set(table.column("status").to_pylist()) == {"success"}
        assert _members(shapes_dir / f"{name}.tar") == [f"{k}.{ext}" for k in keys for ext in ("jpg", "txt", "json")]
        stats = json.loads((shapes_dir / f"{name}_stats.json").read_text())
        assert stats["count"] == stats["successes"] == len(keys) == 32
    # img2dataset keys: 5 shard digits, then ceil(log10(32)) = 2 index digits
    assert pq.read_table(shapes_dir / "00001.parquet").column("key").to_pylist()[:2] == ["0000100", "0000101"]


def test_same_seed_gives_identical_bytes(tmp_path):
    for folder, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_shapes(tmp_path / folder, n=20, image_size=32, seed=seed, shard_size=8)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar",
                     "00001_stats.json", "00002.parquet", "00002.tar", "00002_stats.json"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "00000.tar").read_bytes() != (tmp_path / "c" / "00000.tar").read_bytes()


def test_content_shapes_colours_bbox_caption(shapes_dir, shapes_pattern):
    samples = list(iter_samples(shapes_pattern))
    shapes = collections.Counter(s.meta["shape"] for s in samples)
    colours = collections.Counter(s.meta["colour"] for s in samples)
    assert len(SHAPES) >= 8 and len(shapes) >= 8 and len(colours) >= 6
    assert set(shapes.values()) == {64 // len(SHAPES)}  # balanced classes
    captions = {s.caption for s in samples}
    assert len(captions) > 20  # varied templates
    for s in samples:
        m = s.meta
        x0, y0, x1, y1 = m["bbox"]
        assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
        assert SHAPES[m["label"]] == m["shape"] and m["colour"] in COLOURS
        assert m["shape"] in s.caption and m["colour"] in s.caption
        other = m["distractor"]
        assert other["shape"] != m["shape"] and other["shape"] not in s.caption.split()
        assert s.image.size == (32, 32) and m["split"] in ("train", "val")
        centre = s.image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2))  # the named object is drawn there
        assert max(abs(a - b) for a, b in zip(centre, COLOURS[m["colour"]])) < 90, (s.key, centre, m["colour"])


def test_distractor_shares_colour_at_the_requested_rate(tmp_path):
    write_shapes(tmp_path, n=300, image_size=32, seed=1, shard_size=300, same_colour_frac=0.3)
    same = [s.meta["distractor"]["colour"] == s.meta["colour"] for s in iter_samples(str(tmp_path / "00000.tar"), decode=False)]
    assert 0.2 < sum(same) / len(same) < 0.4
    write_shapes(tmp_path / "default", n=100, image_size=32, seed=1, shard_size=100)   # the data: never
    assert not any(s.meta["distractor"]["colour"] == s.meta["colour"]
                   for s in iter_samples(str(tmp_path / "default" / "00000.tar"), decode=False))


def test_imagefolder_split_by_named_shape(shapes_dir, shapes_pattern):
    meta = {s.key: s.meta for s in iter_samples(shapes_pattern, decode=False)}
    files = sorted((shapes_dir / "imagefolder").glob("*/*/*.jpg"))
    assert len(files) == 64
    for path in files:
        m = meta[path.stem]
        assert (path.parent.parent.name, path.parent.name) == (m["split"], m["shape"])
    val = collections.Counter(m["shape"] for m in meta.values() if m["split"] == "val")
    assert set(val) == set(SHAPES) and 8 <= sum(val.values()) <= 16


def test_rerun_skips_finished_shards(tmp_path):
    write_shapes(tmp_path, n=10, image_size=32, seed=0, shard_size=5)
    before = (tmp_path / "00001.tar").stat().st_mtime_ns
    summary = write_shapes(tmp_path, n=10, image_size=32, seed=0, shard_size=5)
    assert "0 written, 2 already done" in summary and "10 captioned" in summary
    assert (tmp_path / "00001.tar").stat().st_mtime_ns == before


@pytest.mark.slow
def test_speed_at_64px(tmp_path):
    start = time.perf_counter()
    write_shapes(tmp_path, n=2000, image_size=64, seed=0, shard_size=1000)
    assert 2000 / (time.perf_counter() - start) >= 500


def test_main_object_task_one_large_labelled_object_among_small_clutter(tmp_path):
    """Issue 14's proxy task: the label is the one large object; 2-3 small objects of other classes."""
    import json
    import tarfile

    from click.testing import CliRunner

    from salmae.pipeline.cli import cli
    from salmae.pipeline.data.shapes import SHAPES

    res = CliRunner().invoke(cli, ["shapes", str(tmp_path), "--n", "32", "--image-size", "64", "--shard-size", "16",
                                   "--task", "main-object", "--imagefolder"])
    assert res.exit_code == 0, res.output
    with tarfile.open(tmp_path / "00000.tar") as tf:
        metas = [json.load(tf.extractfile(m)) for m in tf.getmembers() if m.name.endswith(".json")]
    assert len(metas) == 16
    for meta in metas:
        main_side = max(meta["bbox"][2] - meta["bbox"][0], meta["bbox"][3] - meta["bbox"][1])
        assert 2 <= len(meta["clutter"]) <= 3 and "distractor" not in meta
        assert all(c["shape"] != meta["shape"] for c in meta["clutter"])
        assert all(max(c["bbox"][2] - c["bbox"][0], c["bbox"][3] - c["bbox"][1]) < main_side for c in meta["clutter"])
        assert meta["shape"] == SHAPES[meta["label"]] and meta["shape"] in meta["caption"]
        assert main_side >= 0.3 * 64
    labels = sorted(m["label"] for m in metas)
    assert labels == sorted(list(range(8)) * 2)              # balanced: each class once per 8 images
    again = tmp_path / "again"
    CliRunner().invoke(cli, ["shapes", str(again), "--n", "32", "--image-size", "64", "--shard-size", "16",
                             "--task", "main-object"])
    assert (again / "00001.tar").read_bytes() == (tmp_path / "00001.tar").read_bytes()   # deterministic


def test_val_every_sets_the_split_and_nothing_else(tmp_path):
    from salmae.pipeline.errors import SalmaeError

    write_shapes(tmp_path / "five", n=160, image_size=32, seed=2, shard_size=160, imagefolder=True, task="main-object")
    write_shapes(tmp_path / "two", n=160, image_size=32, seed=2, shard_size=160, imagefolder=True, task="main-object",
                 val_every=2)
    for every in ("five", "two"):
        val = collections.Counter(p.parent.name for p in (tmp_path / every / "imagefolder" / "val").rglob("*.jpg"))
        train = collections.Counter(p.parent.name for p in (tmp_path / every / "imagefolder" / "train").rglob("*.jpg"))
        per_class = 160 // len(SHAPES)
        want = per_class // 5 if every == "five" else per_class // 2
        assert set(val) == set(SHAPES) and set(val.values()) == {want}, (every, val)     # balanced val per class
        assert set(train.values()) == {per_class - want}
    five = {s.key: s for s in iter_samples(str(tmp_path / "five" / "00000.tar"))}
    two = {s.key: s for s in iter_samples(str(tmp_path / "two" / "00000.tar"))}
    assert five.keys() == two.keys() and all(five[k].image_bytes == two[k].image_bytes for k in five)   # same images
    moved = [k for k in five if five[k].meta["split"] != two[k].meta["split"]]
    assert 0 < len(moved) < 160 and all({**five[k].meta, "split": 0} == {**two[k].meta, "split": 0} for k in five)
    with pytest.raises(SalmaeError, match="val-every >= 2"):
        write_shapes(tmp_path / "one", n=8, image_size=32, val_every=1)
