"""The defaults a config leaves out, made visible (`renorm config --defaults`).

`fill_defaults` adds to a copy of a resolved config every keyword default of each `_component_` node's
constructor and every field default of the typed sections it is given (`trainer:` → TrainerConfig ...), each
wrapped in `Default`. `format_with_defaults` writes that as YAML, ending each default's line in `# default`;
a default that is no YAML value (an object, a function) becomes a comment line holding its repr.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from toolkit.config.loader import plain_value
from toolkit.config.schema import import_object
from toolkit.config.types import COMPONENT_KEY, ConfigError, is_component, join_key, source_of

_DEFAULT_MARK = "__renorm_default__"
_OBJECT_MARK = "__renorm_object_default__"
_MULTILINE_MARK = "__renorm_multiline_default__"
_MAX_REPR = 100


@dataclass(frozen=True)
class Default:
    """A value the config does not set and its constructor (or dataclass field) supplies."""

    value: Any


def fill_defaults(config: Mapping[str, Any], sections: Mapping[str, type[Any]] | None = None) -> dict[str, Any]:
    """A copy of `config` with the defaults it leaves out added as `Default(value)` entries after its own keys.

    Args:
        config: a resolved config (mappings, lists, scalars; `_component_` nodes at any depth).
        sections: dotted path of a mapping ("" for the top level) -> the dataclass built from it, for example
            `{"": RunSpec, "trainer": TrainerConfig}`; a missing section that is listed is filled field by field.

    Raises:
        ConfigError: a `_component_` that cannot be imported (with the closest name).
    """
    filled = _fill(config, "", sections or {})
    assert isinstance(filled, dict)
    return filled


def _fill(node: Any, where: str, sections: Mapping[str, type[Any]]) -> Any:
    if isinstance(node, (list, tuple)):
        return [_fill(item, join_key(where, i), sections) for i, item in enumerate(node)]
    if not isinstance(node, Mapping):
        return node
    out = {key: _fill(value, join_key(where, key), sections) for key, value in node.items()}
    defaults = component_defaults(node, where) if is_component(node) else {}
    if where in sections:
        defaults = {**dataclass_defaults(sections[where]), **defaults}
    for name, value in defaults.items():
        if name in out:
            continue
        path = join_key(where, name)
        out[name] = _fill({}, path, sections) if path in sections and isinstance(value, Mapping) else Default(value)
    return out


def component_defaults(node: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """Keyword defaults of the constructor a `_component_` node names (none when its signature is unreadable)."""
    try:
        target = import_object(node[COMPONENT_KEY])
    except ConfigError as e:
        key = join_key(where, COMPONENT_KEY)
        raise ConfigError(key, e.message, source_of(node, COMPONENT_KEY), e.suggestion) from e
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in parameters if p.kind in kinds and p.default is not p.empty}


def dataclass_defaults(cls: type[Any]) -> dict[str, Any]:
    """Field defaults of the dataclass `cls` (default factories called)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.init and f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.init and f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


# ---------------------------------------------------------------------------------------------- YAML text


def format_with_defaults(config: Mapping[str, Any]) -> str:
    """`config` (from `fill_defaults`) as YAML: each `Default` line ends in `# default`.

    A multi-line string default gets a `# default:` line above it instead; one that is no YAML value is written
    as `# key: <repr>  (default; not a YAML value)`.
    """
    text = yaml.safe_dump(_marked(config, ""), sort_keys=False, allow_unicode=True, width=float("inf"))
    return "\n".join(_annotate(text.splitlines())) + "\n"


def _marked(node: Any, where: str) -> Any:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            path = join_key(where, key)
            if not isinstance(value, Default):
                out[str(key)] = _marked(value, path)
                continue
            try:
                plain = plain_value(value.value, path)
                mark = _MULTILINE_MARK if isinstance(plain, str) and "\n" in plain else _DEFAULT_MARK
                out[f"{key}{mark}"] = plain
            except ConfigError:
                shown = " ".join(repr(value.value).split())
                out[f"{key}{_OBJECT_MARK}"] = shown if len(shown) <= _MAX_REPR else shown[: _MAX_REPR - 3] + "..."
        return out
    if isinstance(node, (list, tuple)):
        return [_marked(item, join_key(where, i)) for i, item in enumerate(node)]
    return plain_value(node, where)


def _annotate(lines: list[str]) -> list[str]:
    out: list[str] = []
    for line in lines:
        indent = " " * (len(line) - len(line.lstrip(" ")))
        if _OBJECT_MARK in line:
            out.append(f"{indent}# {line.strip().replace(_OBJECT_MARK, '', 1)}  (default; not a YAML value)")
        elif _MULTILINE_MARK in line:  # a comment after its first line would cut the string
            out.extend([f"{indent}# default:", line.replace(_MULTILINE_MARK, "", 1)])
        elif _DEFAULT_MARK in line:
            out.append(f"{line.replace(_DEFAULT_MARK, '', 1)}  # default")
        else:
            out.append(line)
    return out
