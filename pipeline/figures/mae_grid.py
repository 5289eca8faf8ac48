"""Stage-2 PNG grids: image | saliency | masked | reconstruction, one row per fixed sample, titled
above each column as in MAE's visualisation notebook."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from salmae.pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from salmae.pipeline.files import atomic_path


def _to_uint8(imgs: torch.Tensor) -> np.ndarray:
    """Normalised [N, 3, H, W] -> uint8 [N, H, W, 3]."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (imgs.detach().float().cpu() * std + mean).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def reconstruct(model, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Paste predicted patches (de-normalised with each target patch's mean/var under norm_pix_loss)
    over the visible ones: imgs [N, 3, H, W], pred [N, L, p*p*3], mask [N, L] -> [N, 3, H, W]."""
    target = model.patchify(imgs.float())
    pred = pred.float()
    if model.norm_pix_loss:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    mixed = torch.where(mask[..., None] > 0.5, pred, target)
    return model.unpatchify(mixed)


def _grid_panel(values: torch.Tensor, grid: tuple[int, int], size: int, colour: tuple[int, int, int]) -> np.ndarray:
    """[L] in [0, 1] -> [size, size, 3] uint8, nearest-upsampled and tinted."""
    v = values.float().view(*grid)
    v = (v - v.min()) / (v.max() - v.min()).clamp_min(1e-8)
    img = Image.fromarray((v.cpu().numpy() * 255).astype(np.uint8)).resize((size, size), Image.NEAREST)
    a = np.asarray(img, dtype=np.float32)[..., None] / 255.0
    return (a * np.array(colour, dtype=np.float32)).astype(np.uint8)


COLUMNS = ("image", "saliency", "masked", "reconstruction")
SHORT = {"saliency": "sal.", "reconstruction": "recon."}   # where a column is too narrow for the word


def title_strip(width: int, columns: int, titles: tuple[str, ...] = COLUMNS) -> Image.Image:
    """A white strip `width` wide with `titles` centred over `columns` equal columns (shortened to fit)."""
    font = ImageFont.load_default()
    col = width / columns
    height = int(font.getbbox("Ag")[3]) + 6
    strip = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for k, title in enumerate(titles):
        if draw.textlength(title, font=font) > col - 2:
            title = SHORT.get(title, title)
        x = col * k + (col - draw.textlength(title, font=font)) / 2
        draw.text((max(x, col * k), 3), title, fill=(0, 0, 0), font=font)
    return strip


def save_mae_grid(path: str | Path, model, imgs: torch.Tensor, saliency: torch.Tensor, pred: torch.Tensor,
                  mask: torch.Tensor, scale: int = 2) -> Path:
    """Write the grid PNG atomically. imgs [N, 3, H, W] (normalised), saliency/mask [N, L], pred [N, L, p*p*3]."""
    n, _, h, _ = imgs.shape
    grid = model.grid
    orig = _to_uint8(imgs)
    recon = _to_uint8(reconstruct(model, imgs.cpu(), pred.cpu(), mask.cpu()))
    rows = []
    for i in range(n):
        masked_view = orig[i].copy()
        m = _grid_panel(mask[i], grid, h, (255, 255, 255)) > 127
        masked_view[m] = (masked_view[m] * 0.25).astype(np.uint8)  # dim hidden patches
        panels = [orig[i], _grid_panel(saliency[i], grid, h, (255, 200, 60)), masked_view, recon[i]]
        rows.append(np.concatenate([np.pad(p, ((1, 1), (1, 1), (0, 0))) for p in panels], axis=1))
    sheet = Image.fromarray(np.concatenate(rows, axis=0))
    sheet = sheet.resize((sheet.width * scale, sheet.height * scale), Image.NEAREST)
    strip = title_strip(sheet.width, len(COLUMNS))
    titled = Image.new("RGB", (sheet.width, strip.height + sheet.height))
    titled.paste(strip, (0, 0))
    titled.paste(sheet, (0, strip.height))
    sheet = titled
    path = Path(path)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path
