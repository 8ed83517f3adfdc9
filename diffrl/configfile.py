"""Reading configs: YAML 1.2 text -> checked values of typed dataclasses, dotted overrides, and
where each value came from (``diffrl train CONFIG --print-config``).

Kept by hand rather than on OmegaConf (2.4, tried): its loader reads YAML 1.1, so
``mixed_precision: no`` (accelerate's spelling) becomes False and is then rejected by the
``Literal`` field, its errors span several lines and name no line of the file, and it cannot
fill an algorithm's defaults only where a key is unset while recording where each value came
from, which ``--print-config`` shows.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from diffrl.errors import ConfigError


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 scalars: only true/false are booleans (so
    ``mixed_precision: no`` stays the string "no") and ``1e-4`` is a float."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


MAX_NODES = 100_000
"""Most values a config may expand to: aliases count once per use, so an alias bomb (a few lines
that expand to billions of values) is refused before it is walked."""


def _construct_mapping(loader, node, deep=False):
    """A mapping whose keys are unique; a repeated key names both of its lines."""
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} on lines {seen[key]} and {line}", key_node.start_mark
            )
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_Yaml12Loader.add_constructor("tag:yaml.org,2002:map", lambda loader, node: _construct_mapping(loader, node))
_Yaml12Loader.construct_mapping = _construct_mapping


def _expanded_size(node, memo: dict) -> int:
    """Values ``node`` stands for once every alias in it is expanded (linear in the node graph)."""
    if id(node) not in memo:
        memo[id(node)] = 1  # a recursive alias counts once here and is refused by the constructor
        if isinstance(node, yaml.SequenceNode):
            memo[id(node)] += sum(_expanded_size(child, memo) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            memo[id(node)] += sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    return memo[id(node)]


def load_yaml(text: str):
    """YAML 1.2 text -> Python data; duplicate keys and documents that expand past
    :data:`MAX_NODES` values raise ``yaml.YAMLError`` (with the line)."""
    loader = _Yaml12Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {})
        if size > MAX_NODES:
            raise yaml.composer.ComposerError(
                None, None, f"aliases expand it to {size:,} values (more than {MAX_NODES:,})", node.start_mark
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


# ---------------------------------------------------------------------------- typed building


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a {_type_name(tp)}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null")
        return None
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        return _coerce_float(key, value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _coerce_float(key: str, value: Any) -> float:
    """Ints and numeric strings (YAML 1.1 reads ``1e-4``, without a dot, as a string) become
    floats; booleans, other strings and non-finite numbers are errors."""
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value) if abs(value) < 1e308 else math.inf
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        raise ConfigError(f"{key}: expected float, got {type(value).__name__} {value!r}")
    if not math.isfinite(number):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    return number


def _unknown_key(dotted: str, key: str, names: list[str], section: str) -> ConfigError:
    """The error for a key that is not a field, with the closest field name as a suggestion."""
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
    hint = f"; did you mean {section + close[0]!r}?" if close else ""
    return ConfigError(
        f"unknown key {dotted!r}{hint} (valid keys of {section.rstrip('.') or 'the top level'}: {', '.join(names)})"
    )


def build(cls, data: dict, prefix: str = ""):
    """Instantiate dataclass ``cls`` from ``data``, recursing into nested sections."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise _unknown_key(dotted, key, names, prefix)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value if value is not None else {}, f"{dotted}.")
        else:
            kwargs[key] = _coerce(dotted, value, tp)
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        if node.get(part) is None:  # a missing section, or one left empty in the YAML file
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[leaf] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw config mapping."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            value = load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({getattr(err, 'problem', err)})"
            ) from err
        _set_dotted(data, key.strip(), value)
    return data


def read_yaml_file(path: Path) -> dict:
    """A config file's mapping; errors name the file (and the line of a YAML syntax error)."""
    if not path.is_file():
        raise ConfigError(f"config file {path}: no such file")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(
            f"config file {path}{where}: invalid YAML ({getattr(err, 'problem', err)})"
        ) from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def with_defaults(data: dict, defaults: dict[str, dict]) -> dict:
    """``data`` with ``defaults`` (section -> key -> value) filled in where a key is unset."""
    merged = dict(data)
    for section, values in defaults.items():
        given = merged.get(section)
        if given is None:
            given = {}
        if isinstance(given, dict):  # a non-mapping section is reported by build
            merged[section] = {**values, **given}
    return merged


def leaf_keys(data: dict, prefix: str = "") -> set[str]:
    """The dotted keys of every value set in a raw mapping (sections recursed into)."""
    keys = set()
    for key, value in data.items():
        if isinstance(value, dict) and value and key != "kwargs":
            keys |= leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested mapping as ``{"section.key": value}`` (``kwargs`` mappings are kept whole)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "kwargs":
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def annotated_yaml(tree: dict, sources: dict[str, str], prefix: str = "", indent: str = "") -> list[str]:
    """``tree`` as YAML lines, each value followed by ``# <source>`` (its dotted key looked up in
    ``sources``, default ``default``); reads back as the same mapping."""
    lines = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "kwargs":
            lines.append(f"{indent}{key}:")
            lines += annotated_yaml(value, sources, f"{dotted}.", indent + "  ")
            continue
        text = yaml.safe_dump({key: value}, default_flow_style=True, width=10**6).strip()
        text = text[1:-1] if text.startswith("{") else text  # flow style wraps the mapping in braces
        lines.append(f"{indent}{text}  # {sources.get(dotted, 'default')}")
    return lines
