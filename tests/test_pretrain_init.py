"""`salmae pretrain --init`: a new run from official MAE weights (full: strict; encoder only: fresh decoder),
a timm ViT or an `hf-hub:` repository (offline cache); recorded in config.yaml with the file's sha256;
a different architecture is one line before the run folder exists; a resume keeps the recorded init."""

from __future__ import annotations

import pytest
import torch
import yaml
from click.testing import CliRunner
from timm.models.vision_transformer import VisionTransformer

from hf_cache import add_to_hub_cache
from salmae.pipeline.checkpoint import load_checkpoint
from salmae.pipeline.cli import cli
from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.files import sha256_file
from salmae.pipeline.models.mae import build_mae
from salmae.pipeline.models.mae_init import init_mae
from test_pretrain_stage import TINY_ARCH, _cfg

# the MAE that test_pretrain_stage's TINY_ARCH builds
ARCH = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
            decoder_num_heads=2)
TINY_SETS = [x for k, v in TINY_ARCH.items() for x in ("--set", f"{k}={v}")]


def official_mae(seed: int = 1, **arch) -> dict[str, torch.Tensor]:
    """A full MAE state dict in the official models_mae layout (what main_pretrain.py saves under `model`)."""
    torch.manual_seed(seed)
    return build_mae("tiny", **{**ARCH, **arch}).state_dict()


