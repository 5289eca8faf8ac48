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


def upsample_map(saliency: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """[gh, gw] -> [H, W] by nearest-patch replication (what the patch grid really resolves)."""
    gh, gw = saliency.shape
    h, w = size_hw
    ys = np.minimum((np.arange(h) * gh) // max(h, 1), gh - 1)
    xs = np.minimum((np.arange(w) * gw) // max(w, 1), gw - 1)
    return saliency[ys][:, xs]


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
        hidden = upsample_map(np.asarray(mask, dtype=np.float32), (int(y1 - y0), int(x1 - x0))) > 0.5
        region = shown[int(y0):int(y1), int(x0):int(x1)]
        region[hidden[:region.shape[0], :region.shape[1]]] = 128
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
