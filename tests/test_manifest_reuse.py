"""Restarts trust a stored manifest after an O(shards) check (issue 10): no rank rescans the data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import salmae.pipeline.data.manifest as manifest_mod
from salmae.pipeline.checkpoint import load_checkpoint
from salmae.pipeline.errors import SalmaeError


@pytest.fixture()
def shards(shapes_copy) -> str:
    return str(shapes_copy / "{00000..00001}.tar")


@pytest.fixture()
def count_builds(monkeypatch):
    calls = []
    real = manifest_mod.build_manifest

    def counting(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(manifest_mod, "build_manifest", counting)
    return calls


def _touch(path: Path) -> None:
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_pretrain_builds_the_manifest_once_and_trusts_it_on_resume(tmp_path, shards, count_builds):
    from salmae.stages.pretrain import run
    from test_pretrain_stage import _cfg

    out = tmp_path / "run"
    kw = dict(mask="random", batch_size=16, viz_samples=0)
    run(_cfg(out, shards, epochs=1, **kw))
    assert len(count_builds) == 1 and (out / "manifest.parquet").is_file()
    run(_cfg(out, shards, epochs=2, resume="latest", **kw))
    assert len(count_builds) == 1                       # the resume read no shard
    assert load_checkpoint(out / "checkpoint-latest.pth")["epoch"] == 1
    _touch(Path(shards.split("{")[0]) / "00001.tar")    # a shard changed on disk: rebuilt, same content
    run(_cfg(out, shards, epochs=3, resume="latest", **kw))
    assert len(count_builds) == 2


def test_pretrain_refuses_a_manifest_of_other_shards(tmp_path, shards, shapes_pattern):
    from salmae.stages.pretrain import run
    from test_pretrain_stage import _cfg

    manifest_mod.build_manifest(shapes_pattern, tmp_path / "other.parquet")    # the same names, other files
    with pytest.raises(SalmaeError, match=r"other\.parquet does not describe --data: .*changed \(size, time or file\)"):
        run(_cfg(tmp_path / "run", shards, mask="random", epochs=1, batch_size=16, viz_samples=0,
                 manifest=str(tmp_path / "other.parquet")))


def test_saliency_restart_reuses_the_stores_manifest(tmp_path, shards, count_builds):
    from salmae.stages.saliency import SaliencyConfig, run

    cfg = SaliencyConfig(data=shards, out=tmp_path / "store.zarr", clip_model="salmae-micro", clip_pretrained="none",
                         rows_per_shard=32, batch_size=16, workers=0, device="cpu")
    first = run(cfg)
    assert len(count_builds) == 1
    again = run(cfg)                                      # a rerun on a finished store: no shard scanned
    assert len(count_builds) == 1 and again["rows"] == first["rows"] == 64
    _touch(Path(shards.split("{")[0]) / "00000.tar")
    run(cfg)                                              # stale by time: rebuilt, same hash, store kept
    assert len(count_builds) == 2
