"""The data the pipeline reads and makes: img2dataset shards (`shards`), manifests keyed by sample
(`manifest`), ImageFolder (`imagefolder`), generated sets (`shapes`, `cc3m_like`) and the paired
crop/flip of images and maps (`transforms`). May import `pipeline`'s root only.
"""
