"""Layered configuration: dataclass defaults -> optional YAML file -> CLI options -> `--set`.

Each stage defines one (possibly nested) dataclass with a comment per field. `resolve_config`
merges the layers, converts values to the field types and rejects unknown keys with a
suggestion; `save_config` writes the result as `config.yaml` into the stage's output folder.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

from salmae.pipeline.errors import SalmaeError
from salmae.pipeline.files import atomic_write_text

T = TypeVar("T")
SHOWN_CHARS = 200   # a value echoed in an error message is cut to this many characters


def shown(value: Any) -> str:
    """`repr(value)` for an error message, cut to `SHOWN_CHARS` (a huge value stays one short line)."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text):,} characters)"


class _StrictLoader(yaml.SafeLoader):
    """YAML for configs: no anchors or aliases (an alias bomb expands to gigabytes) and no key twice
    in one mapping (the second would silently win)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent) or getattr(self.peek_event(), "anchor", None):
            mark = self.peek_event().start_mark
            raise yaml.constructor.ConstructorError(None, None, "anchors and aliases (&, *) are not allowed in "
                                                    "salmae configs; write the values out", mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {shown(key)} appears twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, source: str) -> Any:
    """Parse config YAML strictly (`_StrictLoader`); a SalmaeError naming `source`, the line and what to fix."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or e.__class__.__name__
        raise SalmaeError(f"{source}{where}: {' '.join(str(problem).split())[:SHOWN_CHARS]}; fix the YAML") from None


