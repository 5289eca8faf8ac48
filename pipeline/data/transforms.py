"""Paired augmentation for stage 2: one RandomResizedCrop + flip applied to an image AND its saliency map.

MAE trains with RandomResizedCrop(scale 0.2–1) and a horizontal flip. A saliency map computed on
the whole image is only meaningful for masking if it sees the same crop and flip; so the crop box
is drawn once (`sample_crop_box`) and used for both: the image is resized-cropped, the map is
area-pooled over the same box (in map coordinates) onto the MAE patch grid
(`crop_flip_saliency`). All randomness comes from a `torch.Generator`, so a sample's
augmentation depends only on its seed (not on the worker or DDP rank that loads it).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in image pixels

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_crop_box(width: int, height: int, generator: torch.Generator | None = None,
                    scale: tuple[float, float] = (0.2, 1.0),
                    ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Box:
    """torchvision's RandomResizedCrop.get_params, drawn from `generator`; returns (x0, y0, x1, y1)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=generator).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            pos = torch.rand(2, generator=generator).tolist()
            top = int(pos[0] * (height - h + 1))
            left = int(pos[1] * (width - w + 1))
            return (left, top, left + w, top + h)
    # fallback: central crop with the ratio clipped into range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return (left, top, left + w, top + h)


def crop_flip_image(img: Image.Image, box: Box, flip: bool, size: int) -> torch.Tensor:
    """PIL image -> uint8 tensor [3, size, size] of `box` (bicubic, as MAE), flipped if asked.

    Normalisation happens on the training device (`normalise`), after a uint8 copy.
    """
    x0, y0, x1, y1 = box
    t = TF.to_image(img)
    t = TF.resized_crop(t, int(y0), int(x0), int(y1 - y0), int(x1 - x0), [size, size],
                        interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    if flip:
        t = TF.horizontal_flip(t)
    return t.as_subclass(torch.Tensor)


def pixel_stats(device: torch.device, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std in uint8 units, [1, 3, 1, 1] float32 each on `device`, for `normalise`.

    Built once per run (or epoch), never inside a step: a tensor made from a Python list on a
    GPU is a blocking copy from pageable memory, a full stream sync.
    """
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    return m.to(device), s.to(device)


def normalise(images: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """uint8 images [N, 3, H, W] -> float32 normalised [N, 3, H, W] on their own device.

    `stats` = `pixel_stats(device, mean, std)`, made once outside the step. Loaders ship uint8
    (a quarter of float32's bytes over the host-to-device link) and the training process calls
    this right after `.to(device)`.
    """
    mean, std = stats
    return (images.float() - mean) / std


def crop_flip_saliency(sal: torch.Tensor, frame: Sequence[float], box: Box, flip: bool,
                       out_grid: tuple[int, int]) -> torch.Tensor:
    """Apply an image crop box and flip to a saliency map and area-pool it to the patch grid.

    Args:
        sal: [gh, gw] map covering `frame` = (x0, y0, x1, y1) of the image (image pixels).
        frame: the image region the map covers.
        box: crop box (x0, y0, x1, y1) in image pixels (from `sample_crop_box`).
        flip: whether the cropped image was flipped horizontally.
        out_grid: (Gh, Gw) MAE patch grid.
    Returns:
        [Gh, Gw] float32 mean saliency per output patch; parts of the crop outside the frame count as 0.
    """
    return crop_flip_saliency_batch(sal[None], torch.as_tensor([frame]), torch.as_tensor([box]),
                                    torch.as_tensor([flip]), out_grid)[0]


def crop_flip_saliency_batch(sal: torch.Tensor, frames: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor,
                             out_grid: tuple[int, int]) -> torch.Tensor:
    """`crop_flip_saliency` for a batch: [B, gh, gw] maps, [B, 4] frames and boxes, [B] flips -> [B, Gh, Gw].

    The map is piecewise constant per cell; each output patch gets the exact mean of the map over
    its area, `Wy @ sal @ Wx.T` with per-axis overlap matrices built for the whole batch at once
    (per-sample construction made the data loader ~15% slower).
    """
    n, gh, gw = sal.shape
    frames, boxes = frames.double().numpy(), boxes.double().numpy()
    cell_w = np.maximum(frames[:, 2] - frames[:, 0], 1e-6) / gw          # [B] image pixels per map cell
    cell_h = np.maximum(frames[:, 3] - frames[:, 1], 1e-6) / gh
    wy = _area_weights((boxes[:, 1] - frames[:, 1]) / cell_h, (boxes[:, 3] - frames[:, 1]) / cell_h, out_grid[0], gh)
    wx = _area_weights((boxes[:, 0] - frames[:, 0]) / cell_w, (boxes[:, 2] - frames[:, 0]) / cell_w, out_grid[1], gw)
    out = wy @ sal.double().numpy() @ wx.transpose(0, 2, 1)              # [B, Gh, gh] @ [B, gh, gw] @ [B, gw, Gw]
    flips = flips.numpy().astype(bool)
    out[flips] = out[flips][:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


def _area_weights(lo: np.ndarray, hi: np.ndarray, n_out: int, n_cells: int) -> np.ndarray:
    """[B, n_out, n_cells]: share of output bin k (of [lo, hi] split evenly, in cell units) lying in cell j."""
    steps = np.linspace(0.0, 1.0, n_out + 1)
    edges = lo[:, None] + (hi - lo)[:, None] * steps[None, :]           # [B, n_out + 1]
    cells = np.arange(n_cells + 1, dtype=np.float64)
    overlap = (np.minimum(edges[:, 1:, None], cells[None, None, 1:])
               - np.maximum(edges[:, :-1, None], cells[None, None, :-1]))
    width = np.maximum((hi - lo) / n_out, 1e-12)[:, None, None]
    return np.clip(overlap, 0, None) / width


def resize_saliency(sal: torch.Tensor, frame: Sequence[float], image_size: tuple[int, int],
                    out_grid: tuple[int, int]) -> torch.Tensor:
    """No augmentation (evaluation/visualisation): the whole image as the crop box. [gh, gw] -> [Gh, Gw]."""
    w, h = image_size
    return crop_flip_saliency(sal, frame, (0, 0, w, h), False, out_grid)

