"""Generated captioned shapes, written exactly as img2dataset writes a webdataset dataset.

Each image has a textured, noisy background, one *named* object and one *distractor* of a
different shape class and colour. The caption names only the named object ("a photo of a small
red triangle", "a blue circle on the left", ...). With probability `same_colour_frac` (default 0)
the distractor shares the named object's colour instead: then only the shape word of the caption
tells the two apart, a harder test of whether a CLIP model grounds shape words and not just
colour words (`salmae inspect` reports the pointing game on such images separately).

Layout (img2dataset's `--output_format webdataset`): `00000.tar` with `KEY.jpg`, `KEY.txt`,
`KEY.json` per sample, `00000.parquet` (one row per sample with img2dataset's columns) and
`00000_stats.json`, written last as the shard's completion marker. Keys are the zero-padded
shard number followed by the zero-padded index in the shard (`000000012`). `KEY.json` adds
`bbox` [x0, y0, x1, y1] (pixels) of the named object, `label` (index into `SHAPES`), `shape`,
`colour`, `split` (train/val) and the `distractor`'s shape, colour and bbox.

`task="main-object"` makes images that behave more like ImageNet photos, for probes that pixels
can decide: one large *main* object (the label, radius 0.22–0.36 of the image, any position and
colour) and 2–3 small *clutter* objects of other classes (radius 0.07–0.12) on the same textured
background; the caption names the main object, and `KEY.json` lists the clutter instead of a
distractor.

Everything is a pure function of (seed, global index): same seed -> identical bytes (fixed tar
headers, deterministic JPEG, parquet without timestamps).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.files import atomic_path, atomic_write_json

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "hexagon", "diamond", "heart")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (35, 70, 230),
    "yellow": (240, 220, 30),
    "orange": (250, 140, 20),
    "purple": (140, 40, 200),
    "cyan": (30, 220, 230),
    "pink": (250, 120, 190),
}
TEMPLATES: tuple[str, ...] = (
    "a photo of a {size}{colour} {shape}",
    "a {colour} {shape}",
    "a {colour} {shape} {where}",
    "there is a {colour} {shape}",
    "a {size}{colour} {shape} {where}",
    "an image with a {colour} {shape} in it",
    "a picture of a {colour} {shape} next to another shape",
    "the {shape} is {colour}",
)
JPEG_QUALITY = 95  # img2dataset's default encode_quality
VAL_EVERY = 5  # default: one image in VAL_EVERY of each shape class goes to the ImageFolder val split
_TAR_MTIME = 0  # fixed tar header fields, so that the same seed gives identical bytes

PARQUET_SCHEMA = pa.schema([
    ("url", pa.string()), ("caption", pa.string()), ("key", pa.string()), ("status", pa.string()),
    ("error_message", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
    ("original_width", pa.int64()), ("original_height", pa.int64()), ("exif", pa.string()),
    ("sha256", pa.string()),
])


TASKS = ("named", "main-object")


def write_shapes(out: str | Path, n: int = 1024, image_size: int = 64, seed: int = 0, shard_size: int = 256,
                 imagefolder: bool = False, same_colour_frac: float = 0.0, task: str = "named",
                 val_every: int = VAL_EVERY) -> str:
    """Write `n` captioned shape images into `out` in img2dataset's webdataset layout.

    Args:
        out: output folder (created).
        n: number of images.
        image_size: square image side in pixels.
        seed: same seed -> identical files.
        shard_size: samples per `NNNNN.tar` shard.
        imagefolder: also write `out/imagefolder/{train,val}/<shape>/KEY.jpg`, split by the
            named object's shape (one in `val_every` images of each class goes to val).
        same_colour_frac: probability that the distractor shares the named object's colour.
        task: "named" (a named object and a distractor) or "main-object" (see the module doc).
        val_every: one image in this many of each class is marked `split: val` (>= 2).

    Returns a one-paragraph summary. A shard whose `_stats.json` records the same parameters
    is skipped, so an interrupted run resumes.
    """
    if task not in TASKS:
        raise SalmaeError(f"unknown shapes task {task!r}; use one of {', '.join(TASKS)}")
    if n < 1 or shard_size < 1 or image_size < 16 or val_every < 2:
        raise SalmaeError(f"shapes needs --n >= 1, --shard-size >= 1, --image-size >= 16 and --val-every >= 2 "
                          f"(got n={n}, shard_size={shard_size}, image_size={image_size}, val_every={val_every})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(n / shard_size)
    shard_digits = max(5, len(str(n_shards - 1)))
    index_digits = max(1, math.ceil(math.log10(shard_size))) if shard_size > 1 else 1
    params = {"n": n, "image_size": image_size, "seed": seed, "shard_size": shard_size,
              "imagefolder": imagefolder, "same_colour_frac": same_colour_frac}
    if task != "named":   # older stats files (no task) still match the default task
        params["task"] = task
    if val_every != VAL_EVERY:   # and those without val_every the default split
        params["val_every"] = val_every
    make = _make_sample if task == "named" else _make_main_object_sample
    written = 0
    for shard in range(n_shards):
        name = f"{shard:0{shard_digits}d}"
        stats_path = out / f"{name}_stats.json"
        if _shard_done(stats_path, params):
            continue
        indices = range(shard * shard_size, min(n, (shard + 1) * shard_size))
        keys = [f"{shard:0{shard_digits}d}{i - shard * shard_size:0{index_digits}d}" for i in indices]
        samples = [make(seed, i, key, image_size, same_colour_frac) for i, key in zip(indices, keys)]
        for i, sample in zip(indices, samples):
            sample["meta"]["split"] = split_of(i, sample["meta"]["label"], val_every)
        _write_tar(out / f"{name}.tar", samples)
        _write_parquet(out / f"{name}.parquet", samples)
        if imagefolder:
            _write_imagefolder(out / "imagefolder", samples)
        atomic_write_json(stats_path, _stats(samples, params))
        written += 1
    folder = f"; ImageFolder split in {out / 'imagefolder'}" if imagefolder else ""
    return (f"shapes: {n} captioned {image_size}px images ({len(SHAPES)} shapes, {len(COLOURS)} colours, "
            f"seed {seed}) in {n_shards} img2dataset shards of up to {shard_size} "
            f"({written} written, {n_shards - written} already done) at {out}: "
            f"'{out}/{{{0:0{shard_digits}d}..{n_shards - 1:0{shard_digits}d}}}.tar'{folder}")


def _shard_done(stats_path: Path, params: dict) -> bool:
    try:
        return json.loads(stats_path.read_text()).get("salmae_shapes") == params
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- one image
def _make_sample(seed: int, index: int, key: str, size: int, same_colour_frac: float) -> dict:
    rng = np.random.default_rng([seed, index])
    label = _balanced_label(seed, index)
    colour = _pick(rng, list(COLOURS))
    other_shape = _pick(rng, [s for s in SHAPES if s != SHAPES[label]])
    other_colour = colour if rng.random() < same_colour_frac else _pick(rng, [c for c in COLOURS if c != colour])

    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    radius, centre = _place(rng, size, taken=None)
    bbox = _draw_shape(draw, rng, SHAPES[label], colour, centre, radius, size)
    other_radius, other_centre = _place(rng, size, taken=(centre, radius))
    other_bbox = _draw_shape(draw, rng, other_shape, other_colour, other_centre, other_radius, size)
    image = _add_noise(rng, image)

    caption = _caption(rng, SHAPES[label], colour, radius / size, centre, size)
    sample = _encode(seed, index, key, size, image, caption, bbox, label, colour)
    sample["meta"]["distractor"] = {"shape": other_shape, "colour": other_colour, "bbox": other_bbox}
    return sample


def _make_main_object_sample(seed: int, index: int, key: str, size: int, same_colour_frac: float = 0.0) -> dict:
    """One large main object (the label, named by the caption) and 2-3 small clutter objects."""
    rng = np.random.default_rng([seed, index, 1])
    label = _balanced_label(seed, index)
    colour = _pick(rng, list(COLOURS))
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    radius, centre = _place(rng, size, taken=None, radius_range=(0.22, 0.36))
    clutter = []
    for _ in range(int(rng.integers(2, 4))):
        shape = _pick(rng, [s for s in SHAPES if s != SHAPES[label]])
        c_colour = _pick(rng, list(COLOURS))
        c_radius, c_centre = _place(rng, size, taken=(centre, radius), radius_range=(0.07, 0.12))
        clutter.append({"shape": shape, "colour": c_colour,
                        "bbox": _draw_shape(draw, rng, shape, c_colour, c_centre, c_radius, size)})
    bbox = _draw_shape(draw, rng, SHAPES[label], colour, centre, radius, size)   # on top of any overlap
    image = _add_noise(rng, image)
    sample = _encode(seed, index, key, size, image, _caption(rng, SHAPES[label], colour, radius / size, centre, size),
                     bbox, label, colour)
    sample["meta"]["clutter"] = clutter
    return sample


def _encode(seed: int, index: int, key: str, size: int, image: Image.Image, caption: str, bbox: list[int],
            label: int, colour: str) -> dict:
    """JPEG bytes and img2dataset's metadata (plus bbox, label, shape, colour) of one image."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    jpg = buf.getvalue()
    meta = {
        "url": f"salmae-shapes://seed{seed}/{index}.jpg", "caption": caption, "key": key, "status": "success",
        "error_message": None, "width": size, "height": size, "original_width": size, "original_height": size,
        "exif": "{}", "sha256": hashlib.sha256(jpg).hexdigest(), "bbox": bbox, "label": label,
        "shape": SHAPES[label], "colour": colour,
    }
    return {"key": key, "jpg": jpg, "caption": caption, "meta": meta}


