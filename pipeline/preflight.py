"""Is this machine ready for salmae? Versions, a compiler for torch.compile, the wheelhouse's Python.

A cluster's GPU box often has its own torch, timm and numpy and none of our other packages
(`make wheelhouse` brings those). Before `salmae gpu-check` spends GPU time, this says in one line
per problem what is missing or too old. Standard library only, so that
`python -m pipeline.preflight --wheels DIR` runs before any wheel is installed.

`MINIMUM` is the single list of lower bounds; `pyproject.toml` states the same (a test holds
them equal). Why each bound:
- python 3.11: zarr 3 needs it;
- torch 2.5: `torch.serialization.safe_globals` (checkpoint loading), `torch.amp.GradScaler(device)`;
- torchvision 0.20: the release paired with torch 2.5 (transforms.v2 functional);
- timm 1.0.16: `Block.forward(x, attn_mask=...)`, used for padded (adaptive) keep counts;
- numpy 2.0: zarr 3 needs it.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

MINIMUM = {"python": "3.11", "torch": "2.5", "torchvision": "0.20", "timm": "1.0.16", "numpy": "2.0"}


def version_tuple(text: str) -> tuple[int, ...]:
    """'2.14.1+cu126' -> (2, 14, 1); a pre-release counts as its release ('1.0.16.dev0' -> (1, 0, 16))."""
    return tuple(int(p) for p in re.findall(r"\d+", text.split("+")[0])[:3])


def installed_version(name: str) -> str | None:
    """The version of `name` this interpreter imports (None if it cannot be imported)."""
    if name == "python":
        return ".".join(map(str, sys.version_info[:3]))
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        pass
    try:  # importable without metadata (a --target install, a source tree on PYTHONPATH)
        module = __import__(name)
    except ImportError:
        return None
    return getattr(module, "__version__", None)


def version_problems(found: dict[str, str | None] | None = None) -> list[str]:
    """One line per package below `MINIMUM` (or missing). `found` overrides what is looked up (tests)."""
    problems = []
    for name, minimum in MINIMUM.items():
        have = found[name] if found is not None and name in found else installed_version(name)
        if have is None:
            problems.append(f"{name} is not installed; salmae needs {name}>={minimum}")
        elif version_tuple(have) < version_tuple(minimum):
            fix = f"run salmae with Python {minimum} or newer" if name == "python" else f"pip install -U '{name}>={minimum}'"
            problems.append(f"{name} {have} is too old; salmae needs {name}>={minimum} ({fix})")
    return problems


def compiler_for_compile() -> str | None:
    """The C compiler torch.compile's Triton/inductor would use (CC, cc, gcc, clang), or None."""
    import os

    for name in filter(None, (os.environ.get("CC"), "cc", "gcc", "clang")):
        path = shutil.which(name)
        if path:
            return path
    return None


def wheel_tag_problems(wheels: Path, python: tuple[int, int] | None = None) -> list[str]:
    """One line per wheel in `wheels` that this interpreter cannot install (another CPython's tag)."""
    major, minor = python or sys.version_info[:2]
    ours = {f"cp{major}{minor}", f"py{major}", f"py{major}{minor}", "py2.py3"}
    bad = []
    for wheel in sorted(Path(wheels).glob("*.whl")):
        parts = wheel.name[:-4].split("-")
        python_tags = set(parts[-3].split(".")) if len(parts) >= 5 else set()
        if python_tags and not python_tags & ours:
            bad.append(wheel.name)
    if not bad:
        return []
    return [f"{len(bad)} wheels in {wheels} are for another Python than this {major}.{minor} (e.g. {bad[0]}); "
            f"rebuild them with `make wheelhouse PYVER={major}.{minor}`"]


def wheel_requirement_problems(wheels: Path) -> list[str]:
    """One line per lower bound that a wheel in `wheels` puts on a package the box must already have
    (one not in the wheelhouse), where the box's version is lower: `make wheelhouse` fetches with
    `--no-deps`, which hides e.g. zarr's numpy>=2 and open_clip's timm>=1.0.17 until import time."""
    import zipfile

    shipped = {_norm(w.name.split("-")[0]) for w in Path(wheels).glob("*.whl")}
    problems = []
    for wheel in sorted(Path(wheels).glob("*.whl")):
        try:
            with zipfile.ZipFile(wheel) as z:
                meta = next((z.read(n).decode() for n in z.namelist() if n.endswith(".dist-info/METADATA")), "")
        except (zipfile.BadZipFile, OSError):
            problems.append(f"{wheel} is not a readable wheel; rebuild the wheelhouse with `make wheelhouse`")
            continue
        for line in meta.splitlines():
            m = re.match(r"Requires-Dist:\s*([A-Za-z0-9_.-]+)\s*\(?\s*>=\s*([0-9][0-9.]*)[^;]*$", line)
            if not m or _norm(m.group(1)) in shipped:
                continue
            name, minimum = m.group(1), m.group(2)
            have = installed_version(name)
            if have is not None and version_tuple(have) < version_tuple(minimum):
                problems.append(f"{wheel.name.split('-')[0]} in {wheels} needs {name}>={minimum}, this box has "
                                f"{have} (pip install -U '{name}>={minimum}', or build the wheelhouse with "
                                "older versions)")
    return problems


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.preflight [--wheels DIR]`: print each problem; exit 2 if there is one."""
    args = list(sys.argv[1:] if argv is None else argv)
    problems = []
    if args[:1] == ["--wheels"] and len(args) == 2:
        if Path(args[1]).is_dir():
            problems += wheel_tag_problems(Path(args[1])) + wheel_requirement_problems(Path(args[1]))
    elif args:
        print("usage: python -m pipeline.preflight [--wheels DIR]", file=sys.stderr)
        return 2
    problems += version_problems()
    for line in problems:
        print(f"salmae: preflight: {line}", file=sys.stderr)
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
