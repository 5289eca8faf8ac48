"""The stage-2 PNG grid: one row per sample, four columns, titled as MAE's visualisation notebook."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from salmae.pipeline.models.mae import build_mae
from salmae.pipeline.figures.mae_grid import COLUMNS, SHORT, save_mae_grid, title_strip

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
            decoder_num_heads=2)


def test_grid_has_a_title_over_each_of_its_four_columns(tmp_path):
    model = build_mae("tiny", **TINY).eval()
    imgs = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, pred, mask = model(imgs, mask_ratio=0.75, noise=torch.rand(3, 16, generator=torch.Generator().manual_seed(1)))
    path = save_mae_grid(tmp_path / "g.png", model, imgs, torch.rand(3, 16), pred, mask, scale=2)
    sheet = np.asarray(Image.open(path).convert("RGB"))
    strip = title_strip(4 * 34 * 2, 4)
    assert sheet.shape == (strip.height + 3 * 34 * 2, 4 * 34 * 2, 3)
    head = sheet[:strip.height]
    assert np.array_equal(head, np.asarray(strip))
    col = head.shape[1] // 4
    inked = [(head[:, k * col:(k + 1) * col] < 128).any(axis=2).sum() for k in range(4)]
    assert all(n > 10 for n in inked), inked           # every column has a title drawn over it


def test_titles_are_shortened_only_where_a_column_is_too_narrow():
    wide = np.asarray(title_strip(4 * 200, 4))
    narrow = np.asarray(title_strip(4 * 36, 4))
    short = tuple(SHORT.get(t, t) for t in COLUMNS)
    assert np.array_equal(narrow, np.asarray(title_strip(4 * 36, 4, short)))
    assert not np.array_equal(wide, np.asarray(title_strip(4 * 200, 4, short)))
