"""Models: the MAE (`mae`), the timm ViT encoder read from checkpoints (`encoder`) and open_clip
loading and registration (`clip`). May import `pipeline`'s root and `pretrain.masking` (MAE's
masking contract); never `stages`.
"""
