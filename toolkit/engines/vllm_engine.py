"""The `vllm` rollout engine: a colocated `vllm.LLM` in the trainer's process (GPU only, import-guarded).

The engine core runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, as TRL's colocate mode), so the weight sync
calls the worker's `model.load_weights` through `LLM.collective_rpc` without pickling a tensor. With
`enable_sleep` the engine sleeps between generations (KV cache freed, weights offloaded) and wakes before the
next one, leaving the GPU to the update. Full fine-tuning pushes the whole state dict after every optimizer step;
LoRA saves the adapters to a folder and serves them unmerged through a new `LoRARequest` per version.
Simplified: one engine per process (no tensor parallelism across trainer ranks). Untested in CI (no GPU there).

Multimodal requests (Qwen2-VL / Qwen2.5-VL video) go in as vLLM `multi_modal_data` of precomputed embeddings:
{"video": {"video_embeds", "video_grid_thw", "second_per_grid_ts"}}, one entry per prompt (its G samples share
it). Embeddings rather than frames because the sampler holds sized, normalised patches, not frames: vLLM's own
processor would size and normalise frames again (by its own rules, maybe to another placeholder count than the
prompt ids carry), whereas the trainer's vision tower turns the patches into exactly the embeddings its own forward
uses, once per distinct video, and vLLM then runs only the language model (vLLM >= 0.11.1 takes embeddings only
with `enable_mm_embeds=True`). Suppressed tokens get a -inf logit bias (before temperature and top-k/p, as HF).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from toolkit.distributed import unwrap
from toolkit.engines.base import FinishReason, GenerationRequest, GenerationResult, require_portable, weights_key
from toolkit.hf.policy import unwrap_model
from toolkit.interfaces import Policy

VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
POSITION_KEYS = ("mm_token_type_ids",)  # vLLM derives the mRoPE positions from the ids and the grid itself


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
        enable_mm_embeds: let vLLM take precomputed multimodal embeddings, as video prompts arrive (vLLM >= 0.11.1
            refuses them without it; older releases have no such option and take them: leave it False there).
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
        enable_mm_embeds: bool = False,
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
        if enable_mm_embeds:
            self.options["enable_mm_embeds"] = True
        self.max_lora_rank = max_lora_rank
        self.llm: Any = None
        self._synced: tuple[int, int] | None = None
        self._lora: Any = None
        self._adapters = tempfile.TemporaryDirectory(prefix="renorm-vllm-lora-")
        self.num_syncs = 0

    def generate(self, policy: Policy, request: GenerationRequest) -> GenerationResult:
        """vLLM's completions of `request` (prompt-major, `n` per prompt), after syncing the policy's weights.

        Raises:
            NotImplementedError: a multimodal request without its serialisable `multimodal` form.
            ValueError: multimodal inputs other than a Qwen-VL video's.
        """
        require_portable(request, "vllm")
        prompts = self.prompts(policy, request)
        llm = self._engine(policy)
        if self.options["enable_sleep_mode"]:
            llm.wake_up()
        try:
            self.sync_weights(policy)
            outputs = llm.generate(
                prompts,
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

    def prompts(self, policy: Policy, request: GenerationRequest) -> list[Any]:
        """vLLM `TokensPrompt`s of the request's prompts, each with its video as `multi_modal_data` (if any)."""
        if request.multimodal is None:
            return [self._vllm.inputs.TokensPrompt(prompt_token_ids=list(ids)) for ids in request.prompt_ids]
        videos = video_data(policy, request.multimodal.prompts)
        return [
            self._vllm.inputs.TokensPrompt(prompt_token_ids=list(ids), multi_modal_data={"video": video})
            for ids, video in zip(request.prompt_ids, videos, strict=True)
        ]

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
            ignore_eos=True,  # stop at exactly the sampler's EOS ids (as `hf` and `server`), not the model's own too
            include_stop_str_in_output=True,
            skip_special_tokens=False,
            logprobs=0 if request.return_logprobs else None,
            logit_bias={int(t): float("-inf") for t in params.suppress_token_ids} or None,
        )

    def _save_adapters(self, module: nn.Module, version: int) -> Any:
        """Save the adapters (PEFT layout) in a folder of their own; the LoRARequest that serves them unmerged."""
        folder = os.path.join(self._adapters.name, f"v{version}")
        unwrap(module).save_pretrained(folder)  # type: ignore[operator]
        from vllm.lora.request import LoRARequest

        return LoRARequest(f"policy-v{version}", version, folder)


def video_data(policy: Policy, prompts: Iterable[Mapping[str, Tensor]]) -> list[dict[str, Tensor]]:
    """Each prompt's vLLM video entry: the trainer's vision-tower embeddings of its patches (each distinct video
    encoded once, no grad, under the policy's autocast), its grid and its seconds per grid step.

    Raises:
        ValueError: a prompt with inputs other than a Qwen-VL video's, or a model without `get_video_features`.
    """
    model: Any = unwrap_model(unwrap(policy.module))
    if not callable(getattr(model, "get_video_features", None)):
        raise ValueError(f"{type(model).__name__} has no get_video_features: the vllm engine takes Qwen-VL video only")
    device = next(model.parameters()).device
    autocast = getattr(policy, "autocast_context", None)
    encoded: dict[int, Tensor] = {}
    entries = []
    for index, inputs in enumerate(prompts):
        unknown = sorted(set(inputs) - set(VIDEO_KEYS) - set(POSITION_KEYS))
        if unknown or "pixel_values_videos" not in inputs or "video_grid_thw" not in inputs:
            raise ValueError(
                f"prompt {index} has inputs {sorted(inputs)}; the vllm engine takes {list(VIDEO_KEYS)} (+ token types)"
            )
        pixels, grid = inputs["pixel_values_videos"], inputs["video_grid_thw"]
        if id(pixels) not in encoded:
            context = autocast() if callable(autocast) else contextlib.nullcontext()
            with torch.no_grad(), context:
                out = model.get_video_features(pixels.to(device), grid.to(device), return_dict=True)
            encoded[id(pixels)] = torch.cat(list(out.pooler_output)).cpu()  # vLLM hashes and moves it itself
        entry = {"video_embeds": encoded[id(pixels)], "video_grid_thw": grid}
        if "second_per_grid_ts" in inputs:
            entry["second_per_grid_ts"] = inputs["second_per_grid_ts"]
        entries.append(entry)
    return entries


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
