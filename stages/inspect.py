"""`salmae inspect STORE`: what a saliency store holds and, given the data, how well its maps localise.

Map statistics are over rows with status ok. Every finished shard is decoded and checked first
(`SaliencyStore.damaged_shards`): the rows of a damaged shard are listed as damaged, left out of
the statistics, and the CLI exits 1. With `data` (the store's shards) and a `bbox` in a
sample's KEY.json, the maps are scored against the box: the pointing game (is the centre of the
argmax patch inside the box?) and the share of saliency mass inside the box next to the box's
share of the frame's area (what a uniform map would score).

With `boxes` (a user's PASCAL VOC XML, a folder of them, or a CSV key,x0,y0,x1,y1:
`pipeline/data/boxes.py`) the same check runs on real data: for each ok row with boxes, a hit when
the centre of the map's argmax patch (placed in image pixels through the row's frame) lies inside
any of its boxes, with a 95% Wilson interval over the rows; the share of the map's mass on the
union of its boxes; and the expected hit rate of a uniform random point in the image (the mean
share of the image the boxes cover), which the pointing game must clear for the maps to point at
objects. Keys in the file but not in the store, rows that are not ok and ok rows without boxes are
counted; no matching key at all is an error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from salmae.pipeline.data.boxes import BoxFile, read_boxes
from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.files import atomic_write_json, confined
from salmae.pipeline.saliency.store import (REPAIR_HINT, STATUS_CODES, STATUS_OK, SaliencyStore, StoreDamaged,
                                            rows_text)
from salmae.pipeline.stats import wilson_interval

EXAMPLE_KEYS = 5   # example keys listed per failure reason
BOX_RESIZES = ("scale", "border", "center_crop")   # how a VOC <size> maps onto the stored image (`_place_boxes`)


def inspect_store(store: str | Path, data: str | None = None, png_dir: str | Path | None = None,
                  keys: Sequence[str] | None = None, n_random: int | None = None, strategy: str = "saliency",
                  seed: int = 0, localise: bool = True, boxes: str | Path | None = None,
                  boxes_resize: str = "scale") -> dict[str, Any]:
    """Summarise `store` (see module doc); write overlay PNGs for `keys` / `n_random` rows into `png_dir`.

    `data` gives the images under the PNGs and, with `localise`, the boxes the maps are scored against
    (a scan of every shard's metadata: `localise=False` draws from unlabelled data without it).
    `boxes`: a box file scored by the pointing game (`_box_localisation`); `boxes_resize`: how boxes
    given in the pixels of a VOC file's <size> reach the stored image when the aspect differs
    (`_place_boxes`)."""
    if boxes_resize not in BOX_RESIZES:
        raise SalmaeError(f"unknown --boxes-resize {boxes_resize!r}; use one of {', '.join(BOX_RESIZES)}")
    box_file = read_boxes(boxes) if boxes is not None else None    # a malformed file fails before the long scan
    st = SaliencyStore.open(store)
    if box_file is not None:
        _rows_of_boxes(st, box_file)                               # and so does one whose keys are not the store's
    damage = st.damaged_shards(thorough=True)        # decodes every finished shard: the maps are read below anyway
    status = _status_beside(st, damage)
    ok_rows = np.flatnonzero(status == STATUS_OK)
    summary: dict[str, Any] = {
        "store": str(store), "rows": len(st), "grid": list(st.grid),
        "status": _status_counts(st, status),
        "damaged": [{"shard": d.shard, "array": d.array, "rows": rows_text(d.rows), "problem": d.problem,
                     "text": d.describe(st.path)} for d in damage],
        "attrs": {k: v for k, v in st.attrs.items() if k not in ("status_codes", "fingerprint")},
        "maps": _map_stats_streamed(st, ok_rows) if len(ok_rows) else {},
    }
    meta: dict[str, dict] = {}
    if data is not None and localise:
        meta = _read_meta(data, set(st.keys.tolist()))
        summary["localisation"] = _localisation(st, ok_rows, meta)
    if box_file is not None:
        summary["boxes"] = _box_localisation(st, status, box_file, boxes_resize)
    if png_dir is not None:
        rows = _rows_to_draw(st, ok_rows, keys, n_random, seed)
        summary["png"] = _write_pngs(st, rows, data, meta, Path(png_dir), strategy, seed)
    return summary


def format_summary(summary: dict[str, Any], as_json: bool = False) -> str:
    """Human-readable (or JSON) text of an `inspect_store` summary."""
    if as_json:
        return json.dumps(summary, indent=2, default=str)
    lines = [f"store {summary['store']}: {summary['rows']} rows, grid {summary['grid'][0]}x{summary['grid'][1]}"]
    for reason, info in summary["status"].items():
        examples = f"  e.g. {', '.join(info['examples'])}" if info.get("examples") else ""
        lines.append(f"  {reason:<18} {info['count']:>8}{examples}")
    for d in summary.get("damaged", [])[:20]:
        lines.append(f"  DAMAGED {d['text']}")
    if summary.get("damaged"):
        lines.append(f"  {len(summary['damaged'])} damaged shard files (their rows count as {DAMAGED!r}, left out of "
                     f"the statistics); {REPAIR_HINT} (--out {summary['store']})")
    attrs = summary["attrs"]
    lines.append(f"  model {attrs.get('clip_model')} / {attrs.get('clip_pretrained')}, cam {attrs.get('cam')} "
                 f"at {attrs.get('layer')}, input {attrs.get('input_size')}, manifest {str(attrs.get('manifest_hash'))[:12]}")
    prov = attrs.get("provenance") or {}
    if prov:
        mixed = f"; resumed {len(attrs['mixed_runs'])}x with other settings (allow_mixed)" if attrs.get("mixed_runs") else ""
        lines.append(f"  computed on {prov.get('device')} in {prov.get('precision')}, batch {prov.get('batch_size')}, "
                     f"compile {'on' if prov.get('compile') else 'off'}, seed {prov.get('seed')}; torch {prov.get('torch')}, "
                     f"open_clip {prov.get('open_clip')}, grad-cam {prov.get('grad_cam')}{mixed}")
    maps = summary.get("maps") or {}
    if maps:
        lines.append(f"  maps: entropy {maps['entropy']:.3f} nats ({maps['entropy_rel']:.2f} of uniform), "
                     f"top-25% patches hold {maps['top25_mass']:.2f} of the mass, zero maps {maps['zero_maps']}")
    loc = summary.get("localisation")
    if loc:
        if loc["n"]:
            lines.append(f"  bbox ({loc['n']} maps): pointing game {loc['pointing_game']:.3f}, mass in box "
                         f"{loc['mass_in_box']:.3f} vs box area share {loc['box_area_share']:.3f}")
            if "argmax_on_distractor" in loc:
                split = ", ".join(f"{loc[k]['pointing_game']:.3f} with a {k[len('pointing_game_'):].replace('_', '-')} "
                                  f"distractor ({loc[k]['n']})" for k in ("pointing_game_different_colour",
                                                                          "pointing_game_same_colour") if k in loc)
                lines.append(f"  argmax on the distractor {loc['argmax_on_distractor']:.3f}; pointing game {split}")
        else:
            lines.append("  bbox: no ok rows with a bbox in the data's metadata")
    if summary.get("boxes"):
        lines += _format_boxes(summary["boxes"])
    if summary.get("png"):
        lines.append(f"  wrote {len(summary['png'])} overlay PNGs to {Path(summary['png'][0]).parent}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- statistics
DAMAGED = "damaged_store"      # status shown for the rows of a damaged shard (not a stored code)
DAMAGED_CODE = 255


def _status_beside(st: SaliencyStore, damage: list) -> np.ndarray:
    """[N] statuses, with DAMAGED_CODE for every row of a shard in `damage` (an unreadable status
    shard is not read: its rows are all damaged)."""
    skip = sorted({d.shard for d in damage})
    if not skip:
        return st.status
    status = np.zeros(len(st), np.uint8)
    for shard in range(st.n_shards):
        rows = st.shard_rows(shard)
        status[rows.start:rows.stop] = DAMAGED_CODE if shard in skip else st.status_of(rows)
    return status


def _status_counts(st: SaliencyStore, status: np.ndarray) -> dict[str, dict]:
    out = {}
    for code in np.unique(status):
        rows = np.flatnonzero(status == code)
        entry: dict[str, Any] = {"count": int(len(rows))}
        if code == DAMAGED_CODE:
            out[DAMAGED] = entry
            continue
        if code >= 2:
            try:
                entry["examples"] = [str(st.keys[r]) for r in rows[:EXAMPLE_KEYS]]
            except StoreDamaged:             # a damaged key shard (listed under damaged): rows, not keys
                entry["examples"] = [f"row {r}" for r in rows[:EXAMPLE_KEYS]]
        out[STATUS_CODES.get(int(code), f"code_{code}")] = entry
    return out


def _map_stats(maps: np.ndarray) -> dict[str, float]:
    """maps: [n, gh, gw] -> mean entropy, entropy relative to uniform, top-25% mass share."""
    sums = _map_sums(maps)
    return _stats_from_sums(sums, maps.shape[1] * maps.shape[2])


def _map_stats_streamed(st: SaliencyStore, rows: np.ndarray, chunk_rows: int = 65_536) -> dict[str, float]:
    """`_map_stats` of the store's `rows`, read `chunk_rows` at a time: memory stays O(chunk), not
    O(rows) (the whole cc3m store as float64 would be ~5 GB)."""
    totals = np.zeros(4)
    for lo in range(0, len(rows), chunk_rows):
        totals += _map_sums(st.read(rows[lo:lo + chunk_rows]))
    return _stats_from_sums(totals, st.grid[0] * st.grid[1])


def _map_sums(maps: np.ndarray) -> np.ndarray:
    """[n, gh, gw] -> [sum of entropies, sum of top-25% masses, maps with mass, all-zero maps]."""
    flat = np.clip(maps.reshape(len(maps), -1).astype(np.float64), 0, None)   # [n, L]
    total = flat.sum(1)
    nonzero = total > 0
    length = flat.shape[1]
    p = flat[nonzero] / total[nonzero, None]
    entropy = -(p * np.log(np.where(p > 0, p, 1))).sum(1)
    top = max(1, math.ceil(length / 4))
    top_mass = np.sort(p, axis=1)[:, ::-1][:, :top].sum(1)
    return np.array([entropy.sum(), top_mass.sum(), len(p), (~nonzero).sum()], dtype=np.float64)


def _stats_from_sums(sums: np.ndarray, length: int) -> dict[str, float]:
    entropy_sum, top_sum, n, zero = sums
    mean = entropy_sum / n if n else float("nan")
    return {"entropy": float(mean),
            "entropy_rel": float(mean / math.log(length)) if n and length > 1 else float("nan"),
            "top25_mass": float(top_sum / n) if n else float("nan"),
            "zero_maps": int(zero)}


def _patch_boxes(frame: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Pixel boxes [gh*gw, 4] of the patches of a map covering `frame` (x0, y0, x1, y1)."""
    gh, gw = grid
    x0, y0, x1, y1 = frame
    xs, ys = np.linspace(x0, x1, gw + 1), np.linspace(y0, y1, gh + 1)
    return np.array([[xs[j], ys[i], xs[j + 1], ys[i + 1]] for i in range(gh) for j in range(gw)])


def _overlap(boxes: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """Fraction of each box's area [K] that lies inside `box`."""
    w = np.clip(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]), 0, None)
    h = np.clip(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]), 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return w * h / np.maximum(area, 1e-12)


