"""The CPU proxy of `check_syncs`: no step makes a tensor from Python data or reads one on the host.

What only CUDA can show (a sync inside a library kernel, pinned-memory copies) is checked by
`torch.cuda.set_sync_debug_mode("error")` in the same guard when `salmae gpu-check` runs on a GPU;
here the recorder of `pipeline.host_syncs` runs around the same blocks on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from salmae.pipeline.data import transforms
from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.host_syncs import no_host_syncs, record_host_syncs
from test_engine_pretrain import _run


def _old_normalise(images, stats):
    """How `normalise` built its constants before: from Python lists, on the images' device, every call."""
    m = torch.as_tensor(transforms.IMAGENET_MEAN, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(transforms.IMAGENET_STD, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float() - m * 255) / (s * 255)


def test_recorder_sees_list_tensors_and_host_reads_from_salmae_code_only():
    x = torch.ones(3)
    with record_host_syncs() as found:
        torch.tensor([1.0, 2.0])          # this file is not salmae's code: not recorded
        _old_normalise(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), None)
    assert found == []
    with record_host_syncs() as found:
        transforms.normalise(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), transforms.pixel_stats(torch.device("cpu")))
    assert len(found) == 2 and all("transforms.py" in f for f in found)   # pixel_stats' two lists
    from salmae.pipeline.saliency.gradcam import trim_caption_padding

    with record_host_syncs() as found:
        trim_caption_padding(torch.tensor([[1, 2, 0], [3, 0, 0]]))
    assert [f.split(" at ")[0] for f in found] == ["Tensor.__int__"]
    assert float(x.sum()) == 3.0          # patches are gone afterwards


def test_guard_raises_naming_the_step_and_the_line():
    stats = transforms.pixel_stats(torch.device("cpu"))
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    with no_host_syncs(torch.device("cpu"), True, "epoch 0 step 1"):
        transforms.normalise(images, stats)
    with pytest.raises(SalmaeError, match=r"epoch 0 step 1 would wait for the GPU: torch.tensor of Python data "
                                          r"at transforms.py:\d+"):
        with no_host_syncs(torch.device("cpu"), True, "epoch 0 step 1"):
            transforms.normalise(images, transforms.pixel_stats(images.device))
    with no_host_syncs(torch.device("cpu"), False, "off"):
        transforms.pixel_stats(images.device)


@pytest.mark.parametrize("mask", ["saliency", "adaptive"])
def test_pretraining_steps_make_no_host_syncs(tmp_path, shapes_pattern, store_path, mask):
    """A stage-2 epoch with check_syncs on, loader in the main process (workers 0): the recorder
    runs around every non-logging step (forward, backward, optimizer) and finds nothing."""
    ckpt = _run(tmp_path / "run", shapes_pattern, store_path, mask=mask, workers=0, log_every=4, check_syncs=True)
    assert ckpt["epoch"] == 0


def test_pretraining_with_the_old_normalise_is_stopped(tmp_path, shapes_pattern, store_path, monkeypatch):
    """The same run fails at its first non-logging step when a step builds its constants from lists."""
    import salmae.pipeline.data.transforms as t

    def old(images, stats):
        m = torch.as_tensor(t.IMAGENET_MEAN, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        return images.float() - m
    old.__code__ = old.__code__.replace(co_filename=t.__file__)   # as if it were still in transforms.py
    monkeypatch.setattr("salmae.pipeline.pretrain.engine.normalise", old)
    with pytest.raises(SalmaeError, match=r"epoch 0 step 1 would wait for the GPU: torch.as_tensor of Python data"):
        _run(tmp_path / "run", shapes_pattern, store_path, workers=0, log_every=4, check_syncs=True)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, shapes_pattern):
    from test_pretrain_stage import _store

    return _store(tmp_path_factory.mktemp("store") / "store.zarr", shapes_pattern, failed_rows=(3, 40))


def test_stage1_batches_make_no_host_syncs(tmp_path, shapes_pattern):
    """Stage 1 with check_syncs on and the loader in the main process (workers 0): normalisation,
    the text tower and Grad-CAM of every batch run under the recorder and it finds nothing."""
    from test_saliency_stage import _cfg
    from salmae.stages.saliency import run

    summary = run(_cfg(shapes_pattern, tmp_path / "store.zarr", check_syncs=True))
    assert summary["counts"] == {"ok": 64} and summary["steady_state"]["images"] == 56   # after the first 8


def test_stage1_with_the_old_normalise_is_stopped(tmp_path, shapes_pattern, monkeypatch):
    from test_saliency_stage import _cfg
    import salmae.pipeline.saliency.engine as stage
    from salmae.stages.saliency import run

    def old(images, stats):
        m = torch.as_tensor(transforms.IMAGENET_MEAN, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        return images.float() - m
    old.__code__ = old.__code__.replace(co_filename=transforms.__file__)
    monkeypatch.setattr(stage, "normalise", old)
    with pytest.raises(SalmaeError, match=r"stage 1 batch 0 would wait for the GPU: torch.as_tensor of Python data"):
        run(_cfg(shapes_pattern, tmp_path / "store.zarr", check_syncs=True))
