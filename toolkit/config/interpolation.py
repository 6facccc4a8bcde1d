"""`${...}` interpolation in loaded configs, resolved after the bases merge and the command-line overrides apply.

`${a.b.c}` is another key's value (list items by index: `${data.paths.0}`); alone it keeps that value's type
(a number, a list, a whole section), inside a string it is written as text. `${env:NAME}` and
`${env:NAME,default}` read an environment variable (always a string). `${config_dir}` is the absolute folder of
the YAML file that holds it (for an override: of the config file named on the command line); it is substituted
when the file is read, so a value keeps its own file's folder through `base:` chains and references.
`$${` is a literal `${`; `format_config` writes a literal `${` back as `$${`, so printed configs load unchanged.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.config.types import ConfigError, closest, join_key, show_value, source_of

CONFIG_DIR = "config_dir"
ENV_RESOLVER = "env"

# At each position: an escape `$${`, then a complete `${...}`, then an unterminated or nested `${`.
_TOKEN = re.compile(r"\$\$\{|\$\{([^{}]*)\}|\$\{")
# `${config_dir}` not escaped (a `${` after a `$` is always part of an escape), with the `/..` steps that follow it.
_CONFIG_DIR_TOKEN = re.compile(r"(?<!\$)\$\{\s*config_dir\s*\}(?P<up>(?:/\.\.(?=/|$))*)")
_KEY_PATH = re.compile(r"^[\w\-]+(?:\.[\w\-]+)*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RESOLVER = re.compile(r"^(?P<name>[A-Za-z_][\w.]*):(?P<arg>.*)$", re.DOTALL)


def has_interpolation(value: Any) -> bool:
    """True for a string holding a `${...}` (or an escaped `$${`)."""
    return isinstance(value, str) and "${" in value


def escape(text: str) -> str:
    """`text` with every `${` written as `$${`, so that resolving it gives `text` back."""
    return text.replace("${", "$${")


# ---------------------------------------------------------------------------------------------- ${config_dir}


def substitute_config_dir(node: Any, folder: Path) -> Any:
    """`node` with `${config_dir}` replaced by `folder` in every string value (in place for mappings and lists).

    `/..` steps right after it climb from `folder` (`${config_dir}/../../data` is the grandparent's `data`, written
    without `..`). Other interpolations and escapes are left for `resolve_interpolations`.
    """
    if isinstance(node, dict):
        for key, value in node.items():
            node[key] = substitute_config_dir(value, folder)
        return node
    if isinstance(node, list):
        node[:] = [substitute_config_dir(item, folder) for item in node]
        return node
    if not has_interpolation(node):
        return node

    def replace(match: re.Match[str]) -> str:
        target = folder
        for _ in range(match.group("up").count("/..")):  # `${config_dir}/../data`: the parent, not `dir/..`
            target = target.parent
        return escape(str(target))

    return _CONFIG_DIR_TOKEN.sub(replace, node)


# ---------------------------------------------------------------------------------------------- resolution


@dataclass(frozen=True)
class _Expression:
    """The text between `${` and `}`."""

    body: str


def resolve_interpolations(config: dict[str, Any]) -> dict[str, Any]:
    """Resolve every `${...}` in `config` in place (see the module docstring); returns `config`.

    Raises:
        ConfigError: a reference to a key that does not exist (with the closest name), a reference cycle, an
            unset environment variable without a default, a malformed `${`, or a section or null embedded in
            a string; each names the key holding the interpolation and the file and line that set it.
    """
    _Resolver(config).resolve_children(config, "", None)
    return config


class _Resolver:
    """Resolves slots (a mapping key or a list index) once, in place, following references depth first."""

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.done: set[tuple[int, str | int]] = set()  # (id of the container, key) of resolved slots
        self.finished: set[int] = set()  # ids of containers whose every slot is resolved
        self.stack: list[str] = []  # key paths being resolved, for cycle messages
        self.active: dict[tuple[int, str | int], int] = {}  # slots being resolved -> their place in `stack`

    def resolve_children(self, node: dict[str, Any] | list[Any], where: str, source: str | None) -> None:
        keys: list[str | int] = list(node) if isinstance(node, dict) else list(range(len(node)))
        for key in keys:
            self.resolve_slot(node, key, join_key(where, key), _slot_source(node, key, source))
        self.finished.add(id(node))

    def resolve_slot(self, parent: Any, key: str | int, path: str, source: str | None) -> Any:
        """The resolved value of `parent[key]`, resolving it first (and in place) on the first visit."""
        slot = (id(parent), key)
        if id(parent) in self.finished or slot in self.done:
            return parent[key]
        if slot in self.active:  # by identity: YAML aliases share one object under two paths
            chain = " -> ".join([*self.stack[self.active[slot] :], path])
            raise ConfigError(path, f"interpolation cycle: {chain}", source)
        self.active[slot] = len(self.stack)
        self.stack.append(path)
        try:
            value = parent[key]
            if has_interpolation(value):
                parent[key] = self.resolve_string(value, path, source)
            elif isinstance(value, (dict, list)):
                self.resolve_children(value, path, source)
        finally:
            self.stack.pop()
            del self.active[slot]
        self.done.add(slot)
        return parent[key]

    def resolve_string(self, text: str, path: str, source: str | None) -> Any:
        pieces = _pieces(text, path, source)
        if len(pieces) == 1 and isinstance(pieces[0], _Expression):
            value = self.evaluate(pieces[0], path, source)
            if isinstance(value, (dict, list)):
                value = copy.deepcopy(value)
                self.mark_finished(value)
            return value
        parts = [p if isinstance(p, str) else _as_text(self.evaluate(p, path, source), p, path, source) for p in pieces]
        return "".join(parts)

    def mark_finished(self, node: Any) -> None:
        if isinstance(node, (dict, list)):
            self.finished.add(id(node))
            for item in node.values() if isinstance(node, dict) else node:
                self.mark_finished(item)

    def evaluate(self, expression: _Expression, path: str, source: str | None) -> Any:
        body = expression.body
        resolver = _RESOLVER.match(body)
        if resolver is not None:
            if resolver.group("name") != ENV_RESOLVER:
                message = f"unknown resolver in ${{{body}}} (known: {ENV_RESOLVER}:NAME, {ENV_RESOLVER}:NAME,default)"
                raise ConfigError(path, message, source, closest(resolver.group("name"), [ENV_RESOLVER]))
            return _read_env(resolver.group("arg"), body, path, source)
        if body == CONFIG_DIR:
            message = "${config_dir} is only known in a YAML file (or an override) read by load_config"
            raise ConfigError(path, message, source)
        if not _KEY_PATH.match(body):
            message = f"bad interpolation ${{{body}}}: expected ${{key.path}}, ${{env:NAME}} or ${{env:NAME,default}}"
            raise ConfigError(path, message, source)
        return self.lookup(body, path, source)

    def lookup(self, reference: str, path: str, source: str | None) -> Any:
        """The resolved value at `reference`. Sections on the way are entered as they are (one may be half
        resolved: `${a.b}` inside `a`); only a string on the way, a reference itself, is resolved first."""
        node: Any = self.root
        where, node_source = "", None
        parts = reference.split(".")
        for i, part in enumerate(parts):
            target = join_key(where, part)
            if isinstance(node, Mapping):
                if part not in node:
                    message = f"${{{reference}}}: no key '{target}' in the config"
                    if not where:  # perhaps no reference was meant at all
                        message += " (a literal ${ is written $${)"
                    raise ConfigError(path, message, source, closest(part, [str(k) for k in node]))
                key: str | int = part
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                key = int(part)
            elif isinstance(node, list):
                message = f"${{{reference}}}: '{part}' is not an index of the {len(node)} items of '{where}'"
                raise ConfigError(path, message, source)
            else:
                message = f"${{{reference}}}: '{where}' holds {show_value(node)}, not a section"
                raise ConfigError(path, message, source)
            node_source = _slot_source(node, key, node_source)
            last = i == len(parts) - 1
            value = node[key]
            if last or has_interpolation(value):
                value = self.resolve_slot(node, key, target, node_source)
            node, where = value, target
        return node


def _slot_source(parent: Any, key: str | int, inherited: str | None) -> str | None:
    """Where `parent[key]` was set: the mapping's provenance, else (list items) the source of the list."""
    if isinstance(parent, Mapping) and isinstance(key, str):
        return source_of(parent, key) or inherited
    return inherited


