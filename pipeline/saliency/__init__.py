"""Stage 1's machinery: fast Grad-CAM on open_clip (`gradcam`), the Zarr store (`store`) and its
writer lock (`store_lock`), the store's life cycle (`store_setup`), the batch engine (`engine`)
and the run's report (`report`). May import `pipeline`'s root, `data` and `models`; never `stages`.
"""