def encoder_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mae_pretrain_vit_*.pth: the same without the decoder and mask token."""
    return {k: v for k, v in state.items() if not k.startswith(("decoder_", "mask_token"))}


def fresh_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_mae("tiny", **ARCH)


def test_full_mae_loads_strictly(tmp_path):
    state = official_mae()
    torch.save({"model": state, "epoch": 799}, tmp_path / "mae_full.pth")
    model = fresh_model()
    report = init_mae(model, str(tmp_path / "mae_full.pth"))
    assert report.layout == "full MAE" and report.fresh == [] and report.loaded == len(state)
    assert report.sha256 == sha256_file(tmp_path / "mae_full.pth")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_encoder_only_keeps_a_fresh_decoder_and_says_so(tmp_path):
    state = encoder_only(official_mae())
    torch.save({"model": state}, tmp_path / "mae_pretrain_vit_tiny.pth")
    model, untouched = fresh_model(), fresh_model().state_dict()
    report = init_mae(model, str(tmp_path / "mae_pretrain_vit_tiny.pth"))
    loaded = model.state_dict()
    assert report.layout == "encoder only" and report.loaded == len(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert set(report.fresh) == {k for k in loaded if k.startswith(("decoder_", "mask_token"))}
    assert all(torch.equal(loaded[k], untouched[k]) for k in report.fresh)
    assert "decoder fresh" in report.describe()


def test_timm_vit_with_a_head_loads_its_encoder(tmp_path):
    torch.manual_seed(2)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    model = fresh_model()
    report = init_mae(model, str(tmp_path / "vit.pth"))
    assert report.dropped == ["head.weight", "head.bias"]
    assert torch.equal(model.blocks[0].mlp.fc2.weight, vit.blocks[0].mlp.fc2.weight)
    assert torch.equal(model.norm.weight, vit.norm.weight)


@pytest.mark.parametrize("change, named", [({"depth": 2}, "depth=2"), ({"embed_dim": 64}, "embed_dim=64"),
                                           ({"patch_size": 4}, "patch_size=4"), ({"num_heads": 4}, "num_heads=4")])
def test_a_different_architecture_is_one_line(tmp_path, change, named):
    torch.save({"model": official_mae(**change), "config": {"model_args": {**ARCH, **change}}},
               tmp_path / "other.pth")
    with pytest.raises(SalmaeError, match=f"different architecture: {named}.*--set arch") as info:
        init_mae(fresh_model(), str(tmp_path / "other.pth"))
    assert "\n" not in str(info.value)


def test_pretrain_init_end_to_end_records_the_file_and_resumes(tmp_path, shapes_pattern):
    """The README's `salmae pretrain --init FILE` (tiny sizes, 1 epoch, lr ~0): the run starts from the file's
    weights, config.yaml records it with its sha256, run.log says the decoder is fresh; a resume keeps it."""
    state = encoder_only(official_mae())
    init = tmp_path / "mae_pretrain_vit_base.pth"
    torch.save({"model": state}, init)
    out = tmp_path / "run"
    args = ["pretrain", "--init", str(init), "--data", shapes_pattern, "--mask", "random", "--out", str(out),
            "--epochs", "1", "--batch-size", "16", "--device", "cpu", *TINY_SETS, "--set", "workers=0",
            "--set", "viz_samples=0", "--set", "optim.lr=1e-12", "--set", "optim.weight_decay=0"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["init"] == str(init) and config["init_sha256"] == sha256_file(init)
    assert "encoder only" in (out / "run.log").read_text() and "decoder fresh" in (out / "run.log").read_text()
    trained = load_checkpoint(out / "checkpoint-latest.pth")["model"]
    for k in state:  # lr 1e-12: one epoch leaves the init weights where they were
        torch.testing.assert_close(trained[k], state[k], rtol=0, atol=1e-6)
    assert (trained["blocks.0.attn.qkv.weight"] - fresh_model().blocks[0].attn.qkv.weight).abs().max() > 0.01

    resumed = CliRunner().invoke(cli, [*args[:1], *args[3:], "--resume", "latest", "--epochs", "2"])  # no --init
    assert resumed.exit_code == 0, resumed.output
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["init"] == str(init) and config["init_sha256"] == sha256_file(init)
    other = tmp_path / "other.pth"
    torch.save({"model": state}, other)
    refused = CliRunner().invoke(cli, ["pretrain", "--init", str(other), *args[3:], "--resume", "latest",
                                       "--epochs", "3"])
    assert refused.exit_code == 2 and "is not the init of the run being resumed" in refused.output


def test_refused_init_leaves_no_run_folder(tmp_path, shapes_pattern):
    from salmae.stages.pretrain import run

    torch.save({"model": official_mae(depth=2), "config": {"model_args": {**ARCH, "depth": 2}}}, tmp_path / "d2.pth")
    with pytest.raises(SalmaeError, match="depth=2"):
        run(_cfg(tmp_path / "run", shapes_pattern, mask="random", epochs=1, init=str(tmp_path / "d2.pth")))
    assert not (tmp_path / "run").exists()


def test_a_changed_init_file_is_refused_by_its_recorded_sha256(tmp_path):
    torch.save({"model": official_mae()}, tmp_path / "mae.pth")
    with pytest.raises(SalmaeError, match="not the recorded init_sha256"):
        init_mae(fresh_model(), str(tmp_path / "mae.pth"), expected_sha256="0" * 64)


def test_init_from_an_hf_hub_timm_repository(tmp_path, hub_cache):
    """`--init hf-hub:timm/vit_base_patch16_224.mae`, with a tiny stand-in of that repository in an offline cache
    (model.safetensors + config.json, as timm's hub repos hold them)."""
    from salmae.pipeline.models.timm_layout import timm_config, write_timm_folder

    state = encoder_only(official_mae(seed=3))
    write_timm_folder(tmp_path / "repo", state, timm_config({k: ARCH[k] for k in
                                                             ("img_size", "patch_size", "embed_dim", "depth",
                                                              "num_heads")}))
    add_to_hub_cache(hub_cache, "timm/vit_base_patch16_224.mae",
                     {n: tmp_path / "repo" / n for n in ("model.safetensors", "config.json")})
    model = fresh_model()
    report = init_mae(model, "hf-hub:timm/vit_base_patch16_224.mae")
    assert report.layout == "encoder only" and report.path.name == "model.safetensors"
    assert torch.equal(model.patch_embed.proj.weight, state["patch_embed.proj.weight"])
    with pytest.raises(SalmaeError, match=f"not in the Hugging Face cache {hub_cache}") as info:
        init_mae(fresh_model(), "hf-hub:facebook/not-cached")
    assert "\n" not in str(info.value)
