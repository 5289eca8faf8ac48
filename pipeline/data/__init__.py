"""The data the pipeline reads and makes: img2dataset shards (`shards`), shards in object stores
(`remote`, fsspec), manifests keyed by sample (`manifest`), ImageFolder (`imagefolder`), labelled
classification shards (`class_shards`), generated sets (`shapes`, `cc3m_like`, `class_wds`), the
paired crop/flip of images and maps (`transforms`) and object boxes a user has (`boxes`: VOC XML, CSV). May import `pipeline`'s root only.
"""
