"""Stage 1 under uneven work (issue 22): what is left is dealt evenly, long waits outlast the process
group's timeout, and shards are written by a background thread while the batch loop goes on."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.saliency.store import SaliencyStore
from salmae.pipeline.saliency.engine import deal_todo
from salmae.stages.saliency import run
from test_saliency_stage import _array_bytes, _cfg

REPO = Path(__file__).resolve().parents[1]


def _torchrun_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def full_store(shapes_pattern, tmp_path_factory) -> Path:
    """One uninterrupted single-process run (4 shards of 16 rows, batches of 8)."""
    out = tmp_path_factory.mktemp("full") / "store.zarr"
    run(_cfg(shapes_pattern, out))
    return out


# ---------------------------------------------------------------------------- dealing (item 4)
def test_deal_todo_gives_equal_contiguous_slices_of_what_is_left():
    left = [1, 2, 5, 6, 7, 9, 10, 11, 12, 30]              # a resume: gaps where shards are done
    for todo, world in ((left, 3), (left, 4), (left, 16), (list(range(202 * 8)), 16), ([], 2)):
        shares = [deal_todo(todo, world, r) for r in range(world)]
        assert [s for share in shares for s in share] == todo          # disjoint, in order, all of it
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        for share in shares:                                           # each a contiguous run of the list
            if share:
                start = todo.index(share[0])
                assert todo[start:start + len(share)] == share
    # the measured case: 8 ranks killed at 50%, resumed on 16 -> every rank 101 shards, not [0, 202, 0, 202, ...]
    left = [s for r in range(8) for s in range(404 * r + 202, 404 * (r + 1))]
    assert {len(deal_todo(left, 16, r)) for r in range(16)} == {101}


def test_resume_deals_what_is_left_evenly_over_two_ranks(full_store, shapes_pattern, tmp_path):
    """Rank 0's static share (shards 0, 1) is already done: the two left are split one each, where
    static dealing gave rank 1 both and left rank 0 idle at the barrier."""
    out = tmp_path / "store.zarr"
    run(_cfg(shapes_pattern, out, shards="0:2"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "salmae.pipeline.cli", "saliency", "--data", shapes_pattern, "--out", str(out),
           "--clip-model", "salmae-micro", "--clip-pretrained", "none", "--batch-size", "8", "--workers", "0",
           "--device", "cpu", "--set", "rows_per_shard=16"]
    proc = subprocess.run(cmd, env=_torchrun_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    markers = SaliencyStore.open(out).done_markers()
    assert {s: m["rank"] for s, m in markers.items() if s >= 2} == {2: 0, 3: 1}
    assert "4 shards, 2 left, 1 to do on this rank (world 2)" in proc.stderr     # rank 0's line
    assert _array_bytes(out) == _array_bytes(full_store)


WAIT_WORKER = """
import datetime, time
import torch
from salmae.pipeline import dist
from salmae.pipeline.logging import setup_logging

torch.set_num_threads(1)
dist.TIMEOUT = datetime.timedelta(seconds=2)        # the main group's collectives fail after 2 s
dist.init(torch.device("cpu"))
setup_logging(None)
if dist.rank() == 1:
    time.sleep(5)