def split_of(index: int, label: int, val_every: int = VAL_EVERY) -> str:
    """'val' for one image in `val_every` of each class, else 'train'.

    Labels come in blocks of len(SHAPES) images holding each shape once, so stepping the block
    spreads every class's val images evenly over the data."""
    block = index // len(SHAPES)
    return "val" if (block + label) % val_every == val_every - 1 else "train"


def _balanced_label(seed: int, index: int) -> int:
    """Each block of len(SHAPES) consecutive images holds every shape once, in a seeded order."""
    block = index // len(SHAPES)
    order = np.random.default_rng([seed, block, 7]).permutation(len(SHAPES))
    return int(order[index % len(SHAPES)])


def _pick(rng: np.random.Generator, items: list[str]) -> str:
    return items[int(rng.integers(len(items)))]


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A muted low-frequency colour field: texture that is never as saturated as the objects."""
    coarse = rng.uniform(50, 160, size=(4, 4, 1)) + rng.uniform(-25, 25, size=(4, 4, 3))
    small = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8), "RGB")
    return small.resize((size, size), Image.BILINEAR)


def _add_noise(rng: np.random.Generator, image: Image.Image) -> Image.Image:
    pixels = np.asarray(image, dtype=np.int16) + rng.normal(0, 8, size=(image.height, image.width, 1)).astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _place(rng: np.random.Generator, size: int, taken: tuple[tuple[float, float], float] | None,
           radius_range: tuple[float, float] = (0.12, 0.22)):
    """A radius (a fraction of the image in `radius_range`) and a centre inside the image,
    overlapping the taken object's circle by little."""
    radius = float(rng.uniform(*radius_range)) * size
    for _ in range(30):
        centre = (float(rng.uniform(radius, size - radius)), float(rng.uniform(radius, size - radius)))
        if taken is None or math.dist(centre, taken[0]) > 0.9 * (radius + taken[1]):
            return radius, centre
    return radius, centre  # crowded: accept the last try (rare at these radii)


