"""A study's setting names: a mask strategy, or a capped saliency mask named KIND-CAP.

Shared by the study (`stages/study.py`, which runs them) and its report (`stages/study_report.py`,
which orders and pairs them), so neither imports the other.

KIND is `saliency` (the top-salient patches up to the cap), `inverse` (the least salient) or
`shuffled` (another image's map: the control for the map's content). CAP is a fraction of the
image's patches (`saliency-0.25`), or, with `@salient`, of each map's salient area, the smallest set
of patches holding half its mass (`saliency-0.5@salient`: `masking.cap_of=salient`).
`adaptive` is the old name of `amr-capped`, kept so that study folders that ran it still resume.
"""

from __future__ import annotations

import math
from typing import Any

from salmae.pipeline.errors import SalmaeError

STRATEGIES = ("random", "block", "grid", "amr-capped", "sbam", "adaptive")   # settings without a cap
CAPPED = ("saliency", "inverse", "shuffled")       # settings named KIND-CAP[@salient], e.g. saliency-0.25
SALIENT = "@salient"                               # CAP suffix: a share of the map's salient area


def parse_setting(name: str) -> dict[str, Any]:
    """'random' -> {mask: random, cap: None, inverse: False, map: own, cap_of: image};
    'saliency-0.25' / 'inverse-0.25' / 'shuffled-0.25' / 'saliency-0.5@salient' -> capped."""
    if name in STRATEGIES:
        return {"mask": name, "cap": None, "inverse": False, "map": "own", "cap_of": "image"}
    kind, _, cap = name.partition("-")
    cap_of = "salient" if cap.endswith(SALIENT) else "image"
    try:
        value = float(cap.removesuffix(SALIENT))
    except ValueError:
        value = math.nan
    if kind not in CAPPED or not 0 < value <= 1:
        raise SalmaeError(f"unknown study setting {name!r}; use {', '.join(STRATEGIES)} or KIND-CAP with KIND one "
                          f"of {', '.join(CAPPED)} and 0 < CAP <= 1, optionally CAP{SALIENT} (e.g. saliency-0.25, "
                          f"shuffled-0.25, saliency-0.5{SALIENT})")
    return {"mask": "saliency", "cap": value, "inverse": kind == "inverse",
            "map": "shuffled" if kind == "shuffled" else "own", "cap_of": cap_of}


def on_cap_curve(name: str) -> bool:
    """The settings the accuracy-vs-cap figure draws as a curve: `random` (cap 0) and `saliency-CAP`
    with the cap a fraction of the image; controls and salient-area caps are drawn as points."""
    if name == "random":
        return True
    spec = parse_setting(name)
    return spec["cap"] is not None and not spec["inverse"] and spec["map"] == "own" and spec["cap_of"] == "image"