def _localisation(st: SaliencyStore, ok_rows: np.ndarray, meta: dict[str, dict]) -> dict[str, Any]:
    """Pointing game and mass in box over the rows whose metadata has a `bbox`.

    When the metadata also names a `distractor` (generated shapes), adds how often the argmax lands
    on the distractor instead, and the pointing game split by whether the distractor shares the
    named object's colour (then only the caption's shape word tells them apart).
    """
    rows = [int(r) for r in ok_rows if isinstance(meta.get(str(st.keys[r]), {}).get("bbox"), (list, tuple))]
    if not rows:
        return {"n": 0}
    maps, frames = st.read(rows), st.frames(rows)
    hits, on_distractor, same_colour, mass, area_share = [], [], [], [], []
    for m, frame, r in zip(maps, frames, rows):
        info = meta[str(st.keys[r])]
        boxes = _patch_boxes(frame, st.grid)
        flat = np.clip(m.reshape(-1).astype(np.float64), 0, None)
        centre = boxes[int(flat.argmax())]
        cx, cy = (centre[0] + centre[2]) / 2, (centre[1] + centre[3]) / 2
        hits.append(_contains(info["bbox"], cx, cy))
        other = info.get("distractor") if isinstance(info.get("distractor"), dict) else {}
        on_distractor.append(_contains(other["bbox"], cx, cy) if isinstance(other.get("bbox"), (list, tuple)) else None)
        same_colour.append(other.get("colour") == info.get("colour") if "colour" in other else None)
        inside = _overlap(boxes, info["bbox"])
        mass.append(float((flat * inside).sum() / flat.sum()) if flat.sum() > 0 else float("nan"))
        area_share.append(float(_overlap(np.asarray([frame]), info["bbox"])[0]))   # box area / frame area
    out: dict[str, Any] = {"n": len(rows), "pointing_game": float(np.mean(hits)), "mass_in_box": float(np.nanmean(mass)),
                           "box_area_share": float(np.mean(area_share))}
    known = [d for d in on_distractor if d is not None]
    if known:
        out["argmax_on_distractor"] = float(np.mean(known))
    for name, flag in (("different_colour", False), ("same_colour", True)):
        split = [h for h, s in zip(hits, same_colour) if s is flag]
        if split:
            out[f"pointing_game_{name}"] = {"n": len(split), "pointing_game": float(np.mean(split))}
    return out


