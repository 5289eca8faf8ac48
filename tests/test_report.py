"""`salmae report`: rows never mix settings, per-seed values with t-intervals, paired baseline
differences, stale-checkpoint flags, and plots with one point per seed on a fitted axis."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from matplotlib.collections import PathCollection

from salmae.pipeline.cli import cli
from salmae.pipeline.config import resolve_config
from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.files import sha256_file
from salmae.pipeline.figures.plots import LOSS_CAVEAT, SeedPoints, accuracy_figure, fitted_ylim, loss_figure
from salmae.stages.report import write_report

T2 = 4.302653   # t_{0.975, 2}
T1 = 12.706205  # t_{0.975, 1}


def make_run(root: Path, name: str, *, mask: str, seed: int, losses: list[float], top1: dict[str, float],
             epochs: int = 3, model: str = "tiny", cap: float = 0.25, saliency: str | None = "/s/store.zarr",
             eval_epochs: int = 90, compile: bool = False, eval_precision: str = "fp32",
             checkpoint: bytes | None = None, recorded_sha: str | None = None, ratio: str = "0.75") -> Path:
    """A run folder as stage 2 and 3 write it (config.yaml, metrics.jsonl, eval-*/results.json)."""
    run = root / name
    run.mkdir(parents=True)
    config = {"data": "/d/{00000..00003}.tar", "out": str(run), "saliency": saliency, "mask": mask,
              "model": model, "epochs": epochs, "batch_size": 64, "seed": seed, "device": "cpu", "workers": 2,
              "log_every": 20 + seed, "cache_images": seed % 2 == 1, "compile": compile, "precision": "fp32",
              "masking": {"ratio": ratio, "cap": cap, "select": "topk", "tau": 1.0, "inverse": False,
                          "base": 0.75, "var": 0.1, "delta": 0.5, "source": "store"},
              "optim": {"blr": 1.5e-4, "weight_decay": 0.05}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []
    for e, loss in enumerate(losses):
        lines.append({"kind": "step", "epoch": e, "step": e * 10, "loss": loss + 0.5})
        lines.append({"kind": "epoch", "epoch": e, "loss": loss})
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if checkpoint is not None:
        (run / "checkpoint-latest.pth").write_bytes(checkpoint)
    for protocol, acc in top1.items():
        write_eval(run, protocol, acc, eval_epochs=eval_epochs, precision=eval_precision, seed=seed,
                   sha=recorded_sha, pretrain_epoch=len(losses) - 1)
    return run


def write_eval(run: Path, protocol: str, top1: float, *, folder: str | None = None, eval_epochs: int = 90,
               precision: str = "fp32", seed: int = 0, sha: str | None = None, pretrain_epoch: int | None = None):
    out = run / (folder or f"eval-{protocol}")
    out.mkdir()
    cfg = {"protocol": protocol.removesuffix("-noaug"), "checkpoint": str(run / "checkpoint-latest.pth"),
           "epochs": eval_epochs, "out": str(out), "features": str(run / "features"), "workers": 4, "seed": seed,
           "precision": "auto",
           "linear": {"augment": not protocol.endswith("-noaug")}}
    (out / "results.json").write_text(json.dumps(
        {"protocol": protocol, "top1": top1, "top5": 100.0, "epochs": eval_epochs, "config": cfg,
         "precision": precision, "compile": False, "checkpoint_sha256": sha, "pretrain_epoch": pretrain_epoch}))


def _tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Markdown tables by the `## ` heading above them, each as a list of {header: cell} rows."""
    tables: dict[str, list[dict[str, str]]] = {}
    heading, header = "", None
    for line in text.splitlines():
        if line.startswith("## "):
            heading, header = line[3:], None
        elif line.startswith("| "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
                tables[heading] = []
            else:
                tables[heading].append(dict(zip(header, cells)))
    return tables


def _table(text: str, protocol: str) -> list[dict[str, str]]:
    return next(rows for heading, rows in _tables(text).items() if heading.endswith(f"(`{protocol}`)"))


def _report(tmp_path: Path, runs: list[Path], baseline: str | None = None) -> str:
    out = tmp_path / "report" / "report.md"
    write_report([str(r) for r in runs], str(out), baseline=baseline)
    return out.read_text()


# --------------------------------------------------------------------------- table content and statistics
def test_report_lists_each_seed_mean_and_t_interval(tmp_path):
    runs = [
        make_run(tmp_path, "sal-s0", mask="saliency", seed=0, losses=[0.9, 0.7, 0.5],
                 top1={"knn": 60.0, "linear": 70.0}),
        make_run(tmp_path, "sal-s1", mask="saliency", seed=1, losses=[0.9, 0.7, 0.6],
                 top1={"knn": 64.0, "linear": 74.0}),
        make_run(tmp_path, "sal-s2", mask="saliency", seed=2, losses=[0.9, 0.7, 0.55], top1={"knn": 62.0}),
        make_run(tmp_path, "rand-s0", mask="random", seed=0, losses=[1.0, 0.8, 0.65],
                 top1={"knn": 50.0, "finetune": 81.5}, saliency=None),
    ]
    out = tmp_path / "report" / "report.md"
    summary = write_report([str(r) for r in runs], str(out))
    assert "report.md" in summary and "4 runs, 2 settings" in summary
    text = out.read_text()
    assert "Warning" not in text  # only strategy, seed and log_every (ignored) differ
    pre = _tables(text)["Pretraining"]
    assert [r["strategy"] for r in pre] == ["saliency", "random"]
    assert pre[0]["final loss (seed: value)"] == "0: 0.5000, 1: 0.6000, 2: 0.5500"
    assert pre[0]["mean"] == "0.5500" and pre[0]["n"] == "3" and pre[0]["epochs"] == "3"
    half = T2 * 0.05 / 3 ** 0.5  # s = 0.05 over three seeds
    assert pre[0]["95% CI"] == f"[{0.55 - half:.4f}, {0.55 + half:.4f}]"
    assert pre[1]["final loss (seed: value)"] == "0: 0.6500" and pre[1]["95% CI"] == "—"

    knn = _table(text, "knn")
    sal, rnd = knn
    assert sal["parameters"].startswith("ratio=0.75, cap=0.25") and sal["saliency source"] == "store (store.zarr)"
    assert sal["top-1 % (seed: value)"] == "0: 60.00, 1: 64.00, 2: 62.00"
    # [60, 64, 62]: mean 62, s = 2, half width = 4.302653 * 2 / sqrt(3) = 4.9683
    assert sal["mean"] == "62.00" and sal["95% CI"] == "[57.03, 66.97]" and sal["pretrain epoch"] == "3"
    assert rnd["top-1 % (seed: value)"] == "0: 50.00" and rnd["95% CI"] == "—" and rnd["saliency source"] == "—"
    linear = _table(text, "linear")
    assert len(linear) == 1 and linear[0]["n"] == "2" and linear[0]["mean"] == "72.00"
    half = T1 * statistics.stdev([70.0, 74.0]) / 2 ** 0.5          # 25.41
    assert linear[0]["95% CI"] == f"[{72 - half:.2f}, {72 + half:.2f}]" == "[46.59, 97.41]"
    assert _table(text, "finetune")[0]["top-1 % (seed: value)"] == "0: 81.50"
    for png in ("report-loss.png", "report-accuracy.png"):
        assert (out.parent / png).stat().st_size > 1000
        assert f"]({png})" in text


# --------------------------------------------------------------------------- item 9: never average what differs
def test_evals_with_different_settings_are_separate_rows(tmp_path):
    """The issue's case: a 90-epoch and a 5-epoch probe of one pretraining setting were one
    '50.00 ± 14.14 (n=2)' row. Each is its own row now, and the warning names the key."""
    runs = [make_run(tmp_path, "s0", mask="saliency", seed=0, losses=[0.5], top1={"linear": 60.0}, eval_epochs=90),
            make_run(tmp_path, "s1", mask="saliency", seed=1, losses=[0.5], top1={"linear": 40.0}, eval_epochs=5)]
    text = _report(tmp_path, runs)
    assert len(_tables(text)["Pretraining"]) == 1          # one pretraining setting, two seeds
    rows = _table(text, "linear")
    assert [(r["eval `epochs`"], r["n"], r["mean"]) for r in rows] == [("90", "1", "60.00"), ("5", "1", "40.00")]
    assert "50.00" not in text
    assert "Warning: the linear evaluations differ in** `epochs` (90, 5)" in text


@pytest.mark.parametrize("differ", ["compile", "eval_precision", "epochs"])
def test_precision_compile_and_epochs_split_rows(tmp_path, differ):
    a = make_run(tmp_path, "a", mask="saliency", seed=0, losses=[0.5, 0.4], top1={"knn": 60.0}, epochs=2)
    other = {"compile": {"compile": True}, "eval_precision": {"eval_precision": "bf16"},
             "epochs": {"epochs": 4, "losses": [0.5, 0.4, 0.3, 0.2]}}[differ]
    b = make_run(tmp_path, "b", mask="saliency", seed=1, top1={"knn": 62.0}, **{"losses": [0.5, 0.4], "epochs": 2,
                                                                               **other})
    text = _report(tmp_path, [a, b])
    rows = _table(text, "knn")
    assert [r["top-1 % (seed: value)"] for r in rows] == ["0: 60.00", "1: 62.00"]
    assert all(r["n"] == "1" for r in rows)
    assert len(_tables(text)["Pretraining"]) == (1 if differ == "eval_precision" else 2)


def test_execution_details_do_not_split_rows(tmp_path):
    # seeds, log_every (20 + seed), cache_images, workers, eval out and feature folders differ: still one row of n=2
    runs = [make_run(tmp_path, f"s{s}", mask="random", seed=s, losses=[0.5], top1={"knn": 50.0 + s}, saliency=None)
            for s in (0, 1)]
    rows = _table(_report(tmp_path, runs), "knn")
    assert len(rows) == 1 and rows[0]["n"] == "2"


def test_two_evals_of_one_protocol_in_a_run_are_an_error(tmp_path):
    run = make_run(tmp_path, "r", mask="random", seed=0, losses=[0.5], top1={"linear": 50.0}, saliency=None)
    write_eval(run, "linear", 55.0, folder="eval-linear-again")
    with pytest.raises(SalmaeError, match="two linear evaluations, eval-linear and eval-linear-again"):
        write_report([str(run)], str(tmp_path / "r.md"))


def test_linear_and_linear_noaug_are_different_protocols(tmp_path):
    run = make_run(tmp_path, "r", mask="random", seed=0, losses=[0.5], top1={"linear": 50.0}, saliency=None)
    write_eval(run, "linear-noaug", 45.0, eval_epochs=90)
    text = _report(tmp_path, [run])
    assert _table(text, "linear")[0]["mean"] == "50.00"
    assert _table(text, "linear-noaug")[0]["mean"] == "45.00"
    assert "without augmentation" in text


def test_the_same_seed_twice_in_one_setting_is_an_error(tmp_path):
    runs = [make_run(tmp_path, name, mask="random", seed=0, losses=[0.5], top1={}, saliency=None) for name in "ab"]
    with pytest.raises(SalmaeError, match="same setting and seed 0"):
        write_report([str(r) for r in runs], str(tmp_path / "r.md"))


def test_strategy_parameters_split_rows_without_a_warning(tmp_path):
    runs = [make_run(tmp_path, "cap25", mask="saliency", seed=0, losses=[0.5], top1={"linear": 60.0}, cap=0.25),
            make_run(tmp_path, "cap50", mask="saliency", seed=0, losses=[0.5], top1={"linear": 65.0}, cap=0.5)]
    text = _report(tmp_path, runs)
    assert "Warning" not in text
    assert [r["parameters"].split(", ")[1] for r in _table(text, "linear")] == ["cap=0.25", "cap=0.5"]


def test_report_needs_run_folders(tmp_path):
    with pytest.raises(SalmaeError, match="no config.yaml"):
        write_report([str(tmp_path)], str(tmp_path / "r.md"))


# --------------------------------------------------------------------------- item 11: paired difference to a baseline
def test_paired_difference_to_the_baseline_over_matched_seeds(tmp_path):
    sal = {0: 70.0, 1: 74.0, 2: 71.0}
    rnd = {0: 60.0, 1: 65.0, 3: 99.0}  # seed 3 has no saliency partner, seed 2 no random one
    runs = [make_run(tmp_path, f"sal-s{s}", mask="saliency", seed=s, losses=[0.5], top1={"knn": v})
            for s, v in sal.items()]
    runs += [make_run(tmp_path, f"rand-s{s}", mask="random", seed=s, losses=[0.6], top1={"knn": v}, saliency=None)
             for s, v in rnd.items()]
    # a block run evaluated differently: no random row matches its eval setting
    runs.append(make_run(tmp_path, "block-s0", mask="block", seed=0, losses=[0.6], top1={"knn": 58.0},
                         saliency=None, eval_epochs=7))
    text = _report(tmp_path, runs, baseline="random")
    rows = {r["strategy"]: r for r in _table(text, "knn")}
    # differences 10, 9: mean 9.5, s = 0.7071, half = 12.706205 * 0.7071 / sqrt(2) = 6.3531
    assert rows["saliency"]["Δ vs random (paired)"] == "+9.50 [+3.15, +15.85] (n=2)"
    assert rows["random"]["Δ vs random (paired)"] == "(baseline)"
    assert rows["block"]["Δ vs random (paired)"] == "— (no random run with the same setting)"
    assert "Δ vs random" not in _report(tmp_path / "plain", runs)


def test_runs_that_hide_another_number_of_patches_are_never_paired(tmp_path):
    """The report paired block at ratio 0.6 with random at 0.75 as a 'paired difference' (issue 25, item 7)."""
    runs = [make_run(tmp_path, f"rand-s{s}", mask="random", seed=s, losses=[0.6], top1={"knn": 60.0 + s},
                     saliency=None) for s in (0, 1)]
    runs += [make_run(tmp_path, f"block06-s{s}", mask="block", seed=s, losses=[0.6], top1={"knn": 50.0 + 2 * s},
                      saliency=None, ratio="0.6") for s in (0, 1)]
    runs += [make_run(tmp_path, f"sal075-s{s}", mask="saliency", seed=s, losses=[0.6], top1={"knn": 62.0 + s})
             for s in (0, 1)]
    rows = _table(_report(tmp_path, runs, baseline="random"), "knn")
    by_ratio = {r["strategy"].split(";")[0]: r["Δ vs random (paired)"] for r in rows}
    block = next(v for k, v in by_ratio.items() if k.startswith("block"))
    assert block == "— (no random run with the same setting)"
    saliency = next(v for k, v in by_ratio.items() if k.startswith("saliency"))
    assert saliency.startswith("+2.00 ") and saliency.endswith("(n=2)")


def test_unknown_baseline_is_a_one_line_error_and_cli_passes_it(tmp_path):
    runs = [make_run(tmp_path, "a", mask="saliency", seed=0, losses=[0.5], top1={"knn": 61.0}),
            make_run(tmp_path, "b", mask="random", seed=0, losses=[0.5], top1={"knn": 60.0}, saliency=None)]
    with pytest.raises(SalmaeError, match="--baseline grid: no run uses that mask strategy"):
        write_report([str(r) for r in runs], str(tmp_path / "r.md"), baseline="grid")
    out = tmp_path / "cli.md"
    result = CliRunner().invoke(cli, ["report", *map(str, runs), "-o", str(out), "--baseline", "random"])
    assert result.exit_code == 0, result.output
    rows = {r["strategy"]: r for r in _table(out.read_text(), "knn")}
    assert rows["saliency"]["Δ vs random (paired)"] == "+1.00 no CI (n=1)"


# --------------------------------------------------------------------------- item 10: which checkpoint was evaluated
def test_eval_of_an_older_checkpoint_is_flagged(tmp_path):
    now = b"checkpoint after epoch 3"
    stale = make_run(tmp_path, "stale", mask="random", seed=0, losses=[0.9, 0.8, 0.7], top1={"knn": 50.0},
                     saliency=None, checkpoint=now, recorded_sha="0" * 64)
    fresh = make_run(tmp_path, "fresh", mask="random", seed=1, losses=[0.9, 0.8, 0.7], top1={"knn": 52.0},
                     saliency=None, checkpoint=now, recorded_sha=sha256_file(stale / "checkpoint-latest.pth"))
    text = _report(tmp_path, [stale, fresh])
    assert _table(text, "knn")[0]["top-1 % (seed: value)"] == "0: 50.00†, 1: 52.00"
    flagged = [line for line in text.splitlines() if line.startswith("- `") and "sha256" in line]
    assert len(flagged) == 1 and "stale/eval-knn" in flagged[0] and "000000000000…" in flagged[0]


def test_results_record_the_pretrain_epoch_and_the_report_flags_further_training(tmp_path, shapes_dir,
                                                                                 shapes_pattern):
    """End to end: a 1-epoch tiny pretraining evaluated with kNN, then trained on to 2 epochs."""
    from salmae.stages import evaluate, pretrain

    tiny = {"arch.img_size": 32, "arch.patch_size": 8, "arch.embed_dim": 32, "arch.depth": 1,
            "arch.num_heads": 2, "arch.decoder_embed_dim": 32, "arch.decoder_depth": 1,
            "arch.decoder_num_heads": 2, "workers": 0, "viz_samples": 0, "optim.warmup_epochs": 1}
    run_dir = tmp_path / "run"

    def pretrain_to(epochs: int, resume: str | None):
        pretrain.run(resolve_config(pretrain.PretrainConfig, None, [f"{k}={v}" for k, v in tiny.items()],
                                    data=shapes_pattern, out=str(run_dir), device="cpu", mask="random",
                                    epochs=epochs, batch_size=16, resume=resume))

    pretrain_to(1, None)
    ckpt = run_dir / "checkpoint-latest.pth"
    evaluate.run(evaluate.EvalConfig(protocol="knn", checkpoint=str(ckpt), data=str(shapes_dir / "imagefolder"),
                                     out=str(run_dir / "eval-knn"), device="cpu", workers=0, batch_size=16))
    results = json.loads((run_dir / "eval-knn" / "results.json").read_text())
    assert results["pretrain_epoch"] == 0 and results["checkpoint_sha256"] == sha256_file(ckpt)
    assert "†" not in _report(tmp_path / "before", [run_dir])

    pretrain_to(2, "latest")
    text = _report(tmp_path / "after", [run_dir])
    row = _table(text, "knn")[0]
    assert row["pretrain epoch"] == "1" and row["top-1 % (seed: value)"].endswith("†")
    assert f"checkpoint-latest.pth is now {sha256_file(ckpt)[:12]}… (2 epochs done)" in text


def test_pretrain_epoch_of_an_official_mae_checkpoint(tmp_path):
    """MAE's main_pretrain.py saves `args` as an argparse.Namespace next to `epoch`."""
    from salmae.stages.evaluate import _pretrain_epoch

    path = tmp_path / "mae.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "epoch": 799, "args": argparse.Namespace(blr=1.5e-4)}, path)
    assert _pretrain_epoch(str(path)) == 799
    torch.save({"model": {"w": torch.zeros(2)}}, path)  # released weights: no epoch
    assert _pretrain_epoch(str(path)) is None


# --------------------------------------------------------------------------- item 11: plots
def test_accuracy_plot_shows_each_seed_and_the_mean_on_a_fitted_axis():
    fig = accuracy_figure({"kNN top-1": [SeedPoints("saliency", [60.0, 64.0, 62.0], 62.0, 4.97),
                                         SeedPoints("random", [55.0], 55.0, None)]})
    (ax,) = fig.axes
    lo, hi = ax.get_ylim()
    # fitted to the points and the interval 62 ± 4.97 (57.03..66.97): span 55..66.97 plus 10% each side
    assert (lo, hi) == pytest.approx((55 - 1.197, 66.97 + 1.197))
    hollow = sorted(float(y) for c in ax.collections if isinstance(c, PathCollection) for _, y in c.get_offsets())
    assert hollow == [55.0, 60.0, 62.0, 64.0]        # one hollow point per seed
    means = sorted(float(y) for line in ax.lines for y in line.get_ydata() if line.get_marker() == "D")
    assert means == [55.0, 62.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["saliency", "random"]


def test_fitted_ylim_pads_the_span_within_bounds():
    assert fitted_ylim([60.0, 70.0]) == pytest.approx((59.0, 71.0))
    assert fitted_ylim([60.0, 64.0]) == (59.5, 64.5)  # at least 0.5 each side
    assert fitted_ylim([70.0]) == (69.5, 70.5)
    assert fitted_ylim([-3.0, 97.0, 120.0], bounds=(0.0, 100.0)) == (0.0, 100.0)


def test_loss_curves_of_different_strategies_get_separate_panels():
    fig = loss_figure({"random": {"r-s0": [(0, 1.0), (1, 0.8)], "r-s1": [(0, 1.1), (1, 0.7)]},
                       "saliency": {"s-s0": [(0, 1.3), (1, 1.2)]}})
    assert [ax.get_title() for ax in fig.axes] == ["mask: random", "mask: saliency"]
    assert [len(ax.lines) for ax in fig.axes] == [2, 1]
    assert LOSS_CAVEAT in fig._suptitle.get_text() and "not comparable" in LOSS_CAVEAT
    assert fig.axes[1].get_ylim()[0] > 1.0             # the saliency panel has its own axis
