"""`salmae inspect`: summary fields, bbox scores, overlays."""

import json
from pathlib import Path

import pytest

from salmae.stages.inspect import format_summary, inspect_store
from salmae.stages.saliency import SaliencyConfig, run


@pytest.fixture(scope="module")
def store(shapes_pattern, tmp_path_factory):
    out = tmp_path_factory.mktemp("insp") / "store.zarr"
    run(SaliencyConfig(data=shapes_pattern, out=out, clip_model="salmae-micro", clip_pretrained="none",
                       rows_per_shard=32, batch_size=16, workers=0, device="cpu"))
    return out


def test_summary_and_localisation(store, shapes_pattern, tmp_path):
    s = inspect_store(store, data=shapes_pattern, png_dir=tmp_path / "png", keys=["0000001"], n_random=2)
    assert s["rows"] == 64 and s["status"]["ok"]["count"] == 64 and s["grid"] == [4, 4]
    assert 0 < s["maps"]["entropy_rel"] <= 1 and 0.25 <= s["maps"]["top25_mass"] <= 1
    loc = s["localisation"]
    assert loc["n"] == 64 and 0 < loc["box_area_share"] < 1
    assert loc["pointing_game"] == pytest.approx(_pointing_game(store, shapes_pattern))
    assert len(s["png"]) == 3 and all(Path(p).stat().st_size > 1000 for p in s["png"])
    text = format_summary(s)
    assert "pointing game" in text and "64 rows" in text
    assert "computed on cpu in fp32, batch 16, compile off, seed 0" in text
    assert json.loads(format_summary(s, as_json=True))["rows"] == 64


def _pointing_game(store: Path, data: str) -> float:
    """Independent count: is the centre of each map's top patch inside the named object's bbox?"""
    import numpy as np

    from salmae.pipeline.data.shards import iter_samples
    from salmae.pipeline.saliency.store import SaliencyStore

    st = SaliencyStore.open(store)
    meta = {s.key: s.meta for s in iter_samples(data, decode=False)}
    maps, (gh, gw) = st.load_all(), st.grid
    hits = []
    for row, key in enumerate(st.keys):
        x0, y0, x1, y1 = meta[str(key)]["bbox"]
        width, height = st.image_sizes([row])[0]
        i, j = divmod(int(maps[row].argmax()), gw)
        cx, cy = (j + 0.5) * width / gw, (i + 0.5) * height / gh
        hits.append(x0 <= cx <= x1 and y0 <= cy <= y1)
    return float(np.mean(hits))


