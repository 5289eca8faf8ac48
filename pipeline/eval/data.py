"""Eval datasets: an ImageFolder root (`ROOT/train`, `ROOT/val`, one folder per class).

Every item is `(image [3, S, S], label, index, ok)`: an unreadable file yields a zero image with
`ok=False` instead of an exception, so loops can skip it and the run can list it in
`results.json`. Class indices come from `train/`; a val class missing from train, or an empty
class folder, is a one-line `SalmaeError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from pipeline.errors import SalmaeError


@dataclass
class ImageList:
    """One split: image paths with their class indices, and the class names."""

    paths: list[str]
    labels: list[int]
    classes: list[str]


class EvalImages(Dataset):
    """`ImageList` + transform -> `(img, label, index, ok)`; unreadable files give `ok=False`."""

    def __init__(self, images: ImageList, transform: Callable, image_size: int):
        self.images = images
        self.transform = transform
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.images.paths)

    def __getitem__(self, index: int):
        label = self.images.labels[index]
        try:
            with Image.open(self.images.paths[index]) as im:
                img = self.transform(im.convert("RGB"))
            return img, label, index, True
        except (OSError, ValueError, SyntaxError):  # truncated / corrupt / not an image
            return torch.zeros(3, self.image_size, self.image_size), label, index, False


def scan_imagefolder(root: str | Path) -> tuple[ImageList, ImageList]:
    """The train and val splits of an ImageFolder root, with train's class indices."""
    root = Path(root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise SalmaeError(f"eval data {root} has no {split}/ folder; pass an ImageFolder root with "
                              "train/ and val/ class folders (e.g. `salmae shapes OUT --imagefolder` -> OUT/imagefolder)")
    train_classes = _class_folders(root / "train")
    val_classes = _class_folders(root / "val")
    missing = sorted(set(val_classes) - set(train_classes))
    if missing:
        raise SalmaeError(f"val class(es) {', '.join(missing[:5])} of {root / 'val'} have no folder in "
                          f"{root / 'train'}; add them to train/ or remove them from val/")
    index = {name: i for i, name in enumerate(train_classes)}
    return (_list_split(root / "train", train_classes, index),
            _list_split(root / "val", val_classes, index, classes=train_classes))


def _class_folders(split_dir: Path) -> list[str]:
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SalmaeError(f"{split_dir} holds no class folders; expected {split_dir}/<class>/<image files>")
    return classes


def _list_split(split_dir: Path, names: Sequence[str], index: dict[str, int],
                classes: Sequence[str] | None = None) -> ImageList:
    paths, labels = [], []
    for name in names:
        files = sorted(p for p in (split_dir / name).rglob("*")
                       if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        if not files:
            raise SalmaeError(f"class folder {split_dir / name} is empty (no image files); "
                              "add images or remove the folder")
        paths += [str(p) for p in files]
        labels += [index[name]] * len(files)
    return ImageList(paths, labels, list(classes or names))
