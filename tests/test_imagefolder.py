"""ImageFolder splits for evaluation and labelled shards."""

from __future__ import annotations

import collections
import shutil

import pytest
import torch
from torchvision.transforms import v2

from pipeline.data.imagefolder import LabelledShards, load_imagefolder_splits
from pipeline.data.shapes import SHAPES
from pipeline.data.shards import iter_samples
from pipeline.errors import SalmaeError

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


def test_lazy_check_skips_at_read_time(folder):
    star = folder / "val" / "star"
    for path in star.glob("*.jpg"):
        path.write_bytes(b"broken")
    train, val, split = load_imagefolder_splits(folder, check="none")
    broken = [i for i, (p, _) in enumerate(val.samples) if "/star/" in p]
    image, label = val[broken[0]]  # the next readable image instead
    assert image.mode == "RGB" and val.skipped and val.skipped[0][1] == "unreadable_image"


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
