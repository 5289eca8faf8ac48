"""A cc3m-shaped dataset, fast: img2dataset's webdataset layout at millions of rows, for scale rehearsals.

Layout, as img2dataset writes it (`--output_format webdataset`): per shard `NNNNN.tar` holding
`KEY.jpg`, `KEY.txt`, `KEY.json` for each sample, `NNNNN.parquet` (one row per sample with
img2dataset's columns) and `NNNNN_stats.json`, written last as the shard's completion marker.
Keys are 9-digit strings `shard * 10_000 + i` zero-padded (5 digits of shard, 4 of index), as
img2dataset writes them for shards of 10,000; other shard sizes keep the 9 digits and the
`shard * 10_000 + i` numbering (so `shard_size` must not exceed 10,000).

The images are not drawn per row: a pool of `POOL_SIZE` distinct JPEGs (32 px by default; cc3m's
own sizes on request: img2dataset's 256-px output, or originals of about 500x375) is encoded once per
process and their bytes are reused across rows (row i gets pool image i mod POOL_SIZE); captions
have cc3m's length (5 to 20 words, about 10 on average) from a fixed vocabulary, drawn per shard
from a generator seeded by (seed, shard). Tar headers are written directly (ustar, fixed mtime,
no `tarfile` objects per member), and shards are written by a process pool. Same arguments ->
identical bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np

from salmae.pipeline.errors import SalmaeError

IMAGE_SIZE = 32          # generated side in pixels
POOL_SIZE = 256          # distinct JPEGs reused across rows
INDEX_SPAN = 10_000      # img2dataset's samples per shard: key = shard * INDEX_SPAN + i
KEY_DIGITS = 9           # 5 digits of shard number + 4 of index
SHARD_DIGITS = 5         # shard file names: 00000.tar
JPEG_QUALITY = 95        # img2dataset's default encode_quality
BYTES_PER_ROW = 4_200    # bytes per sample on disk (tar: 3 headers + padded members; parquet)
WORDS = ("a", "the", "of", "in", "on", "with", "and", "at", "for", "by", "view", "person", "man", "woman", "child",
         "dog", "cat", "horse", "bird", "car", "bus", "train", "boat", "street", "city", "beach", "mountain",
         "river", "lake", "forest", "field", "garden", "house", "room", "kitchen", "table", "chair", "window",
         "door", "sky", "sunset", "sunrise", "night", "day", "winter", "summer", "snow", "rain", "tree", "flower",
         "grass", "road", "bridge", "building", "tower", "church", "market", "crowd", "team", "player", "game",
         "ball", "stage", "actor", "artist", "portrait", "illustration", "vector", "background", "pattern",
         "texture", "abstract", "old", "new", "young", "beautiful", "small", "large", "red", "blue", "green",
         "white", "black", "yellow", "wooden", "modern", "traditional", "happy", "walking", "sitting", "standing",
         "playing", "looking", "holding", "wearing", "during", "near", "front", "top", "side", "celebrity",
         "attends", "premiere", "event", "festival", "wedding", "family", "friends", "food", "cake", "coffee")
PARQUET_COLUMNS = ("url", "caption", "key", "status", "error_message", "width", "height", "original_width",
                   "original_height", "exif", "sha256")


def write_cc3m_like(out: str | Path, rows: int, shard_size: int = INDEX_SPAN, seed: int = 0,
                    workers: int | None = None, image_size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> list[str]:
    """Write `rows` samples into `out` as img2dataset shards of `shard_size`; returns the tar paths.

    `image_size` is (width, height) of every JPEG.

    A shard whose `_stats.json` already exists is left as it is (img2dataset's resume rule).
    `workers` processes write shards in parallel (default: the CPU count).
    """
    if rows < 1 or not 1 <= shard_size <= INDEX_SPAN or min(image_size) < 4:
        raise SalmaeError(f"cc3m-like data needs rows >= 1, 1 <= shard_size <= {INDEX_SPAN} and sides of 4 px or more "
                          f"(got rows={rows}, shard_size={shard_size}, image_size={image_size})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = -(-rows // shard_size)
    jobs = [(str(out), s, min(shard_size, rows - s * shard_size), seed, tuple(image_size)) for s in range(n_shards)
            if not (out / f"{s:0{SHARD_DIGITS}d}_stats.json").is_file()]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    if workers == 1:
        for job in jobs:
            _write_shard(*job)
    else:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_shard, *zip(*jobs), chunksize=1))
    return [str(out / f"{s:0{SHARD_DIGITS}d}.tar") for s in range(n_shards)]


def shard_pattern(paths: list[str]) -> str:
    """Brace pattern over consecutive shard paths of one folder (`DIR/{00000..00329}.tar`)."""
    folder = os.path.dirname(paths[0])
    first, last = Path(paths[0]).stem, Path(paths[-1]).stem
    return os.path.join(folder, f"{{{first}..{last}}}.tar" if len(paths) > 1 else f"{first}.tar")


def row_key(shard: int, index: int) -> str:
    """img2dataset's key of sample `index` of `shard`: 9 digits, leading zeros kept."""
    return f"{shard * INDEX_SPAN + index:0{KEY_DIGITS}d}"


# --------------------------------------------------------------------------- one shard
def _write_shard(out: str, shard: int, count: int, seed: int, image_size: tuple[int, int]) -> None:
    pool = _image_pool(seed, image_size)
    rng = random.Random(seed * 1_000_003 + shard)
    name = os.path.join(out, f"{shard:0{SHARD_DIGITS}d}")
    columns: dict[str, list] = {c: [] for c in PARQUET_COLUMNS}
    tmp = f"{name}.tar.tmp-{os.getpid()}"
    with open(tmp, "wb", buffering=1 << 22) as f:
        for i in range(count):
            key = row_key(shard, i)
            jpg, sha = pool[(shard * INDEX_SPAN + i) % len(pool)]
            caption = " ".join(rng.choices(WORDS, k=rng.randint(5, 20)))
            meta = {"url": f"https://cc3m-like.invalid/{key}.jpg", "caption": caption, "key": key,
                    "status": "success", "error_message": None, "width": image_size[0], "height": image_size[1],
                    "original_width": 200 + rng.randrange(800), "original_height": 200 + rng.randrange(800),
                    "exif": None, "sha256": sha}
            for ext, data in (("jpg", jpg), ("txt", caption.encode()), ("json", json.dumps(meta).encode())):
                f.write(tar_member(f"{key}.{ext}", data))
            for c in PARQUET_COLUMNS:
                columns[c].append(meta[c])
        f.write(b"\0" * 1024)                       # end-of-archive: two zero blocks
    os.replace(tmp, f"{name}.tar")
    _write_parquet(f"{name}.parquet", columns)
    stats = {"count": count, "successes": count, "failed_to_download": 0, "failed_to_resize": 0,
             "duration": 0.0, "start_time": 0.0, "end_time": 0.0, "status_dict": {"success": count}}
    with open(f"{name}_stats.json.tmp", "w") as f:
        json.dump(stats, f, indent=4)
    os.replace(f"{name}_stats.json.tmp", f"{name}_stats.json")


def _write_parquet(path: str, columns: dict[str, list]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from salmae.pipeline.data.shapes import PARQUET_SCHEMA

    pq.write_table(pa.table(columns, schema=PARQUET_SCHEMA), f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


_USTAR_TAIL = b"ustar\x0000" + b"bigdata".ljust(32, b"\0") * 2 + b"\0" * (8 + 8 + 155 + 12)  # no device numbers


def tar_member(name: str, data: bytes) -> bytes:
    """One regular-file member (ustar header + data padded to 512 bytes), as webdataset's TarWriter
    writes it: mode 0444, uid/gid 0, user/group 'bigdata', mtime 0. `name` must fit in 100 bytes."""
    raw = name.encode()
    if len(raw) > 100:
        raise ValueError(f"tar member name {name!r} is longer than 100 bytes")
    head = (raw.ljust(100, b"\0") + b"0000444\0" + b"0000000\0" * 2 + f"{len(data):011o}\0".encode()
            + b"00000000000\0" + b" " * 8 + b"0" + b"\0" * 100 + _USTAR_TAIL)
    checksum = f"{sum(head):06o}\0 ".encode()       # computed with the checksum field as spaces
    head = head[:148] + checksum + head[156:]
    return head + data + b"\0" * (-len(data) % 512)


@lru_cache(maxsize=4)
def _image_pool(seed: int, size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> list[tuple[bytes, str]]:
    """`POOL_SIZE` distinct JPEGs of `size` (width, height): a smooth colour field plus noise, and their sha256."""
    from PIL import Image

    rng = np.random.default_rng([seed, 3])
    pool = []
    for _ in range(POOL_SIZE):
        coarse = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(coarse, "RGB").resize(size, Image.BILINEAR))
        pixels = np.clip(field + rng.normal(0, 12, size=field.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
        pool.append((buf.getvalue(), hashlib.sha256(buf.getvalue()).hexdigest()))
    return pool
