"""`salmae study`: settings and presets, that settings differ only in their masks, the statistics
of study.md/json, the cc3m recipes, and the `smoke` preset end to end through the CLI (resumed)."""

from __future__ import annotations

import json
import math
import re

import pytest
import yaml
from click.testing import CliRunner

from salmae.pipeline.cli import cli
from salmae.pipeline.config import config_to_dict, resolve_config
from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.steps import Steps
from salmae.pipeline.stats import (holm, holm_levels, min_detectable_effect, paired_t_test, t_half_width,
                                   t_quantile_975)
from salmae.stages import study
from salmae.stages.study_report import (checks, control_comparisons, controls_section, curve_section, load_curve,
                                        load_results, preregistration, primary_family, primary_result, summarise,
                                        summarise_curve)


def test_settings_parse_into_masks_and_caps():
    own = {"map": "own", "cap_of": "image"}
    assert study.parse_setting("random") == {"mask": "random", "cap": None, "inverse": False, **own}
    assert study.parse_setting("saliency-0.25") == {"mask": "saliency", "cap": 0.25, "inverse": False, **own}
    assert study.parse_setting("inverse-0.5") == {"mask": "saliency", "cap": 0.5, "inverse": True, **own}
    for bad in ("saliency", "saliency-0", "saliency-1.5", "sal-0.25", "saliency-x", "unknown"):
        with pytest.raises(SalmaeError, match="unknown study setting"):
            study.parse_setting(bad)


@pytest.mark.parametrize("change, match", [
    (dict(seeds=0), "seeds"), (dict(settings=["random", "random"]), "settings"),
    (dict(protocols=["probe"]), "protocols"), (dict(seeds=2, viz_seed=2), "viz_seed"),
    (dict(data="x/{0..1}.tar"), "clip_pretrained"), (dict(val_every=1), "val_every"),
    (dict(primary_protocol="finetune"), "primary_protocol"), (dict(curve_protocols=["linear"]), "curve_protocols"),
    (dict(primary_comparisons=["random"]), "primary_comparisons"), (dict(primary_comparisons=["sal-0.2"]), "unknown"),
    (dict(curve_epochs=[35]), "curve_epochs"),
    (dict(curve_settings=["saliency-0.25"]), "curve_settings"), (dict(curve_settings=["random", "block"]), "curve_settings"),
])
def test_validate_refuses_in_one_line(change, match):
    with pytest.raises(SalmaeError, match=match):
        study.validate(study.StudyConfig(**change))


def test_curve_settings_choose_which_runs_the_curve_probes():
    some = study.StudyConfig(settings=["random", "saliency-0.25", "inverse-0.25"], curve_settings=["random", "saliency-0.25"])
    study.validate(some)
    assert [s for s in some.settings if study.on_curve(some, s)] == ["random", "saliency-0.25"]
    every = study.StudyConfig(settings=["random", "inverse-0.25"])
    assert [s for s in every.settings if study.on_curve(every, s)] == ["random", "inverse-0.25"]
    assert not study.on_curve(study.StudyConfig(curve_protocols=[]), "random")


def test_presets_layer_under_config_file_and_set(tmp_path):
    with pytest.raises(SalmaeError, match="unknown study preset"):
        study.preset_values("gpu")
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"seeds": 3, "epochs": 5}))
    cfg = resolve_config(study.StudyConfig, path, ["epochs=7"], base=study.preset_values("smoke"))
    assert (cfg.preset, cfg.seeds, cfg.epochs, cfg.n_images) == ("smoke", 3, 7, 512)  # preset < file < --set
    assert study.StudyConfig().preset == "cpu"
    cpu = resolve_config(study.StudyConfig, None, [], base=study.preset_values("cpu"))
    study.validate(cpu)   # the curve's epochs and settings fit the preset's epochs and settings
    assert (cpu.settings, cpu.epochs, cpu.primary_comparisons) == (
        ["random", "saliency-0.25", "shuffled-0.25", "inverse-0.25"], 20, ["saliency-0.25"])
    assert [s for s in cpu.settings if study.on_curve(cpu, s)] == ["random", "saliency-0.25"]
    assert study.LOGREG_GRID in cpu.eval_set and cpu.curve_epochs == [10, 15]
    assert study.preset_values("cpu-full")["settings"] == study.SWEEP


def _configs(cfg, setting_a, setting_b, seed_a=0, seed_b=0, tmp_path=None):
    paths = study._paths(cfg, tmp_path)
    a = config_to_dict(study.pretrain_config(cfg, paths, setting_a, seed_a, tmp_path / "a"))
    b = config_to_dict(study.pretrain_config(cfg, paths, setting_b, seed_b, tmp_path / "b"))
    return a, b