def _draw_shape(draw: ImageDraw.ImageDraw, rng: np.random.Generator, shape: str, colour: str,
                centre: tuple[float, float], radius: float, size: int) -> list[int]:
    """Draw one filled shape; return its bbox [x0, y0, x1, y1] in pixels, clipped to the image."""
    jitter = rng.integers(-20, 21, size=3)
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter))
    turn = float(rng.uniform(-0.25, 0.25))  # radians; small, so a square never becomes a diamond
    cx, cy = centre
    if shape == "circle":
        points = [(cx - radius, cy - radius), (cx + radius, cy + radius)]
        draw.ellipse(points, fill=fill)
    else:
        points = [(cx + x * radius, cy + y * radius) for x, y in _outline(shape, turn)]
        draw.polygon(points, fill=fill)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return [max(0, math.floor(min(xs))), max(0, math.floor(min(ys))),
            min(size, math.ceil(max(xs)) + 1), min(size, math.ceil(max(ys)) + 1)]


def _outline(shape: str, turn: float) -> list[tuple[float, float]]:
    """Unit-radius outline of a shape, rotated by `turn` radians."""
    if shape == "square":
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape == "diamond":
        pts = [(0, -1), (0.65, 0), (0, 1), (-0.65, 0)]
    elif shape == "triangle":
        pts = _polygon(3, -math.pi / 2)
    elif shape == "hexagon":
        pts = _polygon(6, 0)
    elif shape == "star":
        pts = [(r * math.cos(a), r * math.sin(a))
               for k in range(10) for r, a in [((1.0 if k % 2 == 0 else 0.42), -math.pi / 2 + k * math.pi / 5)]]
    elif shape == "cross":
        a, b = 0.33, 0.95
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    elif shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 24, endpoint=False)
        pts = [(16 * math.sin(t) ** 3 / 17, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t)
                                               - math.cos(4 * t)) / 17 + 0.1) for t in ts]
    else:
        raise ValueError(f"unknown shape {shape}")
    c, s = math.cos(turn), math.sin(turn)
    return [(x * c - y * s, x * s + y * c) for x, y in pts]


