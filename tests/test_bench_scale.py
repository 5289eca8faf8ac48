"""`salmae bench scale`: the cc3m-shaped generator's img2dataset layout, and the rehearsal end to end (quick sizes)."""

from __future__ import annotations

import json
import logging
import tarfile
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from salmae.pipeline.cli import cli
from salmae.pipeline.data.cc3m_like import IMAGE_SIZE, WORDS, row_key, shard_pattern, tar_member, write_cc3m_like
from salmae.pipeline.data.shards import iter_shard
from salmae.pipeline.data.manifest import build_manifest
from salmae.stages.bench import scale


def test_tar_member_header_is_the_one_tarfile_writes_in_ustar():
    data = b"caption text"
    info = tarfile.TarInfo("000123456.txt")
    info.size, info.mode, info.mtime, info.uid, info.gid = len(data), 0o444, 0, 0, 0
    info.uname = info.gname = "bigdata"
    member = tar_member("000123456.txt", data)
    assert member[:512] == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    assert member[512:] == data + b"\0" * (512 - len(data)) and len(member) == 1024


def test_generated_jpegs_take_cc3m_sizes(tmp_path):
    """gpu-check decodes cc3m's own sizes: img2dataset's 256-px output and originals of about 500x375."""
    paths = write_cc3m_like(tmp_path / "data", rows=4, shard_size=4, workers=1, image_size=(500, 375))
    samples = list(iter_shard(paths[0], decode=True))
    assert [s.image.size for s in samples] == [(500, 375)] * 4
    assert [(s.width, s.height) for s in samples] == [(500, 375)] * 4
    assert len({s.image.tobytes() for s in samples}) == 4


def test_generated_shards_are_img2dataset_layout(tmp_path):
    paths = write_cc3m_like(tmp_path / "data", rows=25, shard_size=10, workers=1)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    assert shard_pattern(paths) == str(tmp_path / "data" / "{00000..00002}.tar")
    for shard, path in enumerate(paths):
        count = 10 if shard < 2 else 5
        samples = list(iter_shard(path, decode=True))
        keys = [f"{shard * 10_000 + i:09d}" for i in range(count)]           # img2dataset's 9-digit keys
        assert [s.key for s in samples] == keys == [row_key(shard, i) for i in range(count)]
        assert all(s.ok and s.image.size == (IMAGE_SIZE, IMAGE_SIZE) for s in samples)
        assert all((s.width, s.height, s.image_ext) == (32, 32, "jpg") for s in samples)
        for s in samples:
            words = s.caption.split()
            assert 5 <= len(words) <= 20 and set(words) <= set(WORDS)
            assert s.meta["caption"] == s.caption and s.meta["key"] == s.key and s.meta["status"] == "success"
            assert (s.meta["width"], s.meta["height"], s.meta["exif"], s.meta["error_message"]) == (32, 32, None, None)
            assert 200 <= s.meta["original_width"] < 1000 and len(s.meta["sha256"]) == 64
        with tarfile.open(path) as tar:                                          # checksums verified on read
            members = tar.getmembers()
        assert [m.name for m in members[:3]] == [f"{keys[0]}.jpg", f"{keys[0]}.txt", f"{keys[0]}.json"]
        assert {(m.mode, m.uname, m.mtime) for m in members} == {(0o444, "bigdata", 0)}
        table = pq.read_table(path.replace(".tar", ".parquet")).to_pydict()
        assert table["key"] == keys and table["caption"] == [s.caption for s in samples]
        assert set(table["status"]) == {"success"}
        stats = json.loads((tmp_path / "data" / f"{shard:05d}_stats.json").read_text())
        assert (stats["count"], stats["successes"], stats["status_dict"]) == (count, count, {"success": count})
    # different rows reuse pool images but get their own captions; the manifest sees every row as ok
    manifest = build_manifest(paths)
    assert len(manifest) == 25 and set(manifest.status) == {"ok"}
    assert len(set(manifest.column("caption"))) >= 20