def test_settings_differ_only_in_their_masks_and_seeds_only_in_the_seed(tmp_path):
    cfg = study.StudyConfig(out=tmp_path)
    a, b = _configs(cfg, "random", "saliency-0.5", tmp_path=tmp_path)
    assert {k for k in a if a[k] != b[k]} == {"out", "mask", "masking"}
    assert (a["mask"], b["mask"], b["masking"]["cap"], b["masking"]["inverse"]) == ("random", "saliency", 0.5, False)
    assert {k for k in a["masking"] if a["masking"][k] != b["masking"][k]} == {"cap"}
    assert a["arch"]["img_size"] == 32 and a["arch"]["patch_size"] == 4 and a["epochs"] == cfg.epochs
    _, inv = _configs(cfg, "saliency-0.25", "inverse-0.25", tmp_path=tmp_path)
    assert inv["masking"]["inverse"] is True and inv["masking"]["cap"] == 0.25
    sal, shuffled, salient = _configs(cfg, "saliency-0.25", "shuffled-0.25", tmp_path=tmp_path) + \
        _configs(cfg, "saliency-0.25", "saliency-0.25@salient", tmp_path=tmp_path)[1:]
    assert {k for k in sal["masking"] if sal["masking"][k] != shuffled["masking"][k]} == {"map"}  # same cap
    assert (shuffled["masking"]["map"], salient["masking"]["cap_of"], salient["masking"]["cap"]) == \
        ("shuffled", "salient", 0.25)
    s0, s1 = _configs(cfg, "random", "random", 0, 1, tmp_path=tmp_path)
    assert {k for k in s0 if s0[k] != s1[k]} == {"out", "seed"}
    assert a["compile"] is True and b["compile"] is True                           # the cpu preset compiles
    assert a["cache_images"] is True and cfg.seeds == 5                            # and decodes its images once
    nocache = study.StudyConfig(out=tmp_path, cache_images=False)
    assert _configs(nocache, "random", "random", tmp_path=tmp_path)[0]["cache_images"] is False
    smoke = resolve_config(study.StudyConfig, None, [], base=study.preset_values("smoke"))
    assert _configs(smoke, "random", "random", tmp_path=tmp_path)[0]["compile"] is False


def test_probes_are_the_same_for_every_setting_and_the_floor(tmp_path):
    cfg = study.StudyConfig(out=tmp_path)
    paths = study._paths(cfg, tmp_path)
    run = config_to_dict(study.eval_config(cfg, "linear-noaug", tmp_path / "runs" / "random-s0", paths, 0))
    floor = config_to_dict(study.eval_config(cfg, "linear-noaug", tmp_path / "floor" / "s0", paths, 0))
    assert {k for k in run if run[k] != floor[k]} == {"checkpoint", "out", "features"}
    assert run["features"] == str(tmp_path / "runs" / "random-s0" / "features")   # one cache per checkpoint,
    assert config_to_dict(study.eval_config(cfg, "knn", tmp_path / "runs" / "random-s0", paths, 0))["features"] \
        == run["features"]                                                          # shared by its probes
    assert run["linear"]["augment"] is False and run["global_pool"] is True and run["global_batch"] == 256
    assert run["epochs"] == 30 and run["crop_pct"] == 1.0 and run["data"].endswith("eval-data/imagefolder")
    knn = config_to_dict(study.eval_config(cfg, "knn", tmp_path / "r", paths, 3))
    assert knn["protocol"] == "knn" and knn["epochs"] is None and knn["seed"] == 3


