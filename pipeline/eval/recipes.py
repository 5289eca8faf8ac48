"""MAE's fine-tuning recipes per model size (FINETUNE.md of facebookresearch/mae).

The recipe is chosen by the encoder's width: 1024 is ViT-L, 1280 ViT-H, and every other width
takes the recipe of the largest MAE size not wider than it, ViT-B's for anything up to 768
(MAE publishes no recipe for ViT-Ti/S or the tiny test models; `exact` says whether the width
is one of MAE's). A config value that is not None overrides the recipe's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class FinetuneRecipe:
    size: str            # "base", "large" or "huge": whose recipe this is
    exact: bool          # the encoder's width is that size's (False: the nearest recipe, see above)
    layer_decay: float   # layer-wise lr decay
    drop_path: float     # stochastic depth rate
    blr: float           # base lr (lr = blr * global batch / 256)
    epochs: int          # fine-tuning epochs

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# width -> MAE's recipe at global batch 1024 (FINETUNE.md: ViT-B/16, ViT-L/16, ViT-H/14)
RECIPES = {
    768: FinetuneRecipe("base", True, layer_decay=0.65, drop_path=0.1, blr=5e-4, epochs=100),
    1024: FinetuneRecipe("large", True, layer_decay=0.75, drop_path=0.2, blr=1e-3, epochs=50),
    1280: FinetuneRecipe("huge", True, layer_decay=0.75, drop_path=0.3, blr=1e-3, epochs=50),
}
FINETUNE_GLOBAL_BATCH = 1024  # MAE's effective fine-tuning batch, for every size


def finetune_recipe(embed_dim: int) -> FinetuneRecipe:
    """MAE's recipe for an encoder of width `embed_dim` (see the module docstring for other widths)."""
    if embed_dim in RECIPES:
        return RECIPES[embed_dim]
    fitting = [w for w in RECIPES if w <= embed_dim]
    return replace(RECIPES[max(fitting) if fitting else min(RECIPES)], exact=False)


def resolve_recipe(embed_dim: int, **given: Any) -> FinetuneRecipe:
    """The recipe for `embed_dim` with every non-None value of `given` (layer_decay, drop_path, …) put in."""
    return replace(finetune_recipe(embed_dim), **{k: v for k, v in given.items() if v is not None})
