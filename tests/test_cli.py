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


# --------------------------------------------------------------------------- config keys in --help, --print-config
def _config_commands():
    from salmae.pipeline.cli import _ConfigCommand

    def find(group, prefix):
        for name, sub in group.commands.items():
            if isinstance(sub, _ConfigCommand):
                yield [*prefix, name], sub
            if hasattr(sub, "commands"):
                yield from find(sub, [*prefix, name])

    return list(find(cli, []))


def _all_keys(cls, prefix=""):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _all_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_every_stage_command_lists_every_config_key_in_help():
    import importlib

    commands = _config_commands()
    assert {" ".join(c) for c, _ in commands} >= {"saliency", "clip-train", "pretrain", "eval linear", "eval knn",
                                                  "eval finetune", "demo", "study", "gpu-check"}
    for command, cmd in commands:
        cls = getattr(importlib.import_module(cmd.config[0]), cmd.config[1])
        out = CliRunner().invoke(cli, [*command, "--help"], terminal_width=100).output
        words = out.split()
        assert "Config keys" in out
        missing = [k for k in _all_keys(cls) if k not in words]
        assert not missing, (command, missing)


def test_help_shows_type_default_and_the_dataclass_comment():
    out = " ".join(CliRunner().invoke(cli, ["pretrain", "--help"]).output.split())   # undo the wrapping
    assert "masking.cap saliency: share masked by saliency (0.05, 0.1, 0.25 ...) of cap_of [float; default: 0.25]" in out
    assert "mask mask strategy; amr-capped: AMR-like ratio + capped top-k over the stored map" in out
    assert "|sbam|adaptive; default: saliency]" in out
    assert ("optim.step_partial step a last accumulation group cut short by the epoch's end (MAE drops it: its "
            "gradient is cleared at the next epoch) [bool; default: false]") in out     # a continuation line
    assert "optim.*: AdamW with per-iteration cosine schedule, as MAE." in out           # the section's docstring
    assert "resume 'latest' or a checkpoint path" in out and "[str | None; default: null]" in out


def test_every_config_key_has_a_comment():
    import importlib

    from salmae.pipeline.config import config_key_docs

    for command, cmd in _config_commands():
        cls = getattr(importlib.import_module(cmd.config[0]), cmd.config[1])
        bare = [r.key for _, _, rows in config_key_docs(cls) for r in rows if not r.comment]
        assert not bare, (command, bare)


def test_field_comments_are_read_from_the_source():
    from dataclasses import dataclass

    from salmae.pipeline.config import config_key_docs, field_comments

    @dataclass
    class Example:
        a: int = 1           # first
                             # and its continuation
        # a heading, not part of any field
        b: str | None = None  # second
        c: tuple[float, ...] = (0.5, 2.0)

    assert field_comments(Example) == {"a": "first and its continuation", "b": "second", "c": ""}
    [(section, _, rows)] = config_key_docs(Example)
    assert section == "" and [(r.key, r.type, r.default) for r in rows] == [
        ("a", "int", "1"), ("b", "str | None", "null"), ("c", "list of float", "[0.5, 2.0]")]


def test_print_config_prints_the_resolved_yaml_and_touches_nothing(tmp_path):
    import yaml

    (tmp_path / "c.yaml").write_text("epochs: 7\nmasking:\n  cap: 0.5\n")
    out = tmp_path / "run"
    args = ["pretrain", "--config", str(tmp_path / "c.yaml"), "--set", "masking.cap=0.3", "--mask", "random",
            "--out", str(out), "--print-config"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output)
    assert printed["epochs"] == 7 and printed["masking"]["cap"] == 0.3 and printed["mask"] == "random"
    assert printed["out"] == str(out) and printed["optim"]["blr"] == 1.5e-4
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]
    (tmp_path / "again.yaml").write_text(result.output)       # what it prints is a config that reads back the same
    again = CliRunner().invoke(cli, ["pretrain", "--config", str(tmp_path / "again.yaml"), "--print-config"])
    assert again.exit_code == 0 and yaml.safe_load(again.output) == printed


@pytest.mark.parametrize("command", [["saliency"], ["eval", "knn"], ["study", "--preset", "smoke"], ["demo"],
                                     ["clip-train"], ["gpu-check"]], ids=" ".join)
def test_print_config_works_for_every_stage(tmp_path, command):
    import yaml

    result = CliRunner().invoke(cli, [*command, "--out", str(tmp_path / "o"), "--print-config"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output)["out"] == str(tmp_path / "o") and not (tmp_path / "o").exists()


def test_print_config_reports_a_bad_key_in_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["pretrain", "--set", "masking.kap=1", "--print-config"])
    assert result.exit_code == 2 and "unknown config key 'masking.kap'" in result.output