def _contains(box: Sequence[float], x: float, y: float) -> bool:
    return bool(box[0] <= x <= box[2] and box[1] <= y <= box[3])


# ---------------------------------------------------------------------------- --boxes: the pointing game on real data
MAP_CHUNK_ROWS = 65_536     # maps read at a time when scoring boxes (memory O(chunk), not O(rows))


def _rows_of_boxes(st: SaliencyStore, box_file: BoxFile) -> dict[str, int]:
    """key -> store row of every key of `box_file` the store holds; none at all is a one-line error."""
    rows = {key: row for key in box_file.boxes if (row := st.row_of(key)) is not None}
    if not rows:
        theirs = ", ".join(repr(k) for k in list(box_file.boxes)[:2])
        ours = ", ".join(repr(str(k)) for k in st.keys[:2])
        raise SalmaeError(f"none of the {len(box_file.boxes)} keys in {box_file.path} is a key of store {st.path} "
                          f"(boxes: {theirs}; store: {ours}): name the images by their img2dataset keys (a VOC "
                          "file's <filename> without extension, else the file's name; a CSV's first column)")
    return rows


def _box_localisation(st: SaliencyStore, status: np.ndarray, box_file: BoxFile, resize: str) -> dict[str, Any]:
    """Pointing game (Wilson 95% interval), mass on the boxes and the random-point rate over the ok rows
    that have boxes; counts of what could not be scored (status: [N], damaged shards' rows not ok)."""
    rows_of = _rows_of_boxes(st, box_file)
    scored = sorted((row, key) for key, row in rows_of.items() if status[row] == STATUS_OK)
    rows = np.asarray([r for r, _ in scored], dtype=np.int64)
    frames, sizes = st.frames(rows), st.image_sizes(rows)
    hits, mass, share = [], [], []
    mismatch, outside = [], []
    for lo in range(0, len(scored), MAP_CHUNK_ROWS):
        maps = st.read(rows[lo:lo + MAP_CHUNK_ROWS])
        for m, (_, key), frame, size in zip(maps, scored[lo:lo + MAP_CHUNK_ROWS], frames[lo:], sizes[lo:]):
            placed = _place_boxes(np.asarray(box_file.boxes[key], np.float64), box_file.sizes.get(key),
                                  (int(size[0]), int(size[1])), resize)
            if placed is None:
                mismatch.append(key)
                continue
            if not len(placed):
                outside.append(key)
                continue
            flat = np.clip(m.reshape(-1).astype(np.float64), 0, None)            # [gh*gw]
            cx, cy = _cell_centre(frame, st.grid, int(flat.argmax()))
            hits.append(any(_contains(b, cx, cy) for b in placed))
            mass.append(float((flat * _union_cover(frame, st.grid, placed)).sum() / flat.sum())
                        if flat.sum() > 0 else float("nan"))
            share.append(float(_union_cover(np.array([0, 0, *size], np.float64), (1, 1), placed)[0]))
    n, n_hits = len(hits), int(sum(hits))
    out: dict[str, Any] = {
        "file": box_file.path, "format": box_file.format, "resize": resize, "n": n, "hits": n_hits,
        "pointing_game": n_hits / n if n else None,
        "ci95": list(wilson_interval(n_hits, n)) if n else None,
        "mass_in_box": float(np.nanmean(mass)) if n and not np.isnan(mass).all() else None,
        "random_point": float(np.mean(share)) if n else None,
        "box_keys": len(box_file.boxes), "boxes": sum(len(b) for b in box_file.boxes.values()),
        "keys_not_in_store": len(box_file.boxes) - len(rows_of),
        "not_ok": len(rows_of) - len(scored),
        "size_mismatch": len(mismatch), "outside_image": len(outside),
        "ok_rows_without_boxes": int((status == STATUS_OK).sum()) - len(scored),
    }
    examples = {"keys_not_in_store": [k for k in box_file.boxes if k not in rows_of],
                "size_mismatch": mismatch, "outside_image": outside}
    out["examples"] = {name: keys[:EXAMPLE_KEYS] for name, keys in examples.items() if keys}
    return out


