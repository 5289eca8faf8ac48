"""The house's layering, read from the source with `ast`: no module under `pipeline/` imports
`stages` (the CLI dispatches by name), the root of `pipeline/` (infrastructure) imports no
package of its own, and no two modules import each other, directly or in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = ("pipeline", "stages")


def module_name(path: Path) -> str:
    parts = ["salmae", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for top in OURS for p in sorted((ROOT / top).rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """Our modules that `path` imports anywhere in it (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        for name in names:
            if name.split(".")[0] in OURS:          # the old top-level names: flagged as such
                found.add(name.split(".")[0])
                continue
            while name and name not in known:      # `from salmae.pipeline import dist` -> salmae.pipeline.dist
                name = name.rpartition(".")[0]
            if name.startswith(("salmae.pipeline", "salmae.stages")):
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def test_the_library_never_imports_a_stage():
    bad = {m: sorted(d for d in deps if d.startswith("salmae.stages")) for m, deps in graph().items()
           if m.startswith("salmae.pipeline") and m != "salmae.pipeline.cli"}
    assert {m: d for m, d in bad.items() if d} == {}


def test_infrastructure_imports_no_package_of_its_own():
    packages = {m for m, p in modules().items() if p.name == "__init__.py" and m.count(".") == 2
                and m.startswith("salmae.pipeline.")}
    root = {m: deps for m, deps in graph().items() if m.count(".") == 2 and m.startswith("salmae.pipeline.")
            and m not in packages and m != "salmae.pipeline.cli"}
    assert {m: sorted(d for d in deps if any(d == p or d.startswith(p + ".") for p in packages))
            for m, deps in root.items() if any(d == p or d.startswith(p + ".") for p in packages for d in deps)} == {}


def test_no_import_circles():
    g = graph()
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert cycles == []


def test_the_checker_sees_a_circle_and_a_stage_import(tmp_path, monkeypatch):
    """The checks above can fail: a made-up tree with both faults."""
    for name, text in {"pipeline/__init__.py": "", "pipeline/a.py": "from salmae.pipeline import b\n",
                       "pipeline/b.py": "def f():\n    from salmae.pipeline.a import x\n    import salmae.stages.s\n",
                       "stages/__init__.py": "", "stages/s.py": ""}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    g = graph()
    assert g["salmae.pipeline.a"] == {"salmae.pipeline.b"}
    assert g["salmae.pipeline.b"] == {"salmae.pipeline.a", "salmae.stages.s"}
    import pytest

    with pytest.raises(AssertionError):
        test_no_import_circles()
    with pytest.raises(AssertionError):
        test_the_library_never_imports_a_stage()


def test_code_imports_salmae_never_the_bare_folder_names():
    """`import pipeline` would load a second copy of every module (and only works from the repo root)."""
    bare = {m: sorted(d for d in deps if d in OURS) for m, deps in graph().items()}
    assert {m: d for m, d in bare.items() if d} == {}


def test_every_package_folder_is_installed():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {module_name(p) for top in OURS for p in (ROOT / top).rglob("__init__.py")}
    assert folders | {"salmae"} == listed
