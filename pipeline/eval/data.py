"""Eval datasets on top of the data layer: an ImageFolder root or labelled shards.

Labelled shards come as a train pattern and a val pattern (`--data TRAIN --set val_data=VAL`,
e.g. timm's imagenet-1k-wds), as a folder (or an object-store prefix ending in "/") holding
`*train-*.tar` and `*val-*.tar` (or `*validation-*.tar`) shards, or as one pattern whose KEY.json
`split` says train or val (the generated shapes).

`open_eval_data(data, train_transform, val_transform)` returns train/val datasets whose items
are `(image [3, S, S], label, index, ok)`: the index lets distributed loops put results back in
dataset order, and `ok=False` (a zero image) marks a file that turned out unreadable only when
decoded, so loops skip it instead of crashing. Files found unreadable up front (the data
layer's header probe) are already left out and listed in `skipped`.
"""

from __future__ import annotations

import glob
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from salmae.pipeline.data.imagefolder import ImageFolderSplit, LabelledShards
from salmae.pipeline.data.remote import glob_remote, is_remote
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
        return int(self.base.targets[index])

    def name(self, index: int) -> str:
        """File path (ImageFolder) or shard key of item `index`."""
        if hasattr(self.base, "key_of"):   # LabelledShards
            return self.base.key_of(index)
        return self.base.samples[index][0]


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
                   check: str = "header", val_data: str = "", label_from: str = "auto") -> EvalData:
    """Open `data`: an ImageFolder root (`train/`, `val/`), labelled shards with their val shards in
    `val_data`, a folder of `*train-*.tar` / `*val-*.tar` shards, or shards whose KEY.json `split`
    is train/val (when `val_data` is empty)."""
    root = Path(data)
    if root.is_dir() and not val_data and (root / "train").is_dir():
        split = ImageFolderSplit.open(root, train_transform, val_transform, check=check)
        return EvalData(IndexedImages(split.train, image_size), IndexedImages(split.val, image_size),
                        list(split.classes), [path for path, _ in split.skipped])
    if not val_data and (root.is_dir() or is_remote(data) and data.endswith("/")):
        data, val_data = split_shard_folder(data)
    elif not _looks_like_shards(data):
        raise SalmaeError(f"eval data {data} is neither an ImageFolder root nor shards; pass a folder with "
                          "train/ and val/ class folders, labelled shards with --set val_data=VAL_SHARDS "
                          "(e.g. 'DIR/imagenet1k-train-{0000..1023}.tar'), or a folder of train-*.tar and val-*.tar")
    if val_data:
        train = LabelledShards(data, train_transform, label_from=label_from)
        val = LabelledShards(val_data, val_transform, label_from=label_from, num_classes=len(train.classes))
    else:
        train = LabelledShards(data, train_transform, split="train", label_from=label_from)
        val = LabelledShards(data, val_transform, split="val", label_from=label_from,
                             num_classes=len(train.classes))
    if int(val.targets.max()) >= len(train.classes):
        raise SalmaeError(f"val samples of {val_data or data} carry labels that no train sample has (up to "
                          f"{int(val.targets.max())}, train has {len(train.classes)} classes); "
                          "every val class needs train samples")
    skipped = sorted({key for key, _ in train.skipped + val.skipped})
    return EvalData(IndexedImages(train, image_size), IndexedImages(val, image_size), train.classes, skipped)


def _looks_like_shards(data: str) -> bool:
    return any(ch in data for ch in "{*?") or data.endswith(".tar") or data.startswith("pipe:") or "://" in data


def split_shard_folder(folder: str | Path) -> tuple[str, str]:
    """(train glob, val glob) of a folder (local, or an object-store prefix ending in "/") holding
    `*train-*.tar` and `*val-*.tar` / `*validation-*.tar` shards."""
    base = str(folder).rstrip("/")

    def matches(pattern: str) -> list[str]:
        url = f"{base}/{pattern}"
        return glob_remote(url) if is_remote(url) else glob.glob(url)

    val_pattern = next((p for p in ("*val-*.tar", "*validation-*.tar") if matches(p)), None)
    if not matches("*train-*.tar") or val_pattern is None:
        raise SalmaeError(f"eval data {folder} holds neither train/ and val/ class folders nor *train-*.tar and "
                          "*val-*.tar (or *validation-*.tar) shards; pass an ImageFolder root or "
                          "--data TRAIN_SHARDS --set val_data=VAL_SHARDS")
    return f"{base}/*train-*.tar", f"{base}/{val_pattern}"
