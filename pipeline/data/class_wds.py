"""Generated classification shards in the layout of timm's `imagenet-1k-wds` (no captions).

`write_class_shards(out, n)` draws the shapes generator's main-object images (`shapes`, task
"main-object": one large labelled shape among small clutter) and writes them as webdataset
classification shards, split train/val as `salmae shapes` splits them:

    OUT/imagenet1k-train-0000.tar       KEY.jpg  KEY.cls ("3")  KEY.json
    OUT/imagenet1k-validation-00.tar    {"filename": KEY.JPEG, "label": 3, "class_name": "star"}

Keys are ImageNet-like file stems (`n00000003_000017`, `ILSVRC2012_val_00000004`), not
img2dataset's digit keys. There is no `.txt` caption: stages that need captions refuse these
samples (missing_caption), stages that do not (stage 2 with random/block/grid masks, stage 3)
read them. Same seed -> identical bytes.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

from salmae.pipeline.data.shapes import SHAPES, _make_main_object_sample, split_of
from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.files import atomic_path

PREFIX = "imagenet1k"
_TAR_MTIME = 0


def write_class_shards(out: str | Path, n: int = 256, image_size: int = 64, seed: int = 0, shard_size: int = 64,
                       val_every: int = 5) -> str:
    """Write `n` labelled images into train and validation shards under `out`; return a summary with
    the brace patterns to pass as `--data` and `--set val_data=`."""
    if n < 1 or shard_size < 1 or image_size < 16 or val_every < 2:
        raise SalmaeError(f"classification shards need --n >= 1, --shard-size >= 1, --image-size >= 16 and "
                          f"--val-every >= 2 (got n={n}, shard_size={shard_size}, image_size={image_size}, "
                          f"val_every={val_every})")
    out = Path(out)
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    for i in range(n):
        sample = _make_main_object_sample(seed, i, str(i), image_size)
        label = sample["meta"]["label"]
        split = "validation" if split_of(i, label, val_every) == "val" else "train"
        key = f"n{label:08d}_{i:06d}" if split == "train" else f"ILSVRC2012_val_{i:08d}"
        meta = {"filename": f"{key}.JPEG", "label": label, "class_name": SHAPES[label]}
        splits[split].append({"key": key, "jpg": sample["jpg"], "cls": str(label), "meta": meta})
    patterns = {}
    for split, digits in (("train", 4), ("validation", 2)):
        samples = splits[split]
        n_shards = max(1, math.ceil(len(samples) / shard_size))
        digits = max(digits, len(str(n_shards - 1)))
        for shard in range(n_shards):
            part = samples[shard * shard_size:(shard + 1) * shard_size]
            _write_tar(out / f"{PREFIX}-{split}-{shard:0{digits}d}.tar", part)
        patterns[split] = f"{out}/{PREFIX}-{split}-{{{0:0{digits}d}..{n_shards - 1:0{digits}d}}}.tar"
    return (f"classification shards: {len(splits['train'])} train / {len(splits['validation'])} val {image_size}px "
            f"images of {len(SHAPES)} classes (seed {seed}), KEY.jpg + KEY.cls + KEY.json as in timm's "
            f"imagenet-1k-wds: --data '{patterns['train']}' --set val_data='{patterns['validation']}'")


def _write_tar(path: Path, samples: list[dict]) -> None:
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            members = (("cls", s["cls"].encode()), ("jpg", s["jpg"]),
                       ("json", json.dumps(s["meta"], sort_keys=True).encode()))
            for ext, data in members:
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o444
                info.uid = info.gid = 0
                tar.addfile(info, io.BytesIO(data))
