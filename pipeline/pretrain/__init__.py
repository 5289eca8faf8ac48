"""Stage 2's machinery: masks as pure functions (`masking`), the mask plan built in loader workers
(`mask_plan`), the stage's datasets (`data`) and its epoch loop (`engine`, as MAE's
engine_pretrain.py). May import `pipeline`'s root, `data` and `models`; never `stages`.
"""