def test_cli_inspect(store):
    from click.testing import CliRunner

    from salmae.pipeline.cli import cli

    res = CliRunner().invoke(cli, ["inspect", str(store), "--json"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["inspect", str(store.parent / "nope.zarr")])
    assert res.exit_code == 2 and "not found" in res.output


@pytest.mark.slow
def test_trained_tiny_clip_points_at_the_named_object(tmp_path):
    """Issue 3's acceptance on held-out shapes: clip-train (the demo's recipe, minutes), then maps.

    HiResCAM (the demo's --cam) must point at the named object >= 0.8 of the time (measured 0.939;
    BENCHMARKS.md), the default Grad-CAM on the same model >= 0.7 (0.846), and random weights
    must stay near the box's area share (~0.12; measured 0.109).
    """
    import torch

    from salmae.pipeline.data.shapes import write_shapes
    from salmae.stages.clip_train import ClipTrainConfig
    from salmae.stages.clip_train import run as clip_train

    torch.set_num_threads(1)
    write_shapes(tmp_path / "train", n=32768, image_size=64, seed=1, shard_size=4096)
    write_shapes(tmp_path / "val", n=512, image_size=64, seed=2, shard_size=512)
    clip_train(ClipTrainConfig(data=str(tmp_path / "train" / "{00000..00007}.tar"), out=tmp_path / "clip.pt",
                               steps=500, seconds=1200, batch_size=128))
    val = str(tmp_path / "val" / "00000.tar")
    scores = {}
    for weights, cam in ((str(tmp_path / "clip.pt"), "hirescam"), (str(tmp_path / "clip.pt"), "gradcam"), ("none", "hirescam")):
        out = tmp_path / f"store-{Path(weights).stem}-{cam}.zarr"
        run(SaliencyConfig(data=val, out=out, clip_model="salmae-tiny", clip_pretrained=weights, cam=cam,
                           rows_per_shard=128, batch_size=64, workers=0, device="cpu"))
        scores[Path(weights).stem, cam] = inspect_store(out, data=val)["localisation"]
    trained, gradcam, random = scores["clip", "hirescam"], scores["clip", "gradcam"], scores["none", "hirescam"]
    assert trained["pointing_game"] >= 0.8
    assert trained["mass_in_box"] > 3 * trained["box_area_share"]
    assert gradcam["pointing_game"] >= 0.7
    assert random["pointing_game"] < 0.3


def test_maps_peaked_on_the_distractor_score_as_distractor_hits(store, shapes_pattern, tmp_path):
    """A store whose every map peaks inside the distractor's box: pointing game 0, argmax on distractor 1."""
    import shutil

    import numpy as np

    from salmae.pipeline.data.shards import iter_samples
    from salmae.pipeline.saliency.store import SaliencyStore

    copy = tmp_path / "peaked.zarr"
    shutil.copytree(store, copy)
    st = SaliencyStore.open(copy, mode="r+")
    meta = {s.key: s.meta for s in iter_samples(shapes_pattern, decode=False)}
    gh, gw = st.grid
    maps = np.zeros((len(st), gh, gw), np.float32)
    for row, key in enumerate(st.keys):
        x0, y0, x1, y1 = meta[str(key)]["distractor"]["bbox"]
        frame = st.frames([row])[0]
        px = (frame[2] - frame[0]) / gw   # patch side in pixels
        # the patch whose centre is nearest the box centre; boxes here are >= one patch wide
        j, i = int((x0 + x1) / 2 // px), int((y0 + y1) / 2 // px)
        maps[row, min(i, gh - 1), min(j, gw - 1)] = 1.0
    for shard in range(st.n_shards):
        rows = st.shard_rows(shard)
        st.write_shard(shard, maps[rows.start:rows.stop], np.ones(len(rows), np.uint8), {"test": True})
    loc = inspect_store(copy, data=shapes_pattern)["localisation"]
    assert loc["argmax_on_distractor"] >= 0.9 and loc["pointing_game"] <= 0.1
    split = loc["pointing_game_different_colour"]["n"] + loc.get("pointing_game_same_colour", {"n": 0})["n"]
    assert split == loc["n"] == 64
    assert "argmax on the distractor" in format_summary(inspect_store(copy, data=shapes_pattern))


def test_map_statistics_streamed_in_chunks_equal_all_at_once(store):
    import numpy as np

    from salmae.pipeline.saliency.store import SaliencyStore
    from salmae.stages.inspect import _map_stats, _map_stats_streamed

    st = SaliencyStore.open(store)
    rows = np.arange(len(st))
    whole = _map_stats(st.read(rows))
    chunked = _map_stats_streamed(st, rows, chunk_rows=5)
    assert chunked == pytest.approx(whole, rel=1e-12) and whole["entropy"] > 0


def test_overlays_read_only_the_chosen_samples(store, shapes_pattern, tmp_path, monkeypatch):
    import salmae.pipeline.data.shards as shards

    def no_scan(*a, **k):
        raise AssertionError("inspect scanned a shard to find a few keys")

    monkeypatch.setattr(shards, "iter_samples", no_scan)
    monkeypatch.setattr(shards, "iter_shard", no_scan)
    from salmae.pipeline.saliency.store import SaliencyStore
    from salmae.stages.inspect import _read_images

    images = _read_images(shapes_pattern, {"0000001", "0000101"}, SaliencyStore.open(store))
    assert set(images) == {"0000001", "0000101"} and images["0000001"].shape == (32, 32, 3)


@pytest.mark.parametrize("hostile", ["../escape", "/abs/path", "a/../../x", "..", "sub/dir/key", "nul\x00key"])
def test_overlay_file_names_from_keys_stay_inside_their_folder(store, tmp_path, monkeypatch, hostile):
    """Keys come from tar member names: `../escape`, `/abs/path`, `a/../../x` must not write outside
    `--png DIR` (issue 23, item 9). The file name is sanitised; the key stays in the title and in
    DIR/index.json."""
    import json
    import shutil

    import numpy as np
    import zarr

    import salmae.stages.inspect as inspect_stage
    from salmae.pipeline.saliency.store import SaliencyStore

    copy = tmp_path / "hostile.zarr"
    shutil.copytree(store, copy)
    keys = zarr.open_group(str(copy), mode="r+")["key"]
    keys[0] = hostile
    keys[1] = "0000001"
    monkeypatch.setattr(inspect_stage, "_read_images",
                        lambda data, wanted, st: {k: np.zeros((32, 32, 3), np.uint8) for k in wanted})
    st = SaliencyStore.open(copy)
    assert st.keys[0] == hostile
    out = tmp_path / "deep" / "png"
    written = inspect_stage._write_pngs(st, [0, 1], "unused", {}, out, "saliency", 0)
    files = sorted(p.name for p in out.iterdir())
    assert len(written) == 2 and all(Path(w).parent == out for w in written)
    assert sorted(p.name for p in tmp_path.rglob("*.png")) == sorted(f for f in files if f.endswith(".png"))
    index = json.loads((out / "index.json").read_text())
    assert sorted(index.values()) == sorted([hostile, "0000001"]) and index["0000001.png"] == "0000001"
    name = next(n for n, k in index.items() if k == hostile)
    assert "/" not in name and not name.startswith(".") and name.endswith(".png")


def test_safe_file_names_keep_plain_keys_and_never_collide():
    from salmae.pipeline.files import safe_file_name

    assert safe_file_name("000123456") == "000123456" and safe_file_name("a.b-c_d") == "a.b-c_d"
    names = [safe_file_name(k) for k in ("a/b", "a_b", "a:b", "../a_b", ".a_b")]
    assert len(set(names)) == 5 and names[1] == "a_b"
    assert len(safe_file_name("k" * 500)) == 100 + 9


def test_boxes_from_the_generated_shapes_score_as_their_metadata(store, shapes_pattern, tmp_path):
    """`--boxes` on boxes written from the shapes' own metadata (the named object's bbox) gives the
    pointing game, mass and area share of the `--data` metadata check on the same maps, in both formats;
    keys left out of the file are counted as ok rows without boxes."""
    from salmae.pipeline.data.shards import iter_samples

    meta = {s.key: s.meta for s in iter_samples(shapes_pattern, decode=False)}
    csv = tmp_path / "boxes.csv"
    csv.write_text("".join(f"{k},{','.join(map(str, m['bbox']))}\n" for k, m in sorted(meta.items())))
    voc = tmp_path / "voc"
    voc.mkdir()
    for k, m in meta.items():
        x0, y0, x1, y1 = m["bbox"]
        (voc / f"{k}.xml").write_text(f"<annotation><filename>{k}.jpg</filename><size><width>{m['width']}</width>"
                                      f"<height>{m['height']}</height></size><object><bndbox><xmin>{x0}</xmin>"
                                      f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object></annotation>")
    s = inspect_store(store, data=shapes_pattern, boxes=csv)
    loc = s["localisation"]
    for b in (s["boxes"], inspect_store(store, boxes=voc)["boxes"]):
        assert (b["n"], b["keys_not_in_store"], b["not_ok"], b["ok_rows_without_boxes"]) == (64, 0, 0, 0)
        assert b["pointing_game"] == pytest.approx(loc["pointing_game"]) and b["hits"] == round(64 * loc["pointing_game"])
        assert b["mass_in_box"] == pytest.approx(loc["mass_in_box"], rel=1e-9)
        assert b["random_point"] == pytest.approx(loc["box_area_share"], rel=1e-9)
        assert b["ci95"][0] <= b["pointing_game"] <= b["ci95"][1]
    csv.write_text("".join(f"{k},{','.join(map(str, m['bbox']))}\n" for k, m in sorted(meta.items())[:10]))
    part = inspect_store(store, boxes=csv)["boxes"]
    assert (part["n"], part["ok_rows_without_boxes"]) == (10, 54)
