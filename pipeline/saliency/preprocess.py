"""Stage 1's image preprocessing: the whole image into CLIP's input, and the frame it leaves in the store.

Two ways to fit an image to the CLIP input (`--set resize=`), both with the interpolation of the
CLIP weights' `preprocess_cfg` (open_clip's tag, or the checkpoint file's), as open_clip's
inference transform (`open_clip.image_transform(..., is_train=False)`) does them:

- `squash` (default): resized to the input size, aspect not kept (`resize_mode='squash'`). The
  map covers the whole image: frame `[0, 0, W, H]`.
- `letterbox`: the longest side to the input size, aspect kept, centred and padded with black
  (`resize_mode='longest'`: `ResizeKeepRatio(longest=1)` + `CenterCropOrPad`). The map covers the
  whole input, so the row's frame is the input in image pixels: it reaches past the image by
  the padding on the short side (`letterbox_frames`). Stage 2's crops lie inside the image and
  its area pooling maps them onto map cells through the frame, so padding never enters a mask
  and no map is resampled.

The letterbox geometry is computed from the image size the manifest records (the header's),
in the store's frames and in the loader alike, so the two always agree, also when a JPEG is
decoded at a reduced scale (`draft`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from PIL import Image

Resize = Literal["squash", "letterbox"]
RESIZE_MODES = ("squash", "letterbox")
# open_clip's names; 'random' (a training-time choice) is bicubic at inference, as open_clip does it
INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "random": Image.BICUBIC}
FRAME_CONVENTIONS = {
    "squash": "whole image resized (squashed, aspect not kept) to input_size; frame = [0, 0, W, H]",
    "letterbox": "longest side resized to input_size, aspect kept, centred, padded with black; frame = the input "
                 "in image pixels (reaches past the image by the padding)",
}


def letterbox_geometry(width: int, height: int, size_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(new_w, new_h, pad_left, pad_top) of a `width` x `height` image letterboxed into `size_hw`,
    rounded as open_clip's `ResizeKeepRatio(longest=1)` and `CenterCropOrPad` round them."""
    th, tw = size_hw
    ratio = max(height / th, width / tw)
    new_w, new_h = round(width / ratio), round(height / ratio)
    return new_w, new_h, (tw - new_w) // 2, (th - new_h) // 2


def letterbox_frames(sizes: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """sizes: [N, 2] (W, H) -> [N, 4] float32 frames (x0, y0, x1, y1): the letterboxed input in image pixels.

    Vectorised `letterbox_geometry` (numpy's round is Python's: half to even), for millions of rows.
    """
    th, tw = size_hw
    w, h = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    ratio = np.maximum(h / th, w / tw)
    new_w, new_h = np.round(w / ratio), np.round(h / ratio)
    pad_l, pad_t = (tw - new_w) // 2, (th - new_h) // 2
    sx, sy = w / new_w, h / new_h                                 # image pixels per input pixel
    frames = np.stack([-pad_l * sx, -pad_t * sy, (tw - pad_l) * sx, (th - pad_t) * sy], 1)
    return (frames + 0.0).astype(np.float32)                      # + 0.0: no -0.0 where nothing is padded


def squash_frames(sizes: np.ndarray) -> np.ndarray:
    """sizes: [N, 2] (W, H) -> [N, 4] float32 frames [0, 0, W, H]."""
    return np.concatenate([np.zeros_like(sizes), sizes], 1).astype(np.float32)


def store_frames(sizes: np.ndarray, size_hw: tuple[int, int], resize: str) -> np.ndarray:
    """The frame of every row of a store made with `resize` (sizes: [N, 2] (W, H) -> [N, 4])."""
    return letterbox_frames(sizes, size_hw) if resize == "letterbox" else squash_frames(sizes)


def clip_input(image: Image.Image, size_hw: tuple[int, int], resize: str = "squash",
               interpolation: str = "bicubic", source_size: tuple[int, int] | None = None) -> torch.Tensor:
    """An RGB PIL image -> uint8 [3, H, W], the CLIP input (normalised later, on the device).

    `source_size` (W, H): the size the letterbox geometry is computed from (the manifest's), when
    `image` was decoded smaller (JPEG draft); default `image.size`.
    """
    th, tw = size_hw
    resample = INTERPOLATIONS[interpolation]
    if resize == "squash":
        pixels = np.array(image.resize((tw, th), resample), dtype=np.uint8)          # [H, W, 3]
    else:
        new_w, new_h, pad_l, pad_t = letterbox_geometry(*(source_size or image.size), size_hw)
        pixels = np.zeros((th, tw, 3), np.uint8)
        pixels[pad_t:pad_t + new_h, pad_l:pad_l + new_w] = np.asarray(image.resize((new_w, new_h), resample))
    return torch.from_numpy(pixels).permute(2, 0, 1)                                 # [3, H, W]
