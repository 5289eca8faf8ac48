"""Checkpoints carry a sha256 sidecar and are verified on load; non-finite weights are refused
(issue 23, item 7: torch does not check an archive's CRCs, so a flipped tensor record loaded as
weights of -3.6e37 and kNN still reported a number)."""

from __future__ import annotations

import json

import pytest
import torch

from salmae.pipeline.checkpoint import load_checkpoint, save_checkpoint, sidecar_path, verify_checkpoint
from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.files import sha256_file


def _state(value: float = 0.5) -> dict:
    return {"model": {"w": torch.full((64, 64), value), "b": torch.zeros(64)}, "epoch": 3}


def _flip_tensor_bytes(path, n: int = 16) -> None:
    """Flip `n` bytes inside the data of the largest tensor record (what a bad disk or copy does)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for i in range(start + 100, start + 100 + n):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_save_writes_a_sidecar_that_matches(tmp_path):
    path = tmp_path / "checkpoint-latest.pth"
    save_checkpoint(path, **_state())
    record = json.loads(sidecar_path(path).read_text())
    assert record["sha256"] == sha256_file(path) and record["file"] == path.name
    assert verify_checkpoint(path) is True
    assert load_checkpoint(path)["epoch"] == 3


def test_flipped_bytes_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "checkpoint-latest.pth"
    save_checkpoint(path, **_state())
    _flip_tensor_bytes(path)
    # torch itself loads the damaged file without complaint: that is the bug this guards against
    loaded = torch.load(path, weights_only=True)
    assert not torch.equal(loaded["model"]["w"], _state()["model"]["w"])
    with pytest.raises(SalmaeError, match=r"^checkpoint .*checkpoint-latest.pth is damaged: its sha256 .* differs"):
        load_checkpoint(path)


def test_a_kill_between_the_two_renames_still_verifies(tmp_path):
    """The sidecar is written first and accepts the old hash too: old file + new sidecar loads."""
    path = tmp_path / "checkpoint-latest.pth"
    save_checkpoint(path, **_state(0.5))
    old = path.read_bytes()
    save_checkpoint(path, **_state(0.25))
    path.write_bytes(old)                      # as if the rename of the new file had not happened
    assert load_checkpoint(path)["model"]["w"][0, 0].item() == 0.5
    accepted = json.loads(sidecar_path(path).read_text())["accepted"]
    assert len(accepted) == 2 and accepted[0] != accepted[1]


def test_without_a_sidecar_a_checkpoint_loads_unverified(tmp_path):
    path = tmp_path / "mae_pretrain_vit_base.pth"    # MAE's, timm's or an older salmae's
    torch.save(_state(), path)
    assert verify_checkpoint(path) is False
    assert load_checkpoint(path)["epoch"] == 3


def test_a_damaged_sidecar_is_one_line(tmp_path):
    path = tmp_path / "c.pth"
    save_checkpoint(path, **_state())
    sidecar_path(path).write_text("{not json")
    with pytest.raises(SalmaeError, match=r"checksum file .*c.pth.sha256 is damaged; delete it"):
        load_checkpoint(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(tmp_path, bad):
    path = tmp_path / "diverged.pth"
    state = _state()
    state["model"]["w"][3, :5] = bad
    save_checkpoint(path, **state)             # the sidecar matches: the file is intact, the weights are not
    with pytest.raises(SalmaeError, match=r"^checkpoint .*diverged.pth holds 5 non-finite weights of 4160 in 1 "
                                          r"tensors \(first: w\)"):
        load_checkpoint(path)
