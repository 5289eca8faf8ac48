"""`salmae clip-train`: train a tiny open_clip model contrastively on caption shards (offline CLIP).

The checkpoint is a dict `{"state_dict": ..., "model_name", "preprocess_cfg", "quick_gelu", "config",
"step", "version"}`: open_clip's own loader reads `state_dict` from it, so it loads through the same
path as downloaded weights (`--clip-model salmae-tiny --clip-pretrained clip.pt`), and
`pipeline.models.clip.load_clip` reads the normalisation it was trained with.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from salmae.pipeline.config import config_to_dict
from salmae.pipeline.device import pick_device
from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.files import atomic_path
from salmae.pipeline.logging import MetricsWriter, get_logger, setup_logging
from salmae.pipeline.models.clip import TINY_MODEL, checkpoint_extras, load_clip


@dataclasses.dataclass
class ClipTrainConfig:
    data: str | None = None          # caption shards (brace pattern, paths or pipe: URLs)
    out: Path = Path("runs/clip/clip.pt")  # checkpoint file; NAME.config.yaml/.metrics.jsonl/.run.log go beside it
    clip_model: str = TINY_MODEL     # open_clip config name to train from scratch
    seconds: float = 300.0           # wall-clock budget for the optimisation loop (0 = no limit)
    epochs: int = 0                  # stop after this many epochs (0 = no limit)
    steps: int = 0                   # stop after this many optimiser steps (0 = no limit); deterministic budget
    batch_size: int = 128            # contrastive batch (negatives per sample = batch_size - 1)
    lr: float = 1e-3                 # AdamW peak learning rate (cosine decay over the budget)
    weight_decay: float = 0.1        # AdamW weight decay
    warmup_steps: int = 20           # linear warm-up steps
    augment: bool = True             # random horizontal flips (captions say left/right: flip swaps those words)
    device: str = "auto"             # auto | cpu | cuda
    threads: int = 0                 # torch CPU threads while training (0 = torch's default); restored afterwards.
                                     # On a shared 2-core CPU 1 thread ran 4-5x faster per step than 2
    seed: int = 0                    # data order and init


def run(cfg: ClipTrainConfig) -> dict[str, Any]:
    """Train and write `cfg.out`; returns {steps, epochs, seconds, final_loss, out}."""
    from open_clip import ClipLoss

    if not cfg.data:
        raise SalmaeError("clip-train needs --data SHARDS (caption shards to train on)")
    if cfg.seconds <= 0 and cfg.epochs <= 0 and cfg.steps <= 0:
        raise SalmaeError("clip-train needs a budget: --seconds S, --set steps=N and/or --set epochs=N")
    out = Path(cfg.out)
    log = setup_logging(out.parent, file_name=f"{out.stem}.run.log")   # named after --out: nothing else's is touched
    from salmae.pipeline.config import save_config
    save_config(cfg, out.parent / f"{out.stem}.config.yaml")
    threads_before = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    model, info, tokenizer, _ = load_clip(cfg.clip_model, "none", device)
    model.requires_grad_(True).train()
    images, captions = _load_pairs(cfg.data, info)
    tokens = tokenizer(captions)                                   # [N, T]
    n = len(images)
    if n < 2:
        raise SalmaeError(f"clip-train found {n} usable samples in {cfg.data}; need at least 2")
    batch = min(cfg.batch_size, n)
    steps_per_epoch = max(n // batch, 1)
    # Weight decay on matrices only (as open_clip's trainer): not on gains, biases or the logit scale.
    decay = [p for name, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in name]
    no_decay = [p for name, p in model.named_parameters() if not (p.ndim >= 2 and "logit_scale" not in name)]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    loss_fn = ClipLoss()
    metrics = MetricsWriter(out.parent / f"{out.stem}.metrics.jsonl")
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    gen = torch.Generator().manual_seed(cfg.seed)
    # The cosine schedule runs over the step budget when steps or epochs are given, else over the time budget.
    step_budgets = [b for b in (cfg.steps, cfg.epochs * steps_per_epoch) if b > 0]
    total_steps = min(step_budgets) if step_budgets else None
    log.info("clip-train: %s on %d pairs, batch %d, budget %ss / %s steps (%d threads)", cfg.clip_model, n,
             batch, cfg.seconds or "-", total_steps or "-", torch.get_num_threads())
    from salmae.pipeline.progress import progress_bar

    bar = progress_bar(total=total_steps, unit="step", desc="clip-train")
    start, step, epoch, loss = time.time(), 0, 0, torch.tensor(float("nan"))
    while True:
        order = torch.randperm(n, generator=gen)
        for i in range(steps_per_epoch):
            elapsed = time.time() - start
            progress = step / total_steps if total_steps else elapsed / cfg.seconds
            if progress >= 1 or (cfg.seconds > 0 and elapsed >= cfg.seconds):   # seconds also caps a step budget
                break
            for group in optim.param_groups:
                group["lr"] = _lr(cfg, step, progress)
            idx = order[i * batch:(i + 1) * batch]
            x, t = images[idx].float() / 255.0, tokens[idx]
            if cfg.augment:
                x, t = _flip_half(x, t, captions, idx, tokenizer, gen)
            x = ((x - mean) / std).to(device)
            out_dict = model(x, t.to(device))
            img_f, txt_f, scale = out_dict[:3] if isinstance(out_dict, tuple) else (
                out_dict["image_features"], out_dict["text_features"], out_dict["logit_scale"])
            loss = loss_fn(img_f, txt_f, scale)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % 20 == 0:
                metrics.write(step=step, epoch=epoch, loss=loss.item(), lr=optim.param_groups[0]["lr"])
        else:
            epoch += 1
            continue
        break
    bar.close()
    seconds = time.time() - start
    torch.set_num_threads(threads_before)
    model.eval()
    state = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             **checkpoint_extras(cfg.clip_model, info.mean, info.std),
             "config": config_to_dict(cfg), "step": step, "epoch": epoch, "version": 1}
    with atomic_path(out) as tmp:
        torch.save(state, tmp)
    summary = {"out": str(out), "steps": step, "epochs": epoch, "seconds": round(seconds, 1),
               "final_loss": round(loss.item(), 4), "pairs": n}
    log.info("clip-train done: %s", summary)
    return summary


def _lr(cfg: ClipTrainConfig, step: int, progress: float) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(progress, 1.0)))


_SWAP = {"left": "right", "right": "left"}


def _flip_half(x: torch.Tensor, t: torch.Tensor, captions: list[str], idx: torch.Tensor, tokenizer,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip a random half of the batch horizontally, swapping 'left'/'right' in their captions."""
    flip = torch.rand(len(idx), generator=gen) < 0.5
    if not flip.any():
        return x, t
    x = x.clone()
    x[flip] = x[flip].flip(-1)
    swapped = [" ".join(_SWAP.get(w, w) for w in captions[int(j)].split(" ")) for j in idx[flip]]
    t = t.clone()
    t[flip] = tokenizer(swapped)
    return x, t


def _load_pairs(spec: str, info) -> tuple[torch.Tensor, list[str]]:
    """Decode every usable (image, caption) pair once, resized to the model input: ([N, 3, H, W] uint8, captions)."""
    from salmae.pipeline.data.shards import iter_samples

    size_wh = (info.input_size[1], info.input_size[0])
    images, captions, skipped = [], [], 0
    for sample in iter_samples(spec):
        if sample.error or sample.image is None or not (sample.caption or "").strip():
            skipped += 1
            continue
        arr = np.array(sample.image.resize(size_wh, Image.BICUBIC), dtype=np.uint8)  # writable: torch shares it
        images.append(torch.from_numpy(arr).permute(2, 0, 1))
        captions.append(sample.caption)
    if skipped:
        get_logger().info("clip-train: skipped %d damaged samples", skipped)
    return (torch.stack(images) if images else torch.zeros(0, 3, *info.input_size, dtype=torch.uint8)), captions
