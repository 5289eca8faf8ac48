"""Stage-2 data: images with their saliency maps, augmented together, for MAE pretraining.

Two modes:
- ``indexed`` (default, local tar shards): a map-style dataset over the manifest's ok rows; an
  image is read by random access (`image_offset`/`image_nbytes` through `shards.read_member`).
  `GlobalBatchSampler` draws one permutation per epoch (seeded by seed + epoch) and gives DDP
  rank r the slice [r*b, (r+1)*b) of every global batch of b * world samples, so K processes see
  exactly the batches one process would, and a resumed run the batches a straight run would.
- ``stream`` (pipe:/remote shards): webdataset with a shuffle buffer, split by node and worker.

Saliency is looked up **by key** (manifest key -> store row), loaded into memory once
(`SaliencyTable`). Each sample's augmentation is drawn from a generator seeded by
(seed, epoch, manifest row), so it does not depend on which worker or rank loads it.
An item is ``{"image": [3, S, S], "saliency": [L], "saliency_ok": bool, "row": int}``;
samples whose store status is not ok carry zeros and ``saliency_ok=False`` (the training loop
falls back to random masks for them and counts them), or are skipped (``skip_missing``).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler, default_collate

from pipeline.data.shards import decode_image, read_member, shard_name
from pipeline.data.transforms import crop_flip_image, crop_flip_saliency_batch, sample_crop_box
from pipeline.errors import SalmaeError
from pipeline.store import STATUS_OK, STATUS_PENDING, SaliencyStore


# --------------------------------------------------------------------------- saliency lookup
@dataclass
class SaliencyTable:
    """Saliency for every manifest row, in memory: maps [N, gh, gw], frames [N, 4], ok [N]."""

    maps: np.ndarray
    frames: np.ndarray
    ok: np.ndarray

    @property
    def n_failed(self) -> int:
        return int((~self.ok).sum())


def check_store_covers(manifest, store: SaliencyStore) -> np.ndarray:
    """Store row of each manifest row; SalmaeError if the store was built from another manifest
    or does not cover every ok manifest row (absent, or still pending)."""
    store_hash = store.attrs.get("manifest_hash")
    if store_hash != manifest.hash:
        raise SalmaeError(f"saliency store {store.path} was built from another manifest (hash "
                          f"{str(store_hash)[:12]}… vs data {manifest.hash[:12]}…); rerun `salmae saliency` on this data")
    index = {k: i for i, k in enumerate(store.keys.tolist())}
    store_rows = np.array([index.get(k, -1) for k in manifest.keys], dtype=np.int64)
    status = store.status
    wanted = np.array([s == "ok" for s in manifest.status])
    pending = np.where(store_rows >= 0, status[np.maximum(store_rows, 0)] == STATUS_PENDING, True)
    missing = np.nonzero(wanted & pending)[0]
    if len(missing):
        shards = sorted(Counter(manifest.column("shard")[i] for i in missing).items())
        listed = ", ".join(f"{name} ({count})" for name, count in shards[:8]) + (" …" if len(shards) > 8 else "")
        raise SalmaeError(f"saliency store {store.path} misses {len(missing)} of {int(wanted.sum())} rows "
                          f"(absent or pending) in shards {listed}; finish it with `salmae saliency --out {store.path}`")
    _check_frames_fit(manifest, store, store_rows)
    return store_rows


def _check_frames_fit(manifest, store: SaliencyStore, store_rows: np.ndarray) -> None:
    """SalmaeError unless every ok map's frame lies inside its image (as the manifest sizes it), with area."""
    ok_rows = np.nonzero((store_rows >= 0) & (store.status[np.maximum(store_rows, 0)] == STATUS_OK))[0]
    if not len(ok_rows):
        return
    frames = store.frames(store_rows[ok_rows])                                   # [n, 4] x0, y0, x1, y1
    sizes = np.stack([np.asarray(manifest.column("width"))[ok_rows],
                      np.asarray(manifest.column("height"))[ok_rows]], 1)        # [n, 2] W, H
    tol = 0.5
    bad = ((frames[:, 0] < -tol) | (frames[:, 1] < -tol) | (frames[:, 2] > sizes[:, 0] + tol)
           | (frames[:, 3] > sizes[:, 1] + tol) | (frames[:, 2] <= frames[:, 0]) | (frames[:, 3] <= frames[:, 1]))
    if bad.any():
        i = int(np.nonzero(bad)[0][0])
        key = manifest.keys[ok_rows[i]]
        raise SalmaeError(f"saliency store {store.path}: {int(bad.sum())} maps do not fit their image (e.g. key {key}: "
                          f"frame {frames[i].tolist()} on a {sizes[i][0]}x{sizes[i][1]} image); recompute it with "
                          f"`salmae saliency --overwrite --out {store.path}`")