@pytest.mark.parametrize("name", ["configs/cc3m-vitb.yaml", "configs/cc3m-vitb-sweep.yaml"])
def test_cc3m_recipes_resolve_to_mae_settings(name, tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cfg = resolve_config(study.StudyConfig, root / name, [], base=study.preset_values("cpu"))
    study.validate(cfg)
    assert {"random", "saliency-0.25"} <= set(cfg.settings) and "linear" in cfg.protocols
    paths = study._paths(cfg, tmp_path)
    pre = study.pretrain_config(cfg, paths, "saliency-0.25", 0, tmp_path / "r")
    # warmup scaled to the 100-epoch schedule (MAE's 40 is for 800/1600 epochs); the CAM the CPU study validated
    assert (pre.model, pre.epochs, pre.optim.blr, pre.optim.accum_iter, pre.optim.warmup_epochs) == ("base", 100, 1.5e-4, 8, 10)
    assert pre.masking.cap == 0.25 and pre.masking.ratio == "0.75" and pre.arch.img_size is None
    assert cfg.cam == "hirescam" and "inspect" in (root / name).read_text()
    lin = study.eval_config(cfg, "linear", tmp_path / "r", paths, 0)
    assert (lin.epochs, lin.global_batch, lin.linear.blr, lin.global_pool, lin.crop_pct) == (None, None, 0.1, False, 0.875)
    assert lin.linear.augment is True and lin.data == "imagenet"
    if "finetune" in cfg.protocols:
        assert study.eval_config(cfg, "finetune", tmp_path / "r", paths, 0).global_pool is None  # the recipe pools


def test_cc3m_sweep_states_the_warmup_40_variant_as_a_command_that_resolves(tmp_path):
    """The sweep's header holds MAE's 40-epoch warmup as a sensitivity variant: its --set items resolve."""
    import shlex
    from pathlib import Path

    recipe = Path(__file__).resolve().parent.parent / "configs" / "cc3m-vitb-sweep.yaml"
    lines = recipe.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "--out runs/study/cc3m-vitb-sweep-warmup40" in line) - 1
    command = " ".join(line.lstrip("# ").rstrip("\\") for line in lines[start:start + 3])
    words = shlex.split(command)
    assert words[:6] == ["torchrun", "--standalone", "--nproc-per-node", "8", "-m", "salmae"]
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    cfg = resolve_config(study.StudyConfig, recipe, sets, base=study.preset_values("cpu"))
    study.validate(cfg)
    pre = study.pretrain_config(cfg, study._paths(cfg, tmp_path), "saliency-0.25", 0, tmp_path / "r")
    assert cfg.settings == ["random", "saliency-0.25"] and (pre.optim.warmup_epochs, pre.optim.accum_iter) == (40, 8)


def test_summary_means_intervals_and_paired_differences():
    table = {"random": {"linear-noaug": {0: 40.0, 1: 42.0, 2: 41.0}},
             "saliency-0.25": {"linear-noaug": {0: 41.0, 1: 44.0, 2: 41.5}},
             "saliency-0.75": {"linear-noaug": {0: 30.0, 1: 36.0}},
             "floor": {"linear-noaug": {0: 20.0, 1: 21.0, 2: 19.0}}}
    rows = summarise(table)
    r = rows["random"]["linear-noaug"]
    assert r["mean"] == pytest.approx(41.0) and r["ci95"] == pytest.approx(t_quantile_975(2) * 1.0 / math.sqrt(3))
    assert "diff_to_baseline" not in r and r["values"] == {"0": 40.0, "1": 42.0, "2": 41.0}
    d = rows["saliency-0.25"]["linear-noaug"]["diff_to_baseline"]
    sd = math.sqrt(sum((x - 7 / 6) ** 2 for x in (1.0, 2.0, 0.5)) / 2)
    assert d["n"] == 3 and d["mean"] == pytest.approx(7 / 6) and d["ci95"] == pytest.approx(t_quantile_975(2) * sd / math.sqrt(3))
    d75 = rows["saliency-0.75"]["linear-noaug"]["diff_to_baseline"]
    assert d75["n"] == 2 and d75["mean"] == pytest.approx(((30 - 40) + (36 - 42)) / 2)  # matched seeds only

    verdicts = {(c["name"], c["protocol"]): (c["verdict"], c["value"]) for c in checks(rows, ["linear-noaug"], classes=8)}
    assert verdicts[("random >= 3x chance", "linear-noaug")] == ("PASS", 41.0)
    assert verdicts[("random - floor >= 10 points", "linear-noaug")] == ("PASS", pytest.approx(21.0))
    assert verdicts[("saliency-0.25 - random: 95% half width <= 2", "linear-noaug")][0] == "PASS"   # 1.90
    assert verdicts[("saliency-0.75 - random: 95% half width <= 2", "linear-noaug")][0] == "MISS"   # 12.7 * 2 / sqrt 2
    assert checks(rows, ["linear-noaug"], classes=3)[0]["verdict"] == "MISS"   # 41 < 3 x 33.3
    assert checks(rows, ["knn"], classes=8) == []                               # targets are on linear probes