def _cell_centre(frame: np.ndarray, grid: tuple[int, int], cell: int) -> tuple[float, float]:
    """Pixel centre (x, y) of cell `cell` (row-major) of a `grid` over `frame`: `_patch_boxes`' centre, one cell."""
    gh, gw = grid
    i, j = divmod(cell, gw)
    xs, ys = np.linspace(frame[0], frame[2], gw + 1), np.linspace(frame[1], frame[3], gh + 1)
    return float((xs[j] + xs[j + 1]) / 2), float((ys[i] + ys[i + 1]) / 2)


def _place_boxes(boxes: np.ndarray, source: tuple[int, int] | None, image: tuple[int, int],
                 resize: str) -> np.ndarray | None:
    """Boxes [k, 4] given in the pixels of a `source` (W, H) image -> pixels of the stored `image` (W, H),
    clipped to it, empty ones dropped: [k', 4]. None when they cannot be placed.

    No `source` (a CSV) or the same size: as given. Otherwise the shards hold a resized copy: `scale`
    (same aspect within 2%: img2dataset's keep_ratio or any aspect-keeping resize; another aspect:
    None), `border` (img2dataset's default: longest side fitted, centred on padding), `center_crop`
    (shortest side fitted, centre cropped).
    """
    width, height = image
    if source is not None and tuple(source) != (width, height):
        w, h = source
        if resize == "scale":
            if abs((width / height) / (w / h) - 1) > 0.02:
                return None
            sx, sy, ox, oy = width / w, height / h, 0.0, 0.0
        else:
            sx = sy = (min if resize == "border" else max)(width / w, height / h)
            ox, oy = (width - w * sx) / 2, (height - h * sy) / 2
        boxes = boxes * np.array([sx, sy, sx, sy]) + np.array([ox, oy, ox, oy])
    boxes = np.clip(boxes, 0, [width, height, width, height])
    return boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]


