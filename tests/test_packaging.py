"""Packaging: the license file matches the metadata, the version is written once, and the built
metadata (setuptools' own build backend, offline, in a copy of the sources) says both."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from email.parser import Parser
from pathlib import Path

import pytest

import salmae

ROOT = Path(__file__).resolve().parent.parent


def test_license_file_matches_the_metadata():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n") and "Permission is hereby granted, free of charge" in text


def test_the_version_is_written_in_one_place():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and pyproject["project"]["dynamic"] == ["version"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "salmae.pipeline.__version__"}
    sources = [ROOT / "__init__.py", *sorted((ROOT / "pipeline").rglob("*.py")), *sorted((ROOT / "stages").rglob("*.py"))]
    written = [p.relative_to(ROOT).as_posix() for p in sources if re.search(r"^__version__\s*=", p.read_text(), re.M)]
    assert written == ["pipeline/__init__.py"] and salmae.__version__ == salmae.pipeline.__version__


def test_built_metadata_has_the_version_license_and_python_bound(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if tuple(int(x) for x in setuptools.__version__.split(".")[:2]) < (77, 0):
        pytest.skip("setuptools < 77 cannot build SPDX license metadata (pyproject asks for >= 77)")
    src, meta_dir = tmp_path / "src", tmp_path / "meta"     # a copy: the build writes its egg-info beside it
    src.mkdir()
    meta_dir.mkdir()
    for name in ("pyproject.toml", "LICENSE", "README.md", "__init__.py", "__main__.py"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("pipeline", "stages"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    code = ("import sys; from setuptools import build_meta as b; "
            "print(b.prepare_metadata_for_build_wheel(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-c", code, str(meta_dir)], cwd=src, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dist_info = meta_dir / proc.stdout.strip().splitlines()[-1]
    meta = Parser().parsestr((dist_info / "METADATA").read_text())
    assert meta["Name"] == "salmae" and meta["Version"] == salmae.__version__
    assert meta["License-Expression"] == "MIT" and meta.get_all("License-File") == ["LICENSE"]
    assert meta["Requires-Python"] == ">=3.11"
    assert (dist_info / "licenses" / "LICENSE").read_text() == (ROOT / "LICENSE").read_text()