def test_primary_family_is_holm_corrected_with_its_mde_and_share_of_the_gain():
    base = {0: 40.0, 1: 42.0, 2: 41.0, 3: 40.5}
    table = {"random": {"logreg": base},
             "saliency-0.25": {"logreg": {s: v + d for (s, v), d in zip(base.items(), (2.0, 2.5, 1.5, 2.2))}},
             "saliency-0.75": {"logreg": {s: v + d for (s, v), d in zip(base.items(), (0.5, -1.0, 1.0, -0.3))}},
             "inverse-0.25": {"logreg": {0: 39.0}},                               # one seed: no test
             "floor": {"logreg": {0: 30.0, 1: 31.0, 2: 29.0, 3: 30.0}}}
    rows = summarise(table)
    family = primary_family(table, rows, "logreg", ["saliency-0.25", "saliency-0.75", "inverse-0.25", "block"])
    assert [f["setting"] for f in family] == ["saliency-0.25", "saliency-0.75", "inverse-0.25", "block"]
    a, b, c, missing = family
    assert (missing["n"], missing["verdict"]) == (0, "not run (not among the study's settings)")
    pa, pb = (paired_t_test(table[s]["logreg"], base).p for s in ("saliency-0.25", "saliency-0.75"))
    assert pa < 0.01 and pb > 0.3                                                  # a clear gain, and none
    assert [a["p_holm"], b["p_holm"]] == pytest.approx(holm([pa, pb, 1.0, 1.0])[:2])  # the declared family: m = 4
    assert (a["holm_level"], b["holm_level"]) == pytest.approx((0.05 / 4, 0.05 / 3))  # steps 1 and 2
    assert holm_levels([pa, pb, 1.0, 1.0])[:2] == pytest.approx([a["holm_level"], b["holm_level"]])
    sd = math.sqrt(0.53 / 3)                                                       # diffs 2, 2.5, 1.5, 2.2: mean 2.05
    assert a["mean"] == pytest.approx(2.05) and a["sd"] == pytest.approx(sd)
    assert a["holm_ci"] == pytest.approx(t_half_width(sd, 4, 0.05 / 4)) and a["holm_ci"] > a["ci95"]
    assert a["mde80"] == pytest.approx(min_detectable_effect(sd, 4))
    gain = 40.875 - 30.0                                                           # what pretraining adds
    assert a["of_gain"]["gain"] == pytest.approx(gain) and a["of_gain"]["mean"] == pytest.approx(2.05 / gain)
    assert a["verdict"] == "above random" and b["verdict"] == "cannot tell"
    assert (c["n"], c["p_holm"], c["verdict"]) == (1, None, "no test (fewer than 2 paired seeds)")
    d = rows["saliency-0.25"]["logreg"]["diff_to_baseline"]                       # the per-protocol tables' column
    assert d["of_gain"]["mean"] == pytest.approx(2.05 / gain) and d["mde80"] == pytest.approx(a["mde80"])
    assert d["of_gain"]["ci95"] == pytest.approx(d["ci95"] / gain)

    md = "\n".join(primary_result({"primary": {"protocol": "logreg", "alpha": 0.05, "power": 0.8, "family": family}}))
    assert "## Primary result: `logreg`, Holm-corrected" in md and "(98.75%)" in md   # 1 - 0.05/4
    assert f"| +19% ± {a['holm_ci'] / gain:.0%} of 10.9 |" in md and "cannot tell" in md
    cfg = study.StudyConfig(primary_comparisons=["saliency-0.25"])
    declared = "\n".join(preregistration(cfg))
    assert "**Primary protocol: `logreg`.** The others (`knn`, `linear-noaug`) are secondary" in declared
    assert "one family of 1): `saliency-0.25` − `random`" in declared and "80% power" in declared


def test_controls_pair_the_primary_setting_with_its_same_cap_controls_only():
    base = {0: 40.0, 1: 42.0, 2: 41.0}
    shift = lambda *d: {s: v + x for (s, v), x in zip(base.items(), d)}   # noqa: E731
    table = {"random": {"logreg": base}, "saliency-0.25": {"logreg": shift(2.0, 3.0, 1.0)},
             "shuffled-0.25": {"logreg": shift(1.0, 1.0, 1.0)}, "inverse-0.25": {"logreg": {0: 39.0, 1: 41.0}},
             "shuffled-0.5": {"logreg": base}, "saliency-0.25@salient": {"logreg": base},   # other caps: not controls
             "floor": {"logreg": {0: 30.0, 1: 30.0, 2: 30.0}}}
    hidden = {"saliency-0.25": {"object_hidden": 0.799}, "shuffled-0.25": {"object_hidden": 0.769}}
    found = control_comparisons(table, "logreg", ["saliency-0.25", "block"], hidden)
    assert [(c["setting"], c["control"], c["controls_for"]) for c in found] == [
        ("saliency-0.25", "shuffled-0.25", "the map's content"), ("saliency-0.25", "inverse-0.25", "direction")]
    shuffled, inverse = found
    assert shuffled["to_baseline"] == {"n": 3, "mean": pytest.approx(1.0), "ci95": 0.0}
    d = shuffled["setting_minus_control"]                                   # diffs 1, 2, 0: mean 1, sd 1
    assert (d["n"], d["mean"]) == (3, pytest.approx(1.0)) and d["ci95"] == pytest.approx(t_quantile_975(2) / math.sqrt(3))
    assert inverse["to_baseline"]["n"] == 2 and inverse["to_baseline"]["mean"] == pytest.approx(-1.0)
    assert inverse["setting_minus_control"]["mean"] == pytest.approx(3.5)  # seeds 0 and 1: 42 - 39, 45 - 41
    assert shuffled["object_hidden"] == {"saliency-0.25": 0.799, "shuffled-0.25": 0.769}
    assert inverse["object_hidden"] == {"saliency-0.25": 0.799}
    md = "\n".join(controls_section({"primary": {"protocol": "logreg", "controls": found}}))
    assert "## Controls: the primary setting against its controls, `logreg` (descriptive)" in md
    assert "| `saliency-0.25` | `shuffled-0.25` | the map's content | 79.9% / 76.9% | +1.0 ± 0.0 (n=3) |" in md
    assert "| `saliency-0.25` | `inverse-0.25` | direction | 79.9% / – | -1.0 ± " in md
    assert control_comparisons(table, "logreg", ["shuffled-0.25"]) == []      # a control has no controls
    assert controls_section({"primary": {"protocol": "logreg", "controls": []}}) == []


