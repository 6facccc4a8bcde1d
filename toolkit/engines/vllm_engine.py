"""The `vllm` rollout engine: a colocated `vllm.LLM` in the trainer's process (GPU only, import-guarded).

The engine core runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, as TRL's colocate mode), so the weight sync
calls the worker's `model.load_weights` through `LLM.collective_rpc` without pickling a tensor. With
`enable_sleep` the engine sleeps between generations (KV cache freed, weights offloaded) and wakes before the
next one, leaving the GPU to the update. Full fine-tuning pushes the whole state dict after every optimizer step;
LoRA saves the adapters to a folder and serves them unmerged through a new `LoRARequest` per version.
Simplified: one engine per process (no tensor parallelism across trainer ranks). Untested in CI (no GPU there).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from toolkit.distributed import unwrap
from toolkit.engines.base import FinishReason, GenerationRequest, GenerationResult, text_only, weights_key
from toolkit.interfaces import Policy


def require_vllm() -> Any:
    """Import vllm, or fail with a message that says how to get it (CUDA only)."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(
            "the vllm engine needs vLLM, an optional GPU-only extra: pip install -e '.[vllm]' "
            "(or use engine: hf, which needs nothing extra)"
        ) from err
    if not torch.cuda.is_available():
        raise RuntimeError("the vllm engine runs on CUDA only; use engine: hf on a CPU")
    return vllm


class VLLMEngine:
    """A colocated vLLM engine, built on first use from `model` (or the policy's own checkpoint name).

    Args:
        model: hub id or path vLLM loads the architecture (and initial weights) from; None = the policy's
            `config._name_or_path`. The policy's weights are pushed over them before the first generation.
        gpu_memory_utilization: fraction of GPU memory vLLM may take (the trainer needs the rest).
        max_model_len: longest prompt + completion vLLM plans its KV cache for (None: the model's).
        dtype: vLLM's weight dtype.
        enable_sleep: sleep between generations (frees the KV cache and offloads weights while training).
        max_lora_rank: LoRA rank vLLM reserves for (LoRA policies only).
        enforce_eager: no CUDA graphs (faster start, slower decode).
        seed: vLLM's engine seed (each request is seeded too).
    """

    def __init__(
        self,
        model: str | None = None,
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        dtype: str = "bfloat16",
        enable_sleep: bool = True,
        max_lora_rank: int = 64,
        enforce_eager: bool = False,
        seed: int = 0,
    ) -> None:
        if not 0.0 < gpu_memory_utilization < 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1), got {gpu_memory_utilization}")
        if max_model_len is not None and max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1 or None, got {max_model_len}")
        self._vllm = require_vllm()
        self.model = model
        self.options: dict[str, Any] = {
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len,
            "dtype": dtype,
            "enable_sleep_mode": enable_sleep,
            "enforce_eager": enforce_eager,
            "seed": seed,
        }
        self.max_lora_rank = max_lora_rank
        self.llm: Any = None
        self._synced: tuple[int, int] | None = None
        self._lora: Any = None
        self._adapters = tempfile.TemporaryDirectory(prefix="renorm-vllm-lora-")
        self.num_syncs = 0

    def generate(self, policy: Policy, request: GenerationRequest) -> GenerationResult:
        text_only(request, "vllm")  # vLLM's multi_modal_data is a later step
        llm = self._engine(policy)
        if self.options["enable_sleep_mode"]:
            llm.wake_up()
        try:
            self.sync_weights(policy)
            outputs = llm.generate(
                [self._vllm.inputs.TokensPrompt(prompt_token_ids=list(ids)) for ids in request.prompt_ids],
                self._sampling_params(request),
                use_tqdm=False,
                lora_request=self._lora,
            )
        finally:
            if self.options["enable_sleep_mode"]:
                llm.sleep(level=1)
        return _result(outputs, request)

    def sync_weights(self, policy: Policy) -> None:
        """Load the policy's weights into the engine when they changed since the last sync."""
        local = weights_key(policy.module)
        if local == self._synced:
            return
        self.num_syncs += 1
        if getattr(policy, "is_lora", False):
            self._lora = self._save_adapters(policy.module, self.num_syncs)
        else:
            load_weights(self.llm, _named_weights(unwrap(policy.module)))
        self._synced = local

    def _engine(self, policy: Policy) -> Any:
        if self.llm is None:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine core: no pickled weights
            model = self.model or getattr(getattr(unwrap(policy.module), "config", None), "_name_or_path", None)
            if not model:
                raise ValueError("the vllm engine needs `model`: the policy's module names no checkpoint")
            lora = (
                {"enable_lora": True, "max_lora_rank": self.max_lora_rank} if getattr(policy, "is_lora", False) else {}
            )
            options = {k: v for k, v in self.options.items() if v is not None}
            self.llm = self._vllm.LLM(model=model, **options, **lora)
        return self.llm

    def _sampling_params(self, request: GenerationRequest) -> Any:
        params = request.params
        return self._vllm.SamplingParams(
            n=request.num_samples,
            temperature=params.temperature if params.do_sample else 0.0,
            top_p=params.top_p if params.do_sample else 1.0,
            top_k=params.top_k if params.top_k > 0 else -1,
            max_tokens=params.max_new_tokens,
            seed=request.seed,
            stop=list(params.stop_strings) or None,
            stop_token_ids=list(params.eos_token_ids) or None,
            include_stop_str_in_output=True,
            skip_special_tokens=False,
            logprobs=0 if request.return_logprobs else None,
        )

    def _save_adapters(self, module: nn.Module, version: int) -> Any:
        """Save the adapters (PEFT layout) in a folder of their own; the LoRARequest that serves them unmerged."""
        folder = os.path.join(self._adapters.name, f"v{version}")
        unwrap(module).save_pretrained(folder)  # type: ignore[operator]
        from vllm.lora.request import LoRARequest

        return LoRARequest(f"policy-v{version}", version, folder)


def _named_weights(model: nn.Module) -> Iterable[tuple[str, Tensor]]:
    for name, tensor in model.state_dict().items():
        yield name, tensor.detach()


def load_weights(llm: Any, weights: Iterable[tuple[str, Tensor]]) -> None:
    """`model.load_weights(weights)` on the in-process worker, through vLLM's `collective_rpc`.

    Raises:
        RuntimeError: a vLLM without `LLM.collective_rpc` (releases before 0.7).
    """
    if not callable(getattr(llm, "collective_rpc", None)):
        raise RuntimeError("this vLLM has no LLM.collective_rpc; the vllm engine needs vLLM >= 0.7")
    payload = list(weights)
    llm.collective_rpc(_load_on_worker, args=(payload,))


def _load_on_worker(worker: Any, weights: list[tuple[str, Tensor]]) -> None:
    worker.model_runner.model.load_weights(weights)


def _result(outputs: list[Any], request: GenerationRequest) -> GenerationResult:
    """A `GenerationResult` of vLLM's `RequestOutput`s (one per prompt, `n` completions each)."""
    tokens: list[list[int]] = []
    reasons: list[FinishReason] = []
    logprobs: list[list[float]] = []
    for output in outputs:
        for completion in output.outputs:
            ids = list(completion.token_ids)
            tokens.append(ids)
            reasons.append("stop" if completion.finish_reason == "stop" else "length")
            if request.return_logprobs:
                steps = completion.logprobs or []
                logprobs.append([float(step[token].logprob) for step, token in zip(steps, ids, strict=True)])
    result = GenerationResult(tokens, reasons, logprobs if request.return_logprobs else None)
    result.check_rows(request)
    return result