dist.wait_for_all("rank 1 to wake up", poll_s=1)
dist.wait_for_all("the second wait")                  # the wait group still works after a long wait
print(f"rank {dist.rank()} passed", flush=True)
dist.shutdown()
"""


def test_wait_for_all_outlasts_the_group_timeout(tmp_path):
    """Rank 1 arrives 5 s late under a 2 s group timeout: both pass, and rank 0 logs while it waits."""
    script = tmp_path / "wait_worker.py"
    script.write_text(WAIT_WORKER)
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", str(script)], env=_torchrun_env(),
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 passed" in proc.stdout and "rank 1 passed" in proc.stdout
    waits = re.findall(r"rank 0 waits for rank 1 to wake up \((\d+) s\)", proc.stderr)
    assert len(waits) >= 3 and int(waits[-1]) >= 3, proc.stderr[-2000:]


# ---------------------------------------------------------------------------- background writer (item 10)
def _counting_cams(monkeypatch, on_call=None) -> list[int]:
    """Count the CAM batches launched (and call `on_call(n)` before the n-th, from 1)."""
    import salmae.pipeline.saliency.engine as saliency

    calls: list[int] = []
    real = saliency.compute_cam

    def compute_cam(method):
        cam_fn = real(method)

        def counted(*args, **kwargs):
            calls.append(len(calls) + 1)
            if on_call is not None:
                on_call(len(calls))
            return cam_fn(*args, **kwargs)
        return counted

    monkeypatch.setattr(saliency, "compute_cam", compute_cam)
    return calls


def test_the_batch_loop_goes_on_while_a_shard_is_written(full_store, shapes_pattern, tmp_path, monkeypatch):
    """Shard 0 (batches 1-2) is handed over after batch 3 is launched; its writing is held until batch 4
    is launched, which can only happen if the loop does not wait for the write."""
    launched_4th = threading.Event()
    calls = _counting_cams(monkeypatch, on_call=lambda n: n >= 4 and launched_4th.set())
    real_write = SaliencyStore.write_shard
    seen = {}

    def write_shard(self, shard, *args):
        if shard == 0:
            seen["thread"] = threading.current_thread().name
            seen["overlapped"] = launched_4th.wait(timeout=10)
        return real_write(self, shard, *args)

    monkeypatch.setattr(SaliencyStore, "write_shard", write_shard)
    out = tmp_path / "store.zarr"
    summary = run(_cfg(shapes_pattern, out))
    assert seen == {"thread": "salmae-shard-writer", "overlapped": True}
    assert len(calls) == 8 and summary["shards_done"] == 4
    assert _array_bytes(out) == _array_bytes(full_store)


def _writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "salmae-shard-writer"]


def test_a_writer_error_surfaces_as_itself_and_later_shards_stay_unmarked(full_store, shapes_pattern, tmp_path,
                                                                         monkeypatch):
    real_write = SaliencyStore.write_shard
    error = SalmaeError("disk full writing shard 1 (test); shard 1 is not marked done")

    def write_shard(self, shard, *args):
        if shard == 1:
            raise error
        return real_write(self, shard, *args)

    monkeypatch.setattr(SaliencyStore, "write_shard", write_shard)
    out = tmp_path / "store.zarr"
    with pytest.raises(SalmaeError) as e:
        run(_cfg(shapes_pattern, out))
    assert e.value is error and not _writer_threads()
    assert sorted(SaliencyStore.open(out).done_markers()) == [0]
    monkeypatch.undo()
    assert run(_cfg(shapes_pattern, out))["images_this_run"] == 48      # the rerun computes shards 1-3
    assert _array_bytes(out) == _array_bytes(full_store)


def test_an_error_in_the_loop_still_writes_the_finished_shards(shapes_pattern, tmp_path, monkeypatch):
    """A CAM failure at batch 6 (shard 2) after shards 0 and 1 were handed over to a slow writer:
    the error propagates, and both finished shards are on disk with their markers."""
    def fail_at_6(n):
        if n == 6:
            raise RuntimeError("CAM failed at batch 6")

    _counting_cams(monkeypatch, on_call=fail_at_6)
    real_write = SaliencyStore.write_shard

    def slow_write(self, shard, *args):
        time.sleep(0.5)
        return real_write(self, shard, *args)

    monkeypatch.setattr(SaliencyStore, "write_shard", slow_write)
    out = tmp_path / "store.zarr"
    with pytest.raises(RuntimeError, match="CAM failed at batch 6"):
        run(_cfg(shapes_pattern, out))
    assert sorted(SaliencyStore.open(out).done_markers()) == [0, 1] and not _writer_threads()
