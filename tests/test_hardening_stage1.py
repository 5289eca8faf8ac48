"""Issue 12, stage 1 and the data layer: locks, crash windows, full disk, garbage tars, bad layers,
unsupported towers, perturbation CAMs, pixel limit, the report's place."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.saliency.store import SaliencyStore
from salmae.pipeline.saliency.store_lock import LOCK_DIR, ShardRange, StoreLock
from salmae.stages.saliency import SaliencyConfig, run


def _cfg(data, out, **kw):
    base = dict(data=None if data is None else str(data), out=Path(out), clip_model="salmae-micro", clip_pretrained="none",
                rows_per_shard=16, batch_size=8, workers=0, device="cpu")
    return SaliencyConfig(**{**base, **kw})


def _array_bytes(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes()
            for name in ("saliency", "scale", "status", "key", "frame", "image_size")
            for p in sorted((store / name).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def baseline(shapes_pattern, tmp_path_factory):
    out = tmp_path_factory.mktemp("hard") / "store.zarr"
    run(_cfg(shapes_pattern, out))
    return out


# ---------------------------------------------------------------------------- 3: one writer per shard range
_HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from salmae.pipeline.saliency.store_lock import ShardRange, StoreLock
    lo, hi = int(sys.argv[2]), (int(sys.argv[3]) if sys.argv[3] != "-" else None)
    lock = StoreLock(Path(sys.argv[1]), ShardRange(lo, hi)).acquire()
    print("held", flush=True)
    sys.stdin.read()   # held until the test kills it or exits (no timer: a slow machine must not see it go stale)
""")


