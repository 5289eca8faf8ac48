"""The data the pipeline reads and makes: img2dataset shards (`shards`), shards in object stores
(`remote`, fsspec), manifests keyed by sample (`manifest`), ImageFolder (`imagefolder`), labelled
classification shards (`class_shards`), generated sets (`shapes`, `cc3m_like`, `class_wds`) and the
paired crop/flip of images and maps (`transforms`). May import `pipeline`'s root only.
"""
