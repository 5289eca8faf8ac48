"""Figures (matplotlib, Agg backend): saliency overlays; other stages add their plots here.

Functions take arrays and a path, draw one figure, write it atomically and close it.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from salmae.pipeline.files import atomic_path  # noqa: E402


def frame_cells_at_pixels(cells: np.ndarray, frame: tuple[float, float, float, float],
                          size_hw: tuple[int, int]) -> np.ndarray:
    """cells: [gh, gw] bool over `frame` (x0, y0, x1, y1, image pixels) -> [H, W] bool: each image
    pixel takes the cell under its centre; pixels outside the frame are False. A frame may reach
    past the image (a letterbox store's): the cells there are not drawn."""
    gh, gw = cells.shape
    h, w = size_hw
    x0, y0, x1, y1 = frame
    cols = np.floor((np.arange(w) + 0.5 - x0) / max(x1 - x0, 1e-9) * gw).astype(np.int64)   # [W]
    rows = np.floor((np.arange(h) + 0.5 - y0) / max(y1 - y0, 1e-9) * gh).astype(np.int64)   # [H]
    inside = ((rows >= 0) & (rows < gh))[:, None] & ((cols >= 0) & (cols < gw))[None, :]
    return cells[np.clip(rows, 0, gh - 1)][:, np.clip(cols, 0, gw - 1)] & inside


def save_saliency_overlay(path: str | Path, image: np.ndarray, saliency: np.ndarray,
                          frame: tuple[float, float, float, float] | None = None,
                          mask: np.ndarray | None = None, bbox: tuple[float, ...] | None = None,
                          title: str = "", mask_label: str = "mask") -> None:
    """Write `image | heatmap over image | mask` panels to `path` (PNG).

    image: [H, W, 3] uint8; saliency: [gh, gw] over `frame` (x0, y0, x1, y1; default whole image);
    mask: [gh, gw] with 1 = hidden (MAE convention), drawn as grey patches; bbox drawn as a box.
    """
    h, w = image.shape[:2]
    x0, y0, x1, y1 = frame if frame is not None else (0, 0, w, h)
    panels = 3 if mask is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(2.6 * panels, 2.9))
    extent = (x0, x1, y1, y0)
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=8)
    axes[1].imshow(image)
    axes[1].imshow(saliency, cmap="jet", alpha=0.5, extent=extent, interpolation="bilinear")
    axes[1].set_title("saliency", fontsize=8)
    if mask is not None:
        shown = image.copy()
        shown[frame_cells_at_pixels(np.asarray(mask, dtype=np.float32) > 0.5, (x0, y0, x1, y1), (h, w))] = 128
        axes[2].imshow(shown)
        axes[2].set_title(mask_label, fontsize=8)
    for ax in axes:
        if bbox is not None:
            bx0, by0, bx1, by1 = bbox
            ax.add_patch(plt.Rectangle((bx0, by0), bx1 - bx0, by1 - by0, fill=False, edgecolor="white", lw=1))
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
