"""`hf-hub:` names: files of a Hugging Face Hub repository, through huggingface_hub's own cache.

    hf-hub:ORG/NAME              the repository's default weights (timm: model.safetensors, else
                                 pytorch_model.bin; open_clip's are found by open_clip itself)
    hf-hub:ORG/NAME@REVISION     the same at a branch, tag or commit (timm's spelling)
    hf-hub:ORG/NAME/PATH/FILE    one named file of the repository (e.g. an MAE .pth)

Files come from `huggingface_hub.hf_hub_download`, which reads the local cache
(`HF_HUB_CACHE`, by default `$HF_HOME/hub`) first and downloads only what is missing; with
`HF_HUB_OFFLINE=1` it never touches the network. timm and open_clip resolve their own `hf-hub:`
model names the same way, so one cache serves all three. When a file is neither cached nor
reachable, the error is one line naming the repository, the file and the cache folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from salmae.pipeline.errors import SalmaeError

PREFIX = "hf-hub:"
# What timm's hub repositories hold, in the order timm itself prefers them.
TIMM_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class HubName:
    """A parsed `hf-hub:` name."""

    repo_id: str               # ORG/NAME
    revision: str | None       # branch, tag or commit (None: the default branch)
    filename: str | None       # a file inside the repository (None: the repository's default weights)

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{PREFIX}{self.repo_id}{rev}" + (f"/{self.filename}" if self.filename else "")


def is_hub_name(value: object) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def parse_hub_name(name: str) -> HubName:
    """`hf-hub:ORG/NAME[@REV][/FILE]` -> HubName; anything else is a one-line SalmaeError."""
    parts = name[len(PREFIX):].split("/") if is_hub_name(name) else []
    if len(parts) < 2 or not parts[0] or not parts[1] or any(not p for p in parts[2:]):
        raise SalmaeError(f"{name!r} is not a Hugging Face Hub name; write hf-hub:ORG/NAME, hf-hub:ORG/NAME@REVISION "
                          "or hf-hub:ORG/NAME/FILE")
    repo, _, revision = parts[1].partition("@")
    return HubName(repo_id=f"{parts[0]}/{repo}", revision=revision or None,
                   filename="/".join(parts[2:]) or None)


def cache_dir() -> Path:
    """The Hugging Face cache folder that downloads go to (HF_HUB_CACHE, by default $HF_HOME/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_file(name: str | HubName, filename: str | None = None) -> Path:
    """The local path of `filename` (default: the name's own file) of a hub repository, from the
    cache or downloaded into it. Not cached and not reachable: one SalmaeError line naming the cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    hub = parse_hub_name(name) if isinstance(name, str) else name
    filename = filename or hub.filename
    if filename is None:
        raise SalmaeError(f"{hub}: no file named; write {hub}/FILE")
    try:
        return Path(hf_hub_download(hub.repo_id, filename, revision=hub.revision))
    except LocalEntryNotFoundError as e:
        raise SalmaeError(not_cached_message(hub, filename)) from e
    except RepositoryNotFoundError as e:
        raise SalmaeError(f"{hub}: no such repository on the Hugging Face Hub (or it is private: log in with "
                          "`hf auth login`)") from e
    except EntryNotFoundError as e:
        raise SalmaeError(f"{hub}: the repository holds no file {filename}; name the file with "
                          f"{PREFIX}{hub.repo_id}/FILE") from e


def not_cached_message(hub: HubName | str, filename: str) -> str:
    """One line: `filename` of `hub` is neither in the cache nor reachable, and what to do."""
    return (f"{hub}: {filename} is not in the Hugging Face cache {cache_dir()} and the hub cannot be reached"
            f"{' (HF_HUB_OFFLINE is set)' if _offline() else ''}; download it once with network "
            f"(`hf download {hub.repo_id if isinstance(hub, HubName) else hub}`) or set HF_HUB_CACHE / HF_HOME to a "
            "cache that holds it")


def hub_weights(name: str, candidates: tuple[str, ...] = TIMM_WEIGHT_FILES) -> Path:
    """The weights file of `hf-hub:NAME`: its named file, else the first of `candidates` the
    repository holds (cached or downloadable). None found: one line naming the cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    hub = parse_hub_name(name)
    if hub.filename is not None:
        return hub_file(hub)
    reachable = False
    for filename in candidates:
        try:
            return Path(hf_hub_download(hub.repo_id, filename, revision=hub.revision))
        except RepositoryNotFoundError:
            return hub_file(hub, filename)  # the same error, in one line
        except LocalEntryNotFoundError:
            continue
        except EntryNotFoundError:  # the hub answered: this file is not there
            reachable = True
            continue
    if reachable:
        raise SalmaeError(f"{hub} holds none of {', '.join(candidates)}; name the weights file with "
                          f"{PREFIX}{hub.repo_id}/FILE")
    raise SalmaeError(not_cached_message(hub, " or ".join(candidates)))


def hub_config(name: str, filename: str = "config.json") -> dict | None:
    """The repository's JSON `filename` (timm's config.json, open_clip's open_clip_config.json), or
    None when the repository has none (a missing cache is still an error, from `hub_file`)."""
    import json

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    hub = parse_hub_name(name)
    try:
        path = hf_hub_download(hub.repo_id, filename, revision=hub.revision)
    except LocalEntryNotFoundError:
        return None
    except EntryNotFoundError:
        return None
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)
