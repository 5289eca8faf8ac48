"""MAE model: shapes, official key layout, padded variable-length batches, presets."""

from __future__ import annotations

import pytest
import torch

from salmae.pipeline.pretrain import masking
from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.models.mae import MaskedAutoencoderViT, build_mae

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def _model(**kw):
    torch.manual_seed(0)
    return build_mae("tiny", **{**TINY, **kw}).eval()


def official_keys(depth: int, decoder_depth: int) -> set[str]:
    """The state-dict keys of facebookresearch/mae MaskedAutoencoderViT."""
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
             "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
             "mlp.fc2.weight", "mlp.fc2.bias"]
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
            "norm.bias", "decoder_embed.weight", "decoder_embed.bias", "mask_token", "decoder_pos_embed",
            "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"}
    keys |= {f"blocks.{i}.{k}" for i in range(depth) for k in block}
    keys |= {f"decoder_blocks.{i}.{k}" for i in range(decoder_depth) for k in block}
    return keys


def test_shapes_and_loss():
    model = _model()
    imgs = torch.randn(3, 3, 32, 32)
    loss, pred, mask = model(imgs, mask_ratio=0.75)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert pred.shape == (3, 16, 8 * 8 * 3) and mask.shape == (3, 16)
    assert (mask.sum(1) == 12).all()
    assert model.unpatchify(model.patchify(imgs)).equal(imgs)
    per_image = model(imgs, masking=masking.random_mask(3, 16, 0.75, generator=torch.Generator().manual_seed(0)),
                      reduction="none")[0]
    assert per_image.shape == (3,)


def test_official_key_layout_loads_strict():
    model = _model()
    sd = model.state_dict()
    assert set(sd) == official_keys(2, 1)
    # a state dict with official names (e.g. from a converted checkpoint) loads strictly into a fresh model
    official = {k: torch.randn_like(v) for k, v in sd.items()}
    fresh = _model()
    fresh.load_state_dict(official, strict=True)
    assert torch.equal(fresh.state_dict()["blocks.1.attn.qkv.weight"], official["blocks.1.attn.qkv.weight"])
    assert not fresh.pos_embed.requires_grad and not fresh.decoder_pos_embed.requires_grad
    assert fresh.norm.eps == 1e-6
    rebuilt = MaskedAutoencoderViT(**fresh.model_args)
    assert set(rebuilt.state_dict()) == set(sd)


def test_noise_reproduces_mask():
    model = _model()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    a = model(imgs, noise=noise)
    b = model(imgs, noise=noise)
    assert torch.equal(a[2], b[2]) and torch.allclose(a[0], b[0])
    # MAE's random_masking, transcribed (models_mae.py), not our masking module
    len_keep = int(16 * (1 - 0.75))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask_ref = torch.ones(2, 16)
    mask_ref[:, :len_keep] = 0
    mask_ref = torch.gather(mask_ref, dim=1, index=ids_restore)
    assert torch.equal(a[2], mask_ref) and a[2].sum() == 24


def test_sincos_position_embedding_golden_values():
    """MAE's get_2d_sincos_pos_embed with dim 4 on a 2x2 grid: the first half of the channels
    encodes the column, the second the row; omega = 1, so patch (row r, col c) gets
    [sin c, cos c, sin r, cos r] (and the cls row zeros)."""
    import math

    from salmae.pipeline.models.mae import sincos_pos_embed_2d

    emb = sincos_pos_embed_2d(4, (2, 2))
    s1, c1 = math.sin(1.0), math.cos(1.0)
    want = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 1], [s1, c1, 0, 1], [0, 1, s1, c1], [s1, c1, s1, c1]])
    torch.testing.assert_close(emb, want.float())


def test_precomputed_triple_equals_noise_path():
    model = _model()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    a = model(imgs, noise=noise)
    b = model(imgs, masking=masking.random_mask(2, 16, 0.75, noise=noise))
    assert torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])


def test_padded_batch_equals_each_image_alone():
    model = _model()
    imgs = torch.randn(3, 3, 32, 32)
    sal = torch.zeros(3, 16)
    sal[0, :2] = 1.0
    sal[1, :8] = 1.0
    sal[2, :] = 1.0
    ids_keep, mask, ids_restore = masking.adaptive_mask(sal, base=0.6, var=0.3, delta=0.5,
                                                        generator=torch.Generator().manual_seed(0))
    counts = (mask == 0).sum(1)
    assert counts.unique().numel() == 3  # genuinely variable lengths
    batch_loss, batch_pred, _ = model(imgs, masking=(ids_keep, mask, ids_restore), reduction="none")
    for i in range(3):
        k = int(counts[i])
        alone = (ids_keep[i:i + 1, :k], mask[i:i + 1], ids_restore[i:i + 1])
        loss_i, pred_i, _ = model(imgs[i:i + 1], masking=alone, reduction="none")
        torch.testing.assert_close(batch_loss[i:i + 1], loss_i, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batch_pred[i:i + 1], pred_i, rtol=1e-5, atol=1e-5)


