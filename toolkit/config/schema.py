"""Config schema checks: `_component_` nodes against constructor signatures, typed dataclass sections.

`validate` imports targets and checks keyword names, required arguments and annotated types without
constructing anything; `instantiate` runs the same checks on the whole tree first, then builds it
bottom-up. Errors are `ConfigError`s naming the key path, the file (and line) that set it, and the
closest valid name.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import pkgutil
import re
import types
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import PurePath
from typing import Any, TypeVar, Union

from toolkit.config.types import (
    COMPONENT_KEY,
    PARTIAL_KEY,
    RESERVED_KEYS,
    ConfigError,
    check_value,
    closest,
    is_component,
    join_key,
    show_value,
    source_of,
    type_hints,
    unknown_key_error,
)

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------- imports


def import_object(dotted: str) -> Any:
    """Import `package.module.attr` (attributes may be nested); ConfigError with the closest name if missing."""
    if not isinstance(dotted, str) or not dotted.strip():
        raise ConfigError("", f"expected a dotted import path like 'package.module.Class', got {dotted!r}")
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
                continue
            raise ConfigError("", f"importing '{module_name}' for '{dotted}' failed: {e}") from e
        except Exception as e:
            raise ConfigError("", f"importing '{module_name}' for '{dotted}' failed: {type(e).__name__}: {e}") from e
        return _resolve_attributes(obj, parts[:i], parts[i:], dotted)
    top = sorted(m.name for m in pkgutil.iter_modules())
    raise ConfigError("", f"no module named '{parts[0]}' (importing '{dotted}')", suggestion=closest(parts[0], top))


def _resolve_attributes(obj: Any, found: list[str], rest: list[str], dotted: str) -> Any:
    for attr in rest:
        if not hasattr(obj, attr):
            names = [n for n in dir(obj) if not n.startswith("_")]
            if hasattr(obj, "__path__"):
                names += [m.name for m in pkgutil.iter_modules(obj.__path__)]
            where = ".".join(found)
            raise ConfigError(
                "", f"'{where}' has no attribute '{attr}' (importing '{dotted}')", None, closest(attr, names)
            )
        obj = getattr(obj, attr)
        found = [*found, attr]
    return obj


# ---------------------------------------------------------------------------------------------- components


def _signature(target: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):
        return None


def _target_hints(target: Any) -> dict[str, Any]:
    if isinstance(target, functools.partial):
        target = target.func
    if isinstance(target, type):
        init = target.__init__  # type: ignore[misc]
        return type_hints(init) if init is not object.__init__ else {}
    return type_hints(target)


def _check_reserved(node: Mapping[str, Any], where: str) -> None:
    for key in node:
        if key in ("_target_", "_partial_target_"):  # Hydra / OmegaConf spelling
            message = f"Hydra's {key} is spelled {COMPONENT_KEY} here (and _partial_: true for a partial)"
            raise ConfigError(join_key(where, key), message, source_of(node, key), COMPONENT_KEY)
        if isinstance(key, str) and key.startswith("_") and key.endswith("_") and key not in RESERVED_KEYS:
            raise ConfigError(
                join_key(where, key), "unknown reserved key", source_of(node, key), closest(key, RESERVED_KEYS)
            )
    if PARTIAL_KEY in node and COMPONENT_KEY not in node:
        raise ConfigError(join_key(where, PARTIAL_KEY), f"{PARTIAL_KEY} without {COMPONENT_KEY}", source_of(node))


def _import_target(node: Mapping[str, Any], where: str) -> Any:
    key = join_key(where, COMPONENT_KEY)
    try:
        target = import_object(node[COMPONENT_KEY])
    except ConfigError as e:
        raise ConfigError(key, e.message, source_of(node, COMPONENT_KEY), e.suggestion) from e
    if not callable(target):
        raise ConfigError(key, f"'{node[COMPONENT_KEY]}' is not callable", source_of(node, COMPONENT_KEY))
    partial = node.get(PARTIAL_KEY, False)
    if not isinstance(partial, bool):
        raise ConfigError(
            join_key(where, PARTIAL_KEY), f"expected bool, got {show_value(partial)}", source_of(node, PARTIAL_KEY)
        )
    return target


def _check_component(node: Mapping[str, Any], where: str, provided: Collection[str]) -> None:
    target = _import_target(node, where)
    signature = _signature(target)
    if signature is None:
        return
    owner = node[COMPONENT_KEY]
    kwargs = {k: v for k, v in node.items() if k not in RESERVED_KEYS}
    params = signature.parameters
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_var_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for name in kwargs:
        if name not in named and not takes_var_kwargs:
            raise unknown_key_error(join_key(where, name), name, named, owner, source_of(node, name))
    if not node.get(PARTIAL_KEY, False):
        for name, param in params.items():
            required = param.default is param.empty and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)
            if required and name not in kwargs and name not in provided:
                message = f"missing required argument '{name}' of {owner} (or set {PARTIAL_KEY}: true)"
                raise ConfigError(join_key(where, name), message, source_of(node, COMPONENT_KEY))
    hints = _target_hints(target)
    for name, value in kwargs.items():
        implicit_none = value is None and name in params and params[name].default is None
        if name in hints and not implicit_none:
            check_value(value, hints[name], join_key(where, name), source_of(node, name))


def validate(node: Any, where: str = "", *, runtime_kwargs: Mapping[str, Collection[str]] | None = None) -> None:
    """Check every `_component_` node under `node` without constructing anything (targets are imported).

    Args:
        node: a config value: mapping, list or scalar; `_component_` nodes may appear at any depth.
        where: the key path of `node` in the whole config, used in error messages.
        runtime_kwargs: key path -> argument names the caller supplies at build time (for example
            `{"optimizer": ["params"]}`), so they do not count as missing.

    Raises:
        ConfigError: unknown argument (with the closest valid name), missing required argument,
            wrong type, unknown reserved key, or a `_component_` that cannot be imported.
    """
    provided = runtime_kwargs or {}
    if isinstance(node, Mapping):
        _check_reserved(node, where)
        if COMPONENT_KEY in node:
            _check_component(node, where, provided.get(where, ()))
        for key, value in node.items():
            if key not in RESERVED_KEYS:
                validate(value, join_key(where, key), runtime_kwargs=provided)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            validate(value, join_key(where, i), runtime_kwargs=provided)


def instantiate(node: Any, where: str = "", **kwargs: Any) -> Any:
    """Build `node`: `_component_` mappings become objects (children first), `_partial_: true` a partial.

    The whole tree is validated before anything is constructed. `kwargs` are runtime arguments for the
    top-level component (for example `params=model.parameters()`); they override config values.
    A ValueError raised by a constructor is re-raised as ConfigError naming the node and its file.
    """
    if kwargs and not is_component(node):
        raise ConfigError(where, f"runtime arguments {sorted(kwargs)} given but the node has no {COMPONENT_KEY}")
    validate(node, where, runtime_kwargs={where: set(kwargs)})
    return _build(node, where, kwargs)


def _build(node: Any, where: str, extra: Mapping[str, Any]) -> Any:
    if isinstance(node, Mapping):
        built = {k: _build(v, join_key(where, k), {}) for k, v in node.items() if k not in RESERVED_KEYS}
        if COMPONENT_KEY not in node:
            return built
        target = import_object(node[COMPONENT_KEY])
        built.update(extra)
        if node.get(PARTIAL_KEY, False):
            return functools.partial(target, **built)
        try:
            return target(**built)
        except ConfigError:
            raise
        except ValueError as e:
            message = f"{node[COMPONENT_KEY]} rejected its arguments: {e}"
            raise ConfigError(where, message, source_of(node, COMPONENT_KEY)) from e
    if isinstance(node, (list, tuple)):
        return [_build(v, join_key(where, i), {}) for i, v in enumerate(node)]
    return node


# ---------------------------------------------------------------------------------------------- dataclasses


def build_dataclass(cls: type[T], mapping: Mapping[str, Any] | None, where: str = "") -> T:
    """Build the dataclass `cls` from a config section: unknown keys, missing fields and types checked.

    Nested dataclass fields (also inside `X | None`, lists and dicts) are built from mappings;
    ints given for float fields become floats, lists for tuple fields tuples, strings for Path fields Paths.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"build_dataclass needs a dataclass type, got {cls!r}")
    section: Mapping[str, Any] = {} if mapping is None else mapping
    if not isinstance(section, Mapping):
        raise ConfigError(where, f"expected a mapping of {cls.__name__} fields, got {show_value(section)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = type_hints(cls)
    for key in section:
        if key not in fields:
            raise unknown_key_error(join_key(where, key), str(key), fields, cls.__name__, source_of(section, key))
    for name, f in fields.items():
        missing = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if missing and name not in section:
            raise ConfigError(join_key(where, name), f"missing required field of {cls.__name__}", source_of(section))
    kwargs = {k: _coerce(v, hints.get(k, Any), join_key(where, k), source_of(section, k)) for k, v in section.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        message = f"{cls.__name__} rejected its fields: {e}"
        raise ConfigError(where, message, _source_named_in(str(e), section, where)) from e


def _source_named_in(message: str, section: Mapping[str, Any], where: str) -> str | None:
    """Where the first key whose dotted path (`trainer.lr`) the message names was set; else the section's source."""
    if where:
        for key in section:
            if re.search(rf"(?<![\w.]){re.escape(join_key(where, key))}(?![\w])", message):
                return source_of(section, key)
    return source_of(section)


def _coerce(value: Any, annotation: Any, key: str, source: str | None) -> Any:
    inner = _single_type(annotation)
    if value is None and inner is not annotation:
        return None
    if isinstance(inner, type) and dataclasses.is_dataclass(inner) and isinstance(value, Mapping):
        return build_dataclass(inner, value, key)
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if origin in (list, Sequence) and args and isinstance(value, list):
        items = [_coerce(v, args[0], join_key(key, i), source) for i, v in enumerate(value)]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    if origin in (dict, Mapping) and len(args) == 2 and isinstance(value, Mapping):
        for k in value:
            check_value(k, args[0], join_key(key, k), source)
        entries = {k: _coerce(v, args[1], join_key(key, k), source) for k, v in value.items()}
        # unchanged sections stay the loaded objects, keeping their provenance for later errors
        return value if all(entries[k] is value[k] for k in value) else entries
    check_value(value, annotation, key, source)
    if inner is float and isinstance(value, int):
        return float(value)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if isinstance(inner, type) and issubclass(inner, PurePath) and isinstance(value, str):
        return inner(value)
    return value


def _single_type(annotation: Any) -> Any:
    """`X` for `X | None`, otherwise the annotation itself."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation
