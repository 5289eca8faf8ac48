"""The bench's timing helpers and BENCHMARKS.md writer on tiny inputs (the real benchmarks never run here)."""

from __future__ import annotations

import json

import pytest

from salmae.pipeline.errors import SalmaeError
from salmae.stages import bench
from salmae.stages.bench import Row, Timing, report, suite

REQUIRED_IDS = {"saliency.fast_over_forward", "pretrain.step_saliency_over_random", "pretrain.visible_over_full",
                "pretrain.loader_with_over_without", "eval.linear_cached_over_uncached"}


def test_time_median_runs_warmup_then_repeats_and_reports_median():
    calls = []
    t = bench.time_median(lambda: calls.append(1), repeats=5, warmup=2)
    assert len(calls) == 7 and len(t.seconds) == 5
    assert all(s >= 0 for s in t.seconds) and t.min <= t.median <= t.max


def test_timing_statistics_and_paired_ratio():
    a, b = Timing([2.0, 4.0, 3.0]), Timing([1.0, 1.0, 2.0])
    assert (a.median, a.min, a.max) == (3.0, 2.0, 4.0)
    med, lo, hi = bench.paired_ratio(a, b)
    assert med == pytest.approx(3.0) and (lo, hi) == (1.5, 4.0)   # per-repeat ratios 2, 4, 1.5


def test_time_interleaved_alternates_the_paths():
    order = []
    times = bench.time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                                   repeats=3, warmup=1)
    assert order == ["a", "b"] * 4 and set(times) == {"a", "b"} and len(times["a"].seconds) == 3


def test_repeats_below_one_is_an_error():
    with pytest.raises(SalmaeError, match="--repeats"):
        bench.time_median(lambda: None, repeats=0)


@pytest.mark.parametrize("value,target,verdict", [
    (0.85, "≥ 0.8", "PASS"), (0.79, "≥ 0.8", "MISS"), (1.02, "≤ 1.02", "PASS"), (1.03, "≤ 1.02", "MISS"),
    (899, "≤ 900 s", "PASS"), (0.3, "≈ 0.3 (reference)", "—"), (1.0, "—", "—")])
def test_judge(value, target, verdict):
    assert bench.judge(value, target) == verdict


def test_ratio_row_and_formatting():
    row = bench.ratio_row("pretrain.step_saliency_over_random", "step", (0.98765, 0.9, 1.1), "≤ 1.02", "tiny")
    assert row.value == "0.988 (0.900–1.100)" and row.verdict == "PASS"
    assert (row.section, row.id, row.number, row.low, row.high, row.unit) == \
        ("pretrain", "pretrain.step_saliency_over_random", 0.98765, 0.9, 1.1, "ratio")
    t = Timing([0.5, 0.25, 2.0])
    assert bench.fmt_time(t, unit="ms") == "500 (250–2000) ms"
    assert bench.fmt_time(t, per=4) == "0.125 (0.0625–0.5) s"
    assert bench.fmt_rate(Timing([0.004, 0.002, 0.008]), 10) == "2500 (1250–5000) img/s"
    assert bench.fmt_rate(t, 10) == "20 (5–40) img/s"


def test_markdown_table_has_header_one_line_per_row_and_escapes_pipes():
    rows = [Row("saliency", "fast ÷ forward", "0.900 (0.850–0.950)", "≥ 0.8", "PASS", "batch 8"),
            Row("demo", "wall time", "not run", detail="a | b")]
    lines = bench.markdown_table(rows).splitlines()
    assert lines[0].startswith("| Stage | Figure |") and set(lines[1]) <= {"|", "-"}
    assert lines[2] == "| saliency | fast ÷ forward | 0.900 (0.850–0.950) | ≥ 0.8 | PASS | batch 8 |"
    assert lines[3].endswith("| — | — | a \\| b |") and len(lines) == 4
    assert all(line.count("|") - line.count("\\|") == 7 for line in lines)


def test_merge_blocks_replaces_named_blocks_keeps_other_text_and_appends_new():
    old = "intro\n\n" + bench.block("saliency", "old s1") + "\nnotes kept\n" + bench.block("eval", "old s3")
    merged = bench.merge_blocks(old, {"eval": bench.block("eval", "new s3"), "demo": bench.block("demo", "d")})
    assert "old s1" in merged and "notes kept" in merged and merged.startswith("intro")
    assert "old s3" not in merged and "new s3" in merged and merged.rstrip().endswith("<!-- /bench:demo -->")
    assert bench.merge_blocks("", {"a": bench.block("a", "x")}) == bench.block("a", "x")


def test_demo_row_reads_demo_time_or_says_not_run(tmp_path):
    missing = bench.demo_row(tmp_path / "none.json")
    assert missing.value == "not run" and missing.verdict == "—"
    path = tmp_path / "demo_time.json"
    path.write_text(json.dumps({"seconds_this_invocation": 612.4, "steps": {"shapes": 3.0}}))
    row = bench.demo_row(path)
    assert row.value == "612 s" and row.verdict == "PASS"


