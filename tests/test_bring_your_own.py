"""The README's "Weights: official MAE in, timm and Hugging Face out" commands, run as written: in a folder
holding tiny stand-ins under the README's file names (`mae_pretrain_vit_base.pth`, `imagenet/`), with tiny
repositories under the README's hub names in an offline Hugging Face cache. Only the shard pattern is replaced (by
the generated shapes) and small sizes are
appended (tiny model, 1 epoch, CPU, no workers)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import torch
import yaml
from click.testing import CliRunner

from hf_cache import add_to_hub_cache
from salmae.pipeline.cli import cli
from salmae.pipeline.files import sha256_file
from salmae.pipeline.models.timm_layout import timm_config, write_timm_folder
from test_hub import clip_repo  # noqa: F401  (fixture: a micro CLIP as laion/CLIP-ViT-B-16-laion2B-s34B-b88K)
from test_pretrain_init import ARCH, TINY_SETS, encoder_only, official_mae

README = Path(__file__).resolve().parents[1] / "README.md"
SMALL = {  # appended to each command: tiny sizes for a CPU test
    "pretrain": [*TINY_SETS, "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--set", "workers=0",
                 "--set", "viz_samples=0"],
    "eval": ["--batch-size", "16", "--device", "cpu", "--set", "workers=0"],
    "saliency": ["--batch-size", "16", "--workers", "0", "--device", "cpu", "--set", "rows_per_shard=32"],
    "export": [],
}


def readme_commands() -> list[str]:
    """The command lines of the first code block under "### Weights: official MAE in, timm and Hugging Face out"."""
    text = README.read_text(encoding="utf-8")
    section = text.split("### Weights: official MAE in, timm and Hugging Face out", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_bring_your_own_commands_run(tmp_path, monkeypatch, capsys, hub_cache, clip_repo, shapes_dir,
                                            shapes_pattern):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": encoder_only(official_mae(seed=1))}, tmp_path / "mae_pretrain_vit_base.pth")
    (tmp_path / "imagenet").symlink_to(shapes_dir / "imagefolder")
    timm_mae = tmp_path / "timm-mae"
    write_timm_folder(timm_mae, encoder_only(official_mae(seed=2)),
                      timm_config({k: ARCH[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")}))
    add_to_hub_cache(hub_cache, "timm/vit_base_patch16_224.mae",
                     {n: timm_mae / n for n in ("model.safetensors", "config.json")})

    commands = readme_commands()
    assert [c.split()[:2] for c in commands] == [["salmae", "pretrain"], ["salmae", "pretrain"], ["salmae", "eval"],
                                                 ["salmae", "saliency"], ["salmae", "export"], ["python", "-c"]]
    for line in commands:
        args = shlex.split(line)
        if args[0] == "python":  # `python -c CODE`, run in this process (a fresh interpreter takes 15 s to import)
            capsys.readouterr()
            exec(compile(args[2], "<readme>", "exec"), {})
            assert capsys.readouterr().out.strip() == "(3, 32, 32)"
            continue
        args = [shapes_pattern if a == "cc3m/{00000..00331}.tar" else a for a in args[1:]]
        result = CliRunner().invoke(cli, [*args, *SMALL[args[0]]])
        assert result.exit_code == 0, f"{line}\n{result.output}"

    from_mae = yaml.safe_load(Path("runs/from-mae/config.yaml").read_text())
    assert from_mae["init"] == "mae_pretrain_vit_base.pth"
    assert from_mae["init_sha256"] == sha256_file("mae_pretrain_vit_base.pth")
    assert "decoder fresh" in Path("runs/from-mae/run.log").read_text()
    from_timm = yaml.safe_load(Path("runs/from-timm/config.yaml").read_text())
    assert from_timm["init"] == "hf-hub:timm/vit_base_patch16_224.mae"
    assert from_timm["init_sha256"] == sha256_file(timm_mae / "model.safetensors")
    knn = json.loads(Path("runs/timm-mae/eval-knn/results.json").read_text())
    assert knn["checkpoint"] == "hf-hub:timm/vit_base_patch16_224.mae" and knn["top1"] >= 0
    from salmae.pipeline.saliency.store import SaliencyStore

    assert SaliencyStore.open("cc3m-saliency.zarr").attrs["clip_pretrained"] == \
        "hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K"
    exported = json.loads(Path("runs/from-mae/timm/config.json").read_text())
    assert exported["salmae"]["source_sha256"] == sha256_file("runs/from-mae/checkpoint-latest.pth")