def _pieces(text: str, path: str, source: str | None) -> list[str | _Expression]:
    pieces: list[str | _Expression] = []
    position = 0
    for match in _TOKEN.finditer(text):
        pieces.append(text[position : match.start()])
        if match.group(0) == "$${":
            pieces.append("${")
        elif match.group(1) is None:
            message = f"unterminated or nested '${{' in {text!r} (write $${{ for a literal ${{)"
            raise ConfigError(path, message, source)
        elif not match.group(1).strip():
            raise ConfigError(path, f"empty interpolation ${{}} in {text!r}", source)
        else:
            pieces.append(_Expression(match.group(1).strip()))
        position = match.end()
    pieces.append(text[position:])
    return [piece for piece in pieces if piece != ""]


def _as_text(value: Any, expression: _Expression, path: str, source: str | None) -> str:
    """A referenced value written inside a string: text as is, numbers as written, booleans as true/false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    what = "null" if value is None else "a section" if isinstance(value, Mapping) else show_value(value)
    message = f"${{{expression.body}}} is {what}, which cannot be written inside a string (use it as the whole value)"
    raise ConfigError(path, message, source)


def _read_env(argument: str, body: str, path: str, source: str | None) -> str:
    from toolkit.io.redaction import note_env_value

    name, comma, default = argument.partition(",")
    name = name.strip()
    if not _ENV_NAME.match(name):
        raise ConfigError(path, f"bad environment variable name {name!r} in ${{{body}}}", source)
    value = os.environ.get(name)
    if value is None:
        if not comma:
            message = f"environment variable {name} is not set (give a default: ${{env:{name},default}})"
            raise ConfigError(path, message, source)
        value = default.strip()
    note_env_value(name, value)
    return value
