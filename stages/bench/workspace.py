"""The bench's sizes (full or quick) and the generated data its sections share."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class BenchSizes:
    """Every size the bench uses (stated in the table). `quick()` is for smoke runs only."""

    quick: bool = False
    clip_big: str = "ViT-B-16"      # open_clip config for the stage-1 ratio (random weights)
    clip_big_batch: int = 8         # images per batch, 224 px
    clip_tiny_batch: int = 64       # salmae-tiny (64 px) images per batch
    clip_tiny_batches: int = 4      # batches per timed call (tiny is fast)
    library_on_big: bool = True     # also time pytorch-grad-cam on the big model
    shapes_n: int = 1024            # generated images for the store and the loader
    store_reads: int = 256          # random rows per timed store read
    step_model: str = "tiny"        # MAE preset for the step-time ratio
    step_batch: int = 64
    encoder_model: str = "base"     # MAE preset whose encoder is timed (224 px)
    encoder_batch: int = 4
    loader_batch: int = 64
    loader_workers: int = 2         # loader workers in the step and loader figures
    eval_n: int = 320               # generated images for the linear probe's ImageFolder
    eval_epochs: int = 30
    eval_batch: int = 64

    @classmethod
    def for_run(cls, quick: bool) -> "BenchSizes":
        if not quick:
            return cls()
        return cls(quick=True, clip_big_batch=2, clip_tiny_batches=1, library_on_big=False, shapes_n=256,
                   store_reads=64, step_batch=32, encoder_model="small", encoder_batch=2,
                   loader_batch=32, eval_n=96, eval_epochs=10, eval_batch=32)


def _quick_from_env() -> bool:
    return os.environ.get("SALMAE_BENCH_QUICK", "").strip().lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def _quiet():
    """Silence the stages' INFO logs while they run inside the bench."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


# --------------------------------------------------------------------------- shared generated data
class Workspace:
    """Generated shapes shards and a stage-1 store in a temporary folder, made on first use."""

    def __init__(self, root: Path, sizes: BenchSizes, device: torch.device):
        self.root, self.sizes, self.device = root, sizes, device
        self._store: Path | None = None
        self.store_seconds = 0.0

    @property
    def shards(self) -> str:
        """Brace pattern over the generated shards (written on first use)."""
        from salmae.pipeline.data.shapes import write_shapes

        folder = self.root / "shapes"
        if not folder.exists():
            write_shapes(folder, n=self.sizes.shapes_n, image_size=64, seed=0, shard_size=256)
        names = sorted(p.stem for p in folder.glob("*.tar"))
        return str(folder / (f"{{{names[0]}..{names[-1]}}}.tar" if len(names) > 1 else f"{names[0]}.tar"))

    @property
    def shard_list(self) -> list[str]:
        from salmae.pipeline.data.shards import expand_shards

        return expand_shards(self.shards)

    @property
    def store(self) -> Path:
        """The store stage 1 writes over the shapes with a random-weight salmae-tiny CLIP."""
        if self._store is None:
            from salmae.stages.saliency import SaliencyConfig, run

            path = self.root / "saliency" / "store.zarr"
            cfg = SaliencyConfig(data=self.shards, out=path, clip_model="salmae-tiny", clip_pretrained="none",
                                 batch_size=64, workers=0, device=self.device.type, rows_per_shard=256)
            start = time.perf_counter()
            with _quiet():
                run(cfg)
            self.store_seconds = time.perf_counter() - start
            self._store = path
        return self._store