def resolve_config(
    cls: type[T],
    yaml_path: str | Path | None = None,
    overrides: Sequence[str] = (),
    base: Mapping[str, Any] | None = None,
    **named: Any,
) -> T:
    """Build a `cls` instance from defaults, `base` values (e.g. a preset), a YAML file, named
    options and `key=value` strings, each layer over the one before.

    Named options whose value is None are treated as "not given". Dotted keys (`optim.lr=1e-3`)
    reach into nested dataclasses.
    """
    values: dict[str, Any] = {}
    _merge(values, copy.deepcopy(dict(base or {})))
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise SalmaeError(f"config file {path} not found; pass an existing YAML file to --config")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise SalmaeError(f"config file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        loaded = load_yaml(text, f"config file {path}") or {}
        if not isinstance(loaded, dict):
            raise SalmaeError(f"config file {path} must hold a mapping of keys to values")
        _merge(values, loaded)
    for key, value in named.items():
        if value is not None:
            _set_dotted(values, key, value)
    for item in overrides:
        if "=" not in item:
            raise SalmaeError(f"--set {shown(item)} must look like key=value (e.g. --set optim.lr=1e-3)")
        key, raw = item.split("=", 1)
        _set_dotted(values, key.strip(), load_yaml(raw, f"--set {key.strip()}") if raw.strip() else "")
    return _build(cls, values, prefix="")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-YAML-friendly dict of a config dataclass (paths become strings, tuples lists)."""
    return _plain(dataclasses.asdict(cfg))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _merge(dst: dict, src: Mapping) -> None:
    for key, value in src.items():
        if isinstance(value, Mapping):
            _merge(dst.setdefault(key, {}), value)
        else:
            dst[key] = value


def _set_dotted(dst: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        dst = dst.setdefault(part, {})
    dst[parts[-1]] = value


def _build(cls: type[T], values: Mapping[str, Any], prefix: str) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in values:
        if key not in fields:
            full = prefix + key
            valid = [prefix + name for name in fields]
            close = difflib.get_close_matches(full, valid, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
            raise SalmaeError(f"unknown config key '{full}' for {cls.__name__}{hint}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise SalmaeError(f"config key '{prefix + name}' is a section; set its fields as {prefix + name}.FIELD=…")
            kwargs[name] = _build(hint, value, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert `value` to the annotated type, or raise a one-line error naming `key`."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except SalmaeError as e:
                errors.append(str(e))
        raise SalmaeError(errors[0] if errors else f"config key '{key}' has an invalid value {shown(value)}")
    if origin is typing.Literal:
        if value not in args:
            raise SalmaeError(f"config key '{key}' must be one of {', '.join(map(str, args))}, got {shown(value)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise SalmaeError(f"config key '{key}' expects a list, got {shown(value)}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, key) for v in value] if inner is not Any else list(value)
        return tuple(items) if origin is tuple else items
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise SalmaeError(f"config key '{key}' expects true/false, got {shown(value)}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise SalmaeError(f"config key '{key}' expects an integer, got {shown(value)}")
        try:
            as_float = float(value)
        except ValueError:
            raise SalmaeError(f"config key '{key}' expects an integer, got {shown(value)}") from None
        if as_float != int(as_float):
            raise SalmaeError(f"config key '{key}' expects an integer, got {shown(value)}")
        return int(as_float)
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise SalmaeError(f"config key '{key}' expects a number, got {shown(value)}") from None
    if hint is str:
        if isinstance(value, (list, tuple, dict, set)):
            raise SalmaeError(f"config key '{key}' expects a single value, got {shown(value)}")
        return value if isinstance(value, str) else str(value)
    if hint is Path:
        if not isinstance(value, (str, os.PathLike)):
            raise SalmaeError(f"config key '{key}' expects a path, got {shown(value)}")
        return Path(value)
    return value


# --------------------------------------------------------------------------- validation and resume checks
def require(ok: bool, key: str, value: Any, rule: str) -> None:
    """SalmaeError naming `key`, its value and the rule, unless `ok` (one line; CLI exit 2)."""
    if not ok:
        raise SalmaeError(f"config key '{key}' = {shown(value)} must be {rule}")


def flat_items(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flat_items(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_differences(saved: Mapping[str, Any], now: Mapping[str, Any], may_change: Sequence[str]) -> list[str]:
    """'key: saved -> now' for every key whose value differs, except those in `may_change` (or under
    one of them, for sections). Keys only one side has count as differences too."""
    a, b = flat_items(saved), flat_items(now)
    free = tuple(may_change)

    def is_free(key: str) -> bool:
        return any(key == f or key.startswith(f + ".") for f in free)

    return [f"{k}: {shown(a.get(k, '(absent)'))} -> {shown(b.get(k, '(absent)'))}" for k in sorted(set(a) | set(b))
            if not is_free(k) and a.get(k) != b.get(k)]


# --------------------------------------------------------------------------- documentation of the keys (--help)
@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One config key as `--help` lists it: dotted key, type, default and the dataclass field's comment."""

    key: str
    type: str
    default: str
    comment: str


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment in the source of dataclass `cls` (and its dataclass bases).

    A field's comment is the `#` comment at the end of its line plus the comment-only lines right
    below it that are indented deeper than the field (continuations); a comment line at the
    field's own indentation is a heading of what follows, not part of any field.
    """
    out: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        out.update(_own_field_comments(klass))
    return out


def _own_field_comments(cls: type) -> dict[str, str]:
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):        # defined in a REPL or without source: no comments to show
        return {}
    comments = {tok.start[0]: (tok.start[1], tok.string.lstrip("#").strip())
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    body = ast.parse(source).body[0].body
    out: dict[str, str] = {}
    for i, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        end = node.end_lineno or node.lineno
        stop = body[i + 1].lineno if i + 1 < len(body) else len(lines) + 1
        parts = [comments[n][1] for n in range(node.lineno, end + 1) if n in comments]
        for n in range(end + 1, stop):
            if n not in comments or lines[n - 1].strip()[:1] != "#" or comments[n][0] <= node.col_offset:
                break
            parts.append(comments[n][1])
        out[node.target.id] = " ".join(p for p in parts if p)
    return out


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if hint is type(None):
        return "None"
    if hint is Path:
        return "path"
    return getattr(hint, "__name__", str(hint))


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _shown_default(f: dataclasses.Field) -> str:
    """The default as YAML that `--set` takes (`null`, `[a, b]`, `''`)."""
    default = _default_of(f)
    if default is dataclasses.MISSING:
        return "(required)"
    text = yaml.safe_dump(_plain(default), default_flow_style=True, width=10**6).strip()
    return text.removesuffix("...").strip()


def config_key_docs(cls: type) -> list[tuple[str, str, list[KeyDoc]]]:
    """The keys of config dataclass `cls`, grouped: [(section, its description, [KeyDoc, ...])], the
    top-level keys first (section ""), then each nested dataclass as `section.` (recursively).
    Everything is read from the dataclass: types from its annotations, comments from its source."""
    groups: list[tuple[str, str, list[KeyDoc]]] = []

    def walk(klass: type, prefix: str, about: str) -> None:
        hints, comments = typing.get_type_hints(klass), field_comments(klass)
        rows, nested = [], []
        for f in dataclasses.fields(klass):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                doc = comments.get(f.name) or " ".join((hint.__doc__ or "").split())
                nested.append((hint, f"{prefix}{f.name}.", doc))
                continue
            rows.append(KeyDoc(prefix + f.name, _type_name(hint), _shown_default(f), comments.get(f.name, "")))
        groups.append((prefix.rstrip("."), about, rows))
        for hint, sub_prefix, doc in nested:
            walk(hint, sub_prefix, doc)

    walk(cls, "", "")
    return groups
