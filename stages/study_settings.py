"""A study's setting names: a mask strategy, or a capped saliency mask named KIND-CAP.

Shared by the study (`stages/study.py`, which runs them) and its report (`stages/study_report.py`,
which orders and pairs them), so neither imports the other.
"""

from __future__ import annotations

import math
from typing import Any

from salmae.pipeline.errors import SalmaeError

STRATEGIES = ("random", "block", "grid", "adaptive")   # settings without a cap
CAPPED = ("saliency", "inverse")                       # settings named KIND-CAP, e.g. saliency-0.25


def parse_setting(name: str) -> dict[str, Any]:
    """'random' -> {mask: random, cap: None, inverse: False}; 'saliency-0.25' / 'inverse-0.25' -> capped."""
    if name in STRATEGIES:
        return {"mask": name, "cap": None, "inverse": False}
    kind, _, cap = name.partition("-")
    try:
        value = float(cap)
    except ValueError:
        value = math.nan
    if kind not in CAPPED or not 0 < value <= 1:
        raise SalmaeError(f"unknown study setting {name!r}; use {', '.join(STRATEGIES)}, saliency-CAP or "
                          "inverse-CAP with 0 < CAP <= 1 (e.g. saliency-0.25)")
    return {"mask": "saliency", "cap": value, "inverse": kind == "inverse"}
