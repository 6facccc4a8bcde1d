"""Run configs: YAML files (with `base:` parents) → merged, overridden, interpolated, validated dicts → objects
built from `_component_` nodes. `loader` reads and merges, `interpolation` resolves `${...}`, `schema` validates
and instantiates, `defaults` shows what a config leaves to constructors, `types` holds the shared types and the
file reader."""

from toolkit.config.interpolation import resolve_interpolations
from toolkit.config.loader import (
    ConfigDict,
    apply_overrides,
    dump_config,
    format_config,
    load_config,
    merge_configs,
    provenance,
)
from toolkit.config.schema import build_dataclass, import_object, instantiate, validate
from toolkit.config.types import ConfigError, check_keys

__all__ = [
    "ConfigDict",
    "ConfigError",
    "apply_overrides",
    "build_dataclass",
    "check_keys",
    "dump_config",
    "format_config",
    "import_object",
    "instantiate",
    "load_config",
    "merge_configs",
    "provenance",
    "resolve_interpolations",
    "validate",
]
