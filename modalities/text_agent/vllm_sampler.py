"""`VLLMSampler`: SingleTurnSampler with the colocated vLLM engine (`toolkit.engines.vllm_engine.VLLMEngine`).

Kept for configs that name it; `SingleTurnSampler(engine="vllm")` or an `engine: {_component_:
toolkit.engines.VLLMEngine, ...}` node is the same. The engine part (sleep/wake, gpu_memory_utilization,
max_model_len, weight sync after every update through `collective_rpc`, LoRA adapters served unmerged) lives in
the engine; rollout layout, re-scored old log-probs and masks are SingleTurnSampler's. vLLM is an extra
(`pip install -e ".[vllm]"`), never a requirement.
"""

from __future__ import annotations

from typing import Any

from modalities.text_agent.sampler import SingleTurnSampler
from toolkit.engines.vllm_engine import VLLMEngine


class VLLMSampler(SingleTurnSampler):
    """SingleTurnSampler whose token generation runs in a colocated vLLM engine.

    Args:
        model: the hub id or path vLLM loads its architecture (and initial weights) from; None = the policy's
            checkpoint. The policy's weights are pushed over them before the first generation.
        gpu_memory_utilization: fraction of GPU memory vLLM may take (the trainer needs the rest).
        dtype: vLLM's weight dtype.
        **kwargs: SingleTurnSampler options (max_new_tokens, temperature, top_p, ...). The engine's other options
            (max_model_len, enable_sleep, ...): `SingleTurnSampler(engine=VLLMEngine(...))`.
    """

    def __init__(
        self, model: str | None = None, gpu_memory_utilization: float = 0.3, dtype: str = "bfloat16", **kwargs: Any
    ) -> None:
        engine = VLLMEngine(model, gpu_memory_utilization, dtype=dtype)
        super().__init__(engine=engine, **kwargs)