def _pairwise_attn_mask(valid):
    """The former padding mask, transcribed: [N, 1, 1+K, 1+K], real tokens attend to real ones only,
    a padding token to itself only."""
    n, k = valid.shape
    tok = torch.cat([torch.ones(n, 1, dtype=torch.bool), valid], dim=1)
    return ((tok[:, None, :] & tok[:, :, None]) | torch.eye(k + 1, dtype=torch.bool)[None])[:, None]


@pytest.mark.parametrize("fused", [True, False])
def test_key_padding_mask_gives_the_pairwise_masks_results(monkeypatch, fused):
    """Padded (adaptive) batches hide padding by key only ([N, 1, 1, 1+K]: SDPA may keep its
    memory-efficient kernel); real tokens' outputs and the loss equal the pairwise mask's. Both of
    timm's attention paths (SDPA and its own softmax) are run."""
    from salmae.pipeline.pretrain.mask_plan import MaskPlan, batch_masks
    from salmae.pipeline.models import mae

    model = _model()
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    imgs = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sal = torch.rand(8, 16, generator=torch.Generator().manual_seed(1)) ** 4
    sal[:4] = (sal[:4] > 0.2).float()
    m = batch_masks(MaskPlan(strategy="adaptive", base=0.6, var=0.3), 8, model.grid, 0.0, 3, (0, 8), sal)
    valid = m["valid"]
    assert valid.sum(1).unique().numel() >= 3 and not valid.all()  # several real lengths, and padding
    key_mask = mae._padding_attn_mask(valid)
    assert key_mask.shape == (8, 1, 1, 1 + valid.shape[1]) and key_mask.dtype == torch.bool
    assert torch.equal(key_mask[:, 0, 0, 1:], valid) and key_mask[:, 0, 0, 0].all()
    triple = (m["ids_keep"], m["mask"], m["ids_restore"])
    latent = model.forward_encoder(imgs, m["ids_keep"], valid)
    loss = model(imgs, masking=triple, valid=valid, reduction="none")[0]
    monkeypatch.setattr(mae, "_padding_attn_mask", _pairwise_attn_mask)
    latent_ref = model.forward_encoder(imgs, m["ids_keep"], valid)
    loss_ref = model(imgs, masking=triple, valid=valid, reduction="none")[0]
    real = torch.cat([torch.ones(8, 1, dtype=torch.bool), valid], dim=1)  # cls and the real patches
    torch.testing.assert_close(latent[real], latent_ref[real], rtol=0, atol=1e-6)
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=1e-6)
    assert (latent[~real] - latent_ref[~real]).abs().max() > 1e-3  # padding rows did change: the masks differ


def test_unpadded_forward_runs_on_blocks_without_attn_mask(monkeypatch):
    """timm before 1.0.16: `Block.forward(self, x)` has no attn_mask. A batch without padding must
    not pass one (not even None); the stand-in is timm 1.0.15's Block.forward."""
    from timm.models.vision_transformer import Block

    model = _model()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(0))
    want = model(imgs, noise=noise)[0]

    def forward(self, x):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    monkeypatch.setattr(Block, "forward", forward)
    torch.testing.assert_close(model(imgs, noise=noise)[0], want, rtol=0, atol=0)
    torch.testing.assert_close(model(imgs, masking=masking.random_mask(2, 16, noise=noise), valid=None)[0], want,
                               rtol=0, atol=0)


def test_weights_and_online_salience():
    model = _model()
    imgs = torch.randn(2, 3, 32, 32)
    triple = masking.random_mask(2, 16, 0.5, generator=torch.Generator().manual_seed(0))
    w = masking.boundary_weights(triple[1], model.grid, 3.0)
    weighted, pred, mask = model(imgs, masking=triple, weight=w)
    target = model.patchify(imgs)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(-1)
    torch.testing.assert_close(weighted, (per_patch * mask * w).sum() / (mask * w).sum())
    assert (w[mask == 0] == 1).all() and (w == 3.0).any()
    sal = model.token_salience(imgs)
    assert sal.shape == (2, 16)
    torch.testing.assert_close(sal.sum(1), torch.full((2,), 16.0))   # attention columns: sums to L per row


@pytest.mark.parametrize("preset", ["tiny", "small", "base", "large", "huge"])
def test_presets(preset):
    from salmae.pipeline.models.mae import PRESETS

    args = PRESETS[preset]
    assert args["embed_dim"] % args["num_heads"] == 0
    if preset in ("base", "large", "huge"):
        assert (args["decoder_embed_dim"], args["decoder_depth"]) == (512, 8)
    if preset == "tiny":
        model = build_mae("tiny")
        assert model(torch.randn(1, 3, 64, 64))[1].shape == (1, 64, 192)
    # every preset's encoder has exactly the parameters of timm's ViT of that shape (built on `meta`:
    # no memory, no init), and the decoder predicts p*p*3 values per patch
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):
        model = build_mae(preset)
        vit = VisionTransformer(img_size=args["img_size"], patch_size=args["patch_size"], embed_dim=args["embed_dim"],
                                depth=args["depth"], num_heads=args["num_heads"], num_classes=0)
    encoder = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("decoder", "mask_token")))
    assert encoder == sum(p.numel() for p in vit.parameters())
    assert model.decoder_pred.out_features == args["patch_size"] ** 2 * 3
    with pytest.raises(SalmaeError):
        build_mae("gigantic")
