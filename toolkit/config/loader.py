"""YAML configs: `base:` inheritance, deep merge, CLI overrides, `${...}` interpolation, provenance, atomic dump.

A loaded config is a tree of `ConfigDict`s (plain `dict` subclasses) whose `provenance` maps each key
to the `file:line` or command-line override that set it, so schema errors (`validate`, `instantiate`,
`build_dataclass`, re-exported here from `toolkit.config.schema`) can name the file.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from enum import Enum
from pathlib import Path, PurePath
from typing import Any

import yaml

from toolkit.config.interpolation import escape, resolve_interpolations, substitute_config_dir
from toolkit.config.types import (
    COMPONENT_KEY,
    ConfigError,
    closest,
    join_key,
    read_text_file,
    show_value,
)

BASE_KEY = "base"


class ConfigDict(dict[str, Any]):
    """A config mapping that remembers where each key was set: `provenance[key] = "file:line"`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.provenance: dict[str, str] = {}


# ---------------------------------------------------------------------------------------------- YAML reading

# PyYAML follows YAML 1.1, where `1e-6` (no dot) is a string; configs mean a float.
_FLOAT_EXPONENT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """SafeLoader building ConfigDicts with key provenance; rejects duplicate and non-string keys."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> Iterator[ConfigDict]:
    data = ConfigDict()
    yield data
    seen: dict[str, int] = {}
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            line = key_node.start_mark.line + 1
            if key_node.value in seen:
                message = f"duplicate key (first set on line {seen[key_node.value]})"
                raise ConfigError(key_node.value, message, f"{loader.name}:{line}")
            seen[key_node.value] = line
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        where = f"{loader.name}:{key_node.start_mark.line + 1}"
        if not isinstance(key, str):
            raise ConfigError(str(key), f"config keys must be strings, got {show_value(key)}", where)
        data[key] = loader.construct_object(value_node, deep=True)
        data.provenance[key] = where


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_EXPONENT, list("-+0123456789"))
yaml.SafeDumper.add_representer(ConfigDict, yaml.SafeDumper.represent_dict)


def _parse_yaml(text: str, name: str) -> Any:
    loader = _Loader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else name
        message = f"malformed YAML at {where}: {e.problem or e.context}"
        if e.context and e.context_mark is not None and e.problem:
            message += f" ({e.context} on line {e.context_mark.line + 1})"
        raise ConfigError("", message) from e
    except yaml.YAMLError as e:
        raise ConfigError("", f"malformed YAML in {name}: {e}") from e
    finally:
        loader.dispose()


def _display(path: Path) -> str:
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def _read_file(path: Path, key: str, included_from: str | None) -> ConfigDict:
    name = _display(path)
    if not path.is_file():
        message = f"config file not found: {name}" if path.name else "empty config path"
        raise ConfigError(key, message, included_from)
    try:
        text = read_text_file(path, name)
    except ValueError as e:
        raise ConfigError(key, str(e), included_from) from e
    data = _parse_yaml(text, name)
    if data is None:
        return ConfigDict()
    if not isinstance(data, ConfigDict):
        raise ConfigError("", f"the top level of {name} must be a mapping, got {show_value(data)}")
    substitute_config_dir(data, path.parent)
    return data


def _base_paths(data: ConfigDict, path: Path, source: str | None) -> list[Path]:
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        return []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(BASE_KEY, f"expected a path or a list of paths, got {show_value(bases)}", source)
    return [path.parent / Path(b).expanduser() for b in bases]


def _load_tree(path: Path, stack: tuple[Path, ...], key: str, included_from: str | None) -> ConfigDict:
    # Bases are relative to the real file (symlinks resolved): where its author wrote them.
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(_display(p) for p in (*stack, path))
        raise ConfigError(BASE_KEY, f"base cycle: {chain}", included_from)
    data = _read_file(path, key, included_from)
    source = data.provenance.pop(BASE_KEY, None)
    merged = ConfigDict()
    for base in _base_paths(data, path, source):
        merged = merge_configs(merged, _load_tree(base, (*stack, path), BASE_KEY, source))
    return merge_configs(merged, data)


# ---------------------------------------------------------------------------------------------- merging


def merge_configs(base: Mapping[str, Any], override: Mapping[str, Any]) -> ConfigDict:
    """Deep merge (inputs untouched): mappings merge key by key, `override` wins, lists and scalars replace.

    A mapping whose `_component_` differs from the one it overrides replaces it whole: the old keyword
    arguments belong to the old component.
    """
    out = ConfigDict(copy.deepcopy(dict(base)))
    out.provenance = dict(getattr(base, "provenance", {}))
    for key, value in override.items():
        current = out.get(key)
        if isinstance(current, Mapping) and isinstance(value, Mapping) and not _replaces(current, value):
            out[key] = merge_configs(current, value)
        else:
            out[key] = copy.deepcopy(value)
        _set_source(out, key, getattr(override, "provenance", {}).get(key))
    return out


def _replaces(current: Mapping[str, Any], value: Mapping[str, Any]) -> bool:
    return COMPONENT_KEY in value and value[COMPONENT_KEY] != current.get(COMPONENT_KEY)


# ---------------------------------------------------------------------------------------------- overrides

_OVERRIDE = re.compile(r"^(?P<op>[+~]?)(?P<key>[\w\-]+(?:\.[\w\-]+)*)(?:=(?P<value>.*))?$", re.DOTALL)


def apply_overrides(
    config: dict[str, Any], overrides: Sequence[str], *, config_dir: Path | None = None
) -> dict[str, Any]:
    """Apply CLI overrides in order, in place; returns `config`.

    `a.b=v` sets `b` in the existing mapping `a` (v parsed as YAML: `3`, `1e-5`, `[1, 2]`, `null`, `''`);
    a new key is allowed there (schema checks reject unknown ones later with the closest name) but a
    missing intermediate mapping is an error unless the override starts with `+`, which creates it.
    `~a.b` deletes the key. Digits index into lists: `a.items.0=v`. With `config_dir`, `${config_dir}` in a
    value becomes that folder; other `${...}` stay for `resolve_interpolations`.
    """
    for text in overrides:
        _apply_override(config, text, config_dir)
    return config


def _apply_override(config: dict[str, Any], text: str, config_dir: Path | None) -> None:
    match = _OVERRIDE.match(text)
    label = f"command-line override '{text}'"
    if match is None:
        raise ConfigError("", f"bad override {text!r}: expected key.path=value, +key.path=value or ~key.path")
    op, key, raw = match.group("op"), match.group("key"), match.group("value")
    if (op == "~") != (raw is None):
        expected = "~key.path (no value)" if op == "~" else "key.path=value"
        raise ConfigError(key, f"bad override {text!r}: expected {expected}")
    parts = key.split(".")
    if parts == [BASE_KEY]:
        raise ConfigError(key, "parents are resolved when the file is read; pass another config file instead", label)
    parent = _walk(config, parts[:-1], create=op == "+", label=label)
    last = parts[-1]
    if isinstance(parent, list):
        if not last.isdigit() or int(last) >= len(parent):
            raise ConfigError(key, f"not an index of a list of {len(parent)} items", label)
        if raw is None:
            del parent[int(last)]
        else:
            parent[int(last)] = _parse_value(raw, key, label, config_dir)
    elif op == "~":
        if last not in parent:
            raise ConfigError(key, "cannot delete a key that is not set", label, closest(last, parent))
        del parent[last]
        _set_source(parent, last, None)
    else:
        assert raw is not None
        parent[last] = _parse_value(raw, key, label, config_dir)
        _set_source(parent, last, label)


def _walk(config: dict[str, Any], parts: list[str], create: bool, label: str) -> dict[str, Any] | list[Any]:
    node: Any = config
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(path, f"not an index of a list of {len(node)} items", label)
            node = node[int(part)]
        elif isinstance(node, dict):
            if part not in node:
                if not create:
                    message = "no such section (start the override with '+' to create it)"
                    raise ConfigError(path, message, label, closest(part, node))
                node[part] = ConfigDict()
                _set_source(node, part, label)
            node = node[part]
        else:
            raise ConfigError(path, f"cannot set a key inside {show_value(node)}", label)
    if not isinstance(node, (dict, list)):
        raise ConfigError(".".join(parts), f"cannot set a key inside {show_value(node)}", label)
    return node


def _set_source(mapping: dict[str, Any], key: str, source: str | None) -> None:
    sources = getattr(mapping, "provenance", None)
    if sources is None:
        return
    if source is None:
        sources.pop(key, None)
    else:
        sources[key] = source


def _parse_value(raw: str, key: str, label: str, config_dir: Path | None) -> Any:
    if raw == "":
        raise ConfigError(key, "empty override value; write key=null or key=''", label)
    value = _parse_yaml(raw, label)
    _stamp(value, label)
    return value if config_dir is None else substitute_config_dir(value, config_dir)


def _stamp(value: Any, label: str) -> None:
    if isinstance(value, ConfigDict):
        value.provenance = dict.fromkeys(value, label)
        for item in value.values():
            _stamp(item, label)
    elif isinstance(value, list):
        for item in value:
            _stamp(item, label)


# ---------------------------------------------------------------------------------------------- public API


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Load a YAML config: parents under `base:` (paths relative to the file, merged left to right,
    then the file itself on top), then the CLI `overrides` (see `apply_overrides`), then `${...}`
    interpolation (`toolkit.config.interpolation`: `${trainer.run_dir}/eval` follows an override of the run dir).

    `${config_dir}` is the folder of the file that holds it (in an override: of `path`), symlinks resolved.
    Returns a `ConfigDict` tree (a dict) with provenance. Raises ConfigError for malformed YAML (file
    and line), a file that is not UTF-8 (file, byte offset and line), a missing file (and the file that
    included it), a base cycle, a bad override or a bad interpolation (unknown key, cycle, unset variable).
    """
    file = Path(path).expanduser()
    config = _load_tree(file, (), "", None)
    apply_overrides(config, overrides, config_dir=file.resolve().parent)
    return resolve_interpolations(config)


