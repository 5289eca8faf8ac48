"""Object boxes a user has, read for `salmae inspect STORE --boxes FILE` (the pointing game on real data).

Two formats, both keyed by the store's img2dataset key:
- **PASCAL VOC XML** (ImageNet's val bounding boxes, `ILSVRC2012_bbox_val_v3.tgz`): one file per image,
  or a folder of them (searched recursively for `*.xml`). The key is `<filename>` without its image
  extension (ImageNet's `ILSVRC2012_val_00000001`, VOC's `000005.jpg` -> `000005`), else the XML file's
  own name; every `<object><bndbox>` (`xmin`, `ymin`, `xmax`, `ymax`) is a box, in the pixels of the
  image the file's `<size>` names (recorded here, so that a resized copy can be matched).
- **CSV** `key,x0,y0,x1,y1`, one box per line, several lines per key allowed, an optional header line;
  pixels of the image as stage 1 read it (the store's `image_size`). Keys are read as text: leading
  zeros stay.

Malformed input is a one-line `SalmaeError` naming the file (and line or object) and what it expects.
"""

from __future__ import annotations

import csv
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from salmae.pipeline.errors import SalmaeError

Box = tuple[float, float, float, float]   # x0, y0, x1, y1 in pixels, x1 > x0 and y1 > y0
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FORMATS_HINT = "pass PASCAL VOC XML (a file or a folder of them) or a CSV key,x0,y0,x1,y1"


@dataclass
class BoxFile:
    """The boxes of one `--boxes` path."""

    path: str                                                   # what the user passed
    format: str                                                 # "voc-xml" | "csv"
    boxes: dict[str, list[Box]] = field(default_factory=dict)   # key -> its boxes (at least one)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (W, H) the boxes are in (VOC <size>)


def read_boxes(path: str | Path) -> BoxFile:
    """Read a VOC XML file, a folder of them, or a CSV (see the module doc); at least one box."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.xml"))
        if not files:
            raise SalmaeError(f"boxes folder {path} holds no *.xml file; {FORMATS_HINT}")
        out = BoxFile(str(path), "voc-xml")
        for f in files:
            _read_voc(f, out)
    elif path.is_file():
        out = BoxFile(str(path), "voc-xml" if path.suffix.lower() == ".xml" else "csv")
        (_read_voc if out.format == "voc-xml" else _read_csv)(path, out)
    else:
        raise SalmaeError(f"boxes file {path} not found; {FORMATS_HINT}")
    if not out.boxes:
        raise SalmaeError(f"{path} holds no boxes; {FORMATS_HINT}")
    return out


def _read_voc(path: Path, out: BoxFile) -> None:
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise SalmaeError(f"{path} is not readable XML ({e}); {FORMATS_HINT}") from e
    name = (root.findtext("filename") or "").strip()
    key = name[:-len(Path(name).suffix)] if Path(name).suffix.lower() in IMAGE_EXTENSIONS else name
    key = key or path.stem
    for i, obj in enumerate(root.iter("object"), start=1):
        bnd = obj.find("bndbox")
        try:
            box = tuple(float(bnd.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))   # type: ignore[union-attr]
        except (AttributeError, TypeError, ValueError):
            raise SalmaeError(f"{path}: <object> {i} has no <bndbox> with numeric xmin, ymin, xmax, ymax "
                              "(PASCAL VOC)") from None
        out.boxes.setdefault(key, []).append(_checked(box, f"{path}: <object> {i}"))
    try:
        size = (int(float(root.findtext("size/width") or 0)), int(float(root.findtext("size/height") or 0)))
    except ValueError:
        size = (0, 0)
    if key in out.boxes and min(size) > 0:       # a <size> of 0 (some VOC files) says nothing: left out
        out.sizes[key] = size


def _read_csv(path: Path, out: BoxFile) -> None:
    with open(path, newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if not row or (len(row) == 1 and not row[0].strip()) or row[0].lstrip().startswith("#"):
                continue
            cells = [c.strip() for c in row]
            try:
                if len(cells) != 5:
                    raise ValueError
                box = tuple(float(c) for c in cells[1:])
            except ValueError:
                if line == 1 and len(cells) == 5 and not any(_is_number(c) for c in cells[1:]):
                    continue                # a header line
                raise SalmaeError(f"{path} line {line}: expected key,x0,y0,x1,y1 (5 columns, the last 4 numbers), "
                                  f"got {','.join(row)[:80]!r}") from None
            out.boxes.setdefault(cells[0], []).append(_checked(box, f"{path} line {line}"))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _checked(box: tuple[float, ...], where: str) -> Box:
    x0, y0, x1, y1 = box
    if not all(math.isfinite(v) for v in box) or x1 <= x0 or y1 <= y0:
        raise SalmaeError(f"{where}: box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is empty or not finite; "
                          "boxes are x0, y0, x1, y1 with x1 > x0 and y1 > y0 (pixels)")
    return (x0, y0, x1, y1)
