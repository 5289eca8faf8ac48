"""`salmae inspect STORE --boxes FILE`: the pointing game against a user's boxes (VOC XML or CSV), on a
hand-built store whose maps peak inside or outside the boxes, so every count is known in advance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.saliency.store import SaliencyStore, create_store
from salmae.stages.inspect import _place_boxes, format_summary, inspect_store

GRID = (4, 4)   # 16-px cells on the 64-px images below

# key -> (image W, H), frame, status, {cell: value} of the map, boxes (x0, y0, x1, y1) in image pixels
ROWS = {
    # peak in cell (0,0), centre (8, 8), inside its box: hit; mass 1 of 1 + 15 x 0.25
    "k0": ((64, 64), (0, 0, 64, 64), 1, {(0, 0): 1.0, "rest": 0.25}, [(0, 0, 16, 16)]),
    # peak in cell (3,3), centre (56, 56), outside the box: miss; mass 0.5 (cell (0,0)) of 1.5
    "k1": ((64, 64), (0, 0, 64, 64), 1, {(3, 3): 1.0, (0, 0): 0.5}, [(0, 0, 40, 40)]),
    # two overlapping boxes (union: the bottom half), peak in cell (2,1), inside both: hit; mass 1 of 1.5,
    # counted once although both boxes cover the cell
    "k2": ((64, 64), (0, 0, 64, 64), 1, {(2, 1): 1.0, (0, 3): 0.5}, [(0, 32, 32, 64), (16, 32, 64, 64)]),
    # letterboxed 64x32 image: the frame reaches 16 px past it above and below; the peak cell (0,3) has its
    # centre (56, -8) in the padding above the box's columns: miss; mass 0.5 (cell (1,3), inside) of 1.5
    "k3": ((64, 32), (0, -16, 64, 48), 1, {(0, 3): 1.0, (1, 3): 0.5}, [(32, 0, 64, 32)]),
    # a failed row with boxes: counted as not ok, not scored
    "k4": ((64, 64), (0, 0, 64, 64), 2, {}, [(0, 0, 64, 64)]),
    # an ok row without boxes
    "k5": ((64, 64), (0, 0, 64, 64), 1, {(1, 1): 1.0}, []),
}
HITS = [True, False, True, False]
MASS = [1 / 4.75, 0.5 / 1.5, 1 / 1.5, 0.5 / 1.5]
AREA_SHARE = [256 / 4096, 1600 / 4096, 2048 / 4096, 1024 / 2048]   # union of the boxes / image area
EXTRA_KEY = "zz"   # in the box files, not in the store


@pytest.fixture(scope="module")
def hand_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("boxes") / "store.zarr"
    keys = list(ROWS)
    create_store(path, keys=keys, image_sizes=np.array([r[0] for r in ROWS.values()]),
                 frames=np.array([r[1] for r in ROWS.values()], np.float32), grid=GRID, rows_per_shard=8,
                 attrs={"clip_model": "hand-built", "manifest_hash": "none"})
    maps = np.zeros((len(keys), *GRID), np.float32)
    for i, (_, _, _, cells, _) in enumerate(ROWS.values()):
        maps[i] = cells.get("rest", 0.0)
        for cell, value in cells.items():
            if cell != "rest":
                maps[i][cell] = value
    st = SaliencyStore.open(path, mode="r+")
    st.write_shard(0, maps, np.array([r[2] for r in ROWS.values()], np.uint8), {"test": True})
    return path


def _csv(path: Path) -> Path:
    lines = ["key,x0,y0,x1,y1"] + [f"{k},{','.join(f'{v:g}' for v in box)}"
                                   for k, row in ROWS.items() for box in row[4]] + [f"{EXTRA_KEY},0,0,8,8"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _voc(folder: Path, scale: int = 2) -> Path:
    """One ImageNet-style XML per key, its <size> `scale` x the stored image (boxes in those pixels)."""
    folder.mkdir(parents=True, exist_ok=True)
    for key, ((w, h), _, _, _, boxes) in [*ROWS.items(), (EXTRA_KEY, ((64, 64), None, 1, {}, [(0, 0, 8, 8)]))]:
        if not boxes:
            continue
        objects = "".join(f"<object><name>n01440764</name><bndbox><xmin>{x0 * scale:g}</xmin><ymin>{y0 * scale:g}</ymin>"
                          f"<xmax>{x1 * scale:g}</xmax><ymax>{y1 * scale:g}</ymax></bndbox></object>"
                          for x0, y0, x1, y1 in boxes)
        (folder / f"{key}.xml").write_text(
            f"<annotation><folder>val</folder><filename>{key}.JPEG</filename><size><width>{w * scale}</width>"
            f"<height>{h * scale}</height><depth>3</depth></size>{objects}</annotation>")
    return folder


def _assert_counts(b: dict) -> None:
    assert (b["n"], b["hits"]) == (4, sum(HITS)) and b["pointing_game"] == 0.5
    assert b["ci95"] == pytest.approx([0.1500, 0.8500], abs=1e-4)         # Wilson, 2 of 4
    assert b["mass_in_box"] == pytest.approx(np.mean(MASS), rel=1e-6)
    assert b["random_point"] == pytest.approx(np.mean(AREA_SHARE), rel=1e-9)
    assert (b["box_keys"], b["boxes"]) == (6, 7)
    assert (b["keys_not_in_store"], b["not_ok"], b["ok_rows_without_boxes"]) == (1, 1, 1)
    assert (b["size_mismatch"], b["outside_image"]) == (0, 0) and b["examples"]["keys_not_in_store"] == [EXTRA_KEY]


def test_pointing_game_on_a_hand_built_store_from_a_csv(hand_store, tmp_path):
    s = inspect_store(hand_store, boxes=_csv(tmp_path / "boxes.csv"))
    b = s["boxes"]
    assert b["format"] == "csv"
    _assert_counts(b)
    text = format_summary(s)
    assert "pointing game 0.500 (95% 0.150-0.850, 2/4 maps) vs 0.363 for a uniform random point" in text
    assert "1 keys not in the store (e.g. 'zz'), 1 rows not ok; 1 ok rows have no boxes" in text
    assert json.loads(format_summary(s, as_json=True))["boxes"]["hits"] == 2


def test_pointing_game_from_voc_xml_scaled_from_their_size(hand_store, tmp_path):
    folder = _voc(tmp_path / "val")                  # the boxes of a copy twice the stored size
    b = inspect_store(hand_store, boxes=folder)["boxes"]
    assert b["format"] == "voc-xml"
    _assert_counts(b)
    one = inspect_store(hand_store, boxes=folder / "k2.xml")["boxes"]      # a single file
    assert (one["n"], one["hits"], one["box_keys"], one["ok_rows_without_boxes"]) == (1, 1, 1, 4)
    assert one["mass_in_box"] == pytest.approx(MASS[2], rel=1e-6)


def test_voc_size_of_another_aspect_needs_the_resize_mode(hand_store, tmp_path):
    xml = tmp_path / "k0.xml"     # a 128x64 original of k0 (stored 64x64): img2dataset's border mode pads it
    xml.write_text("<annotation><filename>k0</filename><size><width>128</width><height>64</height></size>"
                   "<object><bndbox><xmin>0</xmin><ymin>0</ymin><xmax>32</xmax><ymax>32</ymax></bndbox></object>"
                   "</annotation>")
    b = inspect_store(hand_store, boxes=xml)["boxes"]
    assert (b["n"], b["size_mismatch"], b["examples"]["size_mismatch"]) == (0, 1, ["k0"])
    assert "--boxes-resize border|center_crop" in format_summary(inspect_store(hand_store, boxes=xml))
    b = inspect_store(hand_store, boxes=xml, boxes_resize="border")["boxes"]   # -> (0, 16, 16, 32): cell (1,0)
    assert (b["n"], b["hits"], b["size_mismatch"]) == (1, 0, 0) and b["random_point"] == pytest.approx(256 / 4096)


def test_place_boxes_follows_img2dataset_resize_modes():
    box = np.array([[0.0, 0.0, 200.0, 100.0], [0.0, 0.0, 40.0, 100.0]])
    np.testing.assert_allclose(_place_boxes(box, (200, 100), (64, 64), "border"), [[0, 16, 64, 48], [0, 16, 12.8, 48]])
    # centre crop: scale 0.64, 32 px cut on each side; the second box falls wholly in the cut: dropped
    np.testing.assert_allclose(_place_boxes(box, (200, 100), (64, 64), "center_crop"), [[0, 0, 64, 64]])
    assert _place_boxes(box, (200, 100), (64, 64), "scale") is None
    np.testing.assert_allclose(_place_boxes(box, (400, 200), (200, 100), "scale"), box / 2)
    np.testing.assert_allclose(_place_boxes(box, None, (100, 50), "scale"), [[0, 0, 100, 50], [0, 0, 40, 50]])


@pytest.mark.parametrize("content, message", [
    ("k0,0,0,16,16\nk1,0,0,abc,16\n", "boxes.csv line 2: expected key,x0,y0,x1,y1"),
    ("k0,0,0,16\n", "boxes.csv line 1: expected key,x0,y0,x1,y1"),
    ("k0,10,0,5,16\n", r"boxes.csv line 1: box \(10, 0, 5, 16\) is empty"),
    ("key,x0,y0,x1,y1\n", "boxes.csv holds no boxes"),
    ("nope,0,0,8,8\nother,0,0,8,8\n", "none of the 2 keys in"),
])
def test_bad_csv_is_one_line(hand_store, tmp_path, content, message):
    path = tmp_path / "boxes.csv"
    path.write_text(content)
    with pytest.raises(SalmaeError, match=message) as e:
        inspect_store(hand_store, boxes=path)
    assert "\n" not in str(e.value)


def test_bad_voc_and_missing_files_are_one_line(hand_store, tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text("<annotation><filename>k0</filename><object><bndbox><xmin>1</xmin></bndbox></object></annotation>")
    cut = tmp_path / "cut.xml"
    cut.write_text("<annotation><filename>k0</filen")
    (tmp_path / "empty").mkdir()
    for path, message in ((bad, "bad.xml: <object> 1 has no <bndbox> with numeric"), (cut, "cut.xml is not readable XML"),
                          (tmp_path / "empty", "holds no \\*.xml file"), (tmp_path / "absent.csv", "not found")):
        with pytest.raises(SalmaeError, match=message) as e:
            inspect_store(hand_store, boxes=path)
        assert "\n" not in str(e.value)


def test_cli_boxes(hand_store, tmp_path):
    from click.testing import CliRunner

    from salmae.pipeline.cli import cli

    res = CliRunner().invoke(cli, ["inspect", str(hand_store), "--boxes", str(_csv(tmp_path / "b.csv")), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["boxes"]["pointing_game"] == 0.5
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("000000001,0,0,8,8\n")
    res = CliRunner().invoke(cli, ["inspect", str(hand_store), "--boxes", str(wrong)])
    assert res.exit_code == 2 and res.output.count("\n") == 1
    assert "none of the 1 keys in" in res.output and "store: 'k0', 'k1'" in res.output


def test_wilson_interval_values_and_edges():
    from salmae.pipeline.stats import wilson_interval

    assert wilson_interval(2, 4) == pytest.approx((0.15004, 0.84996), abs=1e-5)
    assert wilson_interval(20, 20) == pytest.approx((0.83887, 1.0), abs=1e-5)     # never 1 +- 0 at all hits
    assert wilson_interval(0, 20) == pytest.approx((0.0, 0.16113), abs=1e-5)
    assert wilson_interval(81, 100) == pytest.approx((0.72221, 0.87485), abs=1e-5)
    with pytest.raises(ValueError):
        wilson_interval(1, 0)
