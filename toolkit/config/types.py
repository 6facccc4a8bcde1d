"""Config value checks against type annotations, and `ConfigError`, which names key path, file and closest name.

Checked: bool, int, float (ints accepted), str, Path-like (str accepted), Literal, unions/Optional,
list/Sequence/tuple, dict/Mapping, and YAML scalars against plain classes (a string is never a Tensor).
Anything else (protocols, callables, type variables) is not checked. `_component_` nodes are not
checked against the annotation of the argument they fill: their type is known only once built.
`read_text_file` reads a user-supplied text file (config or data) so that a decode error names the file.
"""

from __future__ import annotations

import difflib
import inspect
import os
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any, Literal, Union

COMPONENT_KEY = "_component_"
PARTIAL_KEY = "_partial_"
RESERVED_KEYS = (COMPONENT_KEY, PARTIAL_KEY)

_SEQUENCE_ORIGINS = (list, tuple, Sequence, typing.Sequence, typing.MutableSequence)
_MAPPING_ORIGINS = (dict, Mapping, typing.Mapping, typing.MutableMapping)


class ConfigError(ValueError):
    """A bad config value: the message names the key path, where it was set and the closest valid name."""

    def __init__(self, key: str, message: str, source: str | None = None, suggestion: str | None = None) -> None:
        self.key = key
        self.message = message
        self.source = source
        self.suggestion = suggestion
        text = f"{key}: {message}" if key else message
        if source:
            text += f" (from {source})"
        if suggestion:
            text += f"; did you mean '{suggestion}'?"
        super().__init__(text)


def join_key(where: str, key: str | int) -> str:
    """Dotted key path of `key` inside the node at `where` (list indices are plain numbers)."""
    return f"{where}.{key}" if where else str(key)


def source_of(node: Any, key: str | None = None) -> str | None:
    """Where `node[key]` was set (`file:line` or the override), from a loaded config's provenance."""
    provenance: Mapping[str, str] = getattr(node, "provenance", None) or {}
    if key is not None and key in provenance:
        return provenance[key]
    if COMPONENT_KEY in provenance:
        return provenance[COMPONENT_KEY]
    return next(iter(provenance.values()), None)


def closest(name: str, candidates: Collection[str]) -> str | None:
    """The most similar candidate (difflib), or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown_key_error(key: str, name: str, valid: Collection[str], owner: str, source: str | None) -> ConfigError:
    """ConfigError for an unknown key, with the closest valid name (or the list of valid ones)."""
    suggestion = closest(name, valid)
    message = f"unknown key for {owner}"
    if suggestion is None:
        shown = ", ".join(sorted(valid)[:30]) or "none"
        message += f" (valid keys: {shown})"
    return ConfigError(key, message, source, suggestion)


def check_keys(mapping: Mapping[str, Any], allowed: Collection[str], where: str = "", owner: str = "config") -> None:
    """Raise ConfigError (closest valid name, source) for the first key of `mapping` not in `allowed`."""
    for key in mapping:
        if key not in allowed:
            raise unknown_key_error(join_key(where, key), str(key), allowed, owner, source_of(mapping, key))


def is_component(node: Any) -> bool:
    """True for a mapping with a `_component_` key."""
    return isinstance(node, Mapping) and COMPONENT_KEY in node


# ---------------------------------------------------------------------------------------------- types


def type_hints(obj: Any) -> dict[str, Any]:
    """Evaluated annotations of `obj`; string annotations that cannot be evaluated are left out (unchecked).

    `typing.get_type_hints` fails as a whole when one annotation names something imported only under
    TYPE_CHECKING; then each annotation is evaluated on its own in its defining module.
    """
    try:
        return typing.get_type_hints(obj)
    except Exception:
        pass
    owners: list[Any] = [c for c in reversed(obj.__mro__) if c is not object] if isinstance(obj, type) else [obj]
    hints: dict[str, Any] = {}
    for owner in owners:
        module = inspect.getmodule(owner)
        namespace = dict(vars(module)) if module is not None else {}
        own = vars(owner).get("__annotations__", {}) if isinstance(owner, type) else owner.__annotations__
        for name, annotation in own.items():
            try:
                hints[name] = eval(annotation, namespace) if isinstance(annotation, str) else annotation
            except Exception:
                hints.pop(name, None)
    return hints


def type_name(annotation: Any) -> str:
    """Readable name of an annotation (`float | None`, `Literal['a', 'b']`, `dict[str, Tensor]`)."""
    if annotation is type(None) or annotation is None:
        return "None"
    if annotation is Ellipsis:
        return "..."
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is Literal:
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    if origin is not None and args:
        return f"{type_name(origin)}[{', '.join(type_name(a) for a in args)}]"
    name = getattr(annotation, "__name__", None)
    return name if isinstance(name, str) else repr(annotation).replace("typing.", "")


def show_value(value: Any) -> str:
    """`type value` for messages, shortened."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{type(value).__name__} {text}"


