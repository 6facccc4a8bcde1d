"""The attention kernel of a Hugging Face token model, chosen by name (`attn_implementation`) and checked early.

transformers dispatches attention by name: "eager", "sdpa", "flex_attention", "flash_attention_2" / "_3" / "_4"
(and kernels-hub names "org/repo" through the `kernels` package). The name is checked here before a checkpoint
loads, and flash attention without its package fails with an ImportError that says what to install, instead of a
stack trace from deep inside `from_pretrained`. transformers is imported inside the functions (`import toolkit`
stays light).
"""

from __future__ import annotations

import importlib.util
from typing import Any

# What a missing flash-attention build needs (transformers' is_flash_attn_<n>_available says whether it is usable).
FLASH_INSTALL = {
    "flash_attention_2": "the flash-attn package (pip install flash-attn --no-build-isolation) and a CUDA GPU",
    "flash_attention_3": "FlashAttention-3 (flash_attn_interface, from flash-attention's hopper/) and a Hopper GPU",
    "flash_attention_4": "FlashAttention-4 (flash-attn's cute build) and a Hopper or Blackwell GPU",
}


def attn_implementations() -> list[str]:
    """The attention names this transformers accepts ("eager" plus its attention registry)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return sorted({"eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()})


def check_attn_implementation(name: str | None) -> str | None:
    """`name` unchanged when this machine can use it (None: the model's default).

    Raises:
        ValueError: a name transformers does not know (the allowed ones are listed).
        ImportError: flash attention, or a kernels-hub name, whose package is not installed or not usable here.
    """
    if name is None:
        return None
    if "/" in name:  # a kernels-hub repository, e.g. "kernels-community/flash-attn"
        if importlib.util.find_spec("kernels") is None:
            raise ImportError(f"attn_implementation={name!r} is a kernels-hub name: pip install kernels")
        return name
    known = attn_implementations()
    if name not in known:
        raise ValueError(f"attn_implementation={name!r} is not one of {known} (or a kernels-hub 'org/repo' name)")
    if name in FLASH_INSTALL:
        import transformers.utils

        usable: Any = getattr(transformers.utils, f"is_{name.replace('attention', 'attn')}_available", None)
        if usable is not None and not usable():
            raise ImportError(f"attn_implementation={name!r} needs {FLASH_INSTALL[name]}; use 'sdpa' otherwise")
    return name


def set_attn_implementation(model: Any, name: str | None) -> None:
    """Switch a built transformers `model` to the attention `name` (checked); None leaves it as built."""
    if check_attn_implementation(name) is None:
        return
    setter = getattr(model, "set_attn_implementation", None)
    if not callable(setter):
        raise ValueError(f"attn_implementation={name!r}: {type(model).__name__} is not a transformers model")
    setter(name)
