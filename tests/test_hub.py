"""`hf-hub:` names for open_clip models and weights (stage 1) and for eval checkpoints, loaded by open_clip / timm /
huggingface_hub's own code from a hand-built offline cache; without cache, one line naming the cache folder."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from click.testing import CliRunner

from hf_cache import add_to_hub_cache
from salmae.pipeline.cli import cli
from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.files import sha256_file
from salmae.pipeline.models.clip import load_clip
from salmae.pipeline.models.hub import HubName, parse_hub_name
from test_export import export, stage2_checkpoint

CLIP_REPO = "laion/CLIP-ViT-B-16-laion2B-s34B-b88K"   # the README's name, a micro CLIP in the test cache
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]        # not open_clip's defaults: they must come from the repo


@pytest.fixture
def clip_repo(tmp_path, hub_cache):
    """A micro open_clip model saved as open_clip's hub repositories hold one: open_clip_config.json
    ({model_cfg, preprocess_cfg}) + open_clip_pytorch_model.bin."""
    torch.manual_seed(5)
    model = open_clip.create_model("salmae-micro")
    torch.save(model.state_dict(), tmp_path / "weights.bin")
    config = {"model_cfg": open_clip.get_model_config("salmae-micro"), "preprocess_cfg": {"mean": MEAN, "std": STD}}
    add_to_hub_cache(hub_cache, CLIP_REPO, {"open_clip_config.json": json.dumps(config).encode(),
                                            "open_clip_pytorch_model.bin": tmp_path / "weights.bin"})
    return model.state_dict(), tmp_path / "weights.bin"


def test_hub_names_parse():
    assert parse_hub_name("hf-hub:timm/vit_base_patch16_224.mae") == \
        HubName("timm/vit_base_patch16_224.mae", None, None)
    assert parse_hub_name("hf-hub:org/repo@v1.0/weights/mae.pth") == HubName("org/repo", "v1.0", "weights/mae.pth")
    assert str(parse_hub_name("hf-hub:org/repo@v1.0/mae.pth")) == "hf-hub:org/repo@v1.0/mae.pth"
    for bad in ("hf-hub:", "hf-hub:org", "hf-hub:org/", "hf-hub:/repo", "hf-hub:org/repo//x"):
        with pytest.raises(SalmaeError, match="not a Hugging Face Hub name"):
            parse_hub_name(bad)


def test_open_clip_hub_model_is_built_by_open_clip_from_the_cache(clip_repo):
    state, weights = clip_repo
    model, info, tokenizer, record = load_clip(f"hf-hub:{CLIP_REPO}", "laion2b_s34b_b88k")  # the tag: ignored
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert info.mean == tuple(MEAN) and info.std == tuple(STD) and info.input_size == (32, 32)
    assert record["clip_pretrained"] == f"hf-hub:{CLIP_REPO}" and record["pretrained_sha256"] == sha256_file(weights)
    assert tokenizer(["a red square"]).shape == (1, 16)
    random, _, _, record = load_clip(f"hf-hub:{CLIP_REPO}", "none")
    assert record["clip_pretrained"] == "none"
    assert not torch.equal(random.visual.conv1.weight, state["visual.conv1.weight"])


def test_open_clip_hub_weights_for_a_named_config(clip_repo):
    state, weights = clip_repo
    model, info, _, record = load_clip("salmae-micro", f"hf-hub:{CLIP_REPO}")
    assert torch.equal(model.visual.conv1.weight, state["visual.conv1.weight"])
    assert info.mean == tuple(MEAN) and record["pretrained_sha256"] == sha256_file(weights)
    with pytest.raises(SalmaeError, match=f"holds another model than salmae-tiny; pass --clip-model hf-hub:{CLIP_REPO}"):
        load_clip("salmae-tiny", f"hf-hub:{CLIP_REPO}")
    with pytest.raises(SalmaeError, match="brings its own weights"):
        load_clip(f"hf-hub:{CLIP_REPO}", str(weights))


@pytest.mark.parametrize("model, pretrained", [(f"hf-hub:{CLIP_REPO}", "none"), ("salmae-micro", f"hf-hub:{CLIP_REPO}")])
def test_open_clip_hub_name_without_cache_is_one_line_naming_the_cache(hub_cache, model, pretrained):
    with pytest.raises(SalmaeError) as info:
        load_clip(model, pretrained)
    message = str(info.value)
    assert f"not in the Hugging Face cache {hub_cache}" in message and "HF_HUB_OFFLINE" in message
    assert CLIP_REPO in message and "\n" not in message


def test_stage1_runs_from_an_hf_hub_clip(clip_repo, shapes_pattern, tmp_path):
    """The README's `salmae saliency --clip-model hf-hub:…` (a micro CLIP in the cache; 64 images)."""
    from salmae.pipeline.saliency.store import SaliencyStore

    out = tmp_path / "store.zarr"
    result = CliRunner().invoke(cli, ["saliency", "--clip-model", f"hf-hub:{CLIP_REPO}", "--data", shapes_pattern,
                                      "--out", str(out), "--batch-size", "16", "--workers", "0", "--device", "cpu",
                                      "--set", "rows_per_shard=32"])
    assert result.exit_code == 0, result.output
    attrs = SaliencyStore.open(out).attrs
    assert attrs["clip_pretrained"] == f"hf-hub:{CLIP_REPO}" and attrs["pretrained_sha256"] == sha256_file(clip_repo[1])


