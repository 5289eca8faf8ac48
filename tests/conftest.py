"""Shared fixtures: small generated datasets, written once per test session into a temp dir.

Tests never touch the network and never write inside the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Two cores here: keep each test process to one intra-op thread so parallel work stays predictable.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Never the network: huggingface_hub (and timm / open_clip through it) reads only its cache. Set before any
# test module imports it (it reads the environment once); tests that load hf-hub: names use hf_cache.hub_cache.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """64 captioned 32-px shapes in 2 img2dataset shards (00000.tar, 00001.tar) + ImageFolder split."""
    from salmae.pipeline.data.shapes import write_shapes

    out = tmp_path_factory.mktemp("shapes")
    write_shapes(out, n=64, image_size=32, seed=0, shard_size=32, imagefolder=True)
    return out


@pytest.fixture
def shapes_copy(tmp_path, shapes_dir) -> Path:
    """A writable copy of `shapes_dir`'s two shards, for tests that change or replace a tar."""
    import shutil

    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("00000.tar", "00001.tar"):
        shutil.copy(shapes_dir / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def shapes_pattern(shapes_dir) -> str:
    """Brace pattern over the shards of `shapes_dir`."""
    return str(shapes_dir / "{00000..00001}.tar")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty HF hub cache for this test, offline: huggingface_hub (and so timm and open_clip) reads
    only from it. huggingface_hub reads its environment at import, so its constants are set too."""
    import shutil

    from huggingface_hub import constants

    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(cache.parent))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    yield cache
    shutil.rmtree(cache, ignore_errors=True)
