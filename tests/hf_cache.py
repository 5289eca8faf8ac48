"""A Hugging Face Hub cache built by hand, so that huggingface_hub, timm and open_clip load `hf-hub:`
names through their real code with no network (`HF_HUB_OFFLINE=1`).

The layout is huggingface_hub's own: HF_HUB_CACHE/models--ORG--NAME/ with `blobs/<sha256>` (the
bytes), `refs/main` (the commit the default branch points at) and `snapshots/<commit>/<file>`
(a relative symlink into blobs/). The `hub_cache` fixture (conftest.py) makes an empty one per test.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def add_to_hub_cache(cache: Path, repo_id: str, files: dict[str, Path | bytes], revision: str = "main") -> Path:
    """Put `files` ({name in the repo: local file or bytes}) into `cache` as repo `repo_id` at
    branch `revision`; returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    snapshot = repo / "snapshots" / commit
    for name, content in files.items():
        data = Path(content).read_bytes() if isinstance(content, (str, Path)) else content
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return snapshot