def provenance(config: Mapping[str, Any], where: str = "") -> dict[str, str]:
    """Flattened provenance: dotted key path -> `file:line` or override, for every key with a known source."""
    out: dict[str, str] = {}
    sources: Mapping[str, str] = getattr(config, "provenance", {})
    for key, value in config.items():
        path = join_key(where, key)
        if key in sources:
            out[path] = sources[key]
        out.update(_nested_provenance(value, path))
    return out


def _nested_provenance(value: Any, path: str) -> dict[str, str]:
    if isinstance(value, Mapping):
        return provenance(value, path)
    out: dict[str, str] = {}
    if isinstance(value, list):
        for i, item in enumerate(value):
            out.update(_nested_provenance(item, join_key(path, i)))
    return out


def format_config(config: Mapping[str, Any]) -> str:
    """The config as YAML text (key order kept; paths and tuples written as strings and lists).

    A literal `${` in a resolved value is written `$${`, so `load_config` reads the text back to the same config.
    """
    return yaml.safe_dump(plain_value(config, ""), sort_keys=False, allow_unicode=True, width=120)


def dump_config(config: Mapping[str, Any], path: Path) -> None:
    """Write `format_config(config)` to `path` atomically (temp file, fsync, rename, fsync the directory)."""
    from toolkit.io.atomic import write_text_atomic

    write_text_atomic(path, format_config(config))


def plain_value(value: Any, key: str = "") -> Any:
    """`value` as YAML-native data (mappings, lists, scalars; a literal `${` as `$${`); ConfigError naming `key`
    for anything else."""
    if isinstance(value, Mapping):
        return {str(k): plain_value(v, join_key(key, k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_value(v, join_key(key, i)) for i, v in enumerate(value)]
    if isinstance(value, PurePath):
        return escape(str(value))
    if isinstance(value, Enum):
        return plain_value(value.value, key)
    if isinstance(value, str):
        return escape(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    raise ConfigError(key, f"cannot be written as YAML: {show_value(value)}")