def _write_eval(folder, protocol, top1, pretrain_epoch):
    path = folder / f"eval-{protocol}" / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"protocol": protocol, "top1": top1, "pretrain_epoch": pretrain_epoch}))


def test_the_curve_reads_every_probed_checkpoint_by_its_epoch(tmp_path):
    for seed, (r5, r10, s5, s10) in enumerate(((30.0, 35.0, 28.0, 35.5), (31.0, 36.0, 29.5, 36.0))):
        run = tmp_path / "runs" / f"random-s{seed}"
        _write_eval(run, "logreg", r10, 9)                                        # the run's own eval: epoch 10
        _write_eval(run / "curve" / "epoch-0005", "logreg", r5, 4)
        sal = tmp_path / "runs" / f"saliency-0.25-s{seed}"
        _write_eval(sal, "logreg", s10, 9)
        _write_eval(sal / "curve" / "epoch-0005", "logreg", s5, 4)
        _write_eval(tmp_path / "floor" / f"s{seed}", "logreg", 20.0 + seed, -1)
    curve = load_curve(tmp_path, ["random", "saliency-0.25"], ["logreg"], seeds=2)
    assert curve["logreg"]["random"] == {5: {0: 30.0, 1: 31.0}, 10: {0: 35.0, 1: 36.0}}
    assert curve["logreg"]["floor"] == {0: {0: 20.0, 1: 21.0}}
    summary = summarise_curve(curve)["logreg"]
    assert sorted(summary) == [0, 5, 10]
    assert summary[5]["saliency-0.25"]["diff_to_baseline"]["mean"] == pytest.approx(-1.75)   # -2, -1.5
    assert summary[10]["random"]["mean"] == pytest.approx(35.5)
    cfg = study.StudyConfig(settings=["random", "saliency-0.25"])
    text = "\n".join(curve_section(cfg, {"curve": {"logreg": {str(e): v for e, v in summary.items()}}}, None))
    assert "| 0 (untrained) | 20.5 ± 6.4 | 0 |" in text
    assert "| 5 | 30.5 ± 6.4 | −" not in text and "| 5 | 30.5 ± 6.4 | -1.8 ± 3.2 (n=2) |" in text
    assert text.index("| 5 |") < text.index("| 10 |") and "Only the last epoch" not in text
    for name in ("checkpoint-0004.pth", "checkpoint-0009.pth", "checkpoint-latest.pth", "checkpoint-0019.pth"):
        (tmp_path / name).touch()
    assert study.saved_checkpoints(tmp_path, before=20) == [(5, tmp_path / "checkpoint-0004.pth"),
                                                            (10, tmp_path / "checkpoint-0009.pth")]
    assert [e for e, _ in study.saved_checkpoints(tmp_path, before=35)] == [5, 10, 20]
    cfg = study.StudyConfig(epochs=35, curve_epochs=[20, 5])
    assert study.curve_checkpoints(cfg, tmp_path) == [(5, tmp_path / "checkpoint-0004.pth"),
                                                       (20, tmp_path / "checkpoint-0019.pth")]
    with pytest.raises(SalmaeError, match=r"no checkpoint-0014.pth for curve_epochs \[15\]"):
        study.curve_checkpoints(study.StudyConfig(epochs=35, curve_epochs=[15]), tmp_path)


