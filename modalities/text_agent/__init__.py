"""Text modality: causal-LM policy, single-turn and tool-loop samplers, search tools, tiny models.

Names are imported lazily (PEP 562) so that `renorm --help`, which lists this package's CLI
plugin, does not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CausalLMPolicy": "modalities.text_agent.policy",
    "SingleTurnSampler": "modalities.text_agent.sampler",
    "ToolLoopSampler": "modalities.text_agent.tool_sampler",
    "build_char_tokenizer": "modalities.text_agent.tiny",
    "build_tiny_qwen2": "modalities.text_agent.tiny",
    "tiny_causal_lm": "modalities.text_agent.tiny",
    "tiny_tokenizer": "modalities.text_agent.tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'modalities.text_agent' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
