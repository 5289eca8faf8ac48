"""Read img2dataset webdataset shards: `NNNNN.tar` holding `KEY.jpg`, `KEY.txt`, `KEY.json`.

A sample is identified by its img2dataset key (a digit string, leading zeros kept), never by
its position: img2dataset writes only successful downloads, so a shard holds fewer samples than
its nominal size. Damaged content (an undecodable image, a missing or empty caption, bad json,
a tar cut short) never raises here: the sample is yielded with `.error` set to a
`DAMAGE_REASONS` code, so every sample is counted and reported by key.

Shards are given as brace patterns (`'data/{00000..00331}.tar'`), globs, local paths, lists of
those, `pipe:` commands (webdataset's `gopen`) or object-store / web URLs (`s3://`, `gs://`, `hf://`,
`https://`: fsspec, `pipeline.data.remote`). Every shard is read with
python's `tarfile` in stream mode, which records each member's byte offset (for random access
through `read_member`) and lets us tell a truncated shard from a finished one.
"""

from __future__ import annotations

import glob
import io
import json
import os
import shlex
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Collection, Iterator, Sequence
from urllib.parse import urlparse

import numpy as np
from PIL import Image

from salmae.pipeline.data.remote import filesystem, glob_remote, is_remote, open_remote, read_range
from salmae.pipeline.errors import SalmaeError

DAMAGE_REASONS: dict[str, str] = {
    "unreadable_image": "the image bytes do not decode",
    "missing_image": "no .jpg/.png/.webp member for this key",
    "missing_caption": "no .txt caption member for this key",
    "empty_caption": "the .txt caption is empty",
    "bad_json": "the .json metadata does not parse as a JSON object",
    "truncated_tar": "the tar shard ends in the middle of this sample (key '' when no member could be read)",
    "too_large": "the image has more pixels than the reader's limit (stage 1: --set max_pixels)",
}

# Caption damage: fatal for what reads captions (stage 1, saliency masks), not for the image alone
CAPTION_REASONS: tuple[str, ...] = ("missing_caption", "empty_caption")

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")

_TAIL_KEEP = 32 * 1024  # bytes of a stream kept to check the end-of-archive marker


class DamagedSampleError(SalmaeError):
    """A sample's content is damaged; `.reason` is a `DAMAGE_REASONS` code."""

    def __init__(self, reason: str, key: str = "?", detail: str = ""):
        self.reason = reason
        self.key = key
        super().__init__(f"sample {key}: {DAMAGE_REASONS[reason]}{f' ({detail})' if detail else ''}")


@dataclass
class Sample:
    """One img2dataset sample, good or damaged."""

    key: str  # img2dataset key, digit string, leading zeros kept
    shard: str  # the shard path/URL as expanded
    image: Image.Image | None  # RGB; None if damaged or read with decode=False
    image_bytes: bytes | None  # the encoded image member, None if absent
    caption: str | None  # the .txt member, stripped; None if absent
    meta: dict = field(default_factory=dict)  # parsed KEY.json, {} if absent or bad
    error: str | None = None  # None = ok, else a DAMAGE_REASONS code
    width: int = 0  # image size from its header (0 if unreadable or absent)
    height: int = 0
    image_ext: str = ""  # extension of the image member ("jpg", "png", ...), "" if none
    image_offset: int = -1  # byte offset of the image member's data inside the tar, -1 if none
    image_nbytes: int = -1  # byte length of the image member's data, -1 if none
    cls: str | None = None  # the .cls member (webdataset's class index as text), stripped; None if absent

    @property
    def ok(self) -> bool:
        return self.error is None


# --------------------------------------------------------------------------- shard lists
def expand_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand a shard spec into a list of shard URLs, in order.

    `spec` is a brace pattern (`data/{00000..00003}.tar`), a glob (`data/*.tar`, also in an object
    store), a local path, a `pipe:` command or URL, several of those joined by `::` (webdataset's
    separator), or a list of any of them; `$VARS` are expanded. Raises SalmaeError if a local shard
    does not exist, nothing is left, or a URL's fsspec driver is not installed.
    """
    # braceexpand is what webdataset's expand_urls uses; importing webdataset itself pulls in torch.
    from braceexpand import braceexpand

    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls: list[str] = []
    for item in items:
        for part in os.path.expandvars(str(item)).split("::"):
            for url in braceexpand(part):
                urls.extend(_expand_local(url, pattern=str(item)))
    if not urls:
        raise SalmaeError(f"shard spec {spec!r} names no shards; pass a brace pattern like 'data/{{00000..00003}}.tar'")
    for url in {u.split("://", 1)[0]: u for u in urls if is_remote(u)}.values():
        filesystem(url)  # fsspec or a driver missing: one line naming the extra now, not a warning per shard later
    return urls


def _expand_local(url: str, pattern: str) -> list[str]:
    listable = is_remote(url) and not url.startswith(("http://", "https://"))  # "?" there starts a query
    if listable and any(ch in url.split("://", 1)[1] for ch in "*?["):
        found = glob_remote(url)
        if not found:
            raise SalmaeError(f"no shard matches {url} (from {pattern!r}); check the bucket and pattern")
        return found
    if not _is_local(url):
        return [url]
    path = url.removeprefix("file:")
    if any(ch in path for ch in "*?["):
        found = sorted(glob.glob(path))
        if not found:
            raise SalmaeError(f"no shard matches {path} (from {pattern!r}); check the folder and pattern")
        return found
    if os.path.isdir(path):
        raise SalmaeError(f"--data {path} is a directory; give a tar pattern such as '{path.rstrip('/')}/*.tar' "
                          f"or '{path.rstrip('/')}/{{00000..00099}}.tar'")
    if not os.path.isfile(path):
        raise SalmaeError(f"shard {path} not found (from {pattern!r}); check the path or brace range")
    return [path]


def _is_local(url: str) -> bool:
    return not url.startswith("pipe:") and ("://" not in url or url.startswith("file://"))


def shard_name(url: str) -> str:
    """The shard's file name without scheme or folders (`00003.tar`): how shards are matched."""
    url = str(url)
    if url.startswith("pipe:"):
        tokens = shlex.split(url[len("pipe:"):])
        tars = [t for t in tokens if ".tar" in t]
        paths = [t for t in tokens if not t.startswith("-")]
        url = (tars or paths or [url])[-1]
    path = urlparse(url).path if "://" in url else url
    return os.path.basename(path.rstrip("/"))


