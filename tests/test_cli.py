"""The click CLI: every command's --help, one-line errors, and the data commands end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from salmae.pipeline.cli import cli



def _walk(group, prefix: list[str]):
    for name, sub in group.commands.items():
        yield [*prefix, name]
        if hasattr(sub, "commands"):
            yield from _walk(sub, [*prefix, name])


COMMANDS = [[], *_walk(cli, [])]  # every command and subcommand, found from the click tree


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "salmae")
def test_help(command):
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_contract_commands_exist():
    expected = {("shapes",), ("manifest", "build"), ("manifest", "verify"), ("saliency",), ("clip-train",),
                ("inspect",), ("pretrain",), ("eval", "linear"), ("eval", "knn"), ("eval", "finetune"),
                ("report",), ("demo",), ("bench",)}
    assert expected <= {tuple(c) for c in COMMANDS}


def test_salmae_error_is_one_line_exit_2(tmp_path):
    result = CliRunner().invoke(cli, ["manifest", "build", str(tmp_path / "{00000..00001}.tar"),
                                      "-o", str(tmp_path / "m.parquet")])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and result.output.startswith("salmae: error: ")
    assert "00000.tar not found" in result.output and "Traceback" not in result.output


def test_shapes_then_manifest_build_and_verify(tmp_path):
    runner = CliRunner()
    out = runner.invoke(cli, ["shapes", str(tmp_path / "s"), "--n", "40", "--image-size", "32", "--shard-size", "20"])
    assert out.exit_code == 0 and "40 captioned" in out.output
    pattern = str(tmp_path / "s" / "{00000..00001}.tar")
    built = runner.invoke(cli, ["manifest", "build", pattern, "-o", str(tmp_path / "m.parquet")])
    assert built.exit_code == 0 and "40 rows from 2 shards" in built.output
    ok = runner.invoke(cli, ["manifest", "verify", str(tmp_path / "m.parquet"), pattern])
    assert ok.exit_code == 0 and "matches 2 shards" in ok.output
    bad = runner.invoke(cli, ["manifest", "verify", str(tmp_path / "m.parquet"), str(tmp_path / "s" / "00000.tar")])
    assert bad.exit_code == 1 and "missing (1): 00001.tar" in bad.output


def test_python_dash_m_works():
    result = subprocess.run([sys.executable, "-m", "salmae.pipeline.cli", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "Usage:" in result.stdout and "manifest" in result.stdout