def literal_choices(annotation: Any) -> list[Any]:
    """The Literal values allowed by `annotation` (looking inside unions)."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return list(typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return [c for arg in typing.get_args(annotation) for c in literal_choices(arg)]
    return []


def type_problem(value: Any, annotation: Any) -> str | None:
    """Why `value` (a YAML-native value) does not match `annotation`, or None if it does or is unchecked."""
    if is_component(value) or annotation is Any or annotation is inspect.Parameter.empty:
        return None
    if annotation is None or annotation is type(None):
        return None if value is None else f"expected None, got {show_value(value)}"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        problems = [type_problem(value, arg) for arg in args]
        if any(p is None for p in problems):
            return None
        not_none = [p for arg, p in zip(args, problems, strict=True) if arg is not type(None)]
        if len(not_none) == 1 and not_none[0] is not None and not _is_scalar(value):
            return not_none[0]  # `list[int] | None` given a list: the item that is wrong says more
        return f"expected {_expected(annotation)}, got {show_value(value)}"
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return None
        return f"expected {_expected(annotation)}, got {show_value(value)}"
    scalar = _scalar_problem(value, annotation)
    if scalar is not _UNCHECKED:
        return scalar
    if origin in _SEQUENCE_ORIGINS or annotation in (list, tuple):
        return _sequence_problem(value, annotation, origin, args)
    if origin in _MAPPING_ORIGINS or annotation is dict:
        return _mapping_problem(value, annotation, args)
    return None


_UNCHECKED = "<unchecked>"


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _scalar_problem(value: Any, annotation: Any) -> str | None:
    if annotation is bool:
        ok = isinstance(value, bool)
    elif annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif annotation is str:
        ok = isinstance(value, str)
    elif annotation is os.PathLike or (isinstance(annotation, type) and issubclass(annotation, PurePath)):
        ok = isinstance(value, (str, os.PathLike))
    elif isinstance(annotation, type) and _is_scalar(value) and not getattr(annotation, "_is_protocol", False):
        ok = isinstance(value, annotation)  # a YAML scalar can never be, say, a Tensor
    else:
        return _UNCHECKED
    return None if ok else f"expected {type_name(annotation)}, got {show_value(value)}"


def _sequence_problem(value: Any, annotation: Any, origin: Any, args: tuple[Any, ...]) -> str | None:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        return f"expected {type_name(annotation)}, got {show_value(value)}"
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            return f"expected {type_name(annotation)} ({len(args)} items), got {len(value)} items"
        item_types = list(args)
    else:
        item_types = [args[0] if args else Any] * len(value)
    for i, (item, item_type) in enumerate(zip(value, item_types, strict=True)):
        problem = type_problem(item, item_type)
        if problem is not None:
            return f"item {i}: {problem}"
    return None


def _mapping_problem(value: Any, annotation: Any, args: tuple[Any, ...]) -> str | None:
    if not isinstance(value, Mapping):
        return f"expected {type_name(annotation)}, got {show_value(value)}"
    key_type, value_type = args if len(args) == 2 else (Any, Any)
    for key, item in value.items():
        problem = type_problem(key, key_type) or type_problem(item, value_type)
        if problem is not None:
            return f"entry {key!r}: {problem}"
    return None


def _expected(annotation: Any) -> str:
    choices = literal_choices(annotation)
    others = [a for a in typing.get_args(annotation) if typing.get_origin(a) is not Literal]
    if typing.get_origin(annotation) is Literal:
        others = []
    if not choices:
        return type_name(annotation)
    text = "one of " + ", ".join(repr(c) for c in choices)
    return text + "".join(f" or {type_name(o)}" for o in others)


def check_value(value: Any, annotation: Any, key: str, source: str | None) -> None:
    """Raise ConfigError if `value` does not match `annotation` (closest Literal choice suggested)."""
    problem = type_problem(value, annotation)
    if problem is None:
        return
    choices = [c for c in literal_choices(annotation) if isinstance(c, str)]
    suggestion = closest(value, choices) if isinstance(value, str) else None
    raise ConfigError(key, problem, source, suggestion)


# ---------------------------------------------------------------------------------------------- files

_UTF16_MARKS = (b"\xff\xfe", b"\xfe\xff")


def read_text_file(path: str | os.PathLike[str], name: str | None = None) -> str:
    """The text of a user-supplied UTF-8 file (config, prompt data, corpus).

    Args:
        path: the file.
        name: how messages show the file (default: `path` as given).

    Raises:
        ValueError: the bytes are not UTF-8; the message names the file, the first bad byte, its offset and
            line, e.g. "configs/x.yaml is not valid UTF-8 (byte 0xff at offset 12, line 2)".
    """
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(decode_error_message(name if name is not None else str(path), data, error)) from error


def decode_error_message(name: str, data: bytes, error: UnicodeDecodeError) -> str:
    """The message "<name> is not valid UTF-8 (byte 0x.. at offset O, line L)", with a hint for UTF-16 files."""
    line = data.count(b"\n", 0, error.start) + 1
    message = f"{name} is not valid UTF-8 (byte 0x{data[error.start]:02x} at offset {error.start}, line {line})"
    if data.startswith(_UTF16_MARKS):
        message += "; it starts with a UTF-16 byte-order mark"
    return message + "; save it as UTF-8"
