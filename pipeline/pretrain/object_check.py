"""The manipulation check: how much of each image's main object the masks hide.

On labelled data whose samples carry their main object's box (`KEY.json` `bbox` [x0, y0, x1, y1]
in pixels, as the generated `shapes` data writes it), every pretraining batch marks the object's
patches: the box goes through the same crop and flip as the image and its saliency map, and a
patch is an object patch when at least half of its area lies inside the box (`object_patches`).
Each step counts (`object_stats`) the object patches, the hidden ones among them, the images with
an object patch and those whose object patches are all hidden; each epoch record of
`metrics.jsonl` holds the shares (`summarise`):

- `object_hidden`: hidden object patches / object patches (random masking at ratio r: about r);
- `object_seen`: 1 - object_hidden, the share of object patches the encoder sees;
- `object_all_hidden`: images whose every object patch is hidden / images with an object patch;
- `object_patches`: object patches per image that has one.

So a reader sees whether a setting hides part of the object or all of it. The box is the
object's bounding box, not its outline: for a disc the box's corners count as object too.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

FIELDS = ("object_hidden", "object_seen", "object_all_hidden", "object_patches")


def object_patches(boxes: torch.Tensor, crop_boxes: torch.Tensor, flips: torch.Tensor,
                   grid: tuple[int, int]) -> torch.Tensor:
    """Main-object patches of augmented images: the box cropped and flipped as the image was.

    Args:
        boxes: [B, 4] float (x0, y0, x1, y1) object boxes in image pixels; a row of NaN: no box.
        crop_boxes: [B, 4] the crop boxes the images were cut with (image pixels).
        flips: [B] bool horizontal flips (applied after the crop).
        grid: (gh, gw) patch grid of the crop.
    Returns:
        [B, gh*gw] bool: at least half of the patch's area lies inside the box.
    """
    from salmae.pipeline.data.transforms import crop_flip_saliency_batch

    boxes = boxes.double()
    known = torch.isfinite(boxes).all(dim=1)                                    # [B]
    frames = torch.where(known[:, None], boxes, torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64))
    ones = torch.ones(boxes.shape[0], 1, 1)
    # a one-cell map covering the box: pooled, each patch gets the share of its area inside the box
    inside = crop_flip_saliency_batch(ones, frames, crop_boxes, flips, grid).flatten(1)   # [B, L]
    return (inside >= 0.5 - 1e-6) & known[:, None]


def object_stats(mask: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
    """Counts of one batch: mask [N, L] (1 = hidden), objects [N, L] bool -> [4] float64
    (object patches, hidden object patches, images with an object patch, images with all hidden)."""
    obj = objects.bool()
    per_image = obj.sum(dim=1)                                                  # [N]
    hidden = (obj & (mask > 0.5)).sum(dim=1)                                    # [N]
    has = per_image > 0
    return torch.stack([per_image.sum(), hidden.sum(), has.sum(), (has & (hidden == per_image)).sum()]).double()


def summarise(totals: Sequence[float] | torch.Tensor) -> dict[str, float] | None:
    """The epoch record's shares from summed `object_stats`; None when no image had an object patch."""
    patches, hidden, images, all_hidden = (float(v) for v in totals)
    if images <= 0:
        return None
    return {"object_hidden": hidden / patches, "object_seen": (patches - hidden) / patches,
            "object_all_hidden": all_hidden / images, "object_patches": patches / images}


def read_object_check(run_dir: str | Path) -> list[dict]:
    """A run's manipulation check per epoch, from its metrics.jsonl: [{epoch, object_hidden, ...}]
    ([] for a run without object boxes)."""
    from salmae.pipeline.logging import read_metrics

    path = Path(run_dir) / "metrics.jsonl"
    records = read_metrics(path) if path.is_file() else []
    return [{"epoch": r["epoch"], **{k: r[k] for k in FIELDS}} for r in records
            if r.get("kind") == "epoch" and all(k in r for k in FIELDS)]


# --------------------------------------------------------------------------- the boxes, from the data
def read_object_boxes(manifest, urls: Sequence[str]) -> np.ndarray | None:
    """[N, 4] float64 main-object boxes in manifest row order (NaN rows: no box), or None.

    None unless every shard is a local tar and the first sample's KEY.json has a `bbox` (real
    captioned data has none: one member is read to find out). Then every KEY.json is read once,
    by random access into the tars (headers and json members only).
    """
    from salmae.pipeline.data.shards import shard_name

    paths = [_local_path(u) for u in urls]
    if not paths or any(p is None for p in paths) or not _has_box(next(_json_members(paths[0]), ("", {}))[1]):
        return None
    found = {(shard_name(url), key): meta["bbox"] for url, path in zip(urls, paths)
             for key, meta in _json_members(path) if _has_box(meta)}
    boxes = np.full((len(manifest), 4), np.nan)
    for row, (shard, key) in enumerate(zip(manifest.column("shard").tolist(), manifest.keys.tolist())):
        box = found.get((shard, key))
        if box is not None:
            boxes[row] = box
    return boxes


def _local_path(url: str) -> Path | None:
    if url.startswith("pipe:") or ("://" in url and not url.startswith("file://")):
        return None
    return Path(url.removeprefix("file://"))


def _has_box(meta: dict) -> bool:
    box = meta.get("bbox") if isinstance(meta, dict) else None
    return isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)


def _json_members(path: Path):
    """(key, parsed KEY.json) of a tar's json members, in tar order; unreadable ones are skipped."""
    from salmae.pipeline.data.shards import _split_name   # webdataset's key convention

    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                key, ext = _split_name(info.name)
                if not (info.isfile() and ext == "json"):
                    continue
                try:
                    meta = json.loads(tar.extractfile(info).read())
                except ValueError:
                    continue
                yield key, meta
    except (OSError, tarfile.TarError):
        return
