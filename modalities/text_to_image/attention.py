"""The attention kernel of a diffusers transformer, chosen by name (`FlowMatchingPolicy(attn_implementation=...)`).

diffusers (>= 0.35) dispatches attention through named backends (`AttentionBackendName`: "native" = torch SDPA,
"flash", "_flash_3", "sage", "flex", "xformers", ... and their kernels-hub variants). The transformers names
"sdpa", "flash_attention_2" and "flash_attention_3" are accepted as aliases, so one config key reads the same for
every policy. Backends whose package is missing fail here with an ImportError that says what to install.
"""

from __future__ import annotations

from typing import Any

from torch import nn

# transformers' names for the diffusers backends that compute the same attention.
ALIASES = {"sdpa": "native", "flash_attention_2": "flash", "flash_attention_3": "_flash_3"}


def attention_backends() -> list[str]:
    """Every backend name this diffusers knows (empty when it predates named attention backends)."""
    try:
        from diffusers.models.attention_dispatch import AttentionBackendName
    except ImportError:
        return []
    return [backend.value for backend in AttentionBackendName]


def resolve_attention_backend(name: str) -> str:
    """The diffusers backend for `name` (a backend name or a transformers alias).

    Raises:
        ValueError: `name` is no backend of the installed diffusers (the allowed names are listed).
    """
    known = attention_backends()
    if not known:
        raise ValueError(f"attn_implementation={name!r} needs diffusers >= 0.35 (named attention backends)")
    backend = ALIASES.get(name, name)
    if backend not in known:
        raise ValueError(f"attn_implementation={name!r} is not one of {sorted(ALIASES) + known}")
    return backend


def set_attention_backend(transformer: nn.Module, name: str) -> None:
    """Switch every attention layer of a diffusers `transformer` to the backend `name`.

    Raises:
        ValueError: an unknown name, or a module that is not a diffusers model.
        ImportError: the backend's package (flash-attn, sageattention, kernels, ...) is not installed.
    """
    backend = resolve_attention_backend(name)
    setter: Any = getattr(transformer, "set_attention_backend", None)
    if not callable(setter):
        raise ValueError(f"attn_implementation={name!r}: {type(transformer).__name__} is not a diffusers model")
    try:
        setter(backend)
    except RuntimeError as error:  # diffusers' message names the missing package and version
        message = f"attn_implementation={name!r} (diffusers backend {backend!r}) is unavailable: {error}"
        raise ImportError(message) from error
