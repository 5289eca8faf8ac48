"""`salmae report`: table content against the results files, mean ± std over seeds, flagged differences."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

from pipeline.errors import SalmaeError
from stages.report import write_report


def make_run(root: Path, name: str, *, mask: str, seed: int, losses: list[float], top1: dict[str, float],
             epochs: int = 3, model: str = "tiny", cap: float = 0.25, saliency: str | None = "/s/store.zarr",
             eval_epochs: int = 90) -> Path:
    run = root / name
    run.mkdir(parents=True)
    config = {"data": "/d/{00000..00003}.tar", "out": str(run), "saliency": saliency, "mask": mask,
              "model": model, "epochs": epochs, "batch_size": 64, "seed": seed, "device": "cpu", "workers": 2,
              "masking": {"ratio": "0.75", "cap": cap, "select": "topk", "tau": 1.0, "inverse": False,
                          "base": 0.75, "var": 0.1, "delta": 0.5, "source": "store"},
              "optim": {"blr": 1.5e-4, "weight_decay": 0.05}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []
    for e, loss in enumerate(losses):
        lines.append({"kind": "step", "epoch": e, "step": e * 10, "loss": loss + 0.5})
        lines.append({"kind": "epoch", "epoch": e, "loss": loss})
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    for protocol, acc in top1.items():
        (run / f"eval-{protocol}").mkdir()
        cfg = {"protocol": protocol, "checkpoint": str(run / "checkpoint-latest.pth"), "epochs": eval_epochs,
               "out": str(run / f"eval-{protocol}")}
        (run / f"eval-{protocol}" / "results.json").write_text(json.dumps(
            {"protocol": protocol, "top1": acc, "top5": 100.0, "epochs": eval_epochs, "config": cfg}))
    return run


def _table_rows(text: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows]


def test_report_table_matches_results_with_seed_mean_std(tmp_path):
    runs = [
        make_run(tmp_path, "sal-s0", mask="saliency", seed=0, losses=[0.9, 0.7, 0.5], top1={"knn": 60.0, "linear": 70.0}),
        make_run(tmp_path, "sal-s1", mask="saliency", seed=1, losses=[0.9, 0.7, 0.6], top1={"knn": 64.0, "linear": 74.0}),
        make_run(tmp_path, "rand-s0", mask="random", seed=0, losses=[1.0, 0.8, 0.65], top1={"knn": 50.0, "finetune": 81.5},
                 saliency=None),
    ]
    out = tmp_path / "report" / "report.md"
    summary = write_report([str(r) for r in runs], str(out))
    assert "report.md" in summary and "3 runs, 2 settings" in summary
    text = out.read_text()
    header, *rows = _table_rows(text)
    assert header[:3] == ["strategy", "parameters", "saliency source"]
    assert "Warning" not in text  # only strategy and seed differ
    sal = dict(zip(header, rows[0]))
    rnd = dict(zip(header, rows[1]))
    assert sal["strategy"] == "saliency" and "cap=0.25" in sal["parameters"] and "select=topk" in sal["parameters"]
    assert sal["saliency source"] == "store (store.zarr)" and rnd["saliency source"] == "—"
    assert sal["seed(s)"] == "0, 1" and sal["epochs"] == "3"
    knn_std = statistics.stdev([60.0, 64.0])
    assert sal["kNN top-1"] == f"62.00 ± {knn_std:.2f} (n=2)"
    assert sal["linear top-1"] == f"72.00 ± {knn_std:.2f} (n=2)"
    assert sal["fine-tune top-1"] == "—"
    assert sal["final pretrain loss"] == f"0.5500 ± {statistics.stdev([0.5, 0.6]):.4f} (n=2)"
    assert rnd["strategy"] == "random" and rnd["parameters"] == "ratio=0.75"
    assert rnd["kNN top-1"] == "50.00" and rnd["fine-tune top-1"] == "81.50" and rnd["final pretrain loss"] == "0.6500"
    for png in ("report-loss.png", "report-accuracy.png"):
        assert (out.parent / png).stat().st_size > 1000
        assert f"]({png})" in text


def test_runs_differing_in_other_keys_are_flagged(tmp_path):
    runs = [
        make_run(tmp_path, "a", mask="saliency", seed=0, losses=[0.5], top1={"knn": 60.0}, epochs=1),
        make_run(tmp_path, "b", mask="saliency", seed=1, losses=[0.5, 0.4], top1={"knn": 62.0}, epochs=2),
        make_run(tmp_path, "c", mask="random", seed=0, losses=[0.5], top1={"knn": 55.0}, epochs=1, saliency=None,
                 eval_epochs=10),
    ]
    out = tmp_path / "r.md"
    write_report([str(r) for r in runs], str(out))
    text = out.read_text()
    assert "Warning: these runs differ in more than the mask strategy and the seed" in text
    assert "- `epochs`: 1, 2" in text
    assert "Warning: the knn evaluations differ in** `epochs` (90, 10)" in text
    header, *rows = _table_rows(text)
    assert "epochs" in header
    assert len(rows) == 3  # a and b are not merged: they differ in epochs, not only seed
    assert [dict(zip(header, r))["kNN top-1"] for r in rows] == ["60.00", "62.00", "55.00"]


def test_strategy_parameters_are_not_flagged_but_split_rows(tmp_path):
    runs = [make_run(tmp_path, "cap25", mask="saliency", seed=0, losses=[0.5], top1={"linear": 60.0}, cap=0.25),
            make_run(tmp_path, "cap50", mask="saliency", seed=0, losses=[0.5], top1={"linear": 65.0}, cap=0.5)]
    out = tmp_path / "r.md"
    write_report([str(r) for r in runs], str(out))
    text = out.read_text()
    assert "Warning" not in text
    header, *rows = _table_rows(text)
    assert [dict(zip(header, r))["parameters"].split(", ")[1] for r in rows] == ["cap=0.25", "cap=0.5"]


def test_report_needs_run_folders(tmp_path):
    with pytest.raises(SalmaeError, match="no config.yaml"):
        write_report([str(tmp_path)], str(tmp_path / "r.md"))
