"""Training steps of the eval protocols when a batch has no readable image.

A rank whose whole batch is unreadable must still step (DDP's gradient all-reduce is a
collective) with a zero loss and zero gradients. Checked in one process (exact parameter
updates) and under 2-process gloo torchrun, where this file is also the worker script (which
also checks that `check=header` probes each image file on exactly one rank). What
gloo on the CPU cannot show: NCCL's own timeout/hang behaviour and CUDA streams; the collective
pattern (one all-reduce per bucket per step on every rank) is the same.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from salmae.pipeline.eval.finetune import finetune_one_epoch
from salmae.pipeline.eval.linear import LinearProbeHead, train_linear_head

IMG, CLASSES, FEAT = 32, 4, 6


def _vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=IMG, patch_size=8, embed_dim=32, depth=1, num_heads=1, mlp_ratio=2.0,
                             num_classes=CLASSES, global_pool="avg")


def _batch(readable: bool, seed: int = 1):
    """One loader batch `(imgs, labels, index, ok)` of 4 items; unreadable items are zero images."""
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(4, 3, IMG, IMG, generator=g) if readable else torch.zeros(4, 3, IMG, IMG)
    return imgs, torch.tensor([0, 1, 2, 3]), torch.arange(4) + 10 * seed, torch.full((4,), readable)


class _ListBatches:
    """A `FeatureBatches` source that yields fixed (features, labels) batches every epoch."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int):
        yield from self.batches


def _feats(readable: bool):
    g = torch.Generator().manual_seed(2)
    if not readable:
        return torch.zeros(0, FEAT), torch.zeros(0, dtype=torch.long)
    return torch.randn(8, FEAT, generator=g), torch.tensor([0, 1, 2, 3] * 2)


def _finetune(model, batches, optimizer):
    return finetune_one_epoch(model, batches, optimizer, nn.CrossEntropyLoss(), torch.device("cpu"), epoch=0,
                              total_steps=len(batches), warmup_steps=0, base_lr=optimizer.defaults["lr"],
                              min_lr=0.0)


def test_finetune_unreadable_batch_is_a_zero_loss_step():
    model = _vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, bad = _finetune(model, [_batch(readable=False)], torch.optim.SGD(model.parameters(), lr=0.5))
    assert loss == 0.0 and bad == [10, 11, 12, 13]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # zero gradient, plain SGD: nothing moves
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    assert model.training  # the stand-in forward ran in eval mode and put the mode back


def test_finetune_unreadable_batch_with_adamw_applies_only_weight_decay():
    model = _vit()
    before = [p.detach().clone() for p in model.parameters()]
    lr, wd = 0.01, 0.05
    _finetune(model, [_batch(readable=False)], torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd))
    for p, p0 in zip(model.parameters(), before):
        # fresh Adam moments on a zero gradient give a zero update; decoupled decay still shrinks p
        torch.testing.assert_close(p.detach(), p0 * (1 - lr * wd), rtol=1e-6, atol=0)


def test_linear_unreadable_batch_leaves_head_and_batchnorm_stats_alone():
    head = LinearProbeHead(FEAT, CLASSES)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    losses = []
    train_linear_head(head, _ListBatches([_feats(readable=False)]), torch.optim.SGD(head.parameters(), lr=0.5),
                      epochs=1, base_lr=0.5, warmup_epochs=0, on_epoch=lambda e, loss: losses.append(loss))
    assert losses == [0.0]
    for k, v in head.state_dict().items():  # running mean/var and num_batches_tracked included
        assert torch.equal(v, before[k]), k


def _rows(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, FEAT, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def _linear_head() -> nn.Module:
    """A head without BatchNorm, so a micro-batch's gradient does not depend on the others in its group."""
    torch.manual_seed(3)
    return nn.Linear(FEAT, CLASSES)


def _train_linear(batches, accum_iter: int) -> tuple[nn.Module, list[float]]:
    head, losses = _linear_head(), []
    train_linear_head(head, _ListBatches(batches), torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9),
                      epochs=2, base_lr=0.5, warmup_epochs=0, accum_iter=accum_iter,
                      on_epoch=lambda e, loss: losses.append(loss))
    return head, losses


