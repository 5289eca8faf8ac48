"""Stage-3 figure: `salmae eval linear` with cached vs re-encoded features."""

from __future__ import annotations

import torch

from salmae.pipeline.logging import get_logger
from salmae.stages.bench.report import Row, ratio_row
from salmae.stages.bench.timing import fmt_time, paired_ratio, time_interleaved
from salmae.stages.bench.workspace import Workspace, _quiet


def bench_eval(ws: Workspace, repeats: int, device: torch.device) -> list[Row]:
    """Stage 3: `salmae eval linear` wall time with cached features vs re-encoding every epoch."""
    from salmae.pipeline.checkpoint import save_checkpoint
    from salmae.pipeline.config import resolve_config
    from salmae.pipeline.data.shapes import write_shapes
    from salmae.pipeline.models.mae import build_mae
    from salmae.stages.evaluate import EvalConfig, run

    s = ws.sizes
    get_logger().info("bench eval: linear probe, %d epochs", s.eval_epochs)
    data = ws.root / "eval-shapes"
    write_shapes(data, n=s.eval_n, image_size=64, seed=1, shard_size=s.eval_n, imagefolder=True)
    torch.manual_seed(0)
    mae = build_mae("tiny")
    ckpt = ws.root / "mae-tiny.pth"
    save_checkpoint(ckpt, model=mae.state_dict(), config={"model_args": dict(mae.model_args)})
    counter = iter(range(10**6))
    results: dict[bool, dict] = {}

    def linear(cache: bool):
        def go():
            out = ws.root / "eval-runs" / f"{next(counter):04d}"   # fresh folder: no cache carried over
            cfg = resolve_config(EvalConfig, None, [f"linear.cache={cache}", "linear.augment=false"],  # linear-noaug
                                 protocol="linear", checkpoint=str(ckpt), data=str(data / "imagefolder"),
                                 out=str(out), epochs=s.eval_epochs, batch_size=s.eval_batch,
                                 global_batch=s.eval_batch, device=device.type, workers=0)
            with _quiet():
                results[cache] = run(cfg)
        return go

    t = time_interleaved({"cached": linear(True), "uncached": linear(False)}, repeats, warmup=1, device=device)
    counts = results[True]["counts"]
    detail = (f"`salmae eval linear` end to end (load, features, {s.eval_epochs} epochs, val), MAE tiny encoder "
              f"(64 px), {counts['train']} train / {counts['val']} val images, batch {s.eval_batch}, 0 workers; "
              f"cached {fmt_time(t['cached'])}, uncached {fmt_time(t['uncached'])}; the ratio falls as ~1/epochs "
              f"(MAE's default is 90)")
    return [ratio_row("eval.linear_cached_over_uncached", "linear probe wall time, cached ÷ uncached features",
                      paired_ratio(t["cached"], t["uncached"]), "≤ 0.1", detail)]