def test_generation_is_deterministic_and_the_pool_path_writes_the_same_bytes(tmp_path):
    one = write_cc3m_like(tmp_path / "a", rows=30, shard_size=10, workers=1)
    two = write_cc3m_like(tmp_path / "b", rows=30, shard_size=10, workers=2)
    for a, b in zip(one, two):
        assert Path(a).read_bytes() == Path(b).read_bytes()
    with pytest.raises(Exception, match="shard_size"):
        write_cc3m_like(tmp_path / "c", rows=10, shard_size=10_001)


def test_a_step_that_raises_or_dies_is_reported_not_raised():
    raised = scale.run_in_process(int, "not a number")
    assert raised["error"].startswith("ValueError") and "traceback" in raised
    died = scale.run_in_process(scale.os._exit, 3)
    assert died == {"error": "its process died with exit code 3"}


def test_scale_cli_quick_writes_every_step_and_removes_the_data(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("SALMAE_BENCH_QUICK", "1")
    made = []
    mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **kw: made.append(mkdtemp(**kw)) or made[-1])
    md, js = tmp_path / "BENCH.md", tmp_path / "scale.json"
    md.write_text("notes kept\n\n<!-- bench:header -->\nold header\n<!-- /bench:header -->\n")
    result = CliRunner().invoke(cli, ["bench", "scale", "--rows", "3000", "--shard-size", "1000",
                                      "--out", str(md), "--json", str(js)])
    assert result.exit_code == 0, result.output
    summary = json.loads(js.read_text())
    steps = summary["steps"]
    assert summary["rows"] == 3000 and summary["quick"] is True and list(steps) == list(scale.STEPS)
    for name, st in steps.items():
        assert "error" not in st, (name, st.get("traceback"))
        assert st["seconds"] > 0 and st["peak_rss_mb"] >= st["rss_at_start_mb"] > 10, name
    assert steps["generate"]["shards"] == 3 and steps["generate"]["bytes"] > 3000 * 3 * 1024
    assert steps["manifest"]["manifest_rows"] == 3000
    assert steps["saliency_slice"]["images"] == 256 and steps["saliency_slice"]["grid"] == [4, 4]
    resume = steps["saliency_resume"]    # 3 store shards of 1024, the last (952 rows) left to compute
    assert resume["rows_computed"] == 3000 - 2048 and resume["store_shards"] == 3
    assert 0 < resume["compute_seconds"] < resume["seconds"]
    # the micro CLIP's random weights give a few all-zero maps: status zero_map, not ok
    zero = steps["inspect"]["zero_map_rows"]
    assert steps["inspect"]["store_rows"] == 3000 and steps["inspect"]["ok_rows"] + zero == 3000 and zero < 30
    assert (steps["pretrain_table"]["dataset_rows"], steps["pretrain_table"]["saliency_ok"]) == (3000, 3000 - zero)
    assert steps["pretrain_table"]["zero_maps"] == zero
    loader = steps["pretrain_loader"]
    assert loader["images"] == 1024 and loader["images_per_s"] == pytest.approx(1024 / loader["seconds"])
    assert len(loader["worker_peak_rss_mb"]) == 2 and all(p > 0 for p in loader["worker_peak_rss_mb"])
    assert loader["worker_above_parent_mb"] == pytest.approx([p - loader["parent_rss_mb"]
                                                              for p in loader["worker_peak_rss_mb"]])
    knn = steps["knn"]
    assert (knn["train_rows"], knn["val_rows"], knn["val_rows_measured"]) == (20_000, 1_000, 500)
    assert knn["seconds"] == pytest.approx(knn["seconds_measured"] * 2)
    assert len(made) == 1 and made[0].startswith(str(scratch / "salmae-scale-3000-"))
    assert not scale.os.path.exists(made[0]) and summary["data"] is None        # generated data removed
    text = md.read_text()
    assert text.startswith("notes kept") and "old header" in text          # other blocks kept
    assert "<!-- bench:scale-3000 -->\n## Scale rehearsal — 3,000 rows" in text and "QUICK run" in text
    assert text.rstrip().endswith("<!-- /bench:scale-3000 -->")
    assert text.count("\n| scale |") == len(scale.STEPS) + 2                # steps + peak RSS + worker rows
    ids = {f["id"]: f for f in summary["figures"]}
    assert ids["scale.peak_rss_mb"]["verdict"] == "PASS" and ids["scale.saliency_resume_seconds"]["verdict"] \
        == "— (N < 3.3 M)"


