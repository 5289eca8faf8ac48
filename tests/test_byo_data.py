"""Bring your own data: classification shards in timm's imagenet-1k-wds layout (stage 3 and caption-free
stage 2) and shards in object stores through fsspec (an in-memory `s3://`, no network)."""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import re
import shlex
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fsspec.implementations.memory import MemoryFileSystem

from salmae.pipeline.cli import cli
from salmae.pipeline.data.class_shards import LabelledShards
from salmae.pipeline.data.class_wds import write_class_shards
from salmae.pipeline.data.manifest import build_manifest
from salmae.pipeline.data.shards import expand_shards, iter_shard, read_member
from salmae.pipeline.errors import SalmaeError

README = Path(__file__).resolve().parents[1] / "README.md"


class FakeS3(MemoryFileSystem):
    """fsspec's memory filesystem answering to `s3://`, with its own store (so no network and no s3fs)."""

    protocol = ("s3", "s3a")
    store: dict = {}
    pseudo_dirs = [""]


def _register(monkeypatch, protocol: str, cls) -> None:
    """What fsspec.register_implementation(protocol, cls, clobber=True) does, undone after the test."""
    monkeypatch.setitem(importlib.import_module("fsspec.registry")._registry, protocol, cls)


@pytest.fixture()
def fake_s3(monkeypatch):
    FakeS3.store.clear()
    FakeS3.pseudo_dirs[:] = [""]
    _register(monkeypatch, "s3", FakeS3)
    FakeS3.clear_instance_cache()
    yield FakeS3()
    FakeS3.store.clear()


