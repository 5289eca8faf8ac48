"""salmae: saliency-guided Masked Autoencoder pretraining.

`salmae.pipeline` is the library: infrastructure at its root (config, errors, device, dist,
logging, files, checkpoint, steps, stats, host_syncs, preflight) and one package per role
(`data`, `saliency`, `pretrain`, `eval`, `models`, `figures`). `salmae.stages` holds one module
per stage and imports from here, never the other way round (the CLI in `cli.py` is the single
exception: it dispatches to stages by name, lazily). `tests/test_layout.py` holds these rules.
"""

__version__ = "0.1.0"   # the only place the version is written (pyproject reads it: dynamic version)