def _hold_lock(store: Path, lo: int, hi: int | None) -> subprocess.Popen:
    """Another process (not a thread) that takes the lock for shards lo:hi and keeps it."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(store), str(lo), "-" if hi is None else str(hi)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_on_overlapping_shards_is_refused(baseline, shapes_pattern, tmp_path):
    copy = tmp_path / "store.zarr"
    shutil.copytree(baseline, copy)
    (copy / "_done" / "00001.json").unlink()
    holder = _hold_lock(copy, 0, 2)
    try:
        with pytest.raises(SalmaeError, match=rf"shards 1:2 are being written by host {socket.gethostname()} "
                                              rf"pid {holder.pid} \(shards 0:2"):
            run(_cfg(shapes_pattern, copy, shards="1:2"))
        with pytest.raises(SalmaeError, match=rf"pid {holder.pid}"):
            run(_cfg(shapes_pattern, copy))                            # all shards overlap 0:2 too
        with pytest.raises(SalmaeError, match=r"replacing it \(--overwrite\) needs the store to itself.*"
                                              rf"pid {holder.pid}"):
            run(_cfg(shapes_pattern, copy, shards="2:", layer="transformer.resblocks.0.ln_1", overwrite=True))
        assert not (copy / "_done" / "00001.json").exists()             # nothing written, nothing deleted
        assert SaliencyStore.open(copy).attrs["layer"] == "transformer.resblocks.1.ln_1"
        assert len(list((copy / "_done").glob("*.json"))) == 3
        summary = run(_cfg(shapes_pattern, copy, shards="2:"))         # disjoint: shares the store
        assert summary["shards_done"] == 3
        assert sorted(p.name for p in (copy / LOCK_DIR).iterdir()) == [f"{socket.gethostname()}-{holder.pid}.json"]
    finally:
        holder.kill()
        holder.wait()
    summary = run(_cfg(shapes_pattern, copy))                          # the holder died: its lock is stale
    assert summary["shards_done"] == 4 and summary["images_this_run"] == 16
    assert not (copy / LOCK_DIR).exists()                               # released, folder removed when empty
    assert _array_bytes(copy) == _array_bytes(baseline)


def test_creating_a_store_needs_it_alone_and_a_refused_run_leaves_nothing(shapes_pattern, tmp_path):
    out = tmp_path / "new.zarr"
    holder = _hold_lock(out, 0, 1)
    try:
        with pytest.raises(SalmaeError, match=r"creating it needs the store to itself.*shards=0:0"):
            run(_cfg(shapes_pattern, out, shards="1:"))
        assert sorted(p.name for p in out.iterdir()) == [LOCK_DIR]          # no zarr.json, no manifest
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(SalmaeError, match="does not exist yet"):
        run(_cfg(None, tmp_path / "other.zarr"))
    assert not (tmp_path / "other.zarr").exists()


def test_lock_ranges_and_staleness(tmp_path):
    assert ShardRange(0, 2).overlaps(ShardRange(1, None)) and not ShardRange(0, 2).overlaps(ShardRange(2, 5))
    assert not ShardRange(0, 0).overlaps(ShardRange(0, None))                 # an empty range overlaps nothing
    store = tmp_path / "s.zarr"
    (store / LOCK_DIR).mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale_here = {"host": socket.gethostname(), "pid": int(dead.stdout), "started": time.time(), "shards": [0, None]}
    old_elsewhere = {"host": "node-x", "pid": 1, "started": time.time() - 8 * 24 * 3600, "shards": [0, None]}
    live_elsewhere = {"host": "node-y", "pid": 1, "started": time.time() - 3600, "shards": [3, 4]}
    for name, rec in (("a", stale_here), ("b", old_elsewhere), ("c", live_elsewhere)):
        (store / LOCK_DIR / f"{name}.json").write_text(json.dumps(rec))
    lock = StoreLock(store, ShardRange(0, 3)).acquire()
    assert sorted(p.name for p in (store / LOCK_DIR).iterdir()) == ["c.json", lock.path.name]
    lock.release()
    with pytest.raises(SalmaeError, match=r"host node-y pid 1 \(shards 3:4"):
        StoreLock(store, ShardRange(2, None)).acquire()


# ---------------------------------------------------------------------------- 4: crash windows
class _Killed(BaseException):
    """Stands in for kill -9 at a chosen line (not an Exception: nothing catches it)."""


def test_killed_between_create_and_manifest_is_recreated(baseline, shapes_pattern, tmp_path, monkeypatch):
    import salmae.pipeline.saliency.store_setup as saliency

    out = tmp_path / "store.zarr"
    real = saliency.create_store

    def create_then_die(*a, **kw):
        real(*a, **kw)
        raise _Killed

    monkeypatch.setattr(saliency, "create_store", create_then_die)
    with pytest.raises(_Killed):
        run(_cfg(shapes_pattern, out))
    monkeypatch.undo()
    assert not (out / "manifest.parquet").exists()
    with pytest.raises(SalmaeError, match="unfinished"):
        SaliencyStore.open(out)                                          # stage 2 / inspect never read it
    summary = run(_cfg(shapes_pattern, out))                             # no --overwrite needed
    assert summary["images_this_run"] == 64 and (out / "manifest.parquet").is_file()
    assert _array_bytes(out) == _array_bytes(baseline)


def test_leftovers_of_a_full_disk_do_not_break_a_rerun(baseline, shapes_pattern, tmp_path):
    """A store whose manifest move left 0 bytes (and 0-byte staging files beside it) is recreated."""
    out = tmp_path / "store.zarr"
    shutil.copytree(baseline, out)
    shutil.rmtree(out / "_done")
    (out / "_done").mkdir()
    (out / "manifest.parquet").write_bytes(b"")
    (tmp_path / ".store.zarr.manifest.parquet").write_bytes(b"")
    (tmp_path / ".store.zarr.build.parquet").write_bytes(b"")
    summary = run(_cfg(shapes_pattern, out))
    assert summary["images_this_run"] == 64 and summary["counts"] == {"ok": 64}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.zarr"]
    assert _array_bytes(out) == _array_bytes(baseline)


def test_shard_files_are_fsynced_before_their_marker(baseline, monkeypatch, tmp_path):
    copy = tmp_path / "store.zarr"
    shutil.copytree(baseline, copy)
    (copy / "_done" / "00002.json").unlink()
    st = SaliencyStore.open(copy, mode="r+")
    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((path, st.is_done(2)))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    rows = st.shard_rows(2)
    st.write_shard(2, st.read(list(rows)), st.status[rows.start:rows.stop], {})
    shard_files = {str(p.resolve()) for p in st.shard_files(2)}
    before_marker = {p for p, done in synced if not done}
    assert shard_files <= before_marker, (shard_files, synced)
    assert str(st.marker_path(2).resolve()) in {p for p, _ in synced}


# ---------------------------------------------------------------------------- 5: full disk
def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_while_writing_a_shard_is_one_line_and_keeps_finished_shards(baseline, shapes_pattern, tmp_path,
                                                                              monkeypatch):
    out = tmp_path / "store.zarr"
    run(_cfg(shapes_pattern, out, shards="0:1"))
    monkeypatch.setattr(SaliencyStore, "_clear_shard", _enospc)       # inside write_shard, before any byte
    with pytest.raises(SalmaeError, match=r"disk full writing .*saliency/c/1/0/0 \(\d+\.\d MiB free there\); "
                                          r"shard 1 is not marked done") as e:
        run(_cfg(shapes_pattern, out))
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    assert sorted(SaliencyStore.open(out).done_markers()) == [0]
    run(_cfg(shapes_pattern, out))
    assert _array_bytes(out) == _array_bytes(baseline)


def test_full_disk_while_writing_the_report(baseline, shapes_pattern, tmp_path, monkeypatch):
    import salmae.pipeline.saliency.report as saliency

    out = tmp_path / "store.zarr"
    shutil.copytree(baseline, out)
    monkeypatch.setattr(saliency, "atomic_write_json", _enospc)
    with pytest.raises(SalmaeError, match=r"disk full writing .*store.zarr/saliency_report.json \(\d+\.\d MiB free"):
        run(_cfg(shapes_pattern, out))


# ---------------------------------------------------------------------------- 6: garbage tars
def test_garbage_tars_are_named_by_shard(shapes_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(shapes_dir / "00000.tar", data / "00000.tar")
    rng = np.random.default_rng(0)
    for name in ("00001.tar", "00002.tar"):
        (data / name).write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    out = tmp_path / "store.zarr"
    summary = run(_cfg(data / "{00000..00002}.tar", out))
    bad = [f for f in summary["failures"] if f["reason"] == "truncated_tar"]
    assert [(f["key"], f["shard"]) for f in bad] == [("", "00001.tar"), ("", "00002.tar")]
    assert json.loads((out / "saliency_report.json").read_text())["failures"] == summary["failures"]
    log = (out / "run.log").read_text()
    assert "shard 00001.tar: 1 damaged rows (truncated_tar" in log and "shard 00002.tar: 1 damaged" in log


# ---------------------------------------------------------------------------- 7: layers that give no map
@pytest.mark.parametrize("layer, why", [("ln_post", "zero gradient at every patch token"),
                                        ("transformer.resblocks.-1", "zero gradient at every patch token"),
                                        ("transformer.resblocks.-1.attn", "outputs tuple, not the ViT tokens"),
                                        ("conv1", r"outputs \[2, 32, 4, 4\], not the ViT tokens")])
def test_a_layer_without_maps_is_refused_before_anything_is_written(shapes_pattern, tmp_path, layer, why):
    out = tmp_path / "store.zarr"
    with pytest.raises(SalmaeError, match=rf"CAM layer '.*' (gets )?{why}.*transformer.resblocks.-1.ln_1"):
        run(_cfg(shapes_pattern, out, layer=layer))
    assert not out.exists()


def test_an_earlier_block_input_is_accepted(shapes_pattern, tmp_path):
    summary = run(_cfg(shapes_pattern, tmp_path / "store.zarr", layer="transformer.resblocks.0.ln_1",
                       shards="0:1"))
    assert summary["counts"]["ok"] == 16


# ---------------------------------------------------------------------------- 8: unsupported towers
def _register(tmp_path, name: str, vision_cfg: dict) -> str:
    import open_clip

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, **vision_cfg},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return name


def test_resnet_and_timm_towers_are_refused_in_one_line(tmp_path):
    import open_clip

    from salmae.pipeline.models.clip import check_vision_tower, load_clip

    resnet = _register(tmp_path, "salmae-test-rn", {"layers": [1, 1, 1, 1], "width": 8, "patch_size": None})
    timm_name = _register(tmp_path, "salmae-test-timm", {"timm_model_name": "resnet10t", "timm_model_pretrained": False,
                                                         "timm_pool": "avg", "timm_proj": "linear"})
    with pytest.raises(SalmaeError, match=r"--clip-model salmae-test-rn has a ResNet vision tower; stage 1 "
                                          r"supports only open_clip VisionTransformer towers"):
        load_clip(resnet, "none")
    with pytest.raises(SalmaeError, match=r"has a timm resnet10t vision tower; stage 1 supports only"):
        load_clip(timm_name, "none")
    for name, kind in ((resnet, "ModifiedResNet"), (timm_name, "TimmModel")):     # the built models, too
        model = open_clip.create_model(name, pretrained=None)
        with pytest.raises(SalmaeError, match=rf"has a {kind} vision tower"):
            check_vision_tower(model, name)


# ---------------------------------------------------------------------------- 9: perturbation CAMs
@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_perturbation_cams_of_a_batch_equal_each_image_alone(method):
    """Each image's map from a batch of two equals the library run on that image alone (one caption)."""
    import pytorch_grad_cam
    from pytorch_grad_cam.ablation_layer import AblationLayerVit

    from salmae.pipeline.saliency.gradcam import OwnCaptionSimilarity, SimilarityTarget, library_cam, resolve_layer, tokens_to_grid
    from salmae.pipeline.models.clip import load_clip

    torch.manual_seed(0)
    model, info, tokenizer, _ = load_clip("salmae-micro", "none")
    images = torch.randn(2, 3, *info.input_size, generator=torch.Generator().manual_seed(1))
    text = torch.nn.functional.normalize(model.encode_text(tokenizer(["a red circle", "a blue square"])), dim=-1)
    layer, _ = resolve_layer(model)
    batch = library_cam(method, model, images, text, layer, info.grid)
    assert batch.shape == (2, *info.grid)
    base = {"scorecam": pytorch_grad_cam.ScoreCAM, "ablationcam": pytorch_grad_cam.AblationCAM}[method]
    extra = {"ablation_layer": AblationLayerVit()} if method == "ablationcam" else {}
    for i in range(2):
        cls = type("Grid", (base,), {"get_target_width_height": lambda self, x: (info.grid[1], info.grid[0])})
        cam = cls(model=OwnCaptionSimilarity(model, text[i:i + 1]), target_layers=[layer],
                  reshape_transform=lambda t: tokens_to_grid(t, info.grid).float(), **extra)
        alone = cam(input_tensor=images[i:i + 1].clone().requires_grad_(True), targets=[SimilarityTarget()])
        cam.activations_and_grads.release()
        np.testing.assert_allclose(batch[i].numpy(), alone[0], atol=1e-6)
        assert alone[0].max() == pytest.approx(1.0, abs=1e-5) and alone[0].std() > 0.05   # a real, non-flat map