def _union_cover(frame: np.ndarray, grid: tuple[int, int], boxes: np.ndarray) -> np.ndarray:
    """Share of each cell's area [gh*gw] of a `grid` over `frame` (x0, y0, x1, y1) that lies in the union
    of `boxes` [k, 4] (exact: overlapping boxes count once).

    The cell edges and the box edges cut the frame into rectangles that each lie in one cell and are
    either inside the union or outside it; their areas are summed per cell.
    """
    gh, gw = grid
    x_edges, y_edges = np.linspace(frame[0], frame[2], gw + 1), np.linspace(frame[1], frame[3], gh + 1)
    xs = np.unique(np.concatenate([x_edges, np.clip(boxes[:, [0, 2]].ravel(), x_edges[0], x_edges[-1])]))
    ys = np.unique(np.concatenate([y_edges, np.clip(boxes[:, [1, 3]].ravel(), y_edges[0], y_edges[-1])]))
    cx, cy = (xs[:-1] + xs[1:]) / 2, (ys[:-1] + ys[1:]) / 2                   # [nx], [ny] piece centres
    inside = ((boxes[:, 0, None, None] <= cx) & (cx <= boxes[:, 2, None, None])
              & (boxes[:, 1, None, None] <= cy[:, None]) & (cy[:, None] <= boxes[:, 3, None, None])).any(0)  # [ny, nx]
    area = np.outer(np.diff(ys), np.diff(xs)) * inside                        # [ny, nx]
    col = np.clip(np.searchsorted(x_edges, cx, side="right") - 1, 0, gw - 1)  # [nx] cell column of each piece
    row = np.clip(np.searchsorted(y_edges, cy, side="right") - 1, 0, gh - 1)  # [ny]
    cover = np.bincount((row[:, None] * gw + col).ravel(), weights=area.ravel(), minlength=gh * gw)   # [gh*gw]
    return cover / ((frame[2] - frame[0]) / gw * (frame[3] - frame[1]) / gh)


