"""Masked Autoencoder ViT (He et al., 2021) with the official `models_mae.py` state-dict layout.

    from salmae.pipeline.models.mae import build_mae
    model = build_mae("base")                       # MAE ViT-B/16, decoder 512 x 8
    loss, pred, mask = model(imgs, mask_ratio=0.75)  # imgs [N, 3, 224, 224]

Keys match facebookresearch/mae (`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.N.*`,
`norm`, `decoder_embed`, `mask_token`, `decoder_pos_embed`, `decoder_blocks.N.*`,
`decoder_norm`, `decoder_pred`), so official checkpoints load with `strict=True` and the encoder
keys load into timm's `VisionTransformer`. Beyond MAE, `forward` accepts a precomputed mask
triple from `pipeline.pretrain.masking` (including padded variable-length batches), per-patch loss
weights, and returns per-image losses on request.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.pretrain.masking import keep_valid, online_saliency, random_mask, sbam_salience

# tiny: our test/demo size (64 px shapes, 8 px patches -> 8x8 grid, ~1.2 M parameters).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4,
                 decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    "small": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6,
                  decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8),
    "base": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "large": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                  decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "huge": dict(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
}


def build_mae(preset: str = "base", **overrides: Any) -> "MaskedAutoencoderViT":
    """An MAE from a preset name (tiny|small|base|large|huge) with keyword overrides.

    The resulting `model.model_args` rebuilds the same architecture: `MaskedAutoencoderViT(**model_args)`.
    """
    if preset not in PRESETS:
        raise SalmaeError(f"unknown MAE preset {preset!r}; use one of {', '.join(PRESETS)}")
    return MaskedAutoencoderViT(**{**PRESETS[preset], **overrides})


# --------------------------------------------------------------------------- sin-cos embeddings
def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position embedding: [gh*gw (+1), dim] (zeros for the cls row)."""
    gh, gw = grid
    ys, xs = np.meshgrid(np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64), indexing="ij")
    # MAE: first half of the channels encodes the column (w), second half the row (h)
    emb = np.concatenate([_sincos_1d(dim // 2, xs.reshape(-1)), _sincos_1d(dim // 2, ys.reshape(-1))], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return torch.from_numpy(emb).float()


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos, omega)  # [M, dim/2]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


# --------------------------------------------------------------------------- the model
class MaskedAutoencoderViT(nn.Module):
    """MAE with a ViT encoder over visible patches only and a light ViT decoder."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 1024, depth: int = 24, num_heads: int = 16,
                 decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
                 mlp_ratio: float = 4.0, norm_pix_loss: bool = True):
        super().__init__()
        self.model_args = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                               embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                               decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
                               decoder_num_heads=decoder_num_heads, mlp_ratio=mlp_ratio,
                               norm_pix_loss=norm_pix_loss)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid = tuple(self.patch_embed.grid_size)
        num_patches = self.patch_embed.num_patches
        # encoder
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                                     for _ in range(depth)])
        self.norm = norm_layer(embed_dim)
        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)
        self.initialize_weights()

    # ------------------------------------------------------------------ init (as MAE)
    def initialize_weights(self) -> None:
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid)[None])
        self.decoder_pos_embed.data.copy_(sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], self.grid)[None])
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))  # like nn.Linear, not Conv2d
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_module)

    @staticmethod
    def _init_module(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    # ------------------------------------------------------------------ patches
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [N, C, H, W] -> [N, L, p*p*C] (MAE's (p, q, c) order within a patch)."""
        p, (h, w) = self.patch_size, self.grid
        x = imgs.reshape(imgs.shape[0], self.in_chans, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(imgs.shape[0], h * w, p * p * self.in_chans)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, p*p*C] -> imgs [N, C, H, W]."""
        p, (h, w) = self.patch_size, self.grid
        x = x.reshape(x.shape[0], h, w, p, p, self.in_chans)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], self.in_chans, h * p, w * p)

    # ------------------------------------------------------------------ encoder / decoder
    def forward_encoder(self, imgs: torch.Tensor, ids_keep: torch.Tensor,
                        valid: torch.Tensor | None = None) -> torch.Tensor:
        """imgs [N, C, H, W], ids_keep [N, K], valid [N, K] bool or None -> latent [N, 1+K, D].

        `valid` marks real entries of a padded `ids_keep` (None: no padding, no attention mask).
        """
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]  # [N, L, D]
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [N, K, D]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        if valid is None:
            for blk in self.blocks:
                x = blk(x)  # no attn_mask keyword: timm's Block takes none before 1.0.16
        else:
            attn_mask = _padding_attn_mask(valid)
            for blk in self.blocks:
                x = blk(x, attn_mask=attn_mask)
        return self.norm(x)

    def forward_decoder(self, latent: torch.Tensor, mask: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [N, 1+K, D], mask [N, L], ids_restore [N, L] -> pred [N, L, p*p*C].

        Visible patch l is encoder token ids_restore[l] (its place in the shuffle); masked
        patches take the mask token. Padding tokens (amr-capped, sbam batches) are never gathered.
        """
        x = self.decoder_embed(latent)
        n, k1, d = x.shape
        length = ids_restore.shape[1]
        mask_tokens = self.mask_token.expand(n, length, -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # [N, K + L, D]
        src = torch.where(mask > 0.5, (k1 - 1) + torch.arange(length, device=mask.device)[None, :], ids_restore)
        x_ = torch.gather(x_, 1, src.unsqueeze(-1).expand(-1, -1, d))  # unshuffle: [N, L, D]
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
                     weight: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        """(Weighted) MSE over the masked patches.

        imgs [N, C, H, W], pred [N, L, p*p*C], mask [N, L] (1 = masked), weight [N, L] or None.
        reduction: "mean" -> MAE's: one mean over every masked patch of the batch (scalar);
        "image_mean" -> the mean over images of each image's own mean (scalar; every image weighs
        the same when masked counts differ, as with adaptive ratios); "none" -> per-image means [N].
        The two scalars are equal when every image has the same masked count and no weights.
        """
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # [N, L] per patch
        w = mask if weight is None else mask * weight
        if reduction == "mean":
            return (loss * w).sum() / w.sum().clamp_min(1e-8)
        per_image = (loss * w).sum(dim=1) / w.sum(dim=1).clamp_min(1e-8)
        if reduction == "image_mean":
            return per_image.mean()
        if reduction == "none":
            return per_image
        raise SalmaeError(f"unknown loss reduction {reduction!r}; use mean, image_mean or none")

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None,
                masking: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                weight: torch.Tensor | None = None, reduction: str = "mean",
                valid: torch.Tensor | None | Literal["auto"] = "auto"):
        """MAE forward: -> (loss, pred [N, L, p*p*C], mask [N, L]).

        Args:
            imgs: [N, C, H, W].
            mask_ratio, noise: MAE's random masking (noise [N, L] uniform reproduces a mask exactly).
            masking: a precomputed (ids_keep, mask, ids_restore) from `pipeline.pretrain.masking`; ids_keep
                may be padded (variable keep counts): padding is hidden by a key-padding attention mask.
            weight: [N, L] per-patch loss weights (e.g. `masking.boundary_weights`).
            reduction: "mean" -> MAE's mean over all masked patches; "image_mean" -> mean of per-image
                means; "none" -> per-image means [N] (see `forward_loss`).
            valid: [N, K] bool marking the real entries of a padded `ids_keep`, or None when nothing
                is padded. "auto" finds out from `mask`, which reads a device tensor on the host
                (a sync); the training loop passes what the loader worked out instead.
        """
        if masking is None:
            masking = random_mask(imgs.shape[0], self.num_patches, mask_ratio, noise=noise, device=imgs.device)
        ids_keep, mask, ids_restore = (t.to(imgs.device) for t in masking)
        mask = mask.float()
        if isinstance(valid, str):
            valid = keep_valid(ids_keep, mask)
            valid = None if bool(valid.all()) else valid
        elif valid is not None:
            valid = valid.to(imgs.device)
        latent = self.forward_encoder(imgs, ids_keep, valid)
        pred = self.forward_decoder(latent, mask, ids_restore)
        return self.forward_loss(imgs, pred, mask, weight, reduction), pred, mask

    @torch.no_grad()
    def token_salience(self, imgs: torch.Tensor) -> torch.Tensor:
        """Online (SBAM-like) salience from this model's patch embeddings: imgs -> [N, L]."""
        return online_saliency(self.patch_embed(imgs))

    @torch.no_grad()
    def sbam_salience(self, imgs: torch.Tensor) -> torch.Tensor:
        """SBAM's salience (`masking.sbam_salience`) of the patch + position embeddings, as SBAM's
        `forward_encoder` computes it before masking: imgs [N, C, H, W] -> [N, L] in [0, 1].
        Only the mask's order depends on it (an argsort), so no gradient is lost by not tracking it."""
        return sbam_salience(self.patch_embed(imgs) + self.pos_embed[:, 1:, :])


def _padding_attn_mask(valid: torch.Tensor) -> torch.Tensor:
    """valid [N, K] (patch tokens) -> bool key-padding mask [N, 1, 1, 1+K], True = may be attended to.

    It broadcasts over heads and queries: no token attends to a padding key, so nothing flows from
    padding into real tokens. Padding queries attend to the real tokens (never an empty row: the cls
    token is always real); their outputs are never gathered by the decoder. Real tokens' outputs
    equal those under the pairwise [N, 1, 1+K, 1+K] mask (tested), which is 1+K times larger. Any
    mask rules out SDPA's FlashAttention kernel; the memory-efficient kernel takes this one.
    """
    cls = torch.ones(valid.shape[0], 1, dtype=torch.bool, device=valid.device)
    return torch.cat([cls, valid.bool()], dim=1)[:, None, None, :]  # [N, 1, 1, 1+K]
