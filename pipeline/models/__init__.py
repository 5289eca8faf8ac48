"""Models: the MAE (`mae`), the timm ViT encoder read from checkpoints (`encoder`) and open_clip
loading and registration (`clip`); weights from elsewhere: files, timm hub folders and `hf-hub:`
names (`weights`, through `hub`), a new MAE started from them (`mae_init`), and an encoder written in
timm's hub layout (`timm_layout`). May import `pipeline`'s root, `data.transforms` (the pixel
statistics) and `pretrain.masking` (MAE's masking contract); never `stages`.
"""
