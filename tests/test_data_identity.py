"""Data and weights are identified by content, never by how their path is spelled (issue 23, items 2-4).

- a resume compared `--data` as a string: a relative pattern from another folder that named *other*
  files resumed with rc 0, while the same files given by absolute path were refused;
- a run without a saliency store resumed on a replaced tar (the manifest was rebuilt and never
  compared with the run's);
- the manifest hash covered keys, sizes and offsets only: an image whose bytes changed at the same size
  kept the hash, so a store's maps were applied to other pictures;
- stage 1 refused `--clip-pretrained ../clip.pt` against `clip.pt` although the file's sha256 is recorded.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest

from salmae.pipeline.data.manifest import build_manifest, verify_manifest
from salmae.pipeline.errors import SalmaeError
from test_pretrain_stage import _cfg, _store


def _rewrite_tar(path: Path, change) -> str:
    """Rewrite a tar with `change(name, data) -> data` applied to each member; returns the key changed first."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    changed = None
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as out:
        for m, data in members:
            new = change(m.name, data)
            if new != data and changed is None:
                changed = m.name.split(".")[0]
            m.size = len(new)
            out.addfile(m, io.BytesIO(new))
    path.write_bytes(buf.getvalue())
    return changed


def _same_size_edit(first_jpg: list):
    """Change the bytes of the first JPEG (inside its entropy-coded data), keeping its size."""
    def change(name: str, data: bytes) -> bytes:
        if not name.endswith(".jpg") or first_jpg:
            return data
        first_jpg.append(name)
        raw = bytearray(data)
        for i in range(len(raw) // 2, len(raw) // 2 + 8):
            raw[i] = (raw[i] + 1) % 256 if raw[i] not in (0xFE, 0xFF) else raw[i]
        return bytes(raw)
    return change


@pytest.fixture()
def data_copy(shapes_copy) -> Path:
    return shapes_copy


def test_same_size_content_change_changes_the_hash_and_verify_names_it(data_copy):
    pattern = str(data_copy / "{00000..00001}.tar")
    before = build_manifest(pattern, data_copy / "m.parquet")
    edited = []
    key = _rewrite_tar(data_copy / "00001.tar", _same_size_edit(edited))
    after = build_manifest(pattern)
    assert key and list(before.column("image_nbytes")) == list(after.column("image_nbytes"))
    assert before.hash != after.hash
    report = verify_manifest(data_copy / "m.parquet", pattern)
    assert report.changed == {"00001.tar": f"image content changed for 1 samples (first {key})"}


def test_a_store_refuses_data_whose_bytes_changed(tmp_path, data_copy):
    """The swap case: the store was made for other pictures with the same sizes; stage 2 must not apply it."""
    from salmae.stages.pretrain import run

    pattern = str(data_copy / "{00000..00001}.tar")
    store = _store(tmp_path / "store.zarr", pattern)
    _rewrite_tar(data_copy / "00000.tar", _same_size_edit([]))
    with pytest.raises(SalmaeError, match="another manifest"):
        run(_cfg(tmp_path / "run", pattern, saliency=str(store), mask="saliency", epochs=1, batch_size=8))


def test_a_resume_on_a_replaced_tar_is_refused_naming_the_shard(tmp_path, data_copy):
    from salmae.stages.pretrain import run

    pattern = str(data_copy / "{00000..00001}.tar")
    kw = dict(mask="random", batch_size=16, viz_samples=0)
    run(_cfg(tmp_path / "run", pattern, epochs=1, **kw))
    _rewrite_tar(data_copy / "00001.tar", _same_size_edit([]))
    with pytest.raises(SalmaeError, match=r"^--resume on other data: checkpoint .*checkpoint-latest.pth was trained "
                                          r"on data with manifest hash \w+…, --data .* has \w+… \(shard 00001.tar "
                                          r"changed"):
        run(_cfg(tmp_path / "run", pattern, epochs=2, resume="latest", **kw))


def test_a_resume_follows_the_files_not_the_spelling(tmp_path, data_copy, shapes_dir, monkeypatch):
    """Same files by another path: resumed. Other files by the same relative spelling: refused."""
    from salmae.pipeline.checkpoint import load_checkpoint
    from salmae.stages.pretrain import run

    kw = dict(mask="random", batch_size=16, viz_samples=0)
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    run(_cfg(out, "data/{00000..00001}.tar", epochs=1, **kw))
    run(_cfg(out, str(data_copy / "{00000..00001}.tar"), epochs=2, resume="latest", **kw))   # absolute: same files
    assert load_checkpoint(out / "checkpoint-latest.pth")["epoch"] == 1
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "data").mkdir(parents=True)
    shutil.copy(data_copy / "00000.tar", elsewhere / "data" / "00000.tar")
    other = shutil.copy(data_copy / "00001.tar", elsewhere / "data" / "00001.tar")
    _rewrite_tar(Path(other), _same_size_edit([]))
    monkeypatch.chdir(elsewhere)
    with pytest.raises(SalmaeError, match=r"--resume on other data: .*\(shard 00001.tar changed"):
        run(_cfg(out, "data/{00000..00001}.tar", epochs=3, resume="latest", **kw))
    # the same relative spelling naming a faithful copy resumes (the copy is scanned again, same content)
    shutil.copy(data_copy / "00001.tar", elsewhere / "data" / "00001.tar")
    run(_cfg(out, "data/{00000..00001}.tar", epochs=3, resume="latest", **kw))
    assert load_checkpoint(out / "checkpoint-latest.pth")["epoch"] == 2


def test_stage1_knows_a_clip_file_by_its_sha256_not_its_path(tmp_path, shapes_pattern, monkeypatch):
    """`--clip-pretrained ../clip.pt` against `clip.pt` (same bytes) was refused; other bytes still are."""
    import torch

    from salmae.pipeline.models.clip import checkpoint_extras, load_clip
    from salmae.stages.saliency import SaliencyConfig, run

    model, info, _, _ = load_clip("salmae-micro", "none")
    (tmp_path / "w").mkdir()
    torch.save({"state_dict": model.state_dict(), **checkpoint_extras("salmae-micro", info.mean, info.std)},
               tmp_path / "clip.pt")
    cfg = dict(data=shapes_pattern, out=tmp_path / "store.zarr", clip_model="salmae-micro", rows_per_shard=32,
               batch_size=32, workers=0, device="cpu")
    monkeypatch.chdir(tmp_path)
    run(SaliencyConfig(clip_pretrained="clip.pt", shards="0:1", **cfg))
    monkeypatch.chdir(tmp_path / "w")
    summary = run(SaliencyConfig(clip_pretrained="../clip.pt", **{**cfg, "out": tmp_path / "store.zarr"}))
    assert summary["counts"] == {"ok": 64} and summary["images_this_run"] == 32 and summary["shards_done"] == 2
    state = torch.load(tmp_path / "clip.pt", weights_only=True)
    state["state_dict"]["visual.conv1.weight"] += 1
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(SalmaeError, match=r"another config or data \(.*pretrained_sha256"):
        run(SaliencyConfig(clip_pretrained="../other.pt", **cfg))
