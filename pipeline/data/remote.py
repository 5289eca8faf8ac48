"""Shards in object stores and on web servers, read through fsspec (`pip install 'salmae[remote]'`).

A shard URL with a scheme (`s3://`, `gs://`, `hf://`, `https://`, `memory://`, …) other than
`file:` and webdataset's `pipe:` is opened with fsspec: `open_remote` streams it (what stage 1,
manifest scans and stage-2 stream mode do), `read_range` reads one member's bytes by byte range
(stage-2 indexed mode, stage-3 labelled shards) and `glob_remote` expands `*` patterns. Each
filesystem comes from its own driver package (s3fs, gcsfs, aiohttp for http, huggingface_hub for
hf); a missing fsspec or driver is a one-line SalmaeError naming the extra, never a traceback.
"""

from __future__ import annotations

from typing import BinaryIO

from salmae.pipeline.errors import SalmaeError

EXTRA = "pip install 'salmae[remote]'"
_BLOCK = 4 << 20  # bytes fetched per request while streaming a shard


def is_remote(url: str) -> bool:
    """True for `scheme://` URLs read through fsspec (not `file://`, not `pipe:` commands)."""
    url = str(url)
    return not url.startswith("pipe:") and "://" in url and not url.startswith("file://")


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for `url`; SalmaeError naming the extra if a driver is missing."""
    try:
        import fsspec
    except ImportError:
        raise SalmaeError(f"shard URL {url} needs fsspec to read object stores; {EXTRA}") from None
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:  # fsspec names the driver: "Install s3fs to access S3"
        raise SalmaeError(f"shard URL {url} needs a filesystem driver that is not installed ({e}); {EXTRA}") from None
    except ValueError as e:  # "Protocol not known: …"
        raise SalmaeError(f"shard URL {url}: {e}; use s3://, gs://, hf://, https:// or a local path") from None


def open_remote(url: str) -> BinaryIO:
    """Open a remote shard for sequential reading (read-ahead in blocks of `_BLOCK` bytes)."""
    fs, path = filesystem(url)
    try:
        return fs.open(path, "rb", block_size=_BLOCK, cache_type="readahead")
    except FileNotFoundError:
        raise SalmaeError(f"shard {url} not found; check the bucket, path and brace range") from None
    except TypeError:  # a filesystem whose open() takes no cache options
        return fs.open(path, "rb")
    except (OSError, PermissionError) as e:
        raise SalmaeError(f"cannot open shard {url} ({type(e).__name__}: {e}); check the URL and credentials") from None


def read_range(url: str, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of a remote shard, by one byte-range request.

    A filesystem that cannot serve byte ranges (or a server that sends the whole object) is a
    one-line SalmaeError saying to use stream mode.
    """
    fs, path = filesystem(url)
    try:
        data = fs.cat_file(path, start=offset, end=offset + size)
    except FileNotFoundError:
        raise SalmaeError(f"shard {url} not found; check the bucket, path and brace range") from None
    except (NotImplementedError, TypeError, ValueError) as e:
        raise SalmaeError(f"shard {url} cannot be read by byte range ({type(e).__name__}); "
                          "use stream mode (pretrain: --set data_mode=stream)") from None
    except OSError as e:
        raise SalmaeError(f"cannot read shard {url} ({type(e).__name__}: {e}); check the URL and credentials") from None
    if len(data) != size:
        raise SalmaeError(f"shard {url} returned {len(data)} bytes for a {size}-byte range at {offset}: its store "
                          "does not serve byte ranges or the shard changed; use stream mode (pretrain: --set "
                          "data_mode=stream) or rebuild the manifest")
    return data


def glob_remote(url: str) -> list[str]:
    """The URLs matching a `*`/`?`/`[` pattern in a remote folder, sorted, with the scheme kept."""
    fs, path = filesystem(url)
    try:
        found = sorted(fs.glob(path))
    except (OSError, NotImplementedError) as e:
        raise SalmaeError(f"cannot list {url} ({type(e).__name__}: {e}); give the shards as a brace pattern") from None
    return [fs.unstrip_protocol(p) for p in found]
