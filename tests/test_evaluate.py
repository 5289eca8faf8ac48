"""Stage 3 end to end on generated ImageFolders with a tiny ViT (32 px, patch 8, width 32, 1 block)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from pipeline.config import resolve_config
from pipeline.errors import SalmaeError
from pipeline.files import sha256_file
from pipeline.logging import read_metrics
from stages.evaluate import EvalConfig, run

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def _write_split(root: Path, split: str, n_per_class: int, rng: np.random.Generator, noise: bool = False):
    for cls, rgb in COLOURS.items():
        folder = root / split / cls
        folder.mkdir(parents=True)
        for i in range(n_per_class):
            if noise:  # label carries no information about the pixels
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            else:
                pixels = np.clip(np.array(rgb) + rng.normal(0, 12, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:04d}.png")


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory) -> Path:
    """4 solid-colour classes (trivially separable), 12 train / 6 val each, plus one corrupt train file."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    _write_split(root, "train", 12, rng)
    _write_split(root, "val", 6, rng)
    (root / "train" / "red" / "9999.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return root


@pytest.fixture(scope="module")
def noise_folder(tmp_path_factory) -> Path:
    """The hard set: uniform noise images, class = folder only (nothing to learn), 20 train / 20 val each."""
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(1)
    _write_split(root, "train", 20, rng, noise=True)
    _write_split(root, "val", 20, rng, noise=True)
    return root


@pytest.fixture(scope="module")
def mae_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised encoder saved in the official MAE layout (encoder + decoder keys)."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=1, mlp_ratio=2.0,
                            num_classes=0)
    state = dict(vit.state_dict())
    state["mask_token"] = torch.zeros(1, 1, 16)
    state["decoder_embed.weight"] = torch.randn(16, 32)
    path = tmp_path_factory.mktemp("ckpt") / "mae_tiny.pth"
    torch.save({"model": state}, path)
    return path


def _cfg(protocol, ckpt, data, out, **sets) -> EvalConfig:
    overrides = [f"{k}={v}" for k, v in sets.items()]
    return resolve_config(EvalConfig, None, overrides, protocol=protocol, checkpoint=str(ckpt), data=str(data),
                          out=str(out), device="cpu", workers=0)


def test_knn_separable_far_above_chance_and_results_fields(colour_folder, mae_checkpoint, tmp_path):
    res = run(_cfg("knn", mae_checkpoint, colour_folder, tmp_path / "knn", batch_size=32))
    assert res["top1"] >= 90.0 and res["top5"] == 100.0
    saved = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert saved["protocol"] == "knn" and saved["top1"] == res["top1"]
    assert saved["checkpoint_sha256"] == sha256_file(mae_checkpoint)
    assert saved["counts"]["train"] == 48 and saved["counts"]["val"] == 24 and saved["counts"]["skipped"] == 1
    assert saved["counts"]["skipped_files"][0].endswith("red/9999.png")
    assert saved["config"]["knn"] == {"k": 20, "temperature": 0.07}
    assert saved["encoder"]["source"] == "mae" and saved["salmae_version"] and saved["seconds"] > 0
    for name in ("config.yaml", "run.log", "features-train.pt", "features-val.pt"):
        assert (tmp_path / "knn" / name).is_file(), name


def test_random_encoder_on_hard_set_is_near_chance(noise_folder, mae_checkpoint, tmp_path):
    res = run(_cfg("knn", mae_checkpoint, noise_folder, tmp_path / "knn", batch_size=40))
    assert res["top1"] < 45.0  # chance = 25 % over 80 val images


def test_linear_probe_separable(colour_folder, mae_checkpoint, tmp_path):
    res = run(_cfg("linear", mae_checkpoint, colour_folder, tmp_path / "lin", epochs=15, batch_size=16,
                   **{"linear.blr": 1024, "linear.warmup_epochs": 2}))
    assert res["top1"] >= 90.0 and res["cached_features"] is True
    assert res["counts"]["skipped"] == 1 and res["epochs"] == 15
    losses = [m["loss"] for m in read_metrics(tmp_path / "lin" / "metrics.jsonl")]
    assert len(losses) == 15 and losses[-1] < losses[0]