# ---------------------------------------------------------------------------- 10: pixel limit
def _big_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height), 200).save(buf, format="PNG")
    return buf.getvalue()


def test_images_over_the_pixel_limit_are_too_large_and_never_decoded(shapes_dir, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    big = _big_png(3000, 2000)                                           # 6 MP in a few KB
    assert len(big) < 40_000
    with tarfile.open(shapes_dir / "00000.tar") as src, tarfile.open(data / "00000.tar", "w") as dst:
        for m in src.getmembers():
            payload = src.extractfile(m).read()
            if m.name == "0000002.jpg":
                m.name, payload = "0000002.png", big
            m.size = len(payload)
            dst.addfile(m, io.BytesIO(payload))
    import salmae.pipeline.data.shards as shards

    decoded: list[tuple[int, int]] = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda im: (decoded.append(im.size), real_load(im))[1])
    out = tmp_path / "store.zarr"
    summary = run(_cfg(data / "00000.tar", out, max_pixels=1_000_000))
    st = SaliencyStore.open(out)
    assert summary["counts"] == {"ok": 31, "too_large": 1} and st.attrs["max_pixels"] == 1_000_000
    assert st.status[st.row_of("0000002")] == 11
    entry = next(f for f in summary["failures"] if f["key"] == "0000002")
    assert entry == {"key": "0000002", "shard": "00000.tar", "reason": "too_large",
                     "detail": "3000x2000 = 6.0 MP > max_pixels 1 MP"}
    assert (3000, 2000) not in decoded                                    # refused from the header alone
    with pytest.raises(shards.DamagedSampleError, match="too_large|more pixels") as e:
        shards.decode_image(big, "0000002", max_pixels=1_000_000)
    assert e.value.reason == "too_large"
    with pytest.raises(SalmaeError, match="max_pixels=0 must be positive"):
        run(_cfg(data / "00000.tar", tmp_path / "x.zarr", max_pixels=0))


def test_jpeg_draft_decodes_at_a_reduced_scale():
    from salmae.pipeline.data.shards import decode_image

    buf = io.BytesIO()
    Image.new("RGB", (800, 600), (10, 120, 240)).save(buf, format="JPEG")
    full = decode_image(buf.getvalue())
    small = decode_image(buf.getvalue(), draft_size=(224, 224))            # 1/2 scale still covers 224 x 224
    tiny = decode_image(buf.getvalue(), draft_size=(32, 32))                # 1/8 scale
    assert full.size == (800, 600) and small.size == (400, 300) and tiny.size == (100, 75)
    assert np.abs(np.asarray(tiny, dtype=int) - [10, 120, 240]).max() <= 3
