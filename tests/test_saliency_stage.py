"""Stage 1 end to end on generated shapes with a random micro CLIP (asked for explicitly)."""

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import SalmaeError
from pipeline.store import SaliencyStore
from stages.saliency import SaliencyConfig, run


def _cfg(data, out, **kw):
    base = dict(data=str(data), out=Path(out), clip_model="salmae-micro", clip_pretrained="none",
                rows_per_shard=16, batch_size=8, workers=0, device="cpu")
    return SaliencyConfig(**{**base, **kw})


def _array_bytes(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes()
            for name in ("saliency", "status", "key", "frame", "image_size")
            for p in sorted((store / name).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def baseline(shapes_pattern, tmp_path_factory):
    out = tmp_path_factory.mktemp("sal") / "store.zarr"
    summary = run(_cfg(shapes_pattern, out))
    return out, summary


def test_store_matches_manifest(baseline):
    from pipeline.manifest import load_manifest

    out, summary = baseline
    st = SaliencyStore.open(out)
    manifest = load_manifest(out / "manifest.parquet")
    assert st.keys.tolist() == manifest.keys and len(st) == 64 and st.n_shards == 4
    assert (st.status == 1).all() and summary["counts"] == {"ok": 64}
    maps = st.load_all()
    assert maps.shape == (64, 4, 4) and (maps >= 0).all() and (maps.reshape(64, -1).max(1) > 0).mean() > 0.9
    np.testing.assert_array_equal(st.frames([0])[0], [0, 0, *st.image_sizes([0])[0]])
    assert st.attrs["clip_pretrained"] == "none" and st.attrs["manifest_hash"] == manifest.hash
    assert (out.parent / "saliency_report.json").is_file() and summary["bytes_per_image"] > 0


def test_resume_is_bit_identical(baseline, shapes_pattern, tmp_path):
    out, _ = baseline
    copy = tmp_path / "store.zarr"
    shutil.copytree(out, copy)
    (copy / "_done" / "00001.json").unlink()                   # as if killed while writing shard 1
    shard_file = copy / "saliency" / "c" / "1" / "0" / "0"
    shard_file.write_bytes(shard_file.read_bytes()[:20])        # ...with half its bytes on disk
    (copy / "_done" / "00003.json").unlink()
    (copy / "status" / "c" / "3").unlink()
    summary = run(_cfg(shapes_pattern, copy))
    assert summary["images_this_run"] == 32
    assert _array_bytes(copy) == _array_bytes(out)


def test_two_processes_equal_one(baseline, shapes_pattern, tmp_path):
    out, _ = baseline
    out2 = tmp_path / "store.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "pipeline.cli", "saliency", "--data", shapes_pattern, "--out", str(out2),
           "--clip-model", "salmae-micro", "--clip-pretrained", "none", "--batch-size", "8", "--workers", "0",
           "--device", "cpu", "--set", "rows_per_shard=16"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    markers = SaliencyStore.open(out2).done_markers()
    assert {m["rank"] for m in markers.values()} == {0, 1}
    assert _array_bytes(out2) == _array_bytes(out)


def test_config_change_refused_without_overwrite(baseline, shapes_pattern, tmp_path):
    out, _ = baseline
    copy = tmp_path / "store.zarr"
    shutil.copytree(out, copy)
    with pytest.raises(SalmaeError, match="another config.*--overwrite"):
        run(_cfg(shapes_pattern, copy, layer="transformer.resblocks.0.ln_1"))
    summary = run(_cfg(shapes_pattern, copy, layer="transformer.resblocks.0.ln_1", overwrite=True))
    assert summary["images_this_run"] == 64
    assert SaliencyStore.open(copy).attrs["layer"] == "transformer.resblocks.0.ln_1"


def _damaged_copy(shapes_dir: Path, dst: Path) -> str:
    """Copy of the shapes shards: one unreadable image, one empty caption, shard 1 truncated."""
    dst.mkdir()
    with tarfile.open(shapes_dir / "00000.tar") as src, tarfile.open(dst / "00000.tar", "w") as out:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name == "0000003.jpg":
                data = b"not a jpeg at all" * 4
            if m.name == "0000005.txt":
                data = b""
            m.size = len(data)
            out.addfile(m, io.BytesIO(data))
    raw = (shapes_dir / "00001.tar").read_bytes()
    (dst / "00001.tar").write_bytes(raw[: len(raw) // 2])
    return str(dst / "{00000..00001}.tar")


def test_damaged_samples_get_status_and_report(shapes_dir, tmp_path):
    import json

    pattern = _damaged_copy(shapes_dir, tmp_path / "damaged")
    out = tmp_path / "store.zarr"
    summary = run(_cfg(pattern, out))
    st = SaliencyStore.open(out)
    reasons = {f["key"]: f["reason"] for f in summary["failures"]}
    assert reasons["0000003"] == "unreadable_image" and reasons["0000005"] == "empty_caption"
    assert "truncated_tar" in reasons.values()
    assert st.status[st.row_of("0000003")] == 2 and (st.status == 1).sum() == len(st) - len(reasons)
    report = json.loads((tmp_path / "saliency_report.json").read_text())
    assert report["damaged"] == len(reasons) >= 3


def test_manifest_mismatch_and_missing_checkpoint(baseline, shapes_dir, tmp_path):
    out, _ = baseline
    copy = tmp_path / "store.zarr"
    shutil.copytree(out, copy)
    pattern = _damaged_copy(shapes_dir, tmp_path / "other")
    with pytest.raises(SalmaeError, match="other data.*--overwrite"):
        run(_cfg(pattern, copy))
    with pytest.raises(SalmaeError, match="missing.pt not found"):
        run(_cfg(pattern, copy, clip_pretrained=str(tmp_path / "missing.pt")))