def test_delta_figure_draws_each_setting_against_the_epoch():
    from salmae.pipeline.figures.plots import CurvePoint, delta_epoch_figure

    fig = delta_epoch_figure({"logreg": {"saliency-0.25": [CurvePoint(5, -1.0, 0.5), CurvePoint(10, 0.5, None)],
                                         "saliency-0.75": [CurvePoint(5, -3.0, 1.0)]}})
    ax = fig.axes[0]
    bars = {c.get_label(): c.lines[0] for c in ax.containers}                       # errorbar: (data line, caps, bars)
    assert list(bars["saliency-0.25"].get_ydata()) == [-1.0, 0.5] and list(bars["saliency-0.75"].get_ydata()) == [-3.0]
    assert [round(x) for x in bars["saliency-0.25"].get_xdata()] == [5, 10]
    zero = [ln for ln in ax.lines if ln.get_label() == "random"]
    assert list(zero[0].get_ydata()) == [0.0, 0.0] and ax.get_xlabel() == "pretraining epoch"
    assert ax.get_ylim()[0] < -4.0                                                  # the interval is in view


def test_load_results_reads_runs_and_floor(tmp_path):
    for folder, top1 in (("runs/random-s0", 30.0), ("runs/random-s1", 32.5), ("floor/s0", 20.0)):
        path = tmp_path / folder / "eval-knn" / "results.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"protocol": "knn", "top1": top1}))
    table = load_results(tmp_path, ["random", "block"], ["knn"], seeds=2, floor=True)
    assert table == {"random": {"knn": {0: 30.0, 1: 32.5}}, "block": {"knn": {}}, "floor": {"knn": {0: 20.0}}}


def test_cap_figure_draws_means_against_caps():
    from salmae.pipeline.figures.plots import cap_figure

    fig = cap_figure({"knn": {"random": (0.0, {0: 30.0, 1: 32.0}), "saliency-0.25": (0.25, {0: 33.0, 1: 35.0})}},
                     {"knn": {"floor": {0: 20.0, 1: 21.0}}}, chance=12.5)
    ax = fig.axes[0]
    mean_line = [ln for ln in ax.lines if list(ln.get_xdata()) == [0.0, 0.25]][0]
    assert list(mean_line.get_ydata()) == [31.0, 34.0]
    assert any(list(ln.get_ydata()) == [20.5, 20.5] for ln in ax.lines)       # the floor's mean, dashed
    assert ax.get_xlabel() == "saliency cap (0 = random)"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "floor" in labels and "chance" not in labels                         # 12.5 lies below the fitted range
    near = cap_figure({"knn": {"random": (0.0, {0: 14.0, 1: 15.0})}}, {}, chance=12.5).axes[0]
    assert "chance" in [t.get_text() for t in near.get_legend().get_texts()]


def test_time_left_counts_every_per_seed_step_over_the_runs_pretrained():
    seconds = {"data": 5.0, "eval-data": 17.0, "clip": 150.0, "saliency": 11.0, "inspect": 3.0,   # set-up: not counted
               "floor-init-s0": 1.0, "eval-knn-floor-s0": 59.0,
               "pretrain-random-s0": 600.0, "eval-knn-random-s0": 140.0, "curve-logreg-random-s0-e10": 100.0,
               "pretrain-inverse-0.25-s0": 700.0, "eval-knn-inverse-0.25-s0": 200.0}
    # (1 + 59 + 600 + 140 + 100 + 700 + 200) / 2 runs = 900 s a run; 6 runs left of 8
    assert study.time_left_text(seconds, n_runs=8) == "; about 1h30m00s left at 15m00s a run so far"
    assert study.time_left_text({"data": 5.0, "floor-init-s0": 1.0}, n_runs=8) == ""           # no run yet
    assert study.time_left_text(seconds, n_runs=2) == ""                                       # every run pretrained


