"""Rollout engines behind the token samplers: `hf` (HF `generate`, the CPU default), `server` (an OpenAI-compatible
completions server with a weight channel: `renorm serve-policy`, `vllm serve`) and `vllm` (colocated, GPU only).

A sampler config names one as a string (`engine: server`, the engine's defaults) or as a node
(`engine: {_component_: toolkit.engines.ServerEngine, url: ...}`).
"""

from __future__ import annotations

from toolkit.engines.base import (
    EngineName,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    RolloutEngine,
    SamplingParams,
    weights_version,
)
from toolkit.engines.hf import HFEngine
from toolkit.engines.multimodal import MultimodalInputs
from toolkit.engines.server import EngineUnavailableError, ServerEngine
from toolkit.engines.vllm_engine import VLLMEngine  # vllm itself is imported when an engine is built

__all__ = [
    "EngineName",
    "EngineUnavailableError",
    "FinishReason",
    "GenerationRequest",
    "GenerationResult",
    "HFEngine",
    "MultimodalInputs",
    "RolloutEngine",
    "SamplingParams",
    "ServerEngine",
    "VLLMEngine",
    "build_engine",
    "weights_version",
]


def build_engine(engine: EngineName | RolloutEngine, generation_batch_size: int | None = None) -> RolloutEngine:
    """The engine a sampler's `engine:` names: a string picks that engine with its defaults, an engine is kept.

    Raises:
        ValueError: an unknown name or an object without `generate(policy, request)`.
    """
    if isinstance(engine, str):
        if engine == "hf":
            return HFEngine(generation_batch_size)
        if engine == "server":
            return ServerEngine()
        if engine == "vllm":
            return VLLMEngine()
        raise ValueError(f"engine={engine!r} is not one of ['hf', 'server', 'vllm'] or an engine object")
    if not isinstance(engine, RolloutEngine):
        raise ValueError(f"engine must be 'hf', 'server', 'vllm' or have generate(policy, request), got {engine!r:.80}")
    return engine