def test_cached_linear_equals_uncached(colour_folder, mae_checkpoint, tmp_path):
    sets = {"epochs": 4, "batch_size": 16, "linear.blr": 1024, "linear.warmup_epochs": 1}
    cached = run(_cfg("linear", mae_checkpoint, colour_folder, tmp_path / "cached", **sets))
    uncached = run(_cfg("linear", mae_checkpoint, colour_folder, tmp_path / "uncached",
                        **{**sets, "linear.cache": False}))
    assert cached["cached_features"] and not uncached["cached_features"]
    assert not (tmp_path / "uncached" / "features-train.pt").exists()
    loss_c = [m["loss"] for m in read_metrics(tmp_path / "cached" / "metrics.jsonl")]
    loss_u = [m["loss"] for m in read_metrics(tmp_path / "uncached" / "metrics.jsonl")]
    np.testing.assert_allclose(loss_c, loss_u, rtol=1e-4, atol=1e-5)
    assert (cached["top1"], cached["top5"]) == (uncached["top1"], uncached["top5"])
    assert cached["counts"] == uncached["counts"]


def test_finetune_separable_and_resumes(colour_folder, mae_checkpoint, tmp_path):
    sets = {"batch_size": 16, "finetune.blr": 5e-3, "finetune.warmup_epochs": 1, "finetune.drop_path": 0.0,
            "finetune.re_prob": 0.0}
    out = tmp_path / "ft"
    first = run(_cfg("finetune", mae_checkpoint, colour_folder, out, epochs=2, **sets))
    assert (out / "checkpoint-latest.pth").is_file() and first["resumed_from_epoch"] == 0
    res = run(_cfg("finetune", mae_checkpoint, colour_folder, out, epochs=15, resume="latest", **sets))
    assert res["resumed_from_epoch"] == 2
    assert [m["epoch"] for m in read_metrics(out / "metrics.jsonl")] == list(range(15))
    assert res["top1"] >= 75.0, res  # chance 25 %; mixup/cutmix/RandAugment on, as by default
    assert res["config"]["finetune"]["layer_decay"] == 0.75 and res["config"]["finetune"]["mixup"] == 0.8


def test_missing_data_folders_are_one_line_errors(colour_folder, mae_checkpoint, tmp_path):
    bad = tmp_path / "bad"
    (bad / "train" / "cat").mkdir(parents=True)
    (bad / "train" / "dog").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(bad / "train" / "cat" / "a.png")
    (bad / "val" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(bad / "val" / "cat" / "d.png")
    with pytest.raises(SalmaeError, match=r"class folder .*dog"):
        run(_cfg("knn", mae_checkpoint, bad, tmp_path / "o1"))
    Image.new("RGB", (8, 8)).save(bad / "train" / "dog" / "b.png")
    (bad / "val" / "bird").mkdir()
    Image.new("RGB", (8, 8)).save(bad / "val" / "bird" / "c.png")
    with pytest.raises(SalmaeError, match="val class.*bird"):
        run(_cfg("knn", mae_checkpoint, bad, tmp_path / "o2"))


def test_torchrun_two_processes_match_one(colour_folder, mae_checkpoint, tmp_path):
    """`torchrun --nproc-per-node 2 -m pipeline.cli eval knn` (gloo) gives the single-process metrics."""
    one = run(_cfg("knn", mae_checkpoint, colour_folder, tmp_path / "one", batch_size=8))
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "pipeline.cli", "eval", "knn",
           "--checkpoint", str(mae_checkpoint), "--data", str(colour_folder), "--out", str(tmp_path / "two"),
           "--batch-size", "8", "--device", "cpu", "--set", "workers=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["world_size"] == 2
    assert (two["top1"], two["top5"], two["counts"]) == (one["top1"], one["top5"], one["counts"])
    f1 = torch.load(tmp_path / "one" / "features-val.pt", weights_only=True)["feats"]
    f2 = torch.load(tmp_path / "two" / "features-val.pt", weights_only=True)["feats"]
    torch.testing.assert_close(f1, f2, rtol=1e-5, atol=1e-5)


def test_knn_on_labelled_shards_equals_the_same_images_as_imagefolder(shapes_dir, shapes_pattern, mae_checkpoint,
                                                                     tmp_path):
    """`--data SHARDS` (KEY.json label/split) and the ImageFolder of the same JPEG bytes give the same kNN.

    Class indices differ (shard labels follow SHAPES, ImageFolder sorts names), accuracy must not.
    """
    shards = run(_cfg("knn", mae_checkpoint, shapes_pattern, tmp_path / "shards", batch_size=16))
    folder = run(_cfg("knn", mae_checkpoint, shapes_dir / "imagefolder", tmp_path / "folder", batch_size=16))
    counts = [json.loads((tmp_path / name / "results.json").read_text())["counts"] for name in ("shards", "folder")]
    assert counts[0]["train"] == counts[1]["train"] > 0 and counts[0]["val"] == counts[1]["val"] > 0
    assert counts[0]["train"] + counts[0]["val"] == 64
    assert shards["top1"] == pytest.approx(folder["top1"]) and shards["top5"] == pytest.approx(folder["top5"])
