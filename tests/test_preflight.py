"""`pipeline.preflight`: the version bounds (one list, equal to pyproject's), the wheelhouse's Python tag,
and gpu-check's refusal of a box that is too old."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest

from salmae.pipeline import preflight
from salmae.pipeline.errors import SalmaeError

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_states_the_same_lower_bounds_as_preflight():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    bounds = {}
    for req in project["dependencies"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", req)
        assert m, req
        bounds[m.group(1).lower()] = m.group(2)
    bounds["python"] = project["requires-python"].removeprefix(">=")
    assert {k: bounds[k] for k in preflight.MINIMUM} == preflight.MINIMUM


@pytest.mark.parametrize("have, ok", [("2.14.1+cu126", True), ("2.5.0", True), ("2.4.1", False), ("2.5.0a0", True)])
def test_version_problems_name_the_package_and_the_version_it_needs(have, ok):
    problems = preflight.version_problems({"torch": have, "timm": "1.0.31", "numpy": "2.4", "python": "3.12.1",
                                           "torchvision": "0.29"})
    assert problems == ([] if ok else [f"torch {have} is too old; salmae needs torch>=2.5 (pip install -U 'torch>=2.5')"])


def test_missing_and_old_packages_are_each_one_line():
    problems = preflight.version_problems({"torch": "2.6", "timm": "1.0.15", "numpy": None, "python": "3.10.4",
                                           "torchvision": "0.21"})
    assert problems == ["python 3.10.4 is too old; salmae needs python>=3.11 (run salmae with Python 3.11 or newer)",
                        "timm 1.0.15 is too old; salmae needs timm>=1.0.16 (pip install -U 'timm>=1.0.16')",
                        "numpy is not installed; salmae needs numpy>=2.0"]


def test_this_environment_passes_preflight():
    assert preflight.version_problems() == []
    assert preflight.main([]) == 0


def test_wheels_for_another_python_are_refused_in_one_line(tmp_path, capsys):
    for name in ("zarr-3.1.6-py3-none-any.whl", "regex-2026.1.1-cp312-cp312-manylinux_2_17_x86_64.whl",
                 "google_crc32c-1.7.1-cp312-cp312-manylinux_2_17_x86_64.whl"):
        _wheel(tmp_path, name, [])
    assert preflight.wheel_tag_problems(tmp_path, (3, 12)) == []
    problems = preflight.wheel_tag_problems(tmp_path, (3, 11))
    assert problems == [f"2 wheels in {tmp_path} are for another Python than this 3.11 "
                        "(e.g. google_crc32c-1.7.1-cp312-cp312-manylinux_2_17_x86_64.whl); rebuild them with "
                        "`make wheelhouse PYVER=3.11`"]
    mine = f"{sys.version_info[0]}{sys.version_info[1]}"
    (tmp_path / "regex-2026.1.1-cp312-cp312-manylinux_2_17_x86_64.whl").unlink()
    (tmp_path / "google_crc32c-1.7.1-cp312-cp312-manylinux_2_17_x86_64.whl").unlink()
    _wheel(tmp_path, f"numcodecs-0.16-cp{mine}-cp{mine}-manylinux_2_17_x86_64.whl", [])
    assert preflight.main(["--wheels", str(tmp_path)]) == 0
    _wheel(tmp_path, "x-1-cp39-cp39-manylinux_2_17_x86_64.whl", [])
    assert preflight.main(["--wheels", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("salmae: preflight: 1 wheels in ")


def test_gpu_check_refuses_an_old_box_before_any_work(tmp_path, monkeypatch):
    from salmae.stages.bench.gpu_check import GpuCheckConfig, run

    monkeypatch.setattr(preflight, "installed_version", lambda name: "1.0.15" if name == "timm" else "99")
    with pytest.raises(SalmaeError, match=r"^gpu-check: timm 1.0.15 is too old; salmae needs timm>=1.0.16 "):
        run(GpuCheckConfig(out=tmp_path / "check", device="cpu"))
    assert not (tmp_path / "check").exists()


def test_compile_is_left_out_without_a_compiler_and_said_so():
    from salmae.stages.bench.gpu_check import compile_runs

    assert compile_runs("auto", True, "/usr/bin/cc") == ([False, True], None)
    runs, note = compile_runs("auto", True, None)
    assert runs == [False] and "no C compiler" in note
    assert compile_runs("off", True, None) == ([False], None)
    with pytest.raises(SalmaeError, match="compile=on: no C compiler"):
        compile_runs("on", True, None)


def _wheel(folder, name: str, requires: list[str]):
    import zipfile

    dist = name.split("-")[0] + "-" + name.split("-")[1]
    with zipfile.ZipFile(folder / name, "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", "Metadata-Version: 2.1\nName: x\n"
                   + "".join(f"Requires-Dist: {r}\n" for r in requires))


def test_a_wheels_bound_on_a_package_the_box_holds_is_checked(tmp_path, monkeypatch):
    """`--no-deps` hides what the wheels need from the box: open_clip needs timm>=1.0.17, zarr numpy>=2."""
    _wheel(tmp_path, "open_clip_torch-3.3.0-py3-none-any.whl",
           ["torch>=2.0", "timm>=1.0.17", "ftfy", "regex", 'pytest>=8; extra == "test"'])
    _wheel(tmp_path, "zarr-3.1.6-py3-none-any.whl", ["numpy>=2.0", "numcodecs>=0.14"])
    _wheel(tmp_path, "numcodecs-0.16.6-py3-none-any.whl", ["numpy>=1.24"])
    versions = {"torch": "2.6.0", "timm": "1.0.16", "numpy": "1.26.4", "numcodecs": "0.1"}
    monkeypatch.setattr(preflight, "installed_version", versions.get)
    assert preflight.wheel_requirement_problems(tmp_path) == [
        f"open_clip_torch in {tmp_path} needs timm>=1.0.17, this box has 1.0.16 (pip install -U 'timm>=1.0.17', "
        "or build the wheelhouse with older versions)",
        f"zarr in {tmp_path} needs numpy>=2.0, this box has 1.26.4 (pip install -U 'numpy>=2.0', "
        "or build the wheelhouse with older versions)"]
    versions.update(timm="1.0.31", numpy="2.4.0")
    assert preflight.wheel_requirement_problems(tmp_path) == []