def _readme_commands(marker: str) -> list[list[str]]:
    """The `salmae …` lines of the README block after `<!-- byo: MARKER -->`, split as a shell would."""
    text = README.read_text()
    block = text.split(f"<!-- byo: {marker} -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [shlex.split(line)[1:] for line in block.strip().splitlines() if line.startswith("salmae ")]


def _invoke(args: list[str]):
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def _members(tar_path: Path) -> list[str]:
    with tarfile.open(tar_path) as tar:
        return tar.getnames()


@pytest.fixture(scope="module")
def wds_dir(tmp_path_factory) -> Path:
    """Classification shards as imagenet-1k-wds: 48 images, 24 per shard, 32 px."""
    out = tmp_path_factory.mktemp("in1k-wds")
    write_class_shards(out, n=48, image_size=32, shard_size=24)
    return out


# --------------------------------------------------------------------------- classification shards
def test_generator_writes_timm_wds_layout(wds_dir):
    names = sorted(p.name for p in wds_dir.iterdir())
    assert names == ["imagenet1k-train-0000.tar", "imagenet1k-train-0001.tar", "imagenet1k-validation-00.tar"]
    members = _members(wds_dir / "imagenet1k-train-0000.tar")
    assert {m.split(".", 1)[1] for m in members} == {"jpg", "cls", "json"}   # no caption
    with tarfile.open(wds_dir / "imagenet1k-validation-00.tar") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    key = next(n for n in files if n.endswith(".cls")).removesuffix(".cls")
    meta = json.loads(files[f"{key}.json"])
    assert int(files[f"{key}.cls"]) == meta["label"] and meta["filename"] == f"{key}.JPEG"


def test_labelled_shards_keep_an_index_and_read_each_image_by_byte_range(wds_dir, monkeypatch):
    from salmae.pipeline.data import class_shards

    train = LabelledShards(str(wds_dir / "imagenet1k-train-{0000..0001}.tar"), workers=1)
    labels = {s.key: int(s.cls) for s in iter_shard(str(wds_dir / "imagenet1k-train-0000.tar"), decode=False)}
    labels.update({s.key: int(s.cls) for s in iter_shard(str(wds_dir / "imagenet1k-train-0001.tar"), decode=False)})
    assert len(train) == len(labels) and {train.key_of(i): int(train.targets[i]) for i in range(len(train))} == labels
    assert train.classes[3] == "star" and len(train.classes) == 8
    index_bytes = sum(a.nbytes for a in (train.index.shard, train.index.offset, train.index.nbytes,
                                         train.index.label, train.index.keys))
    assert index_bytes < 64 * len(train) < train.index.nbytes.sum() / 10   # an index; no image bytes held
    reads = []
    real = class_shards.read_member
    monkeypatch.setattr(class_shards, "read_member", lambda *a: reads.append(a) or real(*a))
    image, label = train[5]
    assert len(reads) == 1 and reads[0][2] == train.index.nbytes[5] and image.size == (32, 32)
    assert label == labels[train.key_of(5)]


def test_label_from_a_json_field(tmp_path):
    """Shards without KEY.cls: label_from=json:FIELD reads the field; `cls` finds nothing (one line)."""
    src = tmp_path / "src"
    write_class_shards(src, n=16, image_size=32, shard_size=16)
    out = tmp_path / "target-0.tar"
    with tarfile.open(src / "imagenet1k-train-0000.tar") as tar, tarfile.open(out, "w") as dst:
        for m in tar.getmembers():
            data = tar.extractfile(m).read()
            if m.name.endswith(".cls"):
                continue
            if m.name.endswith(".json"):
                meta = json.loads(data)
                data = json.dumps({"target": meta["label"]}).encode()
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    ds = LabelledShards(str(out), label_from="json:target", workers=1)
    assert len(ds) == sum(1 for s in iter_shard(str(out), decode=False)) and ds.targets.max() < 8
    with pytest.raises(SalmaeError, match="no labelled samples") as e:
        LabelledShards(str(out), label_from="cls", workers=1)
    assert "\n" not in str(e.value)
    with pytest.raises(SalmaeError, match="label_from"):
        LabelledShards(str(out), label_from="field", workers=1)


def test_caption_free_rows_are_usable_only_where_no_saliency_is_read(wds_dir):
    from salmae.pipeline.pretrain.data import readable_rows
    from salmae.stages.pretrain import PretrainConfig, needs_captions

    manifest = build_manifest(str(wds_dir / "imagenet1k-train-{0000..0001}.tar"), workers=1)
    assert set(manifest.status) == {"missing_caption"}
    assert readable_rows(manifest, need_caption=True).sum() == 0
    assert readable_rows(manifest, need_caption=False).sum() == len(manifest)
    assert [needs_captions(PretrainConfig(mask=m)) for m in ("random", "block", "grid", "saliency", "adaptive")] == \
        [False, False, False, True, True]


def test_readme_imagenet_wds_commands(tmp_path, monkeypatch):
    """The README's commands: generate timm-wds shards, pretrain `random` on them (no captions), kNN with
    train and val patterns, and the same from the folder form."""
    monkeypatch.chdir(tmp_path)
    commands = _readme_commands("imagenet-wds")
    assert [c[0] for c in commands] == ["shapes", "pretrain", "eval", "eval"]
    for args in commands:
        _invoke(args)
    n_train = sum(len(_members(p)) for p in Path("data/in1k-wds").glob("*train-*.tar")) // 3
    n_val = sum(len(_members(p)) for p in Path("data/in1k-wds").glob("*validation-*.tar")) // 3
    assert n_train + n_val == 48 and n_val > 0
    log = Path("runs/in1k-random/run.log").read_text()
    assert re.search(rf"stage 2: {n_train} samples", log), log
    results = [json.loads(Path(f"runs/in1k-random/{d}/results.json").read_text())
               for d in ("eval-knn", "eval-knn-folder")]
    for res in results:
        assert res["counts"]["train"] == n_train and res["counts"]["val"] == n_val and res["counts"]["classes"] == 8
    assert results[0]["top1"] == results[1]["top1"]


# --------------------------------------------------------------------------- object stores
def _upload(fs, local: Path, prefix: str) -> None:
    for path in sorted(local.glob("*.tar")):
        fs.pipe(f"{prefix}/{path.name}", path.read_bytes())


def test_remote_shards_read_as_local_ones(fake_s3, shapes_dir, shapes_pattern):
    _upload(fake_s3, shapes_dir, "s3://bucket/shapes")
    urls = expand_shards("s3://bucket/shapes/*.tar")
    assert urls == ["s3://bucket/shapes/00000.tar", "s3://bucket/shapes/00001.tar"]
    local = build_manifest(shapes_pattern, workers=1)
    remote = build_manifest("s3://bucket/shapes/{00000..00001}.tar", workers=1)
    assert remote.hash == local.hash and remote.shard_urls == urls
    row = 7
    offset, nbytes = int(remote.column("image_offset")[row]), int(remote.column("image_nbytes")[row])
    assert read_member(urls[0], offset, nbytes) == read_member(shapes_dir / "00000.tar", offset, nbytes)


def test_indexed_pretrain_data_from_an_object_store_by_byte_range(fake_s3, shapes_dir, shapes_pattern):
    from salmae.pipeline.pretrain.data import IndexedPretrainDataset

    _upload(fake_s3, shapes_dir, "s3://bucket/shapes")
    urls = expand_shards("s3://bucket/shapes/{00000..00001}.tar")
    manifest = build_manifest(urls, workers=1)
    remote = IndexedPretrainDataset(manifest, urls, img_size=32, grid=(4, 4))
    local = IndexedPretrainDataset(manifest, expand_shards(shapes_pattern), img_size=32, grid=(4, 4))
    assert len(remote) == len(local) == 64
    assert np.array_equal(remote[10]["image"].numpy(), local[10]["image"].numpy())


def test_readme_s3_commands(fake_s3, wds_dir, tmp_path, monkeypatch):
    """The README's s3 commands against an in-memory s3:// holding the timm-wds shards: stream-mode
    pretraining, then kNN with globbed train and val patterns (and the prefix form) read by byte range."""
    _upload(fake_s3, wds_dir, "s3://my-bucket/in1k-wds")
    monkeypatch.chdir(tmp_path)
    for args in _readme_commands("s3"):
        _invoke(args)
    n_val = len(_members(wds_dir / "imagenet1k-validation-00.tar")) // 3
    for folder in ("eval-knn", "eval-knn-prefix"):
        res = json.loads(Path(f"runs/s3-random/{folder}/results.json").read_text())
        assert res["counts"]["val"] == n_val and res["counts"]["train"] == 48 - n_val
    assert "data_mode: stream" in Path("runs/s3-random/config.yaml").read_text()


def test_missing_driver_or_fsspec_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    if importlib.util.find_spec("s3fs") is None:   # the real fsspec path: s3:// without its driver
        result = CliRunner().invoke(cli, ["manifest", "build", "s3://bucket/{00000..00001}.tar",
                                          "-o", str(tmp_path / "m.parquet")])
        assert result.exit_code == 2 and result.output.strip().count("\n") == 0
        assert "salmae[remote]" in result.output and "s3fs" in result.output and "Traceback" not in result.output
    monkeypatch.setitem(sys.modules, "fsspec", None)   # fsspec itself not installed
    with pytest.raises(SalmaeError, match=re.escape("pip install 'salmae[remote]'")) as e:
        expand_shards("gs://bucket/{00000..00001}.tar")
    assert "\n" not in str(e.value)


class _NoRanges(MemoryFileSystem):
    """A store that ignores byte ranges and always sends the whole object."""

    protocol = "norange"
    store: dict = {}
    pseudo_dirs = [""]

    def cat_file(self, path, start=None, end=None, **kwargs):
        return super().cat_file(path)


def test_no_byte_ranges_or_pipe_says_to_use_stream_mode(monkeypatch, shapes_dir, shapes_pattern):
    from salmae.pipeline.pretrain.data import IndexedPretrainDataset

    _register(monkeypatch, "norange", _NoRanges)
    _NoRanges.store.clear()
    _upload(_NoRanges(), shapes_dir, "norange://bucket")
    with pytest.raises(SalmaeError, match="stream mode") as e:
        read_member("norange://bucket/00000.tar", 512, 100)
    assert "\n" not in str(e.value)
    manifest = build_manifest(shapes_pattern, workers=1)
    piped = [f"pipe:cat {shapes_dir / name}" for name in ("00000.tar", "00001.tar")]
    with pytest.raises(SalmaeError, match="data_mode=stream"):
        IndexedPretrainDataset(manifest, piped, img_size=32, grid=(4, 4))
    with pytest.raises(SalmaeError, match="pipe: command cannot serve"):
        LabelledShards(piped, workers=1)
    _NoRanges.store.clear()


@pytest.mark.slow
def test_torchrun_two_processes_scan_their_share_and_match_one(wds_dir, tmp_path):
    """Under torchrun each rank scans half the shards and the index is all-gathered: same counts, same kNN."""
    import os
    import subprocess

    import torch
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=1, mlp_ratio=2.0,
                            num_classes=0)
    ckpt = tmp_path / "mae_tiny.pth"
    torch.save({"model": vit.state_dict()}, ckpt)
    args = ["eval", "knn", "--checkpoint", str(ckpt), "--data", str(wds_dir / "imagenet1k-train-{0000..0001}.tar"),
            "--set", f"val_data={wds_dir / 'imagenet1k-validation-00.tar'}", "--batch-size", "8", "--device", "cpu",
            "--set", "workers=0", "--set", "num_heads=1"]
    _invoke([*args, "--out", str(tmp_path / "one")])
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "salmae.pipeline.cli", *args,
           "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two["world_size"] == 2 and one["counts"] == two["counts"]
    assert (one["top1"], one["top5"]) == (two["top1"], two["top5"])
