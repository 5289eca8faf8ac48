"""Stage 1 at cc3m scale (issue 10): contiguous shard blocks per rank, each streamed tar read by one
loader worker, and one store's work split across separate jobs."""

from __future__ import annotations

import pytest

from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.saliency.engine import deal_tars_to_workers, deal_todo, job_shards
from salmae.stages.saliency import run
from test_saliency_stage import _array_bytes, _cfg


def test_ranks_get_contiguous_blocks_that_cover_every_shard_once():
    for n, world in ((10, 3), (4, 8), (332, 8)):
        blocks = [deal_todo(range(n), world, r) for r in range(world)]
        assert [s for b in blocks for s in b] == list(range(n))             # in order, each once
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert deal_todo(job_shards("3:7", 10), 2, 1) == [5, 6]
    assert job_shards("", 5) == range(5) and job_shards("2:", 5) == range(2, 5) and job_shards("4:99", 5) == range(4, 5)
    for bad in ("x", "3", "5:2", "-1:2"):
        with pytest.raises(SalmaeError, match="shards="):
            job_shards(bad, 5)


def test_each_streamed_tar_goes_to_one_worker():
    tars = ["a"] * 5 + ["b"] * 3 + ["c"] * 4 + ["d"] * 2
    order = deal_tars_to_workers(tars, 2)
    assert sorted(order) == list(range(len(tars)))
    worker_of = {}
    for turn, i in enumerate(order):                 # the DataLoader hands batch `turn` to worker turn % 2
        worker_of.setdefault(tars[i], set()).add(turn % 2)
    assert all(len(w) == 1 for w in worker_of.values()), worker_of


def test_pipe_shards_with_two_workers_read_each_tar_once(shapes_dir, tmp_path):
    log = tmp_path / "opened.log"
    urls = [f"pipe:sh -c 'echo {n} >> {log}; cat {shapes_dir / n}'" for n in ("00000.tar", "00001.tar")]
    from salmae.pipeline.data.manifest import build_manifest

    build_manifest(urls, tmp_path / "m.parquet", workers=1)
    log.unlink()
    summary = run(_cfg("::".join(urls), tmp_path / "store.zarr", manifest=tmp_path / "m.parquet", workers=2))
    assert summary["counts"]["ok"] == 64
    assert sorted(log.read_text().split()) == ["00000.tar", "00001.tar"]   # round-robin dealing read 4


def test_two_jobs_with_disjoint_shard_ranges_equal_one_run(shapes_pattern, tmp_path):
    one = tmp_path / "one.zarr"
    run(_cfg(shapes_pattern, one))
    two = tmp_path / "two.zarr"
    first = run(_cfg(shapes_pattern, two, shards="0:1"))        # creates the store, computes shard 0
    assert first["shards_done"] == 1
    run(_cfg(shapes_pattern, two, shards="1:"))                  # the other job: shards 1..3
    assert _array_bytes(one) == _array_bytes(two)
