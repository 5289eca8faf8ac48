"""Layered config: defaults -> YAML -> named options -> --set, and one-line errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from salmae.pipeline.config import config_to_dict, resolve_config, save_config
from salmae.pipeline.errors import SalmaeError


@dataclass
class Optim:
    lr: float = 1e-3  # learning rate
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas


@dataclass
class Toy:
    data: str = "data/shapes"  # shard pattern
    out: Path | None = None  # run folder
    epochs: int = 1  # passes over the data
    mask: Literal["random", "saliency"] = "random"  # mask strategy
    amp: bool = False  # mixed precision
    optim: Optim = field(default_factory=Optim)  # optimiser settings


def test_defaults():
    cfg = resolve_config(Toy)
    assert cfg == Toy() and cfg.optim.lr == 1e-3


def test_layers_apply_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 5\nmask: saliency\noptim:\n  lr: 0.01\n")
    cfg = resolve_config(Toy, path, ["epochs=7", "optim.betas=[0.8, 0.9]", "amp=true"], out="runs/x", epochs=6)
    assert cfg.epochs == 7  # --set beats named options, which beat YAML
    assert cfg.mask == "saliency" and cfg.optim.lr == 0.01 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.out == Path("runs/x") and cfg.amp is True
    assert resolve_config(Toy, path, epochs=6).epochs == 6
    assert resolve_config(Toy, path, epochs=None).epochs == 5  # None = option not given


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(SalmaeError, match=r"unknown config key 'epocs' for Toy; did you mean 'epochs'\?"):
        resolve_config(Toy, overrides=["epocs=3"])
    with pytest.raises(SalmaeError, match=r"'optim.lrr'.*did you mean 'optim.lr'"):
        resolve_config(Toy, overrides=["optim.lrr=1"])


def test_bad_values_and_files(tmp_path):
    with pytest.raises(SalmaeError, match="'epochs' expects an integer"):
        resolve_config(Toy, overrides=["epochs=many"])
    with pytest.raises(SalmaeError, match="'mask' must be one of random, saliency"):
        resolve_config(Toy, overrides=["mask=block"])
    with pytest.raises(SalmaeError, match="key=value"):
        resolve_config(Toy, overrides=["epochs"])
    with pytest.raises(SalmaeError, match="missing.yaml not found"):
        resolve_config(Toy, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SalmaeError, match="mapping"):
        resolve_config(Toy, tmp_path / "list.yaml")


def test_save_config_round_trips(tmp_path):
    cfg = resolve_config(Toy, overrides=["out=runs/a", "optim.lr=0.5"])
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved == config_to_dict(cfg) and saved["out"] == "runs/a" and saved["optim"]["betas"] == [0.9, 0.95]
    assert resolve_config(Toy, tmp_path / "config.yaml") == cfg


def test_yaml_aliases_are_refused_before_they_expand(tmp_path):
    """A billion-laughs alias bomb (9 levels x 9) as a value gave a 351 MB 'one-line' error (issue 23, item 13)."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    lines.append("data: *i")
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    with pytest.raises(SalmaeError) as e:
        resolve_config(Toy, tmp_path / "bomb.yaml")
    msg = str(e.value)
    assert msg.startswith(f"config file {tmp_path / 'bomb.yaml'} line 1: anchors and aliases") and len(msg) < 400
    with pytest.raises(SalmaeError, match=r"^--set data line 1: anchors and aliases"):
        resolve_config(Toy, overrides=["data=&x [1, *x]"])


def test_a_key_twice_is_an_error_naming_the_line(tmp_path):
    (tmp_path / "twice.yaml").write_text("epochs: 2\noptim:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(SalmaeError, match=r"twice.yaml line 4: key 'lr' appears twice; fix the YAML"):
        resolve_config(Toy, tmp_path / "twice.yaml")


def test_non_utf8_config_is_one_line(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes("data: caf\xe9\n".encode("latin-1"))
    with pytest.raises(SalmaeError, match=r"latin1.yaml is not UTF-8 text \(byte 9\); save it as UTF-8"):
        resolve_config(Toy, tmp_path / "latin1.yaml")


def test_echoed_values_are_cut_to_a_short_line():
    with pytest.raises(SalmaeError) as e:
        resolve_config(Toy, overrides=["epochs=" + "9" * 5000 + "x"])
    msg = str(e.value)
    assert "(5,003 characters)" in msg and len(msg) < 400
    with pytest.raises(SalmaeError, match=r"^config key 'out' expects a path, got \[1, 2\]$"):
        resolve_config(Toy, overrides=["out=[1, 2]"])
    with pytest.raises(SalmaeError, match=r"^config key 'data' expects a single value, got \{'a': 1\}$"):
        resolve_config(Toy, overrides=["data={a: 1}"])