def _format_boxes(b: dict[str, Any]) -> list[str]:
    """The text lines of a `_box_localisation` result."""
    head = f"  boxes {b['file']} ({b['format']}, {b['box_keys']} keys, {b['boxes']} boxes)"
    if b["n"]:
        lo, hi = b["ci95"]
        where = "above" if lo > b["random_point"] else "below" if hi < b["random_point"] else "includes"
        verdict = {"above": "interval above it", "below": "interval below it", "includes": "interval includes it"}[where]
        lines = [f"{head}: pointing game {b['pointing_game']:.3f} (95% {lo:.3f}-{hi:.3f}, {b['hits']}/{b['n']} maps) vs "
                 f"{b['random_point']:.3f} for a uniform random point ({verdict}); mass in boxes {b['mass_in_box']:.3f}"]
    else:
        lines = [f"{head}: no ok row with boxes to score"]
    missing = b["examples"].get("keys_not_in_store")
    skipped = [f"{b['keys_not_in_store']} keys not in the store" + (f" (e.g. {', '.join(map(repr, missing))})"
                                                                    if missing else ""), f"{b['not_ok']} rows not ok"]
    if b["size_mismatch"]:
        skipped.append(f"{b['size_mismatch']} whose stored image has another aspect than their VOC <size> "
                       f"(--boxes-resize border|center_crop: the shards' img2dataset resize_mode)")
    if b["outside_image"]:
        skipped.append(f"{b['outside_image']} whose boxes lie outside the image")
    lines.append(f"  boxes not scored: {', '.join(skipped)}; {b['ok_rows_without_boxes']} ok rows have no boxes")
    return lines


# ---------------------------------------------------------------------------- data and figures
def _read_meta(data: str, keys: set[str]) -> dict[str, dict]:
    from salmae.pipeline.data.shards import iter_samples

    return {s.key: s.meta for s in iter_samples(data, decode=False) if s.key in keys}


def _rows_to_draw(st: SaliencyStore, ok_rows: np.ndarray, keys: Sequence[str] | None, n_random: int | None,
                  seed: int) -> list[int]:
    rows = []
    for key in keys or []:
        row = st.row_of(key)
        if row is None:
            raise SalmaeError(f"key {key!r} is not in store {st.path}; list keys with `salmae inspect --json`")
        rows.append(row)
    if n_random:
        rng = np.random.default_rng(seed)
        rows += sorted(rng.choice(ok_rows, size=min(n_random, len(ok_rows)), replace=False).tolist())
    return rows


