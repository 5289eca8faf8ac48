"""Image transforms of the eval protocols (MAE's choices; size, mean and std from the config)."""

from __future__ import annotations

from typing import Sequence

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = 0.875):
    """Deterministic: resize the short side to size / crop_pct, centre crop, normalise."""
    return T.Compose([
        T.Resize(int(round(size / crop_pct)), interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def linear_train_transform(size: int, mean, std, crop_pct: float = 0.875, augment: bool = False):
    """Linear probe: MAE's RandomResizedCrop + flip when `augment`, else the eval transform.

    Without augmentation every epoch sees the same features, so they can be cached.
    """
    if not augment:
        return eval_transform(size, mean, std, crop_pct)
    return T.Compose([
        T.RandomResizedCrop(size, interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def finetune_train_transform(size: int, mean, std, auto_augment: str | None = "rand-m9-mstd0.5-inc1",
                             re_prob: float = 0.25):
    """Fine-tune: timm's RandomResizedCrop + flip + RandAugment + random erasing (MAE's recipe)."""
    from timm.data import create_transform

    return create_transform(input_size=size, is_training=True, color_jitter=None,
                            auto_augment=auto_augment or None, interpolation="bicubic",
                            re_prob=re_prob, re_mode="pixel", re_count=1,
                            mean=tuple(mean), std=tuple(std))
