"""Every shipped recipe (`configs/*.yaml`) runs end to end: `salmae study --config FILE` on the CPU, with
only its sizes and paths made small. A recipe added to configs/ is tested here without further ado.

What the test overrides, and why (every other key of the recipe runs as shipped):
- sizes: `clip_model` (salmae-micro, the 32-px test CLIP, for ViT-B-16), `saliency_batch`, `model` and
  `arch.*` (a tiny 32-px MAE for ViT-B), `epochs`, `batch_size`, `seeds`, `settings` (at most two of the
  recipe's own, its first: the baseline, and its first saliency cap), `linear_epochs` and `eval_set`
  (`epochs=1`: the fine-tune's epochs come from MAE's recipe, and no other key reaches them);
- paths: `out`, `data` (the session's generated shards), `eval_data` (their ImageFolder split),
  `clip_pretrained` (a local file of random salmae-micro weights instead of the `openai` tag, which
  needs the network);
- `device`: cpu instead of cuda, the one override that is not a size or path (no GPU here);
- `compile`: false, not a key of the recipes (they take the cpu preset's true): compiling every
  stage-2 run would take minutes on the CPU.
`workers: null` stays as shipped: every stage resolves it to the CPUs per process and records the number.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from salmae.pipeline.cli import cli
from salmae.pipeline.device import default_workers
from salmae.stages import study

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
TINY_ARCH = {"arch.img_size": 32, "arch.patch_size": 8, "arch.decoder_embed_dim": 32, "arch.decoder_depth": 1,
             "arch.decoder_num_heads": 2}


@pytest.fixture(scope="module")
def micro_clip(tmp_path_factory) -> Path:
    """Random salmae-micro weights as a checkpoint file (a recipe's CLIP is a tag or a file)."""
    from salmae.pipeline.models.clip import checkpoint_extras, load_clip

    model, info, _, _ = load_clip("salmae-micro", "none")
    path = tmp_path_factory.mktemp("clip") / "clip.pt"
    torch.save({"state_dict": model.state_dict(), **checkpoint_extras("salmae-micro", info.mean, info.std)}, path)
    return path


def small_settings(settings: list[str]) -> list[str]:
    """The recipe's first setting and its first saliency cap (each recipe has both)."""
    saliency = [s for s in settings if s.startswith("saliency-")]
    return list(dict.fromkeys([settings[0], *saliency[:1]]))


def test_the_recipes_are_found():
    assert {p.name for p in RECIPES} >= {"cc3m-vitb.yaml", "cc3m-vitb-sweep.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_runs_end_to_end_on_the_cpu(recipe, tmp_path, shapes_dir, shapes_pattern, micro_clip):
    shipped = yaml.safe_load(recipe.read_text())
    assert shipped["workers"] is None                       # the value that crashed stage 1 (issue 22)
    for name in shipped["settings"]:                        # the settings not run below are still valid
        study.parse_setting(name)
    settings = small_settings(shipped["settings"])
    sets = {"data": shapes_pattern, "eval_data": str(shapes_dir / "imagefolder"), "clip_model": "salmae-micro",
            "clip_pretrained": str(micro_clip), "saliency_batch": 16, "model": "tiny", **TINY_ARCH, "epochs": 1,
            "batch_size": 8, "seeds": 1, "settings": json.dumps(settings), "linear_epochs": 1,
            "eval_set": json.dumps(["epochs=1"]), "device": "cpu", "compile": "false"}
    out = tmp_path / "study"
    args = ["study", "--config", str(recipe), "--out", str(out)]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output + repr(result.exception)

    saved = yaml.safe_load((out / "config.yaml").read_text())
    untouched = set(shipped) - {k.split(".")[0] for k in sets} - {"out"}
    assert untouched and {k: saved[k] for k in untouched} == {k: shipped[k] for k in untouched}
    assert saved["workers"] is None and saved["preset"] == recipe.stem

    data = json.loads((out / "study.json").read_text())
    assert list(data["rows"]) == settings                   # the recipe's floor: false: no floor row
    for setting in settings:
        for protocol in shipped["protocols"]:
            (seed, top1), = data["rows"][setting][protocol]["values"].items()
            results = json.loads((out / "runs" / f"{setting}-s0" / f"eval-{protocol}" / "results.json").read_text())
            assert seed == "0" and isinstance(top1, float) and 0 <= top1 <= 100 and top1 == results["top1"]
    md = (out / "study.md").read_text()
    assert all(s in md for s in settings)
    overlays = sorted((out / "saliency" / "png").glob("*.png"))    # stage-1 maps over the user's images,
    assert len(overlays) == 6 and all(p.name in md for p in overlays)  # drawn without scoring boxes
    assert data["stage1"] is None

    # each stage ran with the default worker count (the CPUs per process less one) and recorded the number
    run = out / "runs" / f"{settings[0]}-s0"
    recorded = [out / "saliency" / "store.zarr" / "config.yaml", run / "config.yaml",
                *(run / f"eval-{p}" / "config.yaml" for p in shipped["protocols"])]
    for path in recorded:
        workers = yaml.safe_load(path.read_text())["workers"]
        assert workers == default_workers() and isinstance(workers, int), (path, workers)
    pre = yaml.safe_load((run / "config.yaml").read_text())
    shipped_optim = dict(item.removeprefix("optim.").split("=") for item in shipped["pretrain_set"])  # its pretrain_set
    assert {k: float(pre["optim"][k]) for k in shipped_optim} == {k: float(v) for k, v in shipped_optim.items()}
    assert pre["optim"]["warmup_epochs"] < 0.2 * shipped["epochs"]                  # scaled to the schedule
    assert yaml.safe_load((out / "saliency" / "store.zarr" / "config.yaml").read_text())["cam"] == shipped["cam"]