def load_saliency_table(manifest, store: SaliencyStore) -> SaliencyTable:
    """Check coverage, then gather the store's maps/frames into manifest row order."""
    store_rows = check_store_covers(manifest, store)
    found = store_rows >= 0
    maps_all, frames_all = store.load_all(), store.frames(np.arange(len(store)))
    gh, gw = store.grid
    maps = np.zeros((len(manifest), gh, gw), np.float32)
    frames = np.zeros((len(manifest), 4), np.float32)
    maps[found], frames[found] = maps_all[store_rows[found]], frames_all[store_rows[found]]
    ok = found & (store.status[np.maximum(store_rows, 0)] == STATUS_OK)
    ok &= np.isfinite(maps).all(axis=(1, 2))  # frames were checked by check_store_covers
    return SaliencyTable(maps, frames, ok)


# --------------------------------------------------------------------------- one sample
def sample_seed(seed: int, epoch: int, row: int) -> int:
    """Seed of one sample's augmentation: depends only on (seed, epoch, manifest row)."""
    return (seed * 1_000_003 + epoch * 7_919 + row * 104_729 + 17) % (2**63 - 1)


def make_item(image, row: int, seed: int, epoch: int, img_size: int, grid: tuple[int, int],
              saliency: SaliencyTable | None, augment: bool = True) -> dict:
    """Augment one PIL image (and its map) with the crop/flip drawn for (seed, epoch, row)."""
    g = torch.Generator().manual_seed(sample_seed(seed, epoch, row))
    w, h = image.size
    if augment:
        box = sample_crop_box(w, h, g)
        flip = bool(torch.rand(1, generator=g) < 0.5)
    else:
        box, flip = (0, 0, w, h), False
    item = {"image": crop_flip_image(image, box, flip, img_size), "row": row, "saliency_ok": False}
    if saliency is None:
        item["saliency"] = torch.zeros(grid[0] * grid[1])
        return item
    # the map is cropped, flipped and pooled per batch in `collate` (cheaper than per sample)
    ok = bool(saliency.ok[row])
    item["saliency_ok"] = ok
    item["saliency_raw"] = torch.from_numpy(saliency.maps[row] if ok else np.zeros_like(saliency.maps[row]))
    item["frame"] = torch.from_numpy(saliency.frames[row])
    item["box"] = torch.tensor(box, dtype=torch.float64)
    item["flip"] = flip
    return item


def collate(items: list[dict], grid: tuple[int, int]) -> dict:
    """Batch `make_item` outputs; crop/flip/pool the raw saliency maps of the whole batch at once.

    Returns `image` [B, 3, H, W], `row` [B], `saliency` [B, Gh*Gw] (zeros where not ok), `saliency_ok` [B].
    """
    batch = default_collate(items)
    if "saliency_raw" in batch:
        pooled = crop_flip_saliency_batch(batch.pop("saliency_raw"), batch.pop("frame"), batch.pop("box"),
                                          batch.pop("flip"), grid)                # [B, Gh, Gw]
        batch["saliency"] = pooled.flatten(1)
    return batch


# --------------------------------------------------------------------------- indexed mode
class IndexedPretrainDataset(Dataset):
    """Map-style dataset over the manifest rows with status ok (random access into local tars)."""

    def __init__(self, manifest, shard_urls: list[str], img_size: int, grid: tuple[int, int],
                 saliency: SaliencyTable | None = None, skip_missing: bool = False, seed: int = 0,
                 augment: bool = True):
        by_name = {shard_name(u): u for u in shard_urls}
        status, shards = manifest.status, manifest.column("shard")
        absent = sorted({s for s in shards if s not in by_name})
        if absent:
            raise SalmaeError(f"manifest lists shards not in --data: {', '.join(absent[:5])}; "
                              "pass the shards the manifest was built from")
        self.rows = [i for i, s in enumerate(status) if s == "ok"
                     and not (skip_missing and saliency is not None and not saliency.ok[i])]
        self.n_skipped = sum(1 for s in status if s == "ok") - len(self.rows)
        self.paths = [by_name[s] for s in shards]
        self.offsets = manifest.column("image_offset")
        self.nbytes = manifest.column("image_nbytes")
        self.keys = manifest.keys
        self.img_size, self.grid, self.saliency = img_size, grid, saliency
        self.seed, self.epoch, self.augment = seed, 0, augment

    def collate(self, items: list[dict]) -> dict:
        """DataLoader collate_fn for this dataset's items (see module-level `collate`)."""
        return collate(items, self.grid)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        data = read_member(self.paths[row], self.offsets[row], self.nbytes[row])
        image = decode_image(data, key=self.keys[row])
        return make_item(image, row, self.seed, self.epoch, self.img_size, self.grid, self.saliency, self.augment)