def test_linear_accumulation_equals_one_big_batch_and_an_incomplete_group_is_not_run():
    """Two micro-batches of 4 with accum_iter 2 step exactly as one batch of 8 (mean cross-entropy, SGD with
    momentum, 2 epochs); a third micro-batch that cannot complete a group changes nothing."""
    (x1, y1), (x2, y2), (x3, y3) = _rows(4, 1), _rows(4, 2), _rows(4, 3)
    whole, whole_losses = _train_linear([(torch.cat([x1, x2]), torch.cat([y1, y2]))], accum_iter=1)
    accum, accum_losses = _train_linear([(x1, y1), (x2, y2)], accum_iter=2)
    tail, tail_losses = _train_linear([(x1, y1), (x2, y2), (x3, y3)], accum_iter=2)
    one_by_one, _ = _train_linear([(x1, y1), (x2, y2)], accum_iter=1)
    for got in (accum, tail):
        torch.testing.assert_close(got.weight, whole.weight, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got.bias, whole.bias, rtol=1e-6, atol=1e-7)
    assert (one_by_one.weight - whole.weight).abs().max() > 1e-3  # two steps are not one
    np.testing.assert_allclose(accum_losses, whole_losses, rtol=1e-6)
    np.testing.assert_allclose(tail_losses, whole_losses, rtol=1e-6)  # the unrun micro-batch is not in the mean


def test_finetune_accumulation_equals_one_big_batch():
    """The tiny ViT (LayerNorm only, no drop path): 2 x 4 images with accum_iter 2 == one batch of 8 under AdamW."""
    imgs, labels, index, ok = (torch.cat(parts) for parts in zip(_batch(True, seed=1), _batch(True, seed=2)))
    whole = _vit()
    _finetune_accum(whole, [(imgs, labels, index, ok)], accum_iter=1)
    accum = _vit()
    _finetune_accum(accum, [(imgs[:4], labels[:4], index[:4], ok[:4]), (imgs[4:], labels[4:], index[4:], ok[4:])],
                    accum_iter=2)
    for (k, a), w in zip(accum.state_dict().items(), whole.state_dict().values()):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.equal(whole.head.weight, _vit().head.weight)


