"""Stage-2 data: images with their saliency maps, augmented together, for MAE pretraining.

Two modes:
- ``indexed`` (default; local tars, or object-store URLs read by byte range through fsspec): a
  map-style dataset over the manifest's usable rows; an image is read by random access
  (`image_offset`/`image_nbytes` through `shards.read_member`).
  `GlobalBatchSampler` draws one permutation per epoch (seeded by seed + epoch) and gives DDP
  rank r the slice [r*b, (r+1)*b) of every global batch of b * world samples, so K processes see
  exactly the batches one process would, and a resumed run the batches a straight run would.
- ``stream`` (pipe:/remote shards): webdataset with a shuffle buffer, split by node and worker;
  object-store URLs are opened through fsspec (`pipeline.data.remote`), `pipe:` by webdataset.

Saliency is looked up **by key** (manifest key -> store row), loaded into memory once
(`SaliencyTable`). Each sample's augmentation is drawn from a generator seeded by
(seed, epoch, manifest row), so it does not depend on which worker or rank loads it.
A small indexed set can be decoded once into memory (`cache_images`: one flat uint8 array that
forked workers share); its items equal the uncached ones bit for bit.
An item is ``{"image": [3, S, S], "saliency": [L], "saliency_ok": bool, "row": int}``;
samples whose store status is not ok carry zeros and ``saliency_ok=False`` (the training loop
falls back to random masks for them and counts them), or are skipped (``skip_missing``).
With main-object boxes (labelled data, `object_check.read_object_boxes`) a batch also carries
``object`` [B, L] bool, the object's patches after the same crop and flip (the manipulation check).

`shuffle_maps` gives each row another row's map (`masking.map=shuffled`, a control): the other
image's map, laid over this image's frame and cut by this image's own crop and flip.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler, default_collate

from salmae.pipeline.data.shards import CAPTION_REASONS, decode_image, open_shard, read_member, shard_name
from salmae.pipeline.data.transforms import crop_flip_image, crop_flip_saliency_batch, sample_crop_box
from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.saliency.preprocess import letterbox_frames
from salmae.pipeline.saliency.store import (CODE_OF, REPAIR_HINT, STATUS_OK, STATUS_PENDING, SaliencyStore,
                                            ShardDamage, StoreDamaged)


# --------------------------------------------------------------------------- saliency lookup
@dataclass
class SaliencyTable:
    """Saliency for every manifest row, in memory: maps [N, gh, gw], frames [N, 4], ok [N], zero [N].

    `ok` marks usable maps; `zero` marks maps that are all zero (status `zero_map`, or an ok map of
    an older store that is zero everywhere): they are not ok either, since no patch is salient, and
    are counted on their own.
    """

    maps: np.ndarray
    frames: np.ndarray
    ok: np.ndarray
    zero: np.ndarray

    @property
    def n_failed(self) -> int:
        return int((~self.ok).sum())

    @property
    def n_zero(self) -> int:
        return int(self.zero.sum())


def shuffled_rows(ok: np.ndarray, seed: int) -> np.ndarray:
    """[N] int64: the row whose map each row gets under `masking.map=shuffled`.

    The rows with a usable map (`ok` [N] bool) are put in one seeded random cycle and each takes the
    next one's map: a derangement (no row keeps its own map, each map is used once) that is fixed
    for the whole run and a function of `seed` alone. Other rows keep their own (they have none).
    """
    source = np.arange(len(ok), dtype=np.int64)
    rows = np.nonzero(ok)[0]
    if len(rows) < 2:
        return source
    cycle = rows[np.random.default_rng([seed, 0x5EED]).permutation(len(rows))]
    source[cycle] = np.roll(cycle, -1)
    return source


def shuffle_maps(table: SaliencyTable, seed: int) -> SaliencyTable:
    """The table with each usable row holding another usable row's map (`shuffled_rows`); frames,
    ok and zero flags stay the row's own, so the map is cut by this image's crop and flip."""
    source = shuffled_rows(table.ok, seed)
    return SaliencyTable(table.maps[source], table.frames, table.ok, table.zero)


def check_store_covers(manifest, store: SaliencyStore) -> np.ndarray:
    """Store row of each manifest row; SalmaeError if the store was built from another manifest,
    does not cover every ok manifest row (pending), or is damaged (`StoreDamaged`: a shard file
    missing or unreadable, keys that do not read back)."""
    store_hash = store.attrs.get("manifest_hash")
    if store_hash != manifest.hash:
        raise SalmaeError(f"saliency store {store.path} was built from another manifest (hash "
                          f"{str(store_hash)[:12]}… vs data {manifest.hash[:12]}…); rerun `salmae saliency` on this data")
    status = store.status
    damaged = store.damaged_shards(status=status)              # O(shards) file checks: lost files are no maps
    if damaged:
        raise StoreDamaged(store.path, damaged)
    store_rows = _store_rows(manifest.keys.to_bytes(), np.char.encode(store.keys.astype(str), "utf-8"))
    wanted = manifest.status.equals("ok")
    absent = np.nonzero(wanted & (store_rows < 0))[0]
    if len(absent):           # the store was made from this very manifest: a key it lacks was lost from it
        shards = np.unique(absent // store.rows_per_shard)
        raise SalmaeError(f"saliency store {store.path}: {len(absent)} keys of its manifest do not read back from it "
                          f"(e.g. {manifest.keys[int(absent[0])]!r}; key column damaged in shards "
                          f"{', '.join(map(str, shards[:8]))}{' …' if len(shards) > 8 else ''}); {REPAIR_HINT} "
                          f"(it rewrites keys from the store's manifest), or recompute the store with --overwrite")
    pending = wanted & (status[np.maximum(store_rows, 0)] == STATUS_PENDING)
    marked = np.array([store.is_done(s) for s in range(store.n_shards)], dtype=bool)          # [shards]
    lost = np.nonzero(pending & marked[np.maximum(store_rows, 0) // store.rows_per_shard])[0]
    if len(lost):             # a finished shard whose statuses read as pending: damaged, a rerun skips it
        rows = store_rows[lost]
        raise StoreDamaged(store.path, [ShardDamage(int(s), "status", rows[rows // store.rows_per_shard == s],
                                                    "reads as pending although the shard is marked done")
                                        for s in np.unique(rows // store.rows_per_shard)])
    missing = np.nonzero(pending)[0]
    if len(missing):
        shards = sorted(Counter(manifest.column("shard").take(missing)).items())
        listed = ", ".join(f"{name} ({count})" for name, count in shards[:8]) + (" …" if len(shards) > 8 else "")
        raise SalmaeError(f"saliency store {store.path} misses {len(missing)} of {int(wanted.sum())} rows "
                          f"(pending) in shards {listed}; finish it with the `salmae saliency` command that made it "
                          f"(--out {store.path})")
    _check_frames_fit(manifest, store, store_rows)
    return store_rows


def _store_rows(keys: np.ndarray, store_keys: np.ndarray) -> np.ndarray:
    """[N] store row of each key (-1 where absent), by sorting: no dict of millions of keys."""
    order = np.argsort(store_keys)
    sorted_keys = store_keys[order]
    pos = np.minimum(np.searchsorted(sorted_keys, keys), max(len(sorted_keys) - 1, 0))
    found = (sorted_keys[pos] == keys) if len(sorted_keys) else np.zeros(len(keys), bool)
    return np.where(found, order[pos] if len(order) else -1, -1).astype(np.int64)


def _check_frames_fit(manifest, store: SaliencyStore, store_rows: np.ndarray) -> None:
    """SalmaeError unless every ok map's frame lies inside its image (as the manifest sizes it), with area;
    in a letterbox store, unless it is the letterboxed input of its image (past the image by the padding)."""
    ok_rows = np.nonzero((store_rows >= 0) & (store.status[np.maximum(store_rows, 0)] == STATUS_OK))[0]
    if not len(ok_rows):
        return
    frames = store.frames(store_rows[ok_rows])                                   # [n, 4] x0, y0, x1, y1
    sizes = np.stack([np.asarray(manifest.column("width"))[ok_rows],
                      np.asarray(manifest.column("height"))[ok_rows]], 1)        # [n, 2] W, H
    tol = 0.5
    if store.attrs.get("resize") == "letterbox":
        want = letterbox_frames(sizes, tuple(store.attrs["input_size"]))
        bad = (np.abs(frames - want) > tol + 1e-5 * np.abs(want)).any(axis=1)
    else:
        bad = ((frames[:, 0] < -tol) | (frames[:, 1] < -tol) | (frames[:, 2] > sizes[:, 0] + tol)
               | (frames[:, 3] > sizes[:, 1] + tol) | (frames[:, 2] <= frames[:, 0]) | (frames[:, 3] <= frames[:, 1]))
    if bad.any():
        i = int(np.nonzero(bad)[0][0])
        key = manifest.keys[ok_rows[i]]
        raise SalmaeError(f"saliency store {store.path}: {int(bad.sum())} maps do not fit their image (e.g. key {key}: "
                          f"frame {frames[i].tolist()} on a {sizes[i][0]}x{sizes[i][1]} image); recompute it with "
                          f"`salmae saliency --overwrite --out {store.path}`")


def load_saliency_table(manifest, store: SaliencyStore, chunk_rows: int = 65_536) -> SaliencyTable:
    """Check coverage and damage, then gather the store's maps/frames into manifest row order.

    Maps are held as float16 scaled to their own maximum (1.0): stage 2 only ever uses a map's
    order and proportions (top-k, sampling, SBAM's max-normalised threshold, area pooling), so the
    scale is dropped, and float16 keeps full precision on [0, 1]. That is how a format-2 store holds
    them (`SaliencyStore.read_unit`), read in chunks of `chunk_rows`.
    """
    store_rows = check_store_covers(manifest, store)
    found = store_rows >= 0
    gh, gw = store.grid
    maps = np.zeros((len(manifest), gh, gw), np.float16)
    status = store.status[np.maximum(store_rows, 0)]
    take = np.nonzero(found)[0]
    for lo in range(0, len(take), chunk_rows):
        rows = take[lo:lo + chunk_rows]
        # [n, gh, gw] float16; a map no writer wrote (out of range, an ok map read as zero) is StoreDamaged
        maps[rows] = store.read_unit_checked(store_rows[rows], status[rows])
    frames = np.zeros((len(manifest), 4), np.float32)
    frames[found] = store.frames(store_rows[found])
    ok = found & (status == STATUS_OK)  # frames: check_store_covers
    zero = found & ((status == CODE_OF["zero_map"]) | (ok & ~(maps.reshape(len(maps), -1) > 0).any(axis=1)))
    return SaliencyTable(maps, frames, ok & ~zero, zero)


# --------------------------------------------------------------------------- one sample
def sample_seed(seed: int, epoch: int, row: int) -> int:
    """Seed of one sample's augmentation: depends only on (seed, epoch, manifest row)."""
    return (seed * 1_000_003 + epoch * 7_919 + row * 104_729 + 17) % (2**63 - 1)


def make_item(image, row: int, seed: int, epoch: int, img_size: int, grid: tuple[int, int],
              saliency: SaliencyTable | None, augment: bool = True, boxes: np.ndarray | None = None) -> dict:
    """Augment one image (PIL, or uint8 [3, H, W] as `TF.to_image` makes it) and its map with the
    crop/flip drawn for (seed, epoch, row); `boxes` [N, 4]: main-object boxes by row (NaN: none).

    The image stays uint8 (`image` [3, S, S]); the training process normalises it on its device.
    """
    g = torch.Generator().manual_seed(sample_seed(seed, epoch, row))
    h, w = image.shape[-2:] if isinstance(image, torch.Tensor) else image.size[::-1]
    if augment:
        box = sample_crop_box(w, h, g)
        flip = bool(torch.rand(1, generator=g) < 0.5)
    else:
        box, flip = (0, 0, w, h), False
    item = {"image": crop_flip_image(image, box, flip, img_size), "row": row, "saliency_ok": False,
            "saliency_zero": False, "epoch": epoch}
    if boxes is not None:  # cropped and flipped with the batch in `collate`, as the maps
        item["object_box"] = torch.from_numpy(boxes[row])
        item["box"] = torch.tensor(box, dtype=torch.float64)
        item["flip"] = flip
    if saliency is None:
        item["saliency"] = torch.zeros(grid[0] * grid[1])
        return item
    # the map is cropped, flipped and pooled per batch in `collate` (cheaper than per sample)
    ok = bool(saliency.ok[row])
    item["saliency_ok"] = ok
    item["saliency_zero"] = bool(saliency.zero[row])
    item["saliency_raw"] = torch.from_numpy(saliency.maps[row] if ok else np.zeros_like(saliency.maps[row]))
    item["frame"] = torch.from_numpy(saliency.frames[row])
    item["box"] = torch.tensor(box, dtype=torch.float64)
    item["flip"] = flip
    return item


def collate(items: list[dict], grid: tuple[int, int]) -> dict:
    """Batch `make_item` outputs; crop/flip/pool the raw saliency maps of the whole batch at once.

    Returns `image` [B, 3, H, W] uint8, `row` [B], `saliency` [B, Gh*Gw] (zeros where not ok), `saliency_ok` [B],
    and with object boxes `object` [B, Gh*Gw] bool (the main object's patches).
    """
    from salmae.pipeline.pretrain.object_check import object_patches

    batch = default_collate(items)
    box, flip = batch.pop("box", None), batch.pop("flip", None)
    if "saliency_raw" in batch:
        pooled = crop_flip_saliency_batch(batch.pop("saliency_raw"), batch.pop("frame"), box, flip, grid)  # [B, Gh, Gw]
        batch["saliency"] = pooled.flatten(1)
    if "object_box" in batch:
        batch["object"] = object_patches(batch.pop("object_box"), box, flip, grid)
    return batch


# --------------------------------------------------------------------------- indexed mode
def readable_rows(manifest, need_caption: bool = True) -> np.ndarray:
    """[N] bool: rows whose image can be used; with `need_caption=False` (masks that read no stage-1
    saliency) rows with only a missing or empty caption count as well (classification shards,
    image-only webdatasets)."""
    status = manifest.status
    ok = status.equals("ok")
    if not need_caption:
        for reason in CAPTION_REASONS:  # a sample's first damage: an image problem would be named first
            ok |= status.equals(reason)
    return ok


def _usable_rows(manifest, saliency: SaliencyTable | None, skip_missing: bool,
                 max_pixels: int | None = None, need_caption: bool = True) -> tuple[np.ndarray, int]:
    """Manifest rows with a usable image (`readable_rows`), less those without ok saliency if
    `skip_missing` and those whose header declares more than `max_pixels` (decoding them every epoch
    costs hundreds of MB per worker); and how many were skipped."""
    readable = readable_rows(manifest, need_caption)
    ok = readable.copy()
    if max_pixels is not None:
        pixels = manifest.column("width").astype(np.int64) * manifest.column("height").astype(np.int64)
        ok &= pixels <= max_pixels
    usable = ok & saliency.ok if (skip_missing and saliency is not None) else ok
    rows = np.nonzero(usable)[0].astype(np.int64)
    return rows, int(readable.sum()) - len(rows)


def physical_memory_bytes() -> int | None:
    """This machine's RAM, where the OS says (None elsewhere)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


class DecodedImages:
    """Every listed row's image decoded once: one flat uint8 buffer of HWC pixels, with offsets and
    shapes (numpy arrays, so forked workers share their pages instead of copying them).

    `image(row)` is the uint8 [3, H, W] view `TF.to_image` makes of the PIL image (the same
    permuted HWC memory), so crops from it equal crops from a fresh decode bit for bit.
    Refused (one line) where the pixels would take more than half of this machine's memory.
    """

    def __init__(self, rows: np.ndarray, widths: np.ndarray, heights: np.ndarray, read: Callable[[int], Any],
                 key_of: Callable[[int], str]):
        from salmae.pipeline.progress import progress_bar

        sizes = heights.astype(np.int64) * widths.astype(np.int64) * 3
        need, ram = int(sizes.sum()), physical_memory_bytes()
        if ram is not None and need > ram // 2:
            raise SalmaeError(f"cache_images needs {need / 2**30:.1f} GiB for the decoded pixels of {len(rows)} "
                              f"images, more than half of this machine's {ram / 2**30:.1f} GiB; "
                              "pass --set cache_images=false")
        self.slot = np.full(int(rows.max()) + 1 if len(rows) else 0, -1, dtype=np.int64)  # row -> position
        self.slot[rows] = np.arange(len(rows))
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.shapes = np.stack([heights, widths], axis=1).astype(np.int64)
        self.pixels = np.empty(need, dtype=np.uint8)
        for i, row in enumerate(progress_bar(rows, desc="decoding into memory", unit="img", leave=False,
                                     disable=len(rows) < 1000)):
            pixels = np.asarray(read(int(row)), dtype=np.uint8)       # [H, W, 3] (RGB from decode_image)
            if pixels.shape != (*self.shapes[i], 3):
                raise SalmaeError(f"image {key_of(int(row))} decodes to {pixels.shape[1]}x{pixels.shape[0]} but "
                                  f"the manifest says {self.shapes[i][1]}x{self.shapes[i][0]}; rebuild the manifest "
                                  "(`salmae manifest build`) or pass --set cache_images=false")
            self.pixels[self.offsets[i]:self.offsets[i + 1]] = pixels.reshape(-1)

    @property
    def nbytes(self) -> int:
        return int(self.pixels.nbytes)

    def image(self, row: int) -> torch.Tensor:
        """uint8 [3, H, W] (a view of the cache)."""
        i = self.slot[row]
        h, w = (int(v) for v in self.shapes[i])
        flat = torch.from_numpy(self.pixels[self.offsets[i]:self.offsets[i + 1]])
        return flat.view(h, w, 3).permute(2, 0, 1)


class IndexedPretrainDataset(Dataset):
    """Map-style dataset over the manifest rows with status ok (random access into local tars).

    Per-row data lives in numpy arrays (forked workers share their pages; Python lists of
    millions of objects would be copied page by page as reference counts change). An index is
    either a position in `rows` or a `(position, step)` pair from `GlobalBatchSampler`; the step
    travels with the item so the collate can build that step's masks.
    """

    def __init__(self, manifest, shard_urls: list[str], img_size: int, grid: tuple[int, int],
                 saliency: SaliencyTable | None = None, skip_missing: bool = False, seed: int = 0,
                 augment: bool = True, max_pixels: int | None = None, cache_images: bool = False,
                 need_caption: bool = True, boxes: np.ndarray | None = None):
        by_name = {shard_name(u): u for u in shard_urls}
        encoded = manifest.table.column("shard").combine_chunks().dictionary_encode()
        names = np.asarray(encoded.dictionary.to_pylist(), dtype=object)
        shard_index = encoded.indices.to_numpy()
        absent = [s for s in names if s not in by_name]
        if absent:
            raise SalmaeError(f"manifest lists shards not in --data: {', '.join(absent[:5])}; "
                              "pass the shards the manifest was built from")
        self.rows, self.n_skipped = _usable_rows(manifest, saliency, skip_missing, max_pixels, need_caption)
        self.urls = [by_name[s] for s in names]                        # one per shard
        self.shard_of = shard_index.astype(np.int32)                   # [N] row -> shard
        self.offsets = np.asarray(manifest.column("image_offset"), dtype=np.int64)
        self.nbytes = np.asarray(manifest.column("image_nbytes"), dtype=np.int64)
        self.keys = manifest.keys.to_bytes()                           # bytes: for error messages only
        self.img_size, self.grid, self.saliency, self.boxes = img_size, grid, saliency, boxes
        self.seed, self.epoch, self.augment = seed, 0, augment
        self.cache = None
        if len(self.rows) and any(not _is_local_path(u) for u in self.urls):
            read_member(self.urls[self.shard_of[self.rows[0]]], int(self.offsets[self.rows[0]]), 1)  # fail here, in
            # one line, where the shards cannot serve byte ranges (pipe:) rather than in a loader worker
        if cache_images:
            width, height = (np.asarray(manifest.column(c), dtype=np.int64)[self.rows] for c in ("width", "height"))
            self.cache = DecodedImages(self.rows, width, height, self._decode, lambda r: self.keys[r].decode())

    def collate(self, items: list[dict]) -> dict:
        """DataLoader collate_fn for this dataset's items (see module-level `collate`)."""
        return collate(items, self.grid)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def _decode(self, row: int):
        """Manifest row -> RGB PIL image, read from its tar."""
        data = read_member(self.urls[self.shard_of[row]], int(self.offsets[row]), int(self.nbytes[row]))
        return decode_image(data, key=self.keys[row].decode())

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        index, step = index if isinstance(index, tuple) else (index, None)
        row = int(self.rows[index])
        image = self.cache.image(row) if self.cache is not None else self._decode(row)
        item = make_item(image, row, self.seed, self.epoch, self.img_size, self.grid, self.saliency, self.augment,
                         self.boxes)
        if step is not None:
            item["step"] = step
        return item


def _open_shards(sources: Iterator[dict]) -> Iterator[dict]:
    """webdataset stage: `{"url"}` -> `{"url", "stream"}`, each shard opened by `shards.open_shard` and
    closed once the next is asked for (an unreadable shard is skipped with a warning, as webdataset does)."""
    import warnings

    for source in sources:
        try:
            stream = open_shard(source["url"])
        except SalmaeError as e:
            warnings.warn(f"skipping shard: {e}")
            continue
        try:
            yield {**source, "stream": stream}
        finally:
            stream.close()


def _is_local_path(url: str) -> bool:
    return not url.startswith("pipe:") and ("://" not in url or url.startswith("file://"))


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batch sampler: an epoch-seeded permutation; rank r takes slice [r*b, (r+1)*b) of every global
    batch of b*world, and yields it as `[(index, step), ...]` (the step seeds that batch's masks).

    The tail that does not fill a global batch is dropped (as DistributedSampler + drop_last).
    `set_epoch(epoch, start_step)` resumes an epoch a stop cut short: the same permutation, from
    that step on (`len` stays the epoch's steps, which the lr schedule and the masks count in).
    """

    def __init__(self, n: int, batch_size: int, world: int = 1, rank: int = 0, seed: int = 0):
        self.n, self.b, self.world, self.rank, self.seed, self.epoch = n, batch_size, world, rank, seed, 0
        self.start = 0
        self.steps = n // (batch_size * world)
        if self.steps == 0:
            raise SalmaeError(f"{n} training samples cannot fill one global batch of {batch_size} x {world} "
                              "processes; lower --batch-size")

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start = epoch, start_step

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 9_973 + self.epoch))
        g = self.b * self.world
        for step in range(self.start, self.steps):
            lo = step * g + self.rank * self.b
            yield [(i, step) for i in perm[lo:lo + self.b].tolist()]


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
                 shuffle_buffer: int = 1000, batch_size: int = 1, world: int = 1, max_pixels: int | None = None,
                 need_caption: bool = True, boxes: np.ndarray | None = None):
        self.manifest, self.urls, self.img_size, self.grid = manifest, shard_urls, img_size, grid
        self.boxes = boxes
        self.saliency, self.skip_missing, self.seed, self.epoch = saliency, skip_missing, seed, 0
        self.shuffle_buffer = shuffle_buffer
        self.batch_size = batch_size
        rows, self.n_skipped = _usable_rows(manifest, saliency, skip_missing, max_pixels, need_caption)
        keys = manifest.keys.to_bytes()[rows]
        order = np.argsort(keys)
        self._keys, self._rows = keys[order], rows[order]     # sorted keys -> manifest row (no dict per row)
        self.length = len(rows) // (batch_size * world) * batch_size  # samples per rank and epoch
        if self.length == 0:
            raise SalmaeError(f"{len(rows)} training samples cannot fill one global batch of "
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
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        # Whole batches per worker: the DataLoader batches each worker's stream on its own and drops
        # a worker's partial last batch, so a quota that is not a multiple of the batch loses batches.
        batches = self.length // self.batch_size
        quota = (batches // workers + (1 if worker < batches % workers else 0)) * self.batch_size
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

    def _row_of(self, key: str) -> int | None:
        """Manifest row of a usable key (binary search in the sorted key array), else None."""
        k = key.encode()
        i = int(np.searchsorted(self._keys, k))
        return int(self._rows[i]) if i < len(self._keys) and self._keys[i] == k else None

    def _one_pass(self, round_: int) -> Iterator[dict]:
        import webdataset as wds
        from webdataset.tariterators import group_by_keys, tar_file_expander

        from salmae.pipeline import dist

        nodesplitter = wds.split_by_node if dist.world_size() > 1 else wds.single_node_only
        seed = self.seed * 1009 + self.epoch * 31 + round_
        # WebDataset's own stages, with our opener: object-store URLs go through fsspec, not gopen
        stages = [wds.SimpleShardList(self.urls), nodesplitter, wds.split_by_worker,
                  wds.shuffle(len(self.urls), seed=seed), _open_shards,
                  wds.pipelinefilter(tar_file_expander)(handler=wds.warn_and_continue),
                  wds.pipelinefilter(group_by_keys)(handler=wds.warn_and_continue)]
        if self.shuffle_buffer > 1:
            stages.append(wds.shuffle(self.shuffle_buffer, rng=random.Random(seed)))
        pipeline = wds.DataPipeline(*stages)
        for sample in pipeline:
            row = self._row_of(sample["__key__"])
            data = next((sample[e] for e in ("jpg", "jpeg", "png", "webp") if e in sample), None)
            if row is None or data is None:
                continue
            try:
                image = decode_image(data, key=sample["__key__"])
            except SalmaeError:
                continue
            yield make_item(image, row, self.seed, self.epoch, self.img_size, self.grid, self.saliency,
                            boxes=self.boxes)
