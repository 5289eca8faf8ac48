"""Eval datasets on top of the data layer: an ImageFolder root or labelled shards.

`open_eval_data(data, train_transform, val_transform)` returns train/val datasets whose items
are `(image [3, S, S], label, index, ok)`: the index lets distributed loops put results back in
dataset order, and `ok=False` (a zero image) marks a file that turned out unreadable only when
decoded, so loops skip it instead of crashing. Files found unreadable up front (the data
layer's header probe) are already left out and listed in `skipped`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from salmae.pipeline.data.imagefolder import ImageFolderSplit, LabelledShards
from salmae.pipeline.errors import SalmaeError


class IndexedImages(Dataset):
    """Wrap a `(img, label)` dataset as `(img, label, index, ok)`; a decode error gives `ok=False`."""

    def __init__(self, base: Dataset, image_size: int):
        self.base, self.image_size = base, image_size

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        try:
            img, label = self.base[index]
            return img, label, index, True
        except (OSError, ValueError, SalmaeError):  # a file damaged after the split was opened
            return torch.zeros(3, self.image_size, self.image_size), self.label(index), index, False

    def label(self, index: int) -> int:
        if hasattr(self.base, "targets"):
            return int(self.base.targets[index])
        return int(self.base.items[index][2])  # LabelledShards: (key, bytes, label)

    def name(self, index: int) -> str:
        """File path (ImageFolder) or shard key of item `index`."""
        if hasattr(self.base, "samples"):
            return self.base.samples[index][0]
        return self.base.items[index][0]


@dataclass
class EvalData:
    """Train and val datasets with one class mapping, and what was skipped while opening them."""

    train: IndexedImages
    val: IndexedImages
    classes: list[str]
    skipped: list[str]  # paths (or shard keys) of unreadable images left out

    def fingerprint(self, split: str) -> str:
        """Hash of the item names of a split (a feature cache is only valid for the same files)."""
        ds = self.train if split == "train" else self.val
        return hashlib.sha256("\n".join(ds.name(i) for i in range(len(ds))).encode()).hexdigest()


def open_eval_data(data: str, train_transform: Callable, val_transform: Callable, image_size: int,
                   check: str = "header") -> EvalData:
    """Open `data`: an ImageFolder root (`train/`, `val/`) or labelled shards (KEY.json `split` train/val)."""
    root = Path(data)
    if root.is_dir():
        split = ImageFolderSplit.open(root, train_transform, val_transform, check=check)
        return EvalData(IndexedImages(split.train, image_size), IndexedImages(split.val, image_size),
                        list(split.classes), [path for path, _ in split.skipped])
    if not any(ch in data for ch in "{*") and not root.suffix == ".tar" and not data.startswith("pipe:"):
        raise SalmaeError(f"eval data {data} is neither an ImageFolder root nor shards; pass a folder with "
                          "train/ and val/ class folders, or labelled shards (e.g. 'DIR/{00000..00003}.tar')")
    train = LabelledShards(data, train_transform, split="train")
    val = LabelledShards(data, val_transform, split="val")
    if max(val.items, key=lambda item: item[2])[2] >= len(train.classes):
        raise SalmaeError(f"val samples of {data} carry labels that no train sample has; "
                          "every val class needs train samples")
    skipped = sorted({key for key, _ in train.skipped + val.skipped})
    return EvalData(IndexedImages(train, image_size), IndexedImages(val, image_size), train.classes, skipped)