class GlobalBatchSampler(Sampler[int]):
    """Epoch-seeded permutation; rank r takes slice [r*b, (r+1)*b) of every global batch of b*world.

    The tail that does not fill a global batch is dropped (as DistributedSampler + drop_last).
    """

    def __init__(self, n: int, batch_size: int, world: int = 1, rank: int = 0, seed: int = 0):
        self.n, self.b, self.world, self.rank, self.seed, self.epoch = n, batch_size, world, rank, seed, 0
        self.steps = n // (batch_size * world)
        if self.steps == 0:
            raise SalmaeError(f"{n} training samples cannot fill one global batch of {batch_size} x {world} "
                              "processes; lower --batch-size")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps * self.b

    def __iter__(self) -> Iterator[int]:
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 9_973 + self.epoch))
        g = self.b * self.world
        for step in range(self.steps):
            lo = step * g + self.rank * self.b
            yield from perm[lo:lo + self.b].tolist()


# --------------------------------------------------------------------------- stream mode
class StreamPretrainDataset(IterableDataset):
    """webdataset pipeline for pipe:/remote shards: shard shuffle, split by node and worker,
    a shuffle buffer; saliency looked up by key through the manifest.

    Not DDP-exact (streams never are): each rank reads its own subset of the shards, repeated as
    needed, so that every rank yields the same number of samples per epoch (``len(self)``,
    = usable rows // (batch * world) batches) and no rank waits for another at the end.
    """

    def __init__(self, manifest, shard_urls: list[str], img_size: int, grid: tuple[int, int],
                 saliency: SaliencyTable | None = None, skip_missing: bool = False, seed: int = 0,
                 shuffle_buffer: int = 1000, batch_size: int = 1, world: int = 1):
        self.manifest, self.urls, self.img_size, self.grid = manifest, shard_urls, img_size, grid
        self.saliency, self.skip_missing, self.seed, self.epoch = saliency, skip_missing, seed, 0
        self.shuffle_buffer = shuffle_buffer
        self.rows = {k: i for i, (k, s) in enumerate(zip(manifest.keys, manifest.status)) if s == "ok"
                     and not (skip_missing and saliency is not None and not saliency.ok[i])}
        self.n_skipped = sum(1 for s in manifest.status if s == "ok") - len(self.rows)
        self.length = len(self.rows) // (batch_size * world) * batch_size  # samples per rank and epoch
        if self.length == 0:
            raise SalmaeError(f"{len(self.rows)} training samples cannot fill one global batch of "
                              f"{batch_size} x {world} processes; lower --batch-size")

    def __len__(self) -> int:
        return self.length

    def collate(self, items: list[dict]) -> dict:
        """DataLoader collate_fn for this dataset's items (see module-level `collate`)."""
        return collate(items, self.grid)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        workers = info.num_workers if info is not None else 1
        quota = -(-self.length // workers)  # this worker's share (the loop stops at len(self))
        produced, rounds = 0, 0
        while produced < quota:
            before = produced
            for item in self._one_pass(rounds):
                yield item
                produced += 1
                if produced >= quota:
                    return
            rounds += 1
            if produced == before:  # this worker got no usable sample at all
                return

    def _one_pass(self, round_: int) -> Iterator[dict]:
        import webdataset as wds

        from pipeline import dist

        nodesplitter = wds.split_by_node if dist.world_size() > 1 else wds.single_node_only
        seed = self.seed * 1009 + self.epoch * 31 + round_
        pipeline = wds.WebDataset(self.urls, shardshuffle=len(self.urls), nodesplitter=nodesplitter,
                                  workersplitter=wds.split_by_worker, seed=seed,
                                  handler=wds.warn_and_continue, empty_check=False)
        if self.shuffle_buffer > 1:
            pipeline = pipeline.shuffle(self.shuffle_buffer, rng=random.Random(seed))
        for sample in pipeline:
            row = self.rows.get(sample["__key__"])
            data = next((sample[e] for e in ("jpg", "jpeg", "png", "webp") if e in sample), None)
            if row is None or data is None:
                continue
            try:
                image = decode_image(data, key=sample["__key__"])
            except SalmaeError:
                continue
            yield make_item(image, row, self.seed, self.epoch, self.img_size, self.grid, self.saliency)