def _polygon(sides: int, start: float) -> list[tuple[float, float]]:
    return [(math.cos(start + 2 * math.pi * k / sides), math.sin(start + 2 * math.pi * k / sides))
            for k in range(sides)]


def _caption(rng: np.random.Generator, shape: str, colour: str, rel_radius: float,
             centre: tuple[float, float], size: int) -> str:
    size_word = "small " if rel_radius < 0.15 else "large " if rel_radius > 0.19 else ""
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    text = template.format(size=size_word, colour=colour, shape=shape, where=_where(centre, size))
    return text.replace("a orange", "an orange")


def _where(centre: tuple[float, float], size: int) -> str:
    dx, dy = centre[0] / size - 0.5, centre[1] / size - 0.5
    if max(abs(dx), abs(dy)) < 0.12:
        return "in the centre"
    if abs(dx) >= abs(dy):
        return "on the left" if dx < 0 else "on the right"
    return "at the top" if dy < 0 else "at the bottom"


# --------------------------------------------------------------------------- files
def _write_tar(path: Path, samples: list[dict]) -> None:
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            meta = json.dumps(s["meta"], sort_keys=True).encode()
            for ext, data in (("jpg", s["jpg"]), ("txt", s["caption"].encode()), ("json", meta)):
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o444
                info.uid = info.gid = 0
                info.uname = info.gname = "bigdata"  # what webdataset's TarWriter (used by img2dataset) writes
                tar.addfile(info, io.BytesIO(data))


def _write_parquet(path: Path, samples: list[dict]) -> None:
    columns = {name: [s["meta"][name] for s in samples] for name in PARQUET_SCHEMA.names}
    table = pa.table(columns, schema=PARQUET_SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _write_imagefolder(root: Path, samples: list[dict]) -> None:
    for s in samples:
        folder = root / s["meta"]["split"] / s["meta"]["shape"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{s['key']}.jpg").write_bytes(s["jpg"])


def _stats(samples: list[dict], params: dict) -> dict:
    """img2dataset's `_stats.json` fields, with zero times so that reruns give identical bytes."""
    return {
        "count": len(samples),
        "successes": len(samples),
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "duration": 0.0,
        "start_time": 0.0,
        "end_time": 0.0,
        "status_dict": {"success": len(samples)},
        "salmae_shapes": params,
    }
