"""Stage 1's batch engine: which shards each rank computes, the row dataset its loader workers
read, and the loop that runs CLIP + Grad-CAM batch by batch and hands finished shards to a writer.

Work is split by Zarr shard (`rows_per_shard` manifest rows): rank 0 lists the job's shards not yet
done and each rank computes an equal contiguous block of that list (`deal_todo`: a contiguous run
of tars; after a resume no rank sits idle); batches are formed inside a shard in row order and
never span two tars, so the numbers do not depend on the world size. A shard's completion marker
is written after its rows, so a rerun skips finished shards and ends with the same bytes.

The device never waits for the host: loader workers decode, resize and tokenize, images cross as
uint8 (pinned on CUDA) and are normalised on the device, caption padding is cut on the host,
each batch's maps are copied back while the next batch runs (`_MapsToHost`), and a finished
shard is compressed, written and fsynced by a writer thread while the next batches run
(`_ShardWriter`). Images over `max_pixels` (by their header) are never decoded; JPEGs are
decoded at the smallest scale that still covers CLIP's input (PIL `draft`).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from salmae.pipeline import dist, signals
from salmae.pipeline.data.transforms import normalise, pixel_stats
from salmae.pipeline.device import autocast, pin_memory
from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.files import disk_full_as_error
from salmae.pipeline.host_syncs import no_host_syncs
from salmae.pipeline.logging import get_logger
from salmae.pipeline.saliency.gradcam import compute_cam, encode_captions, trim_caption_padding
from salmae.pipeline.saliency.preprocess import clip_input
from salmae.pipeline.saliency.store import CODE_OF, STATUS_OK, SaliencyStore, status_code
from salmae.pipeline.saliency.store_lock import ShardRange


def parse_shards(spec: str, n_shards: int | None = None) -> ShardRange:
    """`--set shards=LO:HI` -> ShardRange (HI None when omitted); SalmaeError naming the spec if malformed."""
    of = f"; the store has {n_shards} shards" if n_shards is not None else ""
    if not spec:
        return ShardRange()
    try:
        lo_text, hi_text = spec.split(":")
        lo, hi = int(lo_text or 0), int(hi_text) if hi_text else None
    except ValueError:
        raise SalmaeError(f"--set shards={spec!r} is not LO:HI (e.g. 0:160){of}") from None
    if not 0 <= lo <= (hi if hi is not None else lo):
        raise SalmaeError(f"--set shards={spec!r} needs 0 <= LO <= HI{of}")
    return ShardRange(lo, hi)


def job_shards(spec: str, n_shards: int) -> range:
    """The Zarr shards this job computes: all, or `LO:HI` (HI may be omitted; clipped to the store)."""
    shards = parse_shards(spec, n_shards)
    hi = n_shards if shards.hi is None else shards.hi
    return range(min(shards.lo, n_shards), min(hi, n_shards))


def deal_todo(todo: Sequence[int], world: int, rank: int) -> list[int]:
    """Rank `rank`'s share of `todo`, the job's shards still to do in order: a contiguous slice, and
    the `world` slices differ in length by at most one.

    Dealing what is left, not the whole job, keeps every rank busy to the end after a resume
    (dealt statically, a 16-rank resume of an 8-rank run killed at 50% gave work
    [0, 202, 0, 202, ...]: half the ranks idle, the rest working twice as long). Contiguous
    because rows are in manifest order (shard by shard), so a run of Zarr shards is a contiguous
    run of tars: no tar is read by more than the two ranks that share its ends, where round-robin
    dealing made every rank open every tar.
    """
    n = len(todo)
    return list(todo[n * rank // world:n * (rank + 1) // world])


class _RowImages(Dataset):
    """Manifest row -> (row, image uint8 [3, H, W] or None, caption tokens [T] or None, damage reason or None).

    Workers decode, resize (`preprocess.clip_input`: squash or letterbox, the CLIP weights'
    interpolation) and tokenize; images cross to the device as bytes and are normalised there.
    Local tars are read by byte offset (random access); streamed shards (pipe: URLs) are read
    whole once per worker and cached by key.
    """

    def __init__(self, rows: dict[int, tuple[str, str, int, int, str, int, int]], info, tokenizer, max_pixels: int,
                 resize: str = "squash"):
        self.rows = rows                      # row -> (key, shard url, image offset, image bytes, caption, W, H)
        self.size_hw = tuple(info.input_size)
        self.size_wh = (info.input_size[1], info.input_size[0])
        self.interpolation = info.interpolation
        self.resize = resize
        self.max_pixels = max_pixels          # refuse (too_large) before decoding, whatever the manifest said
        self.tokenizer = tokenizer            # open_clip's tokenizers are plain picklable objects
        self._cached_url: str | None = None
        self._cache: dict[str, bytes | None] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, row: int):
        from salmae.pipeline.data.shards import DamagedSampleError, decode_image

        key, url, offset, nbytes, caption, width, height = self.rows[row]
        try:
            image = decode_image(self._image_bytes(key, url, offset, nbytes), key, max_pixels=self.max_pixels,
                                 draft_size=self.size_wh)
        except DamagedSampleError as e:
            return row, None, None, e.reason
        pixels = clip_input(image, self.size_hw, self.resize, self.interpolation, source_size=(width, height))
        return row, pixels, self.tokenizer([caption])[0], None                         # pixels: [3, H, W] uint8

    def _image_bytes(self, key: str, url: str, offset: int, nbytes: int) -> bytes:
        from salmae.pipeline.data.shards import DamagedSampleError, iter_shard, read_member

        if _is_local_tar(url) and offset >= 0:
            return read_member(url, offset, nbytes)
        if url != self._cached_url:
            self._cache = {s.key: s.image_bytes for s in iter_shard(url, decode=False)}
            self._cached_url = url
        data = self._cache.get(key)
        if data is None:
            raise DamagedSampleError("missing_image", key)
        return data


def deal_tars_to_workers(batch_tars: list[str], workers: int) -> list[int]:
    """Order batches so that a DataLoader (batch i -> worker i % workers) gives each tar to one worker.

    A streamed tar (`pipe:`) can only be read whole, so a worker that needs one row of it reads
    all of it: dealt round-robin, every worker would read every tar. Tars go, in order, to the
    worker with the fewest batches so far; if a worker's queue runs dry first, another's tail
    batch takes its turn (that tar is then read by two workers). Local tars are read by byte
    range and need none of this. Returns a permutation of range(len(batch_tars)).
    """
    queues: list[list[int]] = [[] for _ in range(workers)]
    owner: dict[str, int] = {}
    for i, tar in enumerate(batch_tars):
        if tar not in owner:
            owner[tar] = min(range(workers), key=lambda w: len(queues[w]))
        queues[owner[tar]].append(i)
    order: list[int] = []
    for turn in range(len(batch_tars)):
        queue = queues[turn % workers] or max(queues, key=len)
        order.append(queue.pop(0))
    return order


def _is_local_tar(url: str) -> bool:
    return not url.startswith("pipe:") and ("://" not in url or url.startswith("file://"))


def _collate(items):
    """-> rows, images uint8 [n, 3, H, W] | None, tokens [n, T'] | None (padding after the longest cut), errors."""
    rows = [r for r, _, _, _ in items]
    errors = [e for _, _, _, e in items]
    good = [(x, t) for _, x, t, _ in items if x is not None]
    if not good:
        return rows, None, None, errors
    tokens = trim_caption_padding(torch.stack([t for _, t in good])).contiguous()  # contiguous: pinned whole
    return rows, torch.stack([x for x, _ in good]), tokens, errors


class _MapsToHost:
    """Maps [n, gh, gw] on their way from the device to host memory; read them one batch later.

    On CUDA the host buffer is pinned and the copy is queued behind the CAM kernels without
    waiting (`non_blocking`), and an event marks its end: the loop launches the next batch before
    `numpy()` waits on the event, so the GPU is never idle waiting for the host. On the CPU the
    same lines make a plain copy and there is no event; the pinned buffer, the asynchronous copy
    and the event wait are the part only CUDA exercises.
    """

    def __init__(self, maps: torch.Tensor):
        cuda = maps.device.type == "cuda"
        self.host = torch.empty(maps.shape, dtype=torch.float32, pin_memory=cuda)
        self.host.copy_(maps.float(), non_blocking=cuda)
        self.ready = torch.cuda.Event() if cuda else None
        if self.ready is not None:
            self.ready.record()

    def numpy(self) -> np.ndarray:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.numpy()


def _shard_urls(cfg, manifest) -> dict[str, str]:
    from salmae.pipeline.data.shards import expand_shards, shard_name

    urls = expand_shards(cfg.data) if cfg.data else list(manifest.shard_urls)
    return {shard_name(u): u for u in urls}


def compute_shards(cfg, store: SaliencyStore, manifest, todo: list[int], model, info, tokenizer, layer,
                    device, run_id: str, provenance: dict) -> tuple[int, dict[str, float]]:
    """Compute and write every shard in `todo` (cfg: the stage's `SaliencyConfig`; read: data, batch_size,
    workers, max_pixels, resize, cam, precision, check_syncs); returns the number of images run through CLIP and this
    rank's steady state {images, seconds}: from the first batch's maps on the host to the last's (the
    first batch holds loader start-up and CUDA warm-up; shard writes overlap it in their thread)."""
    from salmae.pipeline.progress import progress_bar

    urls = _shard_urls(cfg, manifest)
    keys, shards, captions = manifest.keys, manifest.column("shard"), manifest.column("caption")
    offsets, nbytes, statuses = manifest.column("image_offset"), manifest.column("image_nbytes"), manifest.status
    widths, heights = manifest.column("width").astype(np.int64), manifest.column("height").astype(np.int64)
    image_pixels = widths * heights                                                               # [N]
    plans: dict[int, dict[str, Any]] = {}
    batches, batch_shard, rows_info = [], [], {}
    for s in todo:
        rows = store.shard_rows(s)
        status = np.array([status_code(statuses[r]) for r in rows], dtype=np.uint8)
        for i, r in enumerate(rows):
            if status[i] == STATUS_OK and not (captions[r] or "").strip():
                status[i] = CODE_OF["empty_caption"]
            if status[i] == STATUS_OK and image_pixels[r] > cfg.max_pixels:     # by the header: never read nor decoded
                status[i] = CODE_OF["too_large"]
        ok_rows = [r for i, r in enumerate(rows) if status[i] == STATUS_OK]
        missing = sorted({shards[r] for r in ok_rows} - set(urls))
        if missing:
            raise SalmaeError(f"shard {missing[0]} of the store's manifest is not in --data; pass the original shards")
        for r in ok_rows:
            rows_info[r] = (keys[r], urls[shards[r]], int(offsets[r]), int(nbytes[r]), captions[r],
                            int(widths[r]), int(heights[r]))
        bs = []  # a batch never spans two tars (maps do not depend on the batch: test_batch_size_changes_no_map)
        for _, group in itertools.groupby(ok_rows, key=lambda r: shards[r]):
            group = list(group)
            bs += [group[i:i + cfg.batch_size] for i in range(0, len(group), cfg.batch_size)]
        plans[s] = {"saliency": np.zeros((len(rows), *store.grid), np.float32), "status": status,
                    "left": len(bs), "started": None}
        batches += bs
        batch_shard += [s] * len(bs)
    if cfg.workers > 1 and not all(_is_local_tar(u) for u in urls.values()):
        order = deal_tars_to_workers([shards[b[0]] for b in batches], cfg.workers)
        batches, batch_shard = [batches[i] for i in order], [batch_shard[i] for i in order]
    loader = DataLoader(_RowImages(rows_info, info, tokenizer, cfg.max_pixels, cfg.resize),
                        batch_sampler=batches, num_workers=cfg.workers,
                        collate_fn=_collate, pin_memory=pin_memory(device),
                        persistent_workers=False, multiprocessing_context="fork" if cfg.workers else None,
                        worker_init_fn=signals.ignore_in_worker)   # a group SIGTERM: the main process stops them
    loaded = iter(loader) if batches else iter(())  # forks the workers: before the writer's thread exists
    with _ShardWriter(store, run_id, provenance) as writer:
        for s in todo:
            if plans[s]["left"] == 0:
                writer.submit(s, plans.pop(s))
        if not batches:
            return 0, {"images": 0, "seconds": 0.0}
        cam_fn = compute_cam(cfg.cam)
        bar = progress_bar(total=len(rows_info), unit="img", disable=not dist.is_main(), desc="saliency")
        n_images, steady_from = 0, None               # steady state: from the first batch's maps on the host
        stats = pixel_stats(device, info.mean, info.std)   # once: a batch makes no tensor from Python lists
        in_flight: tuple | None = None             # the previous batch, its maps still on their way to the host
        for step, ((rows, images, tokens, errors), s) in enumerate(zip(loaded, batch_shard)):
            plan = plans[s]
            plan["started"] = plan["started"] or time.time()
            lo = store.shard_rows(s).start
            for r, e in zip(rows, errors):
                if e is not None:
                    plan["status"][r - lo] = status_code(e)
            maps = None
            if images is not None:
                with no_host_syncs(device, cfg.check_syncs, f"stage 1 batch {step}"):
                    pixels = normalise(images.to(device, non_blocking=True), stats)   # [n, 3, H, W] float32
                    with autocast(device, cfg.precision):
                        text_emb = encode_captions(model, tokens, trimmed=True)   # the loader cut the padding
                        cams = cam_fn(model, pixels, text_emb, layer, info.grid)   # [n, gh, gw] on the device
                maps = _MapsToHost(cams)
            if in_flight is not None:
                n_images += _store_maps(store, plans, writer, *in_flight)
                if steady_from is None:
                    steady_from = (n_images, time.perf_counter())
            in_flight = (s, [r for r, e in zip(rows, errors) if e is None], maps)
            bar.update(len(rows))
            if signals.requested():                   # SIGTERM/Ctrl-C: end at this batch boundary
                n_images += _store_maps(store, plans, writer, *in_flight)
                bar.close()
                raise signals.interrupted()           # the writer still writes the shards already finished
        if in_flight is not None:
            n_images += _store_maps(store, plans, writer, *in_flight)
        bar.close()
        first_images, first_done = steady_from or (n_images, time.perf_counter())
        steady = {"images": n_images - first_images, "seconds": time.perf_counter() - first_done}
    return n_images, steady


def _store_maps(store: SaliencyStore, plans: dict[int, dict], writer: _ShardWriter, shard: int, good: list[int],
                maps: _MapsToHost | None) -> int:
    """Put one batch's maps into its shard's plan (handing the shard to the writer when it is complete); -> images."""
    plan = plans[shard]
    lo = store.shard_rows(shard).start
    if maps is not None:
        for r, cam in zip(good, maps.numpy()):                  # [gh, gw] float32 each
            finite = bool(np.isfinite(cam).all())
            plan["saliency"][r - lo] = cam if finite else 0
            plan["status"][r - lo] = (CODE_OF["nonfinite_map"] if not finite
                                      else CODE_OF["zero_map"] if not cam.max() > 0 else STATUS_OK)
    plan["left"] -= 1
    if plan["left"] == 0:
        writer.submit(shard, plans.pop(shard))
    return len(good) if maps is not None else 0


class _ShardWriter:
    """Writes finished shards (`SaliencyStore.write_shard`: compress, write, fsync, then the marker)
    on a thread of its own, in the order submitted, while the batch loop goes on launching CAM
    batches: written on the main thread, every shard's compression and fsyncs left the device idle.

    At most `depth` shards wait in the queue (bounded host memory; the loop waits when the disk is
    slower than the device). The first error (a full disk: one SalmaeError line) ends the writing:
    shards queued after it are dropped, unmarked, for a rerun to compute, and the error itself is
    raised on the main thread by the next `submit` or by `close`. As a context manager, leaving the
    block writes what is queued (on an exception too: those shards are complete) and joins the
    thread. The thread starts on the first `submit`, after the DataLoader has forked its workers.
    """

    def __init__(self, store: SaliencyStore, run_id: str, provenance: dict, depth: int = 2):
        self.store, self.run_id, self.provenance = store, run_id, provenance
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None       # the writer's first error; it writes nothing after it
        self._error_raised = False

    def __enter__(self) -> "_ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(raise_error=exc_type is None)     # an exception already on its way keeps precedence

    def submit(self, shard: int, plan: dict) -> None:
        """Queue a finished shard (its plan's maps and statuses are the writer's from now on)."""
        self._raise_error()
        status = plan["status"]
        seconds = time.time() - plan["started"] if plan["started"] else 0.0
        marker = {"run_id": self.run_id, "rank": dist.rank(), "seconds": round(seconds, 3),
                  "images": int(np.isin(status, [STATUS_OK, CODE_OF["nonfinite_map"], CODE_OF["zero_map"]]).sum()),
                  **{k: self.provenance[k] for k in ("device", "precision", "batch_size", "compile")}}
        if self._thread is None:
            self._thread = threading.Thread(target=self._write_queued, name="salmae-shard-writer", daemon=True)
            self._thread.start()
        self._queue.put((shard, plan["saliency"], status, marker))

    def close(self, raise_error: bool = True) -> None:
        """Write what is queued, join the thread, then raise the writer's error (unless `raise_error` is False)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if raise_error:
            self._raise_error()
        elif self._error is not None and not self._error_raised:
            get_logger().error("writing shards failed too: %s", self._error)

    def _raise_error(self) -> None:
        if self._error is not None and not self._error_raised:
            self._error_raised = True
            raise self._error

    def _write_queued(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue                               # dropped: unmarked, so a rerun computes it
            shard, saliency, status, marker = item
            try:
                with disk_full_as_error(self.store.shard_files(shard)[0],
                                        f"shard {shard} is not marked done, finished shards are kept"):
                    self.store.write_shard(shard, saliency, status, marker)
            except BaseException as e:                 # surfaces on the main thread
                self._error = e