def test_smoke_preset_runs_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "smoke"
    result = CliRunner().invoke(cli, ["study", "--preset", "smoke", "--out", str(out)])
    assert result.exit_code == 0, result.output
    settings = study.PRESETS["smoke"]["settings"]
    data = json.loads((out / "study.json").read_text())
    assert data["preset"] == "smoke" and list(data["rows"]) == settings + ["floor"]
    for name, row in data["rows"].items():
        folder = out / "floor" / "s0" if name == "floor" else out / "runs" / f"{name}-s0"
        for protocol in ("knn", "linear-noaug", "logreg"):
            (seed, top1), = row[protocol]["values"].items()
            results = json.loads((folder / f"eval-{protocol}" / "results.json").read_text())
            assert seed == "0" and top1 == results["top1"] and row[protocol]["mean"] == top1
            assert row[protocol]["ci95"] is None                                   # one seed: no interval
    assert data["rows"]["saliency-0.25"]["knn"]["diff_to_baseline"]["n"] == 1
    assert data["classes"] == 8 and data["chance"] == 12.5
    assert {c["name"] for c in data["checks"]} >= {"random >= 3x chance", "random - floor >= 10 points"}
    assert data["stage1"]["n"] == 512                                            # every pretraining image's map
    md = (out / "study.md").read_text()
    assert md.index("## Hypothesis") < md.index("## Pre-registered analysis") < md.index("## Manipulation check") \
        < md.index("## Δ to random against the pretraining epoch") < md.index("## Primary result") \
        < md.index("## Controls") < md.index("## `knn` top-1 (%) (secondary)") \
        < md.index("## `logreg` top-1 (%) (primary)")
    (control,) = data["primary"]["controls"]                                # inverse-0.25 is saliency-0.25's control
    assert (control["setting"], control["control"]) == ("saliency-0.25", "inverse-0.25")
    logreg = {s: data["rows"][s]["logreg"]["values"]["0"] for s in ("random", "saliency-0.25", "inverse-0.25")}
    assert control["to_baseline"]["mean"] == pytest.approx(logreg["inverse-0.25"] - logreg["random"])
    assert control["setting_minus_control"]["mean"] == pytest.approx(logreg["saliency-0.25"] - logreg["inverse-0.25"])
    assert "**Primary protocol: `logreg`.**" in md and "one family of 1): `saliency-0.25` − `random`" in md
    (family,) = data["primary"]["family"]
    assert (data["primary"]["protocol"], family["setting"], family["n"]) == ("logreg", "saliency-0.25", 1)
    assert family["verdict"] == "no test (fewer than 2 paired seeds)" and family["p_holm"] is None
    lr = json.loads((out / "runs" / "random-s0" / "eval-logreg" / "results.json").read_text())["logreg"]
    assert lr["converged"] and f"{lr['l2']:g}" in lr["holdout_top1"]
    # the curve: stage 2 saved a checkpoint after epoch 1 (save_every=1), probed with logreg into curve/epoch-0001
    point = out / "runs" / "saliency-0.25-s0" / "curve" / "epoch-0001"
    assert json.loads((point / "eval-logreg" / "results.json").read_text())["pretrain_epoch"] == 0
    assert sorted(p.name for p in (point / "features").iterdir()) == ["features-train.pt", "features-val.pt"]
    assert sorted(data["curve"]["logreg"], key=int) == ["0", "1", "2"]
    at1 = data["curve"]["logreg"]["1"]["saliency-0.25"]["diff_to_baseline"]
    assert at1["n"] == 1 and at1["mean"] == pytest.approx(
        json.loads((point / "eval-logreg" / "results.json").read_text())["top1"]
        - json.loads((out / "runs" / "random-s0" / "curve" / "epoch-0001" / "eval-logreg" / "results.json")
                     .read_text())["top1"])
    assert md.index("## Δ to random against the pretraining epoch") < md.index("delta_vs_epoch.png")
    assert "| 0 (untrained) |" in md and "\n| 1 | " in md and "\n| 2 | " in md
    assert (out / "delta_vs_epoch.png").stat().st_size > 0
    assert f"over 512 maps: **{data['stage1']['pointing_game']:.3f}**" in md
    assert (out / "accuracy_vs_cap.png").stat().st_size > 0
    # the study's own log holds its steps after the stages' logs took over, and each run's place with the time left
    log = (out / "run.log").read_text()
    assert "study: run 1 of 4 (random, seed 0)\n" in log and "study: eval-logreg-amr-capped-s0 ..." in log
    assert re.search(r"study: run 4 of 4 \(amr-capped, seed 0\); about [\dhms]+ left at [\dhms]+ a run so far\n", log)
    recorded = Steps(out, "study").recorded_seconds()
    assert len(recorded) == len(list((out / ".done").glob("*.json"))) and recorded["pretrain-random-s0"] > 0
    masks = {s: yaml.safe_load((out / "runs" / f"{s}-s0" / "config.yaml").read_text()) for s in settings}
    assert [masks[s]["mask"] for s in settings] == ["random", "saliency", "saliency", "amr-capped"]
    assert masks["inverse-0.25"]["masking"]["inverse"] is True and masks["saliency-0.25"]["masking"]["cap"] == 0.25
    # the manipulation check of every run, per epoch, and the last epoch's in the pretrain step's marker
    from salmae.pipeline.pretrain.object_check import read_object_check
    for s in settings:
        epochs = read_object_check(out / "runs" / f"{s}-s0")
        marker = json.loads((out / ".done" / f"pretrain-{s}-s0.json").read_text())["result"]["object_check"]
        assert [e["epoch"] for e in epochs] == [0, 1] and marker == {k: epochs[-1][k] for k in marker}
        shown = data["manipulation"][s]                                      # study.json and study.md beside it
        assert shown["n"] == 1 and shown["object_hidden"] == pytest.approx(epochs[-1]["object_hidden"])
        assert (f"| {s} | {100 * shown['object_hidden']:.1f}% | {100 * shown['object_seen']:.1f}% | "
                f"{100 * shown['object_all_hidden']:.1f}% | {shown['object_patches']:.1f} | 1 |") in md
    assert md.index("## Manipulation check") < md.index("## Primary result")
    assert all(masks[s]["save_every"] == 1 for s in settings)
    for folder in (out / "runs" / "random-s0", out / "floor" / "s0"):             # both probes, one extraction
        assert sorted(p.name for p in (folder / "features").iterdir()) == ["features-train.pt", "features-val.pt"]
        assert not list(folder.glob("eval-*/features-*.pt"))
        assert "features reused from" in (folder / "eval-linear-noaug" / "run.log").read_text()

    # a killed study: one probe and the report lost; the rerun redoes that probe only
    markers = {p.name: p.stat().st_mtime_ns for p in (out / ".done").iterdir()}
    (out / ".done" / "eval-knn-amr-capped-s0.json").unlink()
    (out / "study.md").unlink()
    again = CliRunner().invoke(cli, ["study", "--preset", "smoke", "--out", str(out)])
    assert again.exit_code == 0, again.output
    after = {p.name: p.stat().st_mtime_ns for p in (out / ".done").iterdir()}
    assert set(after) == set(markers)
    assert [n for n in after if after[n] != markers[n]] == ["eval-knn-amr-capped-s0.json"]
    assert json.loads((out / "study.json").read_text())["rows"]["random"] == data["rows"]["random"]
    assert (out / "study.md").is_file()
    assert (out / "run.log").read_text().count("study: run ") == 4                 # every run was already done

    # a rerun with other epochs would skip the finished runs and report them as longer ones: refused
    saved = (out / "config.yaml").read_text()
    changed = CliRunner().invoke(cli, ["study", "--preset", "smoke", "--out", str(out), "--set", "epochs=3"])
    assert changed.exit_code == 2 and "epochs: 2 -> 3" in changed.output and "use a new --out" in changed.output
    assert (out / "config.yaml").read_text() == saved