def test_eval_checkpoint_from_the_hub_equals_the_local_file(tmp_path, hub_cache, shapes_dir):
    """The README's `salmae eval knn --checkpoint hf-hub:timm/vit_base_patch16_224.mae` (a tiny exported encoder
    standing in for that repository): the same top-1 as the stage-2 checkpoint it was exported from."""
    ckpt = stage2_checkpoint(tmp_path / "checkpoint-latest.pth")
    export(ckpt, tmp_path / "timm")
    repo = "timm/vit_base_patch16_224.mae"
    add_to_hub_cache(hub_cache, repo, {n: tmp_path / "timm" / n for n in ("config.json", "model.safetensors")})
    runs = {}
    for name, checkpoint in (("hub", f"hf-hub:{repo}"), ("file", str(ckpt))):
        result = CliRunner().invoke(cli, ["eval", "knn", "--checkpoint", checkpoint, "--data",
                                          str(shapes_dir / "imagefolder"), "--out", str(tmp_path / name),
                                          "--batch-size", "16", "--device", "cpu", "--set", "workers=0"])
        assert result.exit_code == 0, result.output
        runs[name] = json.loads((tmp_path / name / "results.json").read_text())
    assert runs["hub"]["top1"] == runs["file"]["top1"] and runs["hub"]["top5"] == runs["file"]["top5"]
    assert runs["hub"]["checkpoint"] == f"hf-hub:{repo}"
    assert runs["hub"]["checkpoint_sha256"] == sha256_file(tmp_path / "timm" / "model.safetensors")
    assert runs["hub"]["encoder"]["source"] == "timm" and runs["hub"]["encoder"]["num_heads"] == 2

    missing = CliRunner().invoke(cli, ["eval", "knn", "--checkpoint", "hf-hub:timm/not_cached", "--data",
                                       str(shapes_dir / "imagefolder"), "--out", str(tmp_path / "missing")])
    assert missing.exit_code == 2 and len(missing.output.strip().splitlines()) == 1
    assert f"not in the Hugging Face cache {hub_cache}" in missing.output
    assert not (tmp_path / "missing").exists()


def test_a_named_file_of_a_repository(tmp_path, hub_cache):
    """hf-hub:ORG/NAME/FILE: e.g. an official MAE .pth kept in a hub repository."""
    from salmae.pipeline.models.encoder import load_encoder

    ckpt = stage2_checkpoint(tmp_path / "ckpt.pth")
    add_to_hub_cache(hub_cache, "someone/mae-weights", {"pretrain/mae_tiny.pth": ckpt})
    encoder, spec = load_encoder("hf-hub:someone/mae-weights/pretrain/mae_tiny.pth")
    assert spec.source == "salmae" and spec.arch["embed_dim"] == 32
    with pytest.raises(SalmaeError, match="other.pth is not in the Hugging Face cache"):
        load_encoder("hf-hub:someone/mae-weights/other.pth")