# --------------------------------------------------------------------------- images
def decode_image(data: bytes, key: str = "?", max_pixels: int | None = None,
                 draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode image bytes to an RGB PIL image; raises DamagedSampleError("unreadable_image").

    Any PIL mode is converted: alpha (RGBA, LA, P with transparency) is composited on black,
    16-bit and float greyscale are rescaled to 8 bits, CMYK/L/P/1 go through PIL's convert.
    `max_pixels`: an image whose header declares more pixels is refused before any decoding
    (DamagedSampleError("too_large")): a 140 KB PNG can hold 12,000 x 12,000 pixels (+400 MB).
    `draft_size` (W, H): a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale that still
    covers it in both dimensions (PIL's `draft`), for callers that shrink the image anyway.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if max_pixels is not None and width * height > max_pixels:
                raise DamagedSampleError("too_large", key, f"{width}x{height} = {width * height / 1e6:.1f} MP, "
                                         f"limit {max_pixels / 1e6:g} MP")
            if draft_size is not None and im.format == "JPEG":
                im.draft("RGB", draft_size)
            im.load()
            return _to_rgb(im)
    except DamagedSampleError:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise DamagedSampleError("unreadable_image", key, f"{type(e).__name__}: {e}") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im.copy()
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if im.mode == "F" and arr.max(initial=0) <= 1.0:
            top = 1.0
        grey = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (0, 0, 0))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


def probe_image(data: bytes, key: str = "?") -> tuple[int, int]:
    """(width, height) from the header, checking the file is not cut short; no full decode.

    A JPEG must end with its EOI marker, a PNG with IEND, a WebP must hold its RIFF length;
    only when that check fails (or the format is another) is the image fully decoded to decide.
    Raises DamagedSampleError("unreadable_image").
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
            if not _tail_looks_complete(data, im.format):
                im.load()
            return size
    except Exception as e:
        raise DamagedSampleError("unreadable_image", key, f"{type(e).__name__}: {e}") from None


def _tail_looks_complete(data: bytes, fmt: str | None) -> bool:
    if fmt == "JPEG":
        return data.rstrip(b"\x00").endswith(b"\xff\xd9")
    if fmt == "PNG":
        return data[-12:-4].endswith(b"IEND")
    if fmt == "WEBP":
        return len(data) >= 12 and int.from_bytes(data[4:8], "little") + 8 <= len(data)
    return False


# --------------------------------------------------------------------------- reading
class _TailStream(io.RawIOBase):
    """Wraps a byte stream, counting bytes read and keeping the last `_TAIL_KEEP` of them."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.total = 0
        self.tail = b""

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.total += len(data)
        self.tail = (self.tail + data)[-_TAIL_KEEP:]
        return data

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def zeros_at(self, pos: int, n: int = 512) -> bool:
        """True if bytes [pos, pos+n) were read and are all zero (the end-of-archive block)."""
        start = self.total - len(self.tail)
        if pos + n > self.total:
            return False
        if pos < start:  # long trailing data we no longer hold: tarfile stopped on a zero block
            return True
        return not any(self.tail[pos - start: pos - start + n])


def open_shard(url: str) -> BinaryIO:
    """Open a shard for streaming: a local file, an object-store URL (fsspec) or a `pipe:` command (webdataset)."""
    if _is_local(url):
        path = url.removeprefix("file://").removeprefix("file:")
        try:
            return open(path, "rb")
        except OSError as e:
            raise SalmaeError(f"cannot open shard {path} ({e.strerror}); check the path") from None
    if is_remote(url):
        return open_remote(url)
    from webdataset.gopen import gopen

    return gopen(url, "rb")


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's convention: key = up to the first dot of the basename, ext = the rest."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_shard(url: str, decode: bool = True, keys: Collection[str] | None = None) -> Iterator[Sample]:
    """Yield the samples of one shard, in tar order, damaged ones with `.error` set.

    `decode=False` skips the full decode (the image is still probed for size and truncation);
    `keys` restricts the samples yielded (other members are skipped without reading).
    A truncated tar yields the good samples before the damage, then one Sample with
    error="truncated_tar" carrying the key it was reading ("" if none).
    """
    wanted = set(keys) if keys is not None else None
    raw = open_shard(url)
    stream = _TailStream(raw)
    group_key: str | None = None
    members: dict[str, tuple[bytes, int, int]] = {}  # ext -> (data, offset, size)
    end_of_last = 0
    finished = False
    try:
        try:
            tar = tarfile.open(fileobj=io.BufferedReader(stream, 1 << 16), mode="r|")
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = _split_name(info.name)
                if key != group_key:
                    if group_key is not None and members:
                        yield _make_sample(group_key, url, members, decode)
                    group_key, members = key, {}
                end_of_last = info.offset_data + (info.size + 511) // 512 * 512
                if wanted is not None and key not in wanted:
                    continue
                data = tar.extractfile(info).read()
                members[ext] = (data, info.offset_data, info.size)
            complete = _finished_cleanly(stream, end_of_last)
        except (tarfile.TarError, EOFError, OSError):
            complete = False
        if complete:
            if group_key is not None and members:
                yield _make_sample(group_key, url, members, decode)
        elif wanted is None or (group_key or "") in wanted:
            yield Sample(key=group_key or "", shard=url, image=None, image_bytes=None, caption=None,
                         error="truncated_tar")
        finished = True
    finally:
        _close(raw, url, report=finished)


def _close(raw: BinaryIO, url: str, report: bool) -> None:
    """Close a shard stream; a `pipe:` command that failed is the user's to fix, so say so."""
    try:
        raw.close()
    except OSError as e:
        if report:  # not when the consumer stopped early: the pipe may then die of SIGPIPE
            raise SalmaeError(f"shard command {url!r} failed ({e}); run it by hand to see why") from None


def _finished_cleanly(stream: _TailStream, end_of_last: int) -> bool:
    """A finished tar has a zero block right after its last member; a cut one does not."""
    stream.drain()
    return stream.zeros_at(end_of_last)


def _make_sample(key: str, url: str, members: dict[str, tuple[bytes, int, int]], decode: bool) -> Sample:
    sample = Sample(key=key, shard=url, image=None, image_bytes=None, caption=None)
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), "")
    errors: list[str] = []
    if image_ext:
        sample.image_bytes, sample.image_offset, sample.image_nbytes = members[image_ext]
        sample.image_ext = image_ext
        try:
            if decode:
                sample.image = decode_image(sample.image_bytes, key)
                sample.width, sample.height = sample.image.size
            else:
                sample.width, sample.height = probe_image(sample.image_bytes, key)
        except DamagedSampleError:
            errors.append("unreadable_image")
    else:
        errors.append("missing_image")
    if "txt" in members:
        sample.caption = members["txt"][0].decode("utf-8", errors="replace").strip()
        if not sample.caption:
            errors.append("empty_caption")
    else:
        errors.append("missing_caption")
    if "cls" in members:
        sample.cls = members["cls"][0].decode("utf-8", errors="replace").strip()
    if "json" in members:
        try:
            meta = json.loads(members["json"][0])
            if not isinstance(meta, dict):
                raise ValueError("not an object")
            sample.meta = meta
        except ValueError:
            errors.append("bad_json")
    sample.error = errors[0] if errors else None
    return sample


