"""salmae: saliency-guided Masked Autoencoder pretraining.

The import name of this repository: `salmae.pipeline` is the library (config, data, stores, masks,
models, one package per stage's machinery) and `salmae.stages` holds one module per stage.
`pyproject.toml` maps this folder to `salmae`, so the folders stay at the top of the repository
and `pip install` adds one package, `salmae`, to site-packages (not `pipeline` and `stages`).
"""

# Absolute, not `from .pipeline`: pytest imports this file as a plain module when the checkout's
# folder is not a valid Python name (e.g. `salmae-main`), and a relative import fails there.
from salmae.pipeline import __version__

__all__ = ["__version__"]
