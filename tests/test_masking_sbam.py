"""SBAM as released (`sbam`), and `amr-capped`, the strategy once called `adaptive`.

The reference below is our line-by-line reading of SBAM's released masking (github.com/doihye/SBAM,
models_mae.py, `saliency_guided_masking` lines 93-124 and `forward_encoder` lines 128-132, commit
84beb18): `masking.sbam_*` must give the same triple, bit for bit, on fixed inputs and seeds.
"""

from __future__ import annotations

import logging

import pytest
import torch

from salmae.pipeline.pretrain import masking
from salmae.pipeline.pretrain.mask_plan import MaskPlan


def released_sbam_masking(x: torch.Tensor, base: float, var: float, delta: float):
    """SBAM's `saliency_guided_masking(x, base_mask_ratio, mask_ratio_var, delta)`, step by step.

    x: [N, L, D] patch + position embeddings. Its noise comes from torch's global generator, as in the
    release. Line 108 reads `mask_ratio`, a name the function does not define; `base` is what it means.
    Returns (ids_keep [N, len_keep], mask [N, L], ids_restore [N, L]).
    """
    n, length, _ = x.shape
    scores = torch.nn.functional.softmax(torch.matmul(x, x.permute(0, 2, 1)), dim=2)   # l.96-97
    column_sums = torch.sum(scores, dim=1)                                               # l.98
    low = column_sums.min(dim=1, keepdim=True)[0]
    high = column_sums.max(dim=1, keepdim=True)[0]
    normalised = (column_sums - low) / (high - low)                                      # l.100-101
    above = (normalised > delta).sum(dim=1)                                              # l.103
    share = above.float().mean() / normalised.size(1)                                    # l.105-106
    ratio = base - var + 2 * var * share                                                 # l.108
    keep = int(length * (1 - ratio))                                                     # l.109
    jitter = torch.rand(n, length, device=x.device) / 2                                  # l.111
    order = torch.argsort(normalised + jitter, dim=1)                                    # l.112-114
    restore = torch.argsort(order, dim=1)                                                # l.115
    hidden = torch.ones([n, length], device=x.device)
    hidden[:, :keep] = 0
    hidden = torch.gather(hidden, dim=1, index=restore)                                  # l.120-122
    return order[:, :keep], hidden, restore


def _reference(x, base, var, delta, seed):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return released_sbam_masking(x, base, var, delta)


CASES = [  # (N, L, D, scale, base, var, delta, seed)
    (4, 16, 8, 0.5, 0.75, 0.1, 0.5, 0),
    (3, 64, 16, 0.3, 0.75, 0.2, 0.3, 1),
    (5, 49, 12, 0.4, 0.6, 0.15, 0.6, 2),
    (2, 16, 8, 1.0, 0.75, 0.1, 0.1, 3),
]


@pytest.mark.parametrize("n, length, dim, scale, base, var, delta, seed", CASES)
def test_sbam_matches_the_released_code(n, length, dim, scale, base, var, delta, seed):
    x = torch.randn(n, length, dim, generator=torch.Generator().manual_seed(100 + seed)) * scale
    keep_ref, mask_ref, restore_ref = _reference(x, base, var, delta, seed)
    slots = masking.sbam_keep_slots(length, base, var)
    ids_keep, mask, restore = masking.sbam_mask(masking.sbam_salience(x), base, var, delta,
                                                generator=torch.Generator().manual_seed(seed), keep_width=slots)
    k = keep_ref.shape[1]
    assert torch.equal(mask, mask_ref) and torch.equal(restore, restore_ref)
    assert torch.equal(ids_keep[:, :k], keep_ref) and ids_keep.shape[1] == slots >= k
    assert torch.equal(masking.keep_valid(ids_keep, mask), torch.arange(slots)[None, :].expand(n, -1) < k)


def test_the_cases_cover_ratios_other_than_the_base():
    """The fixed inputs move SBAM's ratio: the equality above is not just MAE's constant count."""
    counts = set()
    for n, length, dim, scale, base, var, delta, seed in CASES:
        x = torch.randn(n, length, dim, generator=torch.Generator().manual_seed(100 + seed)) * scale
        _, mask, _ = _reference(x, base, var, delta, seed)
        counts.add(int(mask[0].sum()) - masking.n_masked(length, base))
    assert len(counts) > 1


def test_sbam_salience_is_min_max_normalised_column_sums():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])            # [1, 3, 2]
    a = torch.softmax(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 2.0]]), dim=1)
    s = a.sum(dim=0)
    torch.testing.assert_close(masking.sbam_salience(x)[0], (s - s.min()) / (s.max() - s.min()), rtol=0, atol=0)
    assert torch.equal(masking.sbam_salience(torch.ones(2, 4, 3)), torch.zeros(2, 4))   # released: 0/0