def _finetune_accum(model, batches, accum_iter: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    return finetune_one_epoch(model, batches, optimizer, nn.CrossEntropyLoss(), torch.device("cpu"), epoch=0,
                              total_steps=len(batches), warmup_steps=0, base_lr=1e-3, min_lr=0.0,
                              accum_iter=accum_iter)


def _write_folder(root: Path) -> int:
    """A 2-class ImageFolder, 5 train + 2 val images per class, one train file corrupt; returns the file count."""
    from PIL import Image

    for split, n in (("train", 5), ("val", 2)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / split / cls / f"{i}.png")
    (root / "train" / "b" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    return 14


def _open_folder_counting_probes(root: Path) -> dict:
    """Open the split with check=header, counting the files this process probes."""
    import salmae.pipeline.data.imagefolder as imagefolder

    calls, real_probe = [], imagefolder.probe_file
    imagefolder.probe_file = lambda path: (calls.append(path), real_probe(path))[1]
    try:
        split = imagefolder.ImageFolderSplit.open(root, check="header")
    finally:
        imagefolder.probe_file = real_probe
    return {"probed": sorted(calls), "samples": [p for p, _ in split.train.samples],
            "targets": list(split.train.targets), "skipped": split.skipped}


def _ddp_worker(out: Path) -> None:
    """torchrun worker: rank 1's batches are wholly unreadable, rank 0's are not."""
    import torch.distributed as torch_dist
    from torch.nn.parallel import DistributedDataParallel

    torch_dist.init_process_group("gloo")
    rank = torch_dist.get_rank()
    model = _vit()
    ddp = DistributedDataParallel(model)
    loss, _ = _finetune(ddp, [_batch(readable=rank == 0)], torch.optim.SGD(ddp.parameters(), lr=0.5))
    head = LinearProbeHead(FEAT, CLASSES)
    ddp_head = DistributedDataParallel(head)
    head_losses = []
    train_linear_head(ddp_head, _ListBatches([_feats(readable=rank == 0)]), torch.optim.SGD(ddp_head.parameters(),
                      lr=0.5), epochs=1, base_lr=0.5, warmup_epochs=0,
                      on_epoch=lambda e, value: head_losses.append(value))
    probed = _open_folder_counting_probes(out / "folder")
    accum_head = _linear_head()  # accumulation under DDP: no_sync on the first micro-batch, all-reduce on the second
    ddp_accum = DistributedDataParallel(accum_head)
    train_linear_head(ddp_accum, _ListBatches([_rows(4, 10 + 2 * rank), _rows(4, 11 + 2 * rank)]),
                      torch.optim.SGD(ddp_accum.parameters(), lr=0.5), epochs=1, base_lr=0.5, warmup_epochs=0,
                      accum_iter=2)
    torch.save({"vit": model.state_dict(), "loss": loss, "head": head.state_dict(), "head_loss": head_losses[0],
                "accum_head": accum_head.state_dict(), **probed}, out / f"rank{rank}.pt")
    torch_dist.destroy_process_group()


def test_two_ranks_one_with_only_unreadable_images_step_together(tmp_path):
    """Under DDP the gradient is the mean over ranks, so one readable rank and one empty rank with
    lr 0.5 must equal a single process on the readable batch with lr 0.25 (plain SGD)."""
    n_files = _write_folder(tmp_path / "folder")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", __file__, str(tmp_path)],
                          capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    model = _vit()
    loss, _ = _finetune(model, [_batch(readable=True)], torch.optim.SGD(model.parameters(), lr=0.25))
    head = LinearProbeHead(FEAT, CLASSES)
    head_losses = []
    train_linear_head(head, _ListBatches([_feats(readable=True)]), torch.optim.SGD(head.parameters(), lr=0.25),
                      epochs=1, base_lr=0.25, warmup_epochs=0, on_epoch=lambda e, value: head_losses.append(value))
    for got in ranks:
        # the epoch loss is the mean over readable images of all ranks: rank 0's batch alone
        assert abs(got["loss"] - loss) < 1e-6 and abs(got["head_loss"] - head_losses[0]) < 1e-6
        for k, v in model.state_dict().items():
            torch.testing.assert_close(got["vit"][k], v, rtol=1e-5, atol=1e-6, msg=k)
        for k in ("fc.weight", "fc.bias"):
            torch.testing.assert_close(got["head"][k], head.state_dict()[k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(ranks[0]["vit"]["head.weight"], _vit().state_dict()["head.weight"])  # it did train

    # 2 ranks x accum_iter 2 (one all-reduce per group) == one process summing the same 4 micro-batches
    single = _linear_head()
    train_linear_head(single, _ListBatches([_rows(4, seed) for seed in (10, 11, 12, 13)]),
                      torch.optim.SGD(single.parameters(), lr=0.5), epochs=1, base_lr=0.5, warmup_epochs=0,
                      accum_iter=4)
    for got in ranks:
        for k, v in single.state_dict().items():
            torch.testing.assert_close(got["accum_head"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.equal(ranks[0]["accum_head"]["weight"], _linear_head().weight)

    # check=header: each file probed by exactly one rank, and both ranks keep the same list
    probed = [set(got["probed"]) for got in ranks]
    assert not probed[0] & probed[1] and len(probed[0] | probed[1]) == n_files
    assert {len(p) for p in probed} == {n_files // 2}
    assert ranks[0]["samples"] == ranks[1]["samples"] and ranks[0]["targets"] == ranks[1]["targets"]
    assert len(ranks[0]["samples"]) == 9 and all(got["skipped"] == [(str(tmp_path / "folder" / "train" / "b" /
                                                                      "3.png"), "unreadable_image")] for got in ranks)


if __name__ == "__main__":  # run by torchrun from the test above
    torch.set_num_threads(1)
    _ddp_worker(Path(sys.argv[1]))
