"""`salmae gpu-check`: the CPU configuration end to end through the CLI, the GPU sizes and the verdicts."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from salmae.pipeline.cli import cli
from salmae.pipeline.errors import SalmaeError
from salmae.stages.bench.gpu_check import CPU_NOTE, GpuCheckConfig, check_sizes, render, rows


def test_gpu_check_on_cpu_writes_every_stage_with_the_cpu_note(tmp_path):
    out = tmp_path / "check"
    result = CliRunner().invoke(cli, ["gpu-check", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "gpu-check.json").read_text())
    assert summary["device"] == "cpu" and summary["note"] == CPU_NOTE and summary["gpu"] is None
    assert summary["precision"] == "fp32" and summary["compile"] == ["off"]
    assert summary["sizes"]["images"] == 48 and summary["sizes"]["epochs"] == 3   # 1 warm-up + 6 steps of 3/epoch
    stages = summary["stages"]
    assert set(stages) == {"saliency", "saliency_jpeg256", "saliency_jpeg500", "pretrain", "pretrain_online", "knn"}
    for name, stage in stages.items():
        assert math.isfinite(stage["images_per_s"]) and stage["images_per_s"] > 0, name
        assert stage["peak_gpu_memory_bytes"] is None and stage["batch_size"] == 16, name
    # stage 1 on each kind of image, with the stage's own figure: steady state after the first 16-image batch
    for name, kind in (("saliency", "shapes"), ("saliency_jpeg256", "cc3m-like 256x256 JPEG"),
                       ("saliency_jpeg500", "cc3m-like 500x375 JPEG")):
        st = stages[name]
        assert (st["images"], st["images_timed"], st["images_kind"]) == (48, 32, kind), name
        assert st["images_per_s"] == pytest.approx(32 / st["seconds_timed"], rel=0.01) and st["host_syncs_checked"]
    # stage 2: 3 epochs of 3 steps, epoch 0 left out, and of epochs 1-2 the first logging window (step 0)
    for name, mask in (("pretrain", "saliency"), ("pretrain_online", "amr-capped")):
        st = stages[name]
        assert (st["steps"], st["steps_timed"], st["images_timed"], st["mask"]) == (9, 4, 64, mask), name
        assert st["images_per_s"] == pytest.approx(64 / st["seconds_timed"], rel=0.01)
        assert st["host_syncs_checked"] == "recorder" and st["image_size"] == 64
    assert stages["pretrain_online"]["source"] == "online" and stages["pretrain"]["source"] == "store"
    assert stages["knn"]["images"] == 48 and stages["knn"]["image_size"] == 64
    assert stages["knn"]["top1"] == json.loads((out / "gpu-check.json").read_text())["stages"]["knn"]["top1"]
    assert [f["id"] for f in summary["figures"]] == [f"gpu_check.{k}_images_per_s" for k in
                                                     ("saliency", "saliency_jpeg256", "saliency_jpeg500", "pretrain",
                                                      "pretrain_online", "knn")]
    assert all(f["verdict"] == "—" for f in summary["figures"])     # CPU figures are not judged
    assert CPU_NOTE in result.output and CPU_NOTE in (out / "gpu-check.md").read_text()
    assert result.output.count("\n| ") == 7                          # header + 6 stage rows (after the ruler)
    assert not (out / "work").exists()                               # scratch data removed


def test_gpu_sizes_measure_at_least_200_steps_of_base_at_batch_256():
    s = check_sizes(GpuCheckConfig(workers=8), gpu=True)
    assert (s.images, s.image_size, s.clip_model, s.mae_model, s.batch_size) == (8192, 224, "ViT-B-16", "base", 256)
    assert s.steps_per_epoch == 32 and s.epochs == 8
    assert (s.epochs - 1) * s.steps_per_epoch >= 200 and s.images >= 2048 and s.workers == 8
    assert s.images // s.rows_per_shard == 8          # stage 1: 8 shards, 7 timed


def test_sizes_refuse_a_batch_larger_than_the_data():
    with pytest.raises(SalmaeError, match="no batch of 64"):
        check_sizes(GpuCheckConfig(images=32, batch_size=64), gpu=False)


def _stage(rate, **extra):
    return {"images_per_s": rate, "peak_gpu_memory_bytes": 3 * 2**30, "warmup_excluded": "x", "model": "base",
            "image_size": 224, "batch_size": 256, "workers": 8, "images": 8192, "images_timed": 7168,
            "clip_model": "ViT-B-16", "clip_pretrained": "none", "images_per_s_end_to_end": 1.0, "steps": 256,
            "steps_timed": 224, "top1": 12.5, "images_kind": "shapes", "mask": "saliency", "source": "store", **extra}


def test_gpu_rows_are_judged_against_the_h100_targets():
    summary = {"device": "cuda", "gpu": "NVIDIA H100", "torch": "2", "cuda": "13.0", "precision": "bf16",
               "compile": ["off", "on"], "sizes": {"images": 8192, "image_size": 224}, "wall_seconds": 1.0,
               "date": "d", "stages": {"saliency": _stage(1150.0), "pretrain": _stage(999.0),
                                       "pretrain_compiled": _stage(1300.0), "knn": _stage(5000.0)}}
    got = {r.id: (r.target, r.verdict, r.number) for r in rows(summary)}
    assert got == {"gpu_check.saliency_images_per_s": ("≥ 1100 img/s", "PASS", 1150.0),
                   "gpu_check.pretrain_images_per_s": ("≥ 1000 img/s", "MISS", 999.0),
                   "gpu_check.pretrain_compiled_images_per_s": ("≥ 1000 img/s", "PASS", 1300.0),
                   "gpu_check.knn_images_per_s": ("—", "—", 5000.0)}
    table = render(summary)
    assert "NVIDIA H100" in table and "3.0 GiB" in table and CPU_NOTE not in table
