"""Labelled image data for evaluation: ImageNet-style ImageFolder splits, or labelled shards.

ImageFolder layout: `ROOT/train/<class>/*.jpg` and `ROOT/val/<class>/*.jpg` (ImageNet-1k as
usually extracted, or `salmae shapes --imagefolder`). Use

    train_ds, val_ds, split = load_imagefolder_splits(root, train_transform, val_transform)

`train_ds` / `val_ds` are torchvision `ImageFolder`s yielding `(transform(rgb_pil), class_index)`
with one class mapping (the train folders, sorted) for both; `split.classes`, `split.counts()`
(`{"train", "val", "skipped"}`, for results.json) and `split.skipped` (`[(path, reason)]`)
describe them. Unreadable images are skipped and recorded, never fatal; an empty class folder
or a val class that train lacks is a one-line SalmaeError.

`check="header"` probes every file when the split is opened (header plus end-of-file marker;
a full decode only when that is inconclusive). Under torchrun the probe is shared: rank r
probes files r, r + W, …, and the unreadable ones are all-gathered, so every rank keeps the
same file list and each file is opened once in all (opening a split is then a collective:
every rank must do it). On ImageNet that is still a pass over 1.33M files: pass
`check="none"` to skip it. An unreadable file met later (with `check="none"`, or a file
damaged after the probe) raises `DamagedSampleError` from `__getitem__` and is recorded in that
process's `dataset.skipped`; it is never replaced by another image (that would count a
neighbour twice and hide the damage). The eval data path (`pipeline.eval.data`) turns the
error into an `ok=False` item, which the protocols leave out and count as unreadable.

`LabelledShards` (re-exported from `pipeline.data.class_shards`) is the same for labelled
webdataset shards (KEY.cls, or an integer label in KEY.json), read by byte range.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch.distributed as torch_dist
from PIL import Image
from torchvision.datasets import ImageFolder

from salmae.pipeline import dist
from salmae.pipeline.data.class_shards import LabelledShards  # noqa: F401  (re-exported: its old home)
from salmae.pipeline.data.shards import DamagedSampleError, decode_image
from salmae.pipeline.errors import SalmaeError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")
Check = Literal["header", "none"]


def load_rgb(path: str) -> Image.Image:
    """Read an image file as RGB (any mode converted); raises DamagedSampleError if unreadable."""
    with open(path, "rb") as f:
        return decode_image(f.read(), key=path)


def probe_file(path: str) -> None:
    """Raise DamagedSampleError unless `path` looks like a complete, readable image."""
    try:
        with open(path, "rb") as f, Image.open(f) as im:
            fmt = im.format
            f.seek(max(0, os.path.getsize(path) - 16))
            tail = f.read().rstrip(b"\x00")
    except Exception as e:
        raise DamagedSampleError("unreadable_image", path, f"{type(e).__name__}: {e}") from None
    complete = (fmt == "JPEG" and tail.endswith(b"\xff\xd9")) or (fmt == "PNG" and b"IEND" in tail)
    if not complete:
        load_rgb(path)  # inconclusive from the tail: decode fully to decide


class ImageFolderDataset(ImageFolder):
    """One ImageFolder directory read with a fixed class mapping, skipping unreadable images."""

    def __init__(self, root: str | Path, class_to_idx: dict[str, int], transform: Callable | None = None,
                 check: Check = "header"):
        self._class_to_idx = dict(class_to_idx)
        self.skipped: list[tuple[str, str]] = []  # (path, DAMAGE_REASONS code)
        super().__init__(str(root), transform=transform, loader=load_rgb, is_valid_file=_has_image_suffix,
                         allow_empty=True)
        if check == "header":
            self._drop_unreadable()

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes = sorted(self._class_to_idx, key=self._class_to_idx.__getitem__)
        return classes, dict(self._class_to_idx)

    def _drop_unreadable(self) -> None:
        """Probe the files (this rank's share of them), gather the failures, drop them everywhere."""
        mine: list[tuple[int, str, str]] = []  # (position in samples, path, reason)
        shared = torch_dist.is_initialized()  # torchrun's variables alone do not make a group to gather over
        rank, world = (dist.rank(), dist.world_size()) if shared else (0, 1)
        for i in range(rank, len(self.samples), world):
            path = self.samples[i][0]
            try:
                probe_file(path)
            except DamagedSampleError as e:
                mine.append((i, path, e.reason))
        bad = sorted(_all_gather_lists(mine))  # samples order, as a single process finds them
        dropped = {i for i, _, _ in bad}
        self.samples = [s for i, s in enumerate(self.samples) if i not in dropped]
        self.imgs = self.samples
        self.targets = [target for _, target in self.samples]
        self.skipped += [(path, reason) for _, path, reason in bad]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        """`(transform(image), class_index)`; an unreadable file is recorded and re-raised, never substituted."""
        try:
            return super().__getitem__(index)
        except DamagedSampleError as e:
            self.skipped.append((self.samples[index][0], e.reason))
            raise


def _has_image_suffix(path: str) -> bool:
    return path.lower().endswith(IMAGE_SUFFIXES)


def _all_gather_lists(items: list) -> list:
    """The concatenation of every rank's list (this list alone in a single process)."""
    if not torch_dist.is_initialized() or dist.world_size() == 1:
        return list(items)
    parts: list[list] = [[] for _ in range(dist.world_size())]
    torch_dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


@dataclass
class ImageFolderSplit:
    """The train and val datasets of an ImageFolder root, sharing the train class mapping."""

    root: Path
    train: ImageFolderDataset
    val: ImageFolderDataset
    classes: list[str]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return self.train.skipped + self.val.skipped

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "skipped": len(self.skipped)}

    @classmethod
    def open(cls, root: str | Path, train_transform: Callable | None = None,
             val_transform: Callable | None = None, check: Check = "header") -> "ImageFolderSplit":
        root = Path(root)
        train_classes = _class_folders(root, "train")
        val_classes = _class_folders(root, "val")
        unknown = sorted(set(val_classes) - set(train_classes))
        if unknown:
            raise SalmaeError(f"val class '{unknown[0]}' in {root / 'val'} has no folder in {root / 'train'} "
                              f"({len(unknown)} such); add it to train or remove it from val")
        class_to_idx = {name: i for i, name in enumerate(train_classes)}
        train = ImageFolderDataset(root / "train", class_to_idx, train_transform, check)
        val = ImageFolderDataset(root / "val", class_to_idx, val_transform, check)
        if not len(train) or not len(val):
            which = "train" if not len(train) else "val"
            raise SalmaeError(f"no readable images in {root / which} ({len(train.skipped) + len(val.skipped)} "
                              "unreadable); check the files")
        return cls(root=root, train=train, val=val, classes=train_classes)


def _class_folders(root: Path, split: str) -> list[str]:
    folder = root / split
    if not folder.is_dir():
        raise SalmaeError(f"ImageFolder split {folder} not found; --data must hold train/ and val/ "
                          "with one folder per class (e.g. from `salmae shapes OUT --imagefolder`)")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise SalmaeError(f"{folder} holds no class folders; expected {folder}/<class>/<image>.jpg")
    for name in classes:
        if not any(_has_image_suffix(p.name) for p in (folder / name).iterdir()):
            raise SalmaeError(f"class folder {folder / name} holds no images; add images or remove the folder")
    return classes


def load_imagefolder_splits(root: str | Path, train_transform: Callable | None = None,
                            val_transform: Callable | None = None, check: Check = "header",
                            ) -> tuple[ImageFolderDataset, ImageFolderDataset, ImageFolderSplit]:
    """(train_ds, val_ds, split) for `root/train` and `root/val`; see the module docstring."""
    split = ImageFolderSplit.open(root, train_transform, val_transform, check)
    return split.train, split.val, split
