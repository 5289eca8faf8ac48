"""`salmae export CKPT --out DIR`: a pretrained encoder in timm's hub layout, for timm and the HF hub.

The encoder is read as stage 3 reads it (`models.encoder.load_encoder`: stage-2, official MAE or
timm weights), loaded with `strict=True` into timm's own model for the exported config (so the
folder is known to load before it is written), and saved as `model.safetensors` + `config.json`
(`models.timm_layout`). The decoder and mask token are left behind. config.json records the
source checkpoint and its sha256 under `salmae`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from salmae.pipeline import __version__
from salmae.pipeline.errors import SalmaeError


@dataclass
class ExportConfig:
    """`salmae export` configuration."""

    checkpoint: str = ""                 # stage-2, official MAE or timm checkpoint (FILE, FOLDER or hf-hub:NAME)
    out: Path = Path("export")           # folder for model.safetensors + config.json (files in it are replaced)
    format: Literal["timm"] = "timm"     # timm's hub layout (the one layout so far)
    num_heads: int | None = None         # heads of a non-standard width the checkpoint does not record
    crop_pct: float = 0.875              # eval centre-crop fraction written to pretrained_cfg (MAE's linear probe)


def run(cfg: ExportConfig) -> dict:
    """Export; returns {out, architecture, model_args, source_sha256, keys}."""
    from salmae.pipeline.files import sha256_file
    from salmae.pipeline.logging import get_logger, setup_logging
    from salmae.pipeline.models.encoder import load_encoder
    from salmae.pipeline.models.timm_layout import build_timm_encoder, timm_config, write_timm_folder
    from salmae.pipeline.models.weights import weights_path

    if not cfg.checkpoint:
        raise SalmaeError("export needs a checkpoint: salmae export CKPT --out DIR")
    if cfg.format != "timm":
        raise SalmaeError(f"--format {cfg.format!r} is not known; use --format timm")
    if not 0 < cfg.crop_pct <= 1:
        raise SalmaeError(f"crop_pct {cfg.crop_pct} is not in (0, 1]; pass --set crop_pct=0.875")
    setup_logging(None)
    encoder, spec = load_encoder(cfg.checkpoint, num_heads=cfg.num_heads)
    weights_file = weights_path(cfg.checkpoint)
    config = timm_config(spec.arch, crop_pct=cfg.crop_pct, salmae={
        "source_checkpoint": str(cfg.checkpoint), "source_sha256": sha256_file(weights_file),
        "source_kind": spec.source,
        "dropped_keys": spec.dropped_keys, "salmae_version": __version__})
    model = build_timm_encoder(config)
    try:
        model.load_state_dict(encoder.state_dict(), strict=True)
    except RuntimeError as e:  # a layout timm would not read back: never write it
        raise SalmaeError(f"the encoder of {cfg.checkpoint} does not load into timm's {config['architecture']} with "
                          f"{config['model_args']} ({str(e).splitlines()[0][:160]})") from e
    write_timm_folder(cfg.out, model.state_dict(), config)
    get_logger().info("exported the %s encoder of %s to %s as timm %s %s", spec.source, cfg.checkpoint, cfg.out,
                      config["architecture"], config["model_args"])
    return {"out": str(cfg.out), "architecture": config["architecture"], "model_args": config["model_args"],
            "source_sha256": config["salmae"]["source_sha256"], "keys": len(model.state_dict())}