def _fake_steps(seconds: float, peak: float, worker: float) -> dict:
    common = {"rss_at_start_mb": 400.0, "children_peak_rss_mb": 0.0}
    steps = {name: {"seconds": seconds, "peak_rss_mb": 500.0, **common} for name in scale.STEPS}
    steps["generate"].update(shards=330, bytes=13 * 10**9)
    steps["manifest"]["manifest_rows"] = 3_300_000
    steps["saliency_slice"].update(images=2048, images_per_s=500.0, grid=[4, 4])
    steps["saliency_resume"].update(rows_computed=2048, compute_seconds=2.0, start_up_seconds=seconds - 2,
                                    setup_seconds=1.0, store_shards=3223, peak_rss_mb=peak)
    steps["inspect"].update(store_rows=3_300_000, ok_rows=3_300_000)
    steps["pretrain_table"].update(dataset_rows=3_300_000, saliency_ok=3_300_000)
    steps["pretrain_loader"].update(images=19_968, images_per_s=1000.0, batch_size=64, workers=2, parent_rss_mb=1000.0,
                                    worker_peak_rss_mb=[1000.0 + worker, 1010.0], worker_peak_private_mb=[50.0, 60.0],
                                    worker_above_parent_mb=[worker, 10.0])
    steps["knn"].update(train_rows=1_281_167, val_rows=50_000, val_rows_measured=2048, seconds_measured=1.0, dim=128,
                        classes=1000)
    return steps


@pytest.mark.parametrize("seconds,peak,worker,verdicts", [
    (50.0, 7000.0, 400.0, ("PASS", "PASS", "PASS", "PASS")),
    (130.0, 9000.0, 600.0, ("MISS", "MISS", "MISS", "MISS"))])
def test_verdicts_at_full_size(seconds, peak, worker, verdicts, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(scale, "_check_disk", lambda cfg: None)
    monkeypatch.setattr(scale, "_run_steps", lambda cfg, work, log: _fake_steps(seconds, peak, worker))
    summary = scale.run_scale(scale.ScaleConfig(rows=3_300_000, out=tmp_path / "b.md", keep=True))
    ids = {f["id"]: f["verdict"] for f in summary["figures"]}
    got = (ids["scale.saliency_resume_seconds"], ids["scale.pretrain_table_seconds"], ids["scale.peak_rss_mb"],
           ids["scale.loader_worker_above_parent_mb"])
    assert got == verdicts
    assert summary["data"] is not None and (tmp_path / summary["data"]).is_dir()     # --keep keeps the folder


def test_a_failed_step_is_a_failed_row_and_its_dependants_are_skipped(tmp_path, monkeypatch):
    ran = []

    def fake_run(fn, *args):
        ran.append(fn.__name__)
        return {"error": "OSError: disk full"} if fn.__name__ == "_manifest" else {"seconds": 1.0, "peak_rss_mb": 1.0}

    monkeypatch.setattr(scale, "run_in_process", fake_run)
    done = scale._run_steps(scale.ScaleConfig(rows=100), tmp_path, logging.getLogger("test"))
    assert ran == ["_generate", "_manifest", "_saliency_slice", "_knn"]
    assert done["saliency_resume"]["error"] == "skipped: manifest failed"
    assert {k for k, v in done.items() if v.get("error", "").startswith("skipped:")} == \
        {"saliency_resume", "inspect", "pretrain_table", "pretrain_loader"}
    steps = _fake_steps(10.0, 1000.0, 10.0)
    steps["saliency_resume"] = {"error": "SalmaeError: store refused\ntraceback..."}
    table = {r.id: r for r in scale.rows({"rows": 1000, "steps": steps})}
    failed = table["scale.saliency_resume_seconds"]
    assert (failed.value, failed.verdict, failed.detail) == ("failed", "MISS", "SalmaeError: store refused")
    assert table["scale.pretrain_table_seconds"].verdict == "— (N < 3.3 M)"      # small N: time not judged
    assert "≈ 33000 s at 3.3 M" in table["scale.pretrain_table_seconds"].detail   # 10 s x 3300, linear


def test_disk_check_names_tmpdir(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(Exception, match="TMPDIR"):
        scale._check_disk(scale.ScaleConfig(rows=10**12))