def iter_samples(spec: str | Sequence[str], decode: bool = True) -> Iterator[Sample]:
    """Yield every sample of every shard in `spec`, shard by shard, in order."""
    for url in expand_shards(spec):
        yield from iter_shard(url, decode=decode)


def read_member(shard_path: str | os.PathLike, offset: int, size: int) -> bytes:
    """Read `size` bytes at `offset` of a tar (a member's data, as recorded in a manifest): a local
    file by seek, an object-store URL by one byte-range request; a `pipe:` command cannot be."""
    url = str(shard_path)
    if offset < 0 or size < 0:
        raise SalmaeError(f"no member data recorded for this sample in {url} (offset {offset}); "
                          "its image is missing, read it by key instead")
    if url.startswith("pipe:"):
        raise SalmaeError(f"shard {url!r} is a command, which cannot be read by byte range; use stream mode "
                          "(pretrain: --set data_mode=stream) or give the shards as paths or s3:// / https:// URLs")
    if is_remote(url):
        return read_range(url, offset, size)
    path = Path(url.removeprefix("file://").removeprefix("file:"))
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    except OSError as e:
        raise SalmaeError(f"cannot read shard {path} ({e.strerror}); check the path") from None
    if len(data) != size:
        raise SalmaeError(f"shard {path} is shorter than the manifest expects (offset {offset} + {size} bytes); "
                          "the shard changed: rebuild the manifest with `salmae manifest build`")
    return data
