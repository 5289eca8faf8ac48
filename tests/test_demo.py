"""The demo orchestration: a very small end-to-end run, then a rerun that redoes nothing."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import yaml

from salmae.pipeline.errors import SalmaeError
from salmae.stages.demo import DemoConfig, run


def test_demo_runs_end_to_end_and_resumes_without_redoing_steps(tmp_path, capsys):
    cfg = DemoConfig(out=tmp_path / "demo", n_images=128, image_size=32, shard_size=64, clip_images=128, clip_steps=3, clip_seconds=30,
                     strategies=["random", "saliency"], epochs=1, batch_size=32, linear_epochs=2, workers=0)
    first = run(cfg)
    report = tmp_path / "demo" / "report.md"
    assert first["report"] == str(report) and report.is_file()
    text = report.read_text()
    assert "| random |" in text and "| saliency |" in text and "Pointing game" in text
    assert f"report: {report}" in capsys.readouterr().out
    markers = sorted(p.name for p in (tmp_path / "demo" / ".done").iterdir())
    assert len(markers) == 5 + 2 * 3          # shapes, clip-data, clip, saliency, inspect + 2 x (pretrain, knn, linear)
    results = json.loads((tmp_path / "demo" / "runs" / "saliency-s0" / "eval-knn" / "results.json").read_text())
    assert results["protocol"] == "knn" and f"| 0: {results['top1']:.2f} | {results['top1']:.2f} | — |" in text

    stats = json.loads((tmp_path / "demo" / "data" / "00000_stats.json").read_text())
    assert stats["salmae_shapes"]["task"] == "main-object"      # a task pixels can decide
    probe = yaml.safe_load((tmp_path / "demo" / "runs" / "random-s0" / "eval-linear" / "config.yaml").read_text())
    assert probe["global_pool"] is True and probe["linear"]["augment"] is False

    second = run(cfg)
    assert second["steps"] == {}               # every step was skipped

    saved = (tmp_path / "demo" / "config.yaml").read_text()
    with pytest.raises(SalmaeError, match=r"epochs: 1 -> 2\); rerun with the saved ones"):
        run(replace(cfg, epochs=2))            # would report the 1-epoch runs as 2-epoch ones
    with pytest.raises(SalmaeError, match="task: 'main-object' -> 'named'"):
        run(replace(cfg, task="named"))        # would keep the main-object data
    assert (tmp_path / "demo" / "config.yaml").read_text() == saved