def test_a_rerun_may_add_seeds_and_settings_but_not_change_the_finished_steps(tmp_path):
    from salmae.pipeline.steps import record_config

    def saved():
        return yaml.safe_load((tmp_path / "config.yaml").read_text())

    record_config(tmp_path, study.StudyConfig(out=tmp_path, seeds=2), study.RESUME_MAY_CHANGE, "the study")
    later = study.StudyConfig(out=tmp_path, seeds=4, epochs=30, blr=1e-3, settings=["random", "block"])
    record_config(tmp_path, later, study.RESUME_MAY_CHANGE, "the study")    # no step finished yet: saved
    assert (saved()["epochs"], saved()["seeds"]) == (30, 4)
    (tmp_path / ".done").mkdir()
    changed = study.StudyConfig(out=tmp_path, seeds=4, epochs=25, blr=1.5e-3, settings=["random"], eval_images=99)
    with pytest.raises(SalmaeError) as refused:
        record_config(tmp_path, changed, study.RESUME_MAY_CHANGE, "the study")
    assert str(refused.value).count("->") == 3 and "blr: 0.001 -> 0.0015" in str(refused.value)
    assert "epochs: 30 -> 25" in str(refused.value) and "eval_images: 26216 -> 99" in str(refused.value)
    assert "\n" not in str(refused.value) and saved()["epochs"] == 30                 # config.yaml untouched
    more = study.StudyConfig(out=tmp_path, seeds=6, epochs=30, blr=1e-3, settings=["random", "block", "grid"],
                             preset="cpu-full", workers=2)
    record_config(tmp_path, more, study.RESUME_MAY_CHANGE, "the study")             # only adds steps
    assert (saved()["seeds"], saved()["preset"]) == (6, "cpu-full")


def test_pretrain_set_reaches_the_runs_and_the_floor(tmp_path):
    from salmae.pipeline.checkpoint import load_checkpoint

    cfg = study.StudyConfig(out=tmp_path, pretrain_set=["arch.depth=2", "optim.warmup_epochs=3"])
    paths = study._paths(cfg, tmp_path)
    pre = study.pretrain_config(cfg, paths, "saliency-0.25", 0, tmp_path / "r")
    assert (pre.arch.depth, pre.arch.img_size, pre.arch.patch_size, pre.optim.warmup_epochs) == (2, 32, 4, 3)
    study._untrained_checkpoint(cfg, paths, 0, tmp_path / "floor")
    args = load_checkpoint(tmp_path / "floor" / "checkpoint-latest.pth")["config"]["model_args"]
    assert (args["depth"], args["img_size"], args["patch_size"], args["decoder_depth"]) == (2, 32, 4, 1)