def _mask_for(strategy: str, saliency: np.ndarray, grid: tuple[int, int], seed: int) -> np.ndarray | None:
    """The mask `strategy` would draw on the store's grid (None if pipeline.pretrain.masking is unavailable)."""
    try:
        import torch

        from salmae.pipeline.pretrain.masking import make_mask
    except ImportError:
        return None
    gen = torch.Generator().manual_seed(seed)
    sal = torch.from_numpy(saliency.reshape(1, -1).astype(np.float32))
    _, mask, _ = make_mask(strategy, 1, tuple(grid), 0.75, saliency=sal, generator=gen)
    return mask.reshape(grid).numpy()


def _write_pngs(st: SaliencyStore, rows: list[int], data: str | None, meta: dict[str, dict], out: Path,
                strategy: str, seed: int) -> list[str]:
    from salmae.pipeline.figures.overlays import save_saliency_overlay

    if rows and data is None:
        raise SalmaeError("--png needs --data SHARDS to draw the images under the maps")
    wanted = {str(st.keys[r]): r for r in rows}
    images = _read_images(data, set(wanted), st) if rows else {}
    written, index = [], {}
    out.mkdir(parents=True, exist_ok=True)
    for key, row in wanted.items():
        if key not in images:
            continue
        sal = st.read([row])[0]
        mask = _mask_for(strategy, sal, st.grid, seed) if st.status[row] == STATUS_OK else None
        path = confined(out, key, ".png")        # keys come from tar member names: never a path of their own
        save_saliency_overlay(path, images[key], sal, frame=tuple(st.frames([row])[0]), mask=mask,
                              bbox=meta.get(key, {}).get("bbox"), mask_label=f"{strategy} mask",
                              title=f"{key} [{STATUS_CODES[int(st.status[row])]}]")
        written.append(str(path))
        index[path.name] = key
    if index:
        atomic_write_json(out / "index.json", index)   # file name -> the sample's key, as stored
    return written


def _read_images(data: str, keys: set[str], st: SaliencyStore) -> dict[str, np.ndarray]:
    """The images of `keys`: read by byte range through the store's manifest (local tars), else by
    streaming only the shards that hold them; never a scan of every tar for a few keys."""
    from salmae.pipeline.data.shards import decode_image, expand_shards, iter_shard, read_member, shard_name
    from salmae.pipeline.data.manifest import load_manifest

    manifest_path = Path(st.path) / "manifest.parquet"
    by_name = {shard_name(u): u for u in expand_shards(data)}
    raw: dict[str, bytes] = {}
    if manifest_path.is_file():
        manifest = load_manifest(manifest_path)
        shards, offsets, nbytes = manifest.column("shard"), manifest.column("image_offset"), manifest.column("image_nbytes")
        streamed: dict[str, set[str]] = {}
        for key in keys:
            row = manifest.row_of(key)
            url = by_name.get(shards[row])
            if url is None or offsets[row] < 0:
                continue
            local = not url.startswith("pipe:") and ("://" not in url or url.startswith("file://"))
            if local:
                raw[key] = read_member(url, int(offsets[row]), int(nbytes[row]))
            else:
                streamed.setdefault(url, set()).add(key)
        for url, wanted in streamed.items():
            raw.update({s.key: s.image_bytes for s in iter_shard(url, decode=False, keys=wanted) if s.image_bytes})
    else:  # a store without its manifest (older tooling): stream the data once
        from salmae.pipeline.data.shards import iter_samples

        raw = {s.key: s.image_bytes for s in iter_samples(data, decode=False) if s.key in keys and s.image_bytes}
    images = {}
    for key, data_bytes in raw.items():
        try:
            images[key] = np.asarray(decode_image(data_bytes, key))
        except SalmaeError:
            continue
    return images