def test_unknown_section_is_an_error(tmp_path):
    with pytest.raises(SalmaeError, match="unknown bench"):
        bench.run_bench("stage9", out=str(tmp_path / "B.md"))


def test_figure_record_carries_the_number_target_and_verdict():
    row = bench.ratio_row("eval.linear_cached_over_uncached", "linear", (0.08, 0.05, 0.12), "≤ 0.1", "d")
    rec = report.figure_record(row, "2026-01-01 00:00:00 UTC", quick=True)
    assert rec["id"] == "eval.linear_cached_over_uncached" and rec["section"] == "eval"
    assert (rec["value"], rec["low"], rec["high"], rec["unit"]) == (0.08, 0.05, 0.12, "ratio")
    assert (rec["target"], rec["verdict"], rec["text"]) == ("≤ 0.1", "PASS", "0.080 (0.050–0.120)")
    assert rec["quick"] is True and rec["measured"].startswith("2026-01-01")
    with pytest.raises(ValueError, match="no id"):
        report.figure_record(Row("demo", "wall", "1 s"), "now", quick=False)


def test_merge_figures_replaces_by_id_keeps_the_others_and_appends_new():
    old = {"machine": {"CPU": "old"}, "figures": [
        {"id": "saliency.fast_over_forward", "value": 0.9}, {"id": "eval.linear_cached_over_uncached", "value": 0.5}]}
    rows = [bench.ratio_row("eval.linear_cached_over_uncached", "linear", (0.07, 0.06, 0.08), "≤ 0.1", ""),
            Row("demo", "wall", "600 s", "≤ 900 s", "PASS", id="demo.wall_s", number=600.0, unit="s")]
    merged = report.merge_figures(old, rows, "today", quick=False, machine={"CPU": "new"})
    assert [f["id"] for f in merged["figures"]] == ["saliency.fast_over_forward",
                                                    "eval.linear_cached_over_uncached", "demo.wall_s"]
    assert [f["value"] for f in merged["figures"]] == [0.9, 0.07, 600.0]
    assert merged["machine"] == {"CPU": "new"}
    json.dumps(merged)   # serialisable as it stands
    twice = [rows[0], rows[0]]
    with pytest.raises(ValueError, match="repeat"):
        report.merge_figures({}, twice, "today", quick=False)


def test_run_bench_json_merges_with_an_earlier_file(tmp_path, monkeypatch):
    """The suite's wiring: section rows + the demo row land in --json, earlier figures of other sections stay.

    The eval section is replaced by a fixed row here (the real one takes ~20 s; the slow test runs it).
    """
    monkeypatch.setitem(suite.RUNNERS, "eval", lambda ws, repeats, device: [
        bench.ratio_row("eval.linear_cached_over_uncached", "linear", (0.2, 0.1, 0.3), "≤ 0.1", "fixed")])
    monkeypatch.chdir(tmp_path)          # no runs/demo/demo_time.json here: the demo row says "not run"
    out = tmp_path / "figures.json"
    out.write_text(json.dumps({"figures": [{"id": "saliency.fast_over_forward", "value": 0.81}]}))
    bench.run_bench("eval", out=str(tmp_path / "B.md"), repeats=1, quick=True, json_out=str(out))
    figures = {f["id"]: f for f in json.loads(out.read_text())["figures"]}
    assert set(figures) == {"saliency.fast_over_forward", "eval.linear_cached_over_uncached", "demo.wall_s"}
    assert figures["saliency.fast_over_forward"]["value"] == 0.81
    ev = figures["eval.linear_cached_over_uncached"]
    assert (ev["value"], ev["verdict"], ev["quick"]) == (0.2, "MISS", True)
    assert figures["demo.wall_s"]["value"] is None and figures["demo.wall_s"]["text"] == "not run"
    assert "| eval | linear | 0.200 (0.100–0.300) | ≤ 0.1 | MISS | fixed |" in (tmp_path / "B.md").read_text()


def test_run_bench_refuses_a_json_file_that_is_not_json_before_measuring(tmp_path):
    bad = tmp_path / "f.json"
    bad.write_text("not json")
    with pytest.raises(SalmaeError, match="is not JSON"):
        bench.run_bench("eval", out=str(tmp_path / "B.md"), repeats=1, quick=True, json_out=str(bad))
    assert not (tmp_path / "B.md").exists()


@pytest.mark.slow
def test_quick_bench_writes_every_required_figure_as_json(tmp_path):
    """The real sections in quick mode (~80 s on 2 cores): every required id, a finite positive median each."""
    out = tmp_path / "figures.json"
    bench.run_bench("all", out=str(tmp_path / "B.md"), repeats=1, quick=True, json_out=str(out))
    figures = json.loads(out.read_text())["figures"]
    ids = [f["id"] for f in figures]
    assert len(ids) == len(set(ids)) and REQUIRED_IDS <= set(ids)
    for f in figures:
        if f["id"] in REQUIRED_IDS:
            assert f["unit"] == "ratio" and 0 < f["value"] < 100 and f["low"] <= f["value"] <= f["high"]
            assert f["verdict"] in ("PASS", "MISS") and f["quick"] is True
