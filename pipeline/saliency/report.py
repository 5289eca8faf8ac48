"""Stage 1's report: counts by status, every damaged row with its key and shard file, the run's
throughput and provenance, written atomically as `saliency_report.json` inside the store (two
stores in one folder keep their own reports); one warning line per shard with damaged rows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from salmae.pipeline.files import atomic_write_json, disk_full_as_error
from salmae.pipeline.logging import get_logger
from salmae.pipeline.saliency.store import STATUS_CODES, SaliencyStore

REPORT_NAME = "saliency_report.json"


def summarise(store: SaliencyStore, manifest, out: Path, started: float, run_id: str, steady: dict[str, float],
               provenance: dict) -> dict[str, Any]:
    status = store.status
    keys = store.keys
    counts = {STATUS_CODES[int(c)]: int(n) for c, n in zip(*np.unique(status, return_counts=True))}
    failures = _failures(store, manifest, status, keys)
    markers = store.done_markers()
    seconds = time.time() - started
    this_run = sum(m.get("images", 0) for m in markers.values() if m.get("run_id") == run_id)
    nbytes = store.array_nbytes("saliency") + store.array_nbytes("scale")
    summary = {
        "store": str(out), "rows": len(store), "grid": list(store.grid), "counts": counts,
        "damaged": len(failures), "failures": failures,
        "shards": store.n_shards, "shards_done": len(markers),
        "images_this_run": this_run, "seconds": round(seconds, 3),
        "images_per_s": round(this_run / seconds, 2) if seconds > 0 else None,
        "bytes_per_image": round(nbytes / max(len(store), 1), 2), "saliency_bytes": nbytes,
        "manifest_hash": store.attrs.get("manifest_hash"), "clip_model": store.attrs.get("clip_model"),
        "clip_pretrained": store.attrs.get("clip_pretrained"), "cam": store.attrs.get("cam"),
        "max_pixels": store.attrs.get("max_pixels"),
        "this_run": provenance, "allow_mixed": bool(store.attrs.get("allow_mixed", False)),
        "steady_state": {"images": steady["images"], "seconds": round(steady["seconds"], 4), "of": "rank 0",
                         "images_per_s": round(steady["images"] / steady["seconds"], 2) if steady["seconds"] > 0
                         else None},
    }
    report = out / REPORT_NAME           # inside the store: two stores in one folder keep their own reports
    with disk_full_as_error(report, "the store itself is complete; only its report is missing"):
        atomic_write_json(report, summary)
    log = get_logger()
    _log_damaged_shards(log, failures)
    log.info("stage 1 done: %d rows, %s; %.1f img/s this run, %.0f bytes/image; report %s",
             len(store), counts, summary["images_per_s"] or 0, summary["bytes_per_image"], report)
    return summary


def _failures(store: SaliencyStore, manifest, status: np.ndarray, keys: np.ndarray) -> list[dict[str, Any]]:
    """One entry per damaged row: key ('' when a garbage tar has none), shard file, reason (+ detail)."""
    rows = np.flatnonzero(status >= 2)
    shard_of = manifest.column("shard").take(rows) if len(manifest) == len(store) else [None] * len(rows)
    sizes = store.image_sizes(rows) if len(rows) else np.zeros((0, 2), np.int32)
    out = []
    for r, shard, (w, h) in zip(rows.tolist(), shard_of, sizes.tolist()):
        entry = {"key": str(keys[r]), "shard": shard, "reason": STATUS_CODES[int(status[r])]}
        if entry["reason"] == "too_large":
            limit = store.attrs.get("max_pixels")
            entry["detail"] = f"{w}x{h} = {w * h / 1e6:.1f} MP > max_pixels {limit / 1e6:g} MP" if limit else f"{w}x{h}"
        elif entry["reason"] == "truncated_tar" and not entry["key"]:
            entry["detail"] = "no sample of this tar could be read (not a tar, or cut before its first member)"
        out.append(entry)
    return out


def _log_damaged_shards(log, failures: list[dict[str, Any]], limit: int = 20) -> None:
    """One warning line per shard with damaged rows (the first `limit` shards), naming the shard file."""
    by_shard: dict[str, list[dict]] = {}
    for f in failures:
        by_shard.setdefault(str(f["shard"]), []).append(f)
    for shard, items in list(by_shard.items())[:limit]:
        reasons = sorted({f["reason"] for f in items})
        keys = ", ".join(repr(f["key"]) for f in items[:3]) + (" ..." if len(items) > 3 else "")
        log.warning("shard %s: %d damaged rows (%s; keys %s)", shard, len(items), ", ".join(reasons), keys)
    if len(by_shard) > limit:
        log.warning("... and %d more shards with damaged rows (all listed in %s)", len(by_shard) - limit, REPORT_NAME)
