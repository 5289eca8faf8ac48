"""The GPU path's switches, shown on the CPU: CUDA math settings, a process group that cannot form,
gradient accumulation under a compiled DDP wrapper, readable rows without copies, and the
frozen-feature protocols under the run's autocast.

What only a GPU can show: that TF32 and cuDNN autotuning speed a step up, that NCCL forms across
nodes with the interface named; `salmae gpu-check` on a GPU box measures the first.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as td
from torch.nn.parallel import DistributedDataParallel

from salmae.pipeline.device import configure_cuda_math, pick_device
from salmae.pipeline.eval.accumulation import gradient_sync
from salmae.pipeline.eval.empty_batch import readable_rows

ROOT = Path(__file__).resolve().parents[1]


def test_cuda_math_is_tf32_and_autotuned_and_the_cpu_path_leaves_it_alone():
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.benchmark = False
        pick_device("cpu")
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.benchmark
        configure_cuda_math()   # what pick_device("cuda") runs
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.benchmark
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved[1], saved[2]


def test_a_process_group_that_cannot_form_is_one_line_naming_the_interface_variable(tmp_path):
    """2-process torchrun with GLOO_SOCKET_IFNAME naming no interface: every rank gets the SalmaeError
    (what a multi-node job whose hostname resolves to 127.0.1.1 or the wrong interface meets)."""
    script = tmp_path / "join.py"
    script.write_text(textwrap.dedent("""
        import torch
        from salmae.pipeline import dist
        from salmae.pipeline.errors import SalmaeError
        try:
            dist.init(torch.device("cpu"))
            print("JOINED")
        except SalmaeError as e:
            print("SALMAE", e)
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="nosuchif0",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2",
                           str(script)], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("SALMAE", "JOINED"))]
    assert len(lines) == 2 and all(ln.startswith("SALMAE rank ") for ln in lines), proc.stdout + proc.stderr[-2000:]
    for ln in lines:
        assert "nosuchif0" in ln and "set GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME)" in ln and "\n" not in ln


@pytest.fixture
def one_process_group(tmp_path):
    td.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    td.destroy_process_group()


def test_compiled_ddp_skips_the_all_reduce_inside_an_accumulation_group(one_process_group):
    """Stage 3 compiles around DDP (`torch.compile(DDP(m))`): `no_sync` must reach the DDP module
    through the compiled wrapper, or every micro-batch is all-reduced."""
    ddp = DistributedDataParallel(torch.nn.Linear(4, 2))
    compiled = torch.compile(ddp)            # wrapping only: nothing is compiled until it runs
    for model in (ddp, compiled):
        with gradient_sync(model, sync=False):
            assert ddp.require_backward_grad_sync is False
        assert ddp.require_backward_grad_sync is True
        with gradient_sync(model, sync=True):
            assert ddp.require_backward_grad_sync is True


def test_readable_rows_copy_nothing_when_every_row_is_readable():
    imgs, labels = torch.randn(4, 3, 2, 2), torch.arange(4)
    same = readable_rows(torch.ones(4, dtype=torch.bool), imgs, labels)
    assert same[0] is imgs and same[1] is labels
    some = readable_rows(torch.tensor([True, False, True, True]), imgs, labels)
    assert torch.equal(some[1], torch.tensor([0, 2, 3])) and torch.equal(some[0], imgs[[0, 2, 3]])


def test_features_are_extracted_under_the_runs_autocast():
    """bf16 features are float32 tensors equal to the encoder's bf16 output, and differ from fp32 ones."""
    import timm

    from salmae.pipeline.eval.features import encode, extract_features

    encoder = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=0,
                                depth=1, embed_dim=64, num_heads=2).eval()
    imgs = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    dataset = [(imgs[i], i % 2, i, True) for i in range(6)]
    fp32 = extract_features(encoder, dataset, batch_size=3, device=torch.device("cpu"))
    bf16 = extract_features(encoder, dataset, batch_size=3, device=torch.device("cpu"), precision="bf16")
    assert bf16.feats.dtype == torch.float32 and bf16.feats.shape == fp32.feats.shape == (6, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = encode(encoder, imgs[:3]).float()
    assert torch.equal(bf16.feats[:3], want)
    assert not torch.equal(bf16.feats, fp32.feats)
    torch.testing.assert_close(bf16.feats, fp32.feats, rtol=0.05, atol=0.05)
