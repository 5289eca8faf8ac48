"""salmae: saliency-guided Masked Autoencoder pretraining.

`pipeline/` is the shared library (config, data, stores, masks, models); `stages/` holds one
module per pipeline stage. Stages import from `pipeline`, never the other way round (the CLI
in `pipeline/cli.py` is the single exception: it dispatches to stages, lazily).
"""

__version__ = "0.1.0"
