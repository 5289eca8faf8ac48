"""Labelled webdataset shards for evaluation: ImageNet as kept on clusters, never all in memory.

A sample is `KEY.jpg` (or png/webp) with its class index in `KEY.cls` (timm's `imagenet-1k-wds`
and webdataset's convention) or in a field of `KEY.json` (the generated shapes' `label`).
`LabelledShards(spec, transform, split=None, label_from="auto")` reads the shards once, streamed
(a process pool, one shard per task; under torchrun each rank scans its share and the results are
all-gathered), and keeps per sample only its shard, the image's byte offset and length, its label
and key, in numpy arrays (ImageNet's 1.28M train images: about 60 MB). An item is read when asked for
by byte range (`shards.read_member`: a seek in a local tar, one range request to an object store)
and decoded, so the data are never held in memory and loader workers share the index.

`label_from`: "auto" (KEY.cls, else KEY.json `label`), "cls", or "json:FIELD". `split` keeps the
samples whose KEY.json `split` equals it (one set of shards holding both splits, as `salmae
shapes` writes); with separate train and val patterns it stays None. Damaged or unlabelled
samples are skipped and listed in `skipped` as (key, reason); caption members are not needed.
`classes[label]` is the KEY.json `class_name` (or `shape`) seen with that label, else the label.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from salmae.pipeline.data.shards import (CAPTION_REASONS, DamagedSampleError, decode_image, expand_shards,
                                         iter_shard, read_member)
from salmae.pipeline.errors import SalmaeError

_NAME_FIELDS = ("class_name", "shape")  # KEY.json fields that name a class, in order of preference


def parse_label_from(label_from: str) -> tuple[str, str]:
    """("auto" | "cls" | "json", json field) from a `label_from` setting; SalmaeError if malformed."""
    if label_from in ("auto", "cls"):
        return label_from, "label"
    if label_from.startswith("json:") and label_from[5:]:
        return "json", label_from[5:]
    raise SalmaeError(f"label_from={label_from!r} is not one of auto, cls, json:FIELD (e.g. json:label)")


def sample_label(cls: str | None, meta: dict, label_from: str) -> int | None:
    """A sample's class index from its .cls text or KEY.json, as `label_from` says (None: no label >= 0)."""
    how, field = parse_label_from(label_from)
    if how in ("auto", "cls") and cls is not None:
        try:
            value = int(cls)
        except ValueError:
            return None
    elif how == "cls":
        return None
    else:
        value = meta.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:  # -1: "no label" in some sets
        return None
    return value


@dataclass
class ShardIndex:
    """Where each labelled image of a set of shards lies: numpy arrays, one entry per sample."""

    urls: list[str]          # shard URLs, in order
    shard: np.ndarray        # [N] int32: index into `urls`
    offset: np.ndarray       # [N] int64: byte offset of the image member's data in its tar
    nbytes: np.ndarray       # [N] int64: its length
    label: np.ndarray        # [N] int64
    keys: np.ndarray         # [N] bytes ('S'): the sample keys
    names: dict[int, str]    # label -> class name, where KEY.json gave one
    skipped: list[tuple[str, str]]  # (key, reason) of damaged or unlabelled samples


def _scan_one(args: tuple[int, str, str | None, str]) -> dict[str, Any]:
    """One shard's labelled samples (only those of `split`, if given) as arrays; what a worker sends back."""
    index, url, split, label_from = args
    rows: list[tuple[bytes, int, int, int]] = []
    names: dict[int, str] = {}
    skipped: list[tuple[str, str]] = []
    for s in iter_shard(url, decode=False):
        label = sample_label(s.cls, s.meta, label_from)
        damage = s.error if s.error not in CAPTION_REASONS else None
        if damage or label is None or s.image_offset < 0:
            skipped.append((s.key or url, damage or "no_label"))
            continue
        if split is not None and s.meta.get("split") != split:
            continue
        rows.append((s.key.encode(), s.image_offset, s.image_nbytes, label))
        name = next((str(s.meta[f]) for f in _NAME_FIELDS if f in s.meta), None)
        if name is not None:
            names.setdefault(label, name)
    return _scan_result(index, rows, names, skipped)


def _scan_result(index: int, rows: list[tuple[bytes, int, int, int]], names: dict[int, str],
                 skipped: list[tuple[str, str]]) -> dict[str, Any]:
    keys, offsets, nbytes, labels = zip(*rows) if rows else ((), (), (), ())
    return {"index": index, "keys": np.asarray(keys, dtype="S") if rows else np.zeros(0, "S1"),
            "offset": np.asarray(offsets, np.int64), "nbytes": np.asarray(nbytes, np.int64),
            "label": np.asarray(labels, np.int64), "names": names, "skipped": skipped}


