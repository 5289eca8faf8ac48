"""The manipulation check: main-object patches from boxes cropped and flipped as the image, the share
of them the masks hide, and the boxes read from the samples' json; on hand-built masks and boxes."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import torch

from salmae.pipeline.pretrain.mask_plan import MaskPlan, batch_masks


def test_object_stats_on_a_hand_built_mask():
    from salmae.pipeline.pretrain.object_check import object_stats, summarise

    objects = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    mask = torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.float32)
    counts = object_stats(mask, objects)
    assert counts.tolist() == [5.0, 4.0, 2.0, 1.0]     # object patches, hidden, images with one, all hidden
    assert summarise(counts) == {"object_hidden": 0.8, "object_seen": 0.2,
                                 "object_all_hidden": 0.5, "object_patches": 2.5}
    assert summarise(torch.zeros(4)) is None


def test_object_patches_follow_the_crop_and_flip():
    """A 32-px image, 4x4 patches of 8 px; the box covers x 16..32, y 0..16 (patches 2, 3, 6, 7)."""
    from salmae.pipeline.pretrain.object_check import object_patches

    box = torch.tensor([[16.0, 0, 32, 16]] * 3 + [[float("nan")] * 4])
    crops = torch.tensor([[0.0, 0, 32, 32], [0, 0, 32, 32], [16, 0, 32, 32], [0, 0, 32, 32]])
    flips = torch.tensor([False, True, False, False])
    got = object_patches(box, crops, flips, (4, 4))
    idx = [torch.nonzero(row).flatten().tolist() for row in got]
    assert idx == [[2, 3, 6, 7], [0, 1, 4, 5], list(range(8)), []]
    half = object_patches(torch.tensor([[12.0, 0, 32, 8]]), crops[:1], flips[:1], (4, 4))   # patch 1: half inside
    assert torch.nonzero(half[0]).flatten().tolist() == [1, 2, 3]


def test_batch_masks_count_the_object_patches_they_hide():
    objects = torch.zeros(3, 16, dtype=torch.bool)
    objects[:, :4] = True
    sal = torch.zeros(3, 16)
    sal[:, :4] = 1.0                                            # the map is the object
    plan = MaskPlan(strategy="saliency", cap=0.25)
    m = batch_masks(plan, 3, (4, 4), 0.0, 0, (0, 3), sal, objects=objects)
    assert m["object_stats"].tolist() == [12.0, 12.0, 3.0, 3.0]  # cap 4 of 16 = the whole object
    assert batch_masks(plan, 3, (4, 4), 0.0, 0, (0, 3), sal)["object_stats"] is None


def _tar(path, metas: dict[str, dict]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, meta in metas.items():
            for ext, data in (("jpg", b"x"), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


class _Manifest:
    def __init__(self, shards, keys):
        from salmae.pipeline.data.manifest import StringColumn
        import pyarrow as pa

        self._shard, self.keys = StringColumn(pa.array(shards)), StringColumn(pa.array(keys))

    def __len__(self):
        return len(self.keys)

    def column(self, name):
        return self._shard


def test_object_boxes_are_read_by_row_from_the_samples_json(tmp_path):
    from salmae.pipeline.pretrain.object_check import read_object_boxes

    _tar(tmp_path / "00000.tar", {"000": {"bbox": [1, 2, 3, 4]}, "001": {"caption": "no box"}})
    _tar(tmp_path / "00001.tar", {"100": {"bbox": [5, 6, 7, 8]}})
    manifest = _Manifest(["00000.tar", "00000.tar", "00001.tar"], ["000", "001", "100"])
    boxes = read_object_boxes(manifest, [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")])
    assert boxes[0].tolist() == [1, 2, 3, 4] and np.isnan(boxes[1]).all() and boxes[2].tolist() == [5, 6, 7, 8]
    _tar(tmp_path / "plain.tar", {"000": {"caption": "a photo"}, "001": {"bbox": [1, 2, 3, 4]}})
    assert read_object_boxes(manifest, [str(tmp_path / "plain.tar")]) is None    # the first sample decides
    assert read_object_boxes(manifest, ["pipe:cat 00000.tar"]) is None


def test_read_object_check_gives_the_epoch_records_shares(tmp_path):
    from salmae.pipeline.pretrain.object_check import read_object_check

    shares = {"object_hidden": 0.8, "object_seen": 0.2, "object_all_hidden": 0.5, "object_patches": 2.5}
    lines = [{"kind": "step", "epoch": 0, "loss": 1.0}, {"kind": "epoch", "epoch": 0, "loss": 1.0, **shares},
             {"kind": "epoch", "epoch": 1, "loss": 0.9}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert read_object_check(tmp_path) == [{"epoch": 0, **shares}]
    assert read_object_check(tmp_path / "absent") == []
