"""Optional vLLM generation engine behind the same Sampler interface (GPU only, import-guarded).

`VLLMSampler` replaces HF `generate` with a colocated `vllm.LLM`; everything else (rollout layout,
old log-probs re-scored by the policy, masks) is `SingleTurnSampler`'s. Before each generation it
pushes the policy's current weights into the engine when they changed (weight sync after every
update). Simplified: one engine per process (no tensor-parallel across trainer ranks) and LoRA is
merged into the pushed weights. vLLM is an extra (`pip install -e ".[vllm]"`), never a requirement.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from modalities.text_agent.policy import unwrap_model
from modalities.text_agent.sampler import SingleTurnSampler, left_pad


def require_vllm() -> Any:
    """Import vllm or fail with a message that says how to get it."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(
            "VLLMSampler needs vLLM, an optional GPU-only engine: pip install -e '.[vllm]' "
            "(or use modalities.text_agent.sampler.SingleTurnSampler, which needs nothing extra)"
        ) from err
    if not torch.cuda.is_available():
        raise RuntimeError("VLLMSampler runs on CUDA only; use SingleTurnSampler on a CPU")
    return vllm


class VLLMSampler(SingleTurnSampler):
    """SingleTurnSampler whose token generation runs in a colocated vLLM engine.

    Args:
        model: the hub id or path vLLM loads its architecture (and initial weights) from; the
            policy's weights are pushed over them before the first generation.
        gpu_memory_utilization: fraction of GPU memory vLLM may take (the trainer needs the rest).
        dtype: vLLM's weight dtype.
        **kwargs: SingleTurnSampler options (max_new_tokens, temperature, top_p, ...).
    """

    def __init__(self, model: str, gpu_memory_utilization: float = 0.3, dtype: str = "bfloat16", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 < gpu_memory_utilization < 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1), got {gpu_memory_utilization}")
        vllm = require_vllm()
        self.engine = vllm.LLM(model=model, gpu_memory_utilization=gpu_memory_utilization, dtype=dtype)
        self._vllm = vllm
        self._synced_version: int | None = None

    def _generate(
        self, policy: Any, tokenizer: Any, rows: list[list[int]], seed: int, temperature: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        self.sync_weights(policy.module)
        params = self._vllm.SamplingParams(
            n=1,
            temperature=temperature,
            top_p=float(self.top_p if self.top_p is not None else getattr(policy, "top_p", 1.0)),
            top_k=int(self.top_k or getattr(policy, "top_k", None) or -1),
            max_tokens=self.max_new_tokens,
            seed=seed,
            stop=list(self.stop_strings) or None,
        )
        prompts = [self._vllm.inputs.TokensPrompt(prompt_token_ids=ids) for ids in rows]
        outputs = self.engine.generate(prompts, params, use_tqdm=False)
        device = policy.device
        prompt_ids, prompt_mask = left_pad(rows, int(tokenizer.pad_token_id), device)
        responses = [list(out.outputs[0].token_ids) for out in outputs]
        width = max(1, max(len(r) for r in responses))
        response_ids = torch.full((len(rows), width), int(tokenizer.pad_token_id), dtype=torch.long, device=device)
        ends = torch.full((len(rows),), -1, dtype=torch.long, device=device)
        for i, (tokens, out) in enumerate(zip(responses, outputs, strict=True)):
            response_ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            if out.outputs[0].finish_reason == "stop" and tokens:
                ends[i] = len(tokens) - 1
        return prompt_ids, prompt_mask, response_ids, ends

    def sync_weights(self, module: nn.Module) -> None:
        """Push the policy's weights into the engine when they changed since the last push."""
        version = _weights_version(module)
        if version == self._synced_version:
            return
        model = unwrap_model(module)
        if hasattr(model, "merge_and_unload"):
            raise NotImplementedError("VLLMSampler with LoRA: merge adapters before syncing (not supported yet)")
        _load_into_engine(self.engine, _named_weights(model))
        self._synced_version = version


def _named_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    for name, tensor in model.state_dict().items():
        yield name, tensor.detach()


def _weights_version(module: nn.Module) -> int:
    """Changes after every optimizer step (parameters' in-place version counters)."""
    return sum(p._version for p in module.parameters())


def _load_into_engine(engine: Any, weights: Iterator[tuple[str, Tensor]]) -> None:
    """vLLM has moved this entry point between releases; try the known ones."""
    try:
        model = engine.llm_engine.model_executor.driver_worker.model_runner.model
    except AttributeError:
        model = None
    if model is not None:
        model.load_weights(weights)
        return
    if hasattr(engine, "collective_rpc"):
        payload = list(weights)
        engine.collective_rpc(lambda worker: worker.model_runner.model.load_weights(payload))
        return
    raise RuntimeError("this vLLM version exposes no known way to load weights into a running engine")