def index_shards(spec: str | Sequence[str], split: str | None = None, label_from: str = "auto",
                 workers: int | None = None) -> ShardIndex:
    """Scan every shard of `spec` once (streamed, images probed but not kept) into a `ShardIndex`."""
    parse_label_from(label_from)  # a bad setting fails before any shard is read
    urls = expand_shards(spec)
    if any(u.startswith("pipe:") for u in urls):
        raise SalmaeError(f"labelled shards {spec!r} are read by byte range, which a pipe: command cannot serve; "
                          "give them as paths or s3:// / gs:// / hf:// / https:// URLs")
    rank, world = _rank_world()
    mine = [(i, u, split, label_from) for i, u in enumerate(urls) if i % world == rank]
    parts = sorted(_gather(_scan_many(mine, workers)), key=lambda p: p["index"]) or [_scan_result(-1, [], {}, [])]
    names: dict[int, str] = {}
    for p in parts:
        for label, name in p["names"].items():
            names.setdefault(label, name)
    joined = {name: np.concatenate([p[name] for p in parts]) for name in ("offset", "nbytes", "label", "keys")}
    shard = np.concatenate([np.full(len(p["label"]), p["index"], np.int32) for p in parts])
    return ShardIndex(urls=urls, shard=shard, names=names, skipped=[item for p in parts for item in p["skipped"]],
                      **joined)


def _rank_world() -> tuple[int, int]:
    import torch.distributed as torch_dist

    from salmae.pipeline import dist

    return (dist.rank(), dist.world_size()) if torch_dist.is_initialized() else (0, 1)


def _scan_many(tasks: list[tuple], workers: int | None) -> list[dict]:
    """Scan `tasks` in this process, or in a fork pool of `workers` (default: one per CPU, at most one per shard)."""
    if workers is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:
            cpus = os.cpu_count() or 1
        workers = cpus
    workers = max(1, min(workers, len(tasks)))
    if workers == 1:
        return [_scan_one(t) for t in tasks]
    import multiprocessing as mp

    with mp.get_context("fork").Pool(workers) as pool:  # fork: no re-import; each task opens its own shard
        return list(pool.imap(_scan_one, tasks))


def _gather(parts: list[dict]) -> list[dict]:
    """Every rank's shard parts (this rank's alone in a single process)."""
    import torch.distributed as torch_dist

    from salmae.pipeline import dist

    if not torch_dist.is_initialized() or dist.world_size() == 1:
        return parts
    everyone: list[list[dict]] = [[] for _ in range(dist.world_size())]
    torch_dist.all_gather_object(everyone, parts)
    return [p for rank_parts in everyone for p in rank_parts]


class LabelledShards:
    """Map-style dataset over labelled shards (see the module docstring): `(transform(rgb_pil), label)`.

    `targets` [N] int64 labels, `key_of(i)` the sample key, `skipped` (key, reason), `classes`.
    An image found unreadable when read raises DamagedSampleError (the eval layer turns it into
    an `ok=False` item); it is never replaced by another.
    """

    def __init__(self, spec: str | Sequence[str], transform: Callable | None = None, split: str | None = None,
                 label_from: str = "auto", workers: int | None = None, num_classes: int | None = None):
        self.spec, self.transform, self.split = spec, transform, split
        self.index = index_shards(spec, split=split, label_from=label_from, workers=workers)
        self.skipped = list(self.index.skipped)
        self.targets = self.index.label
        if not len(self.targets):
            where = f" with split={split}" if split else ""
            raise SalmaeError(f"no labelled samples in {spec!r}{where}; each sample needs KEY.cls or an integer "
                              f"'label' in KEY.json ({len(self.skipped)} skipped; label_from={label_from})")
        n = num_classes if num_classes is not None else int(self.targets.max()) + 1
        self.classes = [self.index.names.get(i, str(i)) for i in range(n)]
        self._check_first()

    def __len__(self) -> int:
        return len(self.targets)

    def key_of(self, index: int) -> str:
        return self.index.keys[index].decode()

    def read(self, index: int) -> bytes:
        """The encoded image of item `index`, by byte range."""
        ix = self.index
        return read_member(ix.urls[ix.shard[index]], int(ix.offset[index]), int(ix.nbytes[index]))

    def __getitem__(self, index: int) -> tuple[Any, int]:
        key = self.key_of(index)
        try:
            image = decode_image(self.read(index), key)
        except DamagedSampleError as e:
            self.skipped.append((key, e.reason))
            raise
        return (self.transform(image) if self.transform else image), int(self.targets[index])

    def _check_first(self) -> None:
        """Read the first image now, so a store that cannot serve byte ranges fails here in one line,
        not in a loader worker."""
        self.read(0)
