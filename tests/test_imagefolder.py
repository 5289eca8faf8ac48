"""ImageFolder splits for evaluation and labelled shards."""

from __future__ import annotations

import collections
import shutil

import pytest
import torch
from torchvision.transforms import v2

from salmae.pipeline.data.imagefolder import LabelledShards, load_imagefolder_splits
from salmae.pipeline.data.shapes import SHAPES
from salmae.pipeline.data.shards import DamagedSampleError, iter_samples
from salmae.pipeline.eval.data import IndexedImages
from salmae.pipeline.errors import SalmaeError

TO_TENSOR = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


@pytest.fixture()
def folder(tmp_path, shapes_dir):
    root = tmp_path / "if"
    shutil.copytree(shapes_dir / "imagefolder", root)
    return root


def test_splits_on_generated_shapes(shapes_dir, shapes_pattern):
    train, val, split = load_imagefolder_splits(shapes_dir / "imagefolder", TO_TENSOR, TO_TENSOR)
    splits = collections.Counter(s.meta["split"] for s in iter_samples(shapes_pattern, decode=False))
    assert split.counts() == {"train": splits["train"], "val": splits["val"], "skipped": 0}
    assert split.classes == sorted(SHAPES) and train.class_to_idx == val.class_to_idx
    image, label = val[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and split.classes[label] == "circle"


def test_unreadable_images_are_skipped_and_recorded(folder):
    good = next((folder / "train" / "star").glob("*.jpg"))
    (folder / "train" / "star" / "cut.jpg").write_bytes(good.read_bytes()[:300])
    (folder / "val" / "heart" / "junk.png").write_bytes(b"not a png")
    (folder / "train" / "star" / "notes.txt").write_text("ignored: not an image suffix")
    _, _, split = load_imagefolder_splits(folder)
    assert sorted((p.rsplit("/", 1)[-1], why) for p, why in split.skipped) == [
        ("cut.jpg", "unreadable_image"), ("junk.png", "unreadable_image")]
    assert split.counts()["skipped"] == 2


def test_lazy_check_marks_a_damaged_file_unreadable_never_a_neighbour(folder):
    """check=none: a file that fails to decode raises and is recorded; no other image stands in for it."""
    star = folder / "val" / "star"
    damaged = sorted(star.glob("*.jpg"))
    for path in damaged:
        path.write_bytes(b"broken")
    train, val, split = load_imagefolder_splits(folder, check="none")
    assert split.counts()["skipped"] == 0  # nothing probed up front
    broken = [i for i, (p, _) in enumerate(val.samples) if "/star/" in p]
    assert len(broken) == len(damaged) > 0
    with pytest.raises(DamagedSampleError) as info:
        val[broken[0]]
    assert info.value.reason == "unreadable_image"
    assert val.skipped == [(val.samples[broken[0]][0], "unreadable_image")]
    readable = next(i for i in range(len(val)) if i not in broken)
    image, label = val[readable]
    assert image.mode == "RGB" and val.classes[label] != "star"

    items = IndexedImages(val, image_size=32)  # the eval data path: marked, not substituted
    image, label, index, ok = items[broken[0]]
    assert (ok, index, val.classes[label]) == (False, broken[0], "star") and not image.any()


def test_empty_class_folder_is_an_error(folder):
    (folder / "train" / "ellipse").mkdir()
    with pytest.raises(SalmaeError, match="train/ellipse holds no images"):
        load_imagefolder_splits(folder)


def test_val_class_missing_from_train_is_an_error(folder):
    shutil.move(folder / "train" / "heart", folder / "heart")
    with pytest.raises(SalmaeError, match="val class 'heart'"):
        load_imagefolder_splits(folder)
    with pytest.raises(SalmaeError, match="not found"):
        load_imagefolder_splits(folder / "nowhere")


def test_labelled_shards(shapes_pattern):
    val = LabelledShards(shapes_pattern, TO_TENSOR, split="val")
    train = LabelledShards(shapes_pattern, split="train")
    assert len(val) + len(train) == 64 and val.classes == list(SHAPES)
    image, label = val[0]
    assert image.shape == (3, 32, 32) and 0 <= label < len(SHAPES)
    with pytest.raises(SalmaeError, match="no labelled samples"):
        LabelledShards(shapes_pattern, split="test")