def test_sbam_ratio_per_batch_and_per_image():
    s = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.9, 0.1, 0.0, 0.0]])     # 2 and 1 of 4 above 0.5
    per_batch = masking.sbam_ratio(s, 0.75, 0.1, 0.5, per="batch")
    per_image = masking.sbam_ratio(s, 0.75, 0.1, 0.5, per="image")
    assert per_batch.dtype == torch.float32 and per_batch.tolist() == pytest.approx([0.725, 0.725], abs=1e-7)
    assert per_image.tolist() == pytest.approx([0.75, 0.70], abs=1e-7)
    _, mask, _ = masking.sbam_mask(s, 0.75, 0.1, 0.5, per="image", generator=torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [4 - int(4 * (1 - 0.75)), 4 - int(4 * (1 - torch.tensor(0.70).item()))]


def test_sbam_masks_in_the_step_come_from_the_models_own_embeddings():
    """The plan builds SBAM's masks from patch + position embeddings (forward_encoder l.128-132) with the
    step's generator: exactly the released masking of the same tokens and seed."""
    from salmae.pipeline.models.mae import build_mae
    from salmae.pipeline.pretrain.engine import device_masks

    torch.manual_seed(0)
    model = build_mae("tiny", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                      decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    # small pixels: at init, unit-variance images give tokens whose x·xᵀ saturates the softmax, and an
    # image whose column sums are all exactly 1 is 0/0 in the release (NaN), zeros here
    imgs = 0.1 * torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    plan = MaskPlan(strategy="sbam", base=0.75, var=0.2, delta=0.4)
    assert not plan.in_loader and not plan.reads_store
    m = device_masks({}, plan, model, imgs, 0.0, 1234, (0, 4))
    with torch.no_grad():
        tokens = model.patch_embed(imgs) + model.pos_embed[:, 1:, :]
    keep_ref, mask_ref, restore_ref = _reference(tokens, 0.75, 0.2, 0.4, 1234)
    assert torch.equal(m["mask"], mask_ref) and torch.equal(m["ids_restore"], restore_ref)
    assert torch.equal(m["ids_keep"][:, :keep_ref.shape[1]], keep_ref)
    loss, _, _ = model(imgs, masking=(m["ids_keep"], m["mask"], m["ids_restore"]), valid=m["valid"])
    assert torch.isfinite(loss)


def test_sbam_keeps_maes_loss_mean():
    """SBAM's released loss is MAE's mean over masked patches: auto does not switch it to per-image means."""
    from salmae.stages.pretrain import PretrainConfig, _loss_reduction, _mask_plan

    class Model:
        num_patches = 64

    for mask, reduction in (("sbam", "mean"), ("amr-capped", "image_mean"), ("saliency", "mean")):
        cfg = PretrainConfig(mask=mask)
        assert _loss_reduction(cfg, _mask_plan(cfg), Model()) == reduction


# --------------------------------------------------------------------------- amr-capped, once `adaptive`
def test_adaptive_is_amr_capped_and_says_so_once():
    sal = torch.rand(4, 64, generator=torch.Generator().manual_seed(0))
    a = masking.make_mask("adaptive", 4, (8, 8), saliency=sal, generator=torch.Generator().manual_seed(1))
    b = masking.make_mask("amr-capped", 4, (8, 8), saliency=sal, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("salmae")
    logger.addHandler(handler)
    try:
        from salmae.pipeline.pretrain import mask_plan

        mask_plan._warned.discard("adaptive")
        assert [mask_plan.resolve_strategy(n) for n in ("adaptive", "adaptive", "amr-capped")] == ["amr-capped"] * 3
    finally:
        logger.removeHandler(handler)
    assert len(records) == 1 and "deprecated" in records[0].getMessage()
    assert "amr-capped" in records[0].getMessage() and "sbam" in records[0].getMessage()


def test_old_runs_resume_under_either_name(tmp_path):
    """A checkpoint saved as `adaptive`, before the masking keys map/cap_of/sbam_ratio_per existed, resumes
    as `adaptive` or `amr-capped`; a real change (map=shuffled) is still refused."""
    from salmae.pipeline.config import config_to_dict
    from salmae.pipeline.errors import SalmaeError
    from salmae.stages.pretrain import PretrainConfig, _check_resume

    old = config_to_dict(PretrainConfig(mask="adaptive", epochs=2))
    for key in ("map", "cap_of", "sbam_ratio_per"):
        del old["masking"][key]
    state = {"config": old, "epoch": 0}
    for mask in ("adaptive", "amr-capped"):
        _check_resume(PretrainConfig(mask=mask, epochs=2), state, tmp_path / "c.pth")
    changed = PretrainConfig(mask="amr-capped", epochs=2)
    changed.masking.map = "shuffled"
    with pytest.raises(SalmaeError, match=r"masking\.map: 'own' -> 'shuffled'"):
        _check_resume(changed, state, tmp_path / "c.pth")
