"""Paired crop + flip: the saliency map follows the image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from salmae.pipeline.data.transforms import crop_flip_image, crop_flip_saliency, resize_saliency, sample_crop_box

W, H = 96, 64          # image size
OBJ = (56, 12, 80, 36)  # object box x0, y0, x1, y1 (pixels)
OUT = 64               # MAE input size
GRID = (8, 8)          # MAE patch grid (patch 8)


def _scene():
    """An image with a white object box on black, and its saliency map: 1 on the object, 16x24 cells."""
    arr = np.zeros((H, W, 3), np.uint8)
    x0, y0, x1, y1 = OBJ
    arr[y0:y1, x0:x1] = 255
    sal = torch.zeros(16, 24)  # 4 px per map cell
    sal[y0 // 4:y1 // 4, x0 // 4:x1 // 4] = 1.0
    return Image.fromarray(arr), sal


@pytest.mark.parametrize("seed", range(8))
def test_top_salient_patches_cover_object_after_crop_and_flip(seed):
    img, sal = _scene()
    g = torch.Generator().manual_seed(seed)
    box = sample_crop_box(W, H, g, scale=(0.3, 1.0))
    flip = bool(seed % 2)
    x = crop_flip_image(img, box, flip, OUT)  # [3, 64, 64]
    # object coverage of each MAE patch in the augmented image (ground truth from the pixels)
    assert x.dtype == torch.uint8  # normalised later, on the training device
    white = (x[0] > 127).float()   # bicubic rings faintly around the box: threshold at mid-grey
    coverage = white.view(GRID[0], 8, GRID[1], 8).mean(dim=(1, 3))
    pooled = crop_flip_saliency(sal, (0, 0, W, H), box, flip, GRID)
    assert pooled.shape == GRID
    if coverage.max() < 0.5:
        pytest.skip("this crop misses the object")
    k = int((coverage > 0.5).sum())
    top_sal = set(pooled.flatten().topk(k).indices.tolist())
    top_cov = set(coverage.flatten().topk(k).indices.tolist())
    assert top_sal == top_cov
    assert (pooled[coverage > 0.99] > 0.9).all() and (pooled[coverage == 0] < 0.2).all()


def test_flip_mirrors_and_frame_offsets():
    _, sal = _scene()
    box = (8, 0, 88, 64)
    a = crop_flip_saliency(sal, (0, 0, W, H), box, False, GRID)
    b = crop_flip_saliency(sal, (0, 0, W, H), box, True, GRID)
    assert torch.equal(a.flip(-1), b)
    # a map covering only the right half: the same object gives the same pooled map
    right = sal[:, 12:]
    c = crop_flip_saliency(right, (48, 0, 96, 64), box, False, GRID)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=0)
    whole = resize_saliency(sal, (0, 0, W, H), (W, H), (16, 24))
    torch.testing.assert_close(whole, sal, atol=0.02, rtol=0)


def test_crop_box_is_deterministic_and_inside():
    boxes = [sample_crop_box(W, H, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert boxes[0] == boxes[1]
    for s in range(50):
        x0, y0, x1, y1 = sample_crop_box(W, H, torch.Generator().manual_seed(s))
        assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
        assert (x1 - x0) * (y1 - y0) >= 0.2 * W * H * 0.9


def test_area_pooling_is_exact_mean_over_each_patch():
    sal = torch.rand(14, 14, generator=torch.Generator().manual_seed(0))
    whole = (0, 0, 224, 224)
    assert torch.equal(crop_flip_saliency(sal, whole, whole, False, (14, 14)), sal)
    pooled = crop_flip_saliency(sal, whole, whole, False, (7, 7))
    assert torch.allclose(pooled, torch.nn.functional.avg_pool2d(sal[None, None], 2)[0, 0], atol=1e-6)
    # a crop of the top-left 3x3 cells onto a 1x1 grid is their mean; flipping a 1x1 grid changes nothing
    crop = crop_flip_saliency(sal, whole, (0, 0, 48, 48), True, (1, 1))
    assert torch.allclose(crop[0, 0], sal[:3, :3].mean(), atol=1e-6)


def test_batched_pooling_equals_one_sample_at_a_time():
    from salmae.pipeline.data.transforms import crop_flip_saliency_batch

    g = torch.Generator().manual_seed(3)
    sal = torch.rand(5, 7, 9, generator=g)
    frames = torch.tensor([[0, 0, 90, 70], [10, 5, 100, 75], [0, 0, 45, 35], [0, 0, 90, 70], [3, 0, 93, 70]],
                          dtype=torch.float32)
    boxes = [sample_crop_box(100, 80, g) for _ in range(5)]
    flips = torch.tensor([True, False, True, False, True])
    batched = crop_flip_saliency_batch(sal, frames, torch.tensor(boxes, dtype=torch.float64), flips, (4, 4))
    for i in range(5):
        one = crop_flip_saliency(sal[i], frames[i].tolist(), boxes[i], bool(flips[i]), (4, 4))
        assert torch.allclose(batched[i], one, atol=1e-6)
    assert not torch.allclose(batched[0], batched[0].flip(-1))  # the flip is really applied per sample
