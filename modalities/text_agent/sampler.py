"""Single-turn text sampler: G samples per prompt from a rollout engine (`toolkit.engines`: `hf` = batched HF
`generate`, the default; `server`; `vllm`).

old_logprobs are not the engine's: after generation the rollout is re-scored with one extra no-grad forward
through `policy.log_probs` (as TRL does), so the on-policy ratio is exactly 1 by construction whatever the engine.
They are log-probs of the temperature-scaled full distribution (as in TRL and verl); top-p/top-k only restrict
which token is drawn. The engine's own log-probs are kept (`data["engine_logprobs"]`) and their mean |Δ| to the
re-scored ones logged (the train/inference mismatch).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from toolkit.distributed import unwrap
from toolkit.engines import (
    EngineName,
    GenerationRequest,
    GenerationResult,
    HFEngine,
    SamplingParams,
    ServerEngine,
    build_engine,
)
from toolkit.engines.base import record_engine_logprobs
from toolkit.engines.hf import model_eos_ids
from toolkit.engines.vllm_engine import VLLMEngine
from toolkit.hf.generation import check_sampler_options, left_pad
from toolkit.interfaces import Policy
from toolkit.rollout import Rollout

PromptTruncation = Literal["error", "left"]


class SingleTurnSampler:
    """Samples G completions per prompt with the policy's causal LM.

    Prompts are dicts with "prompt" (a string, or chat messages [{"role", "content"}]) and optional
    "id", "dataset", "task", "answer", ... (kept in `rollout.prompts`); a bare string is accepted as
    {"prompt": s}. Chat messages always go through the tokenizer's chat template (then no extra
    special tokens are added); strings only when `chat_template` is True.

    Sampling is reproducible from `generator`: one seed is drawn from it and handed to the engine (the `hf`
    engine runs `torch.manual_seed(seed)` inside `torch.random.fork_rng`), so the same generator state gives
    the same rollout and the global RNG state is restored afterwards.

    Args:
        max_new_tokens: generation budget per completion.
        temperature, top_p, top_k: None inherits the policy's values. top_k 0 = off.
        do_sample: False = greedy (evaluation).
        chat_template: apply the chat template to string prompts too (as one user message).
        stop_strings: strings that end a completion (the token completing one is kept, trained on).
        eos_token_ids: ids that end a completion; None = the tokenizer's eos plus the model's
            `generation_config.eos_token_id`. The rest of the checkpoint's generation_config
            (repetition penalty, its own temperature, ...) is ignored: it would make the sampled
            distribution differ from the one the policy scores.
        max_prompt_length: longest prompt in tokens; None = no limit.
        prompt_truncation: what a longer prompt does: "error" (ValueError) or "left" (keep the last
            `max_prompt_length` tokens, dropping the start).
        generation_batch_size: rows per `generate` call of the `hf` engine (None = all N rows at once).
        compute_old_logprobs: re-score the rollout for old_logprobs (one extra forward); False
            leaves zeros (evaluation only: such a rollout must not be trained on).
        engine: what generates: "hf" (HF `generate` on the policy's module), "server" (`ServerEngine()`:
            `renorm serve-policy` on 127.0.0.1:8001, weights pushed after every update), "vllm" (colocated,
            GPU), or an engine node (`toolkit.engines.ServerEngine`, `VLLMEngine`, `HFEngine`) with its options;
            in Python any object with `generate(policy, request)` (a `toolkit.engines.RolloutEngine`).
        engine_logprobs: ask the engine for its log-probs of the sampled tokens, keep them as
            `data["engine_logprobs"]` [N, T] and log their mismatch with the re-scored old_logprobs
            (`rollout/engine_logprob_abs_diff_mean`, `_max`; not when the trainer defers old_logprobs).

    Attribute `defer_old_logprobs` (set by the Trainer, not a config key): True skips the re-scoring forward
    and leaves zeros because the trainer's update is on-policy and takes old_logprobs from its own first forward.
    """

    def __init__(
        self,
        max_new_tokens: int = 128,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        do_sample: bool = True,
        chat_template: bool = False,
        stop_strings: Sequence[str] = (),
        eos_token_ids: Sequence[int] | None = None,
        max_prompt_length: int | None = None,
        prompt_truncation: PromptTruncation = "error",
        generation_batch_size: int | None = None,
        compute_old_logprobs: bool = True,
        engine: EngineName | HFEngine | ServerEngine | VLLMEngine = "hf",
        engine_logprobs: bool = True,
    ) -> None:
        check_sampler_options(max_new_tokens, temperature, top_p, top_k, generation_batch_size)
        if prompt_truncation not in get_args(PromptTruncation):
            raise ValueError(
                f"prompt_truncation={prompt_truncation!r} is not one of {list(get_args(PromptTruncation))}"
            )
        if max_prompt_length is not None and max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1 or None, got {max_prompt_length}")
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.do_sample = do_sample
        self.chat_template = chat_template
        self.stop_strings = list(stop_strings)
        self.eos_token_ids = None if eos_token_ids is None else [int(i) for i in eos_token_ids]
        self.max_prompt_length = max_prompt_length
        self.prompt_truncation = prompt_truncation
        self.compute_old_logprobs = compute_old_logprobs
        self.engine = build_engine(engine, generation_batch_size)
        self.engine_logprobs = engine_logprobs
        self.defer_old_logprobs = False

    def sample(self, policy: Policy, prompts: list[Any], group_size: int, generator: torch.Generator) -> Rollout:
        """G samples per prompt, group-major (`group_ids[i] = i // G`), re-scored for old_logprobs."""
        tokenizer, temperature, dicts, encoded, seed = self._prepare(policy, prompts, group_size, generator)
        module = policy.module
        was_training = module.training
        module.eval()  # dropout off while sampling and re-scoring
        try:
            start = time.perf_counter()
            params = self._sampling_params(policy, tokenizer, unwrap(module), temperature)
            request = GenerationRequest(encoded, params, group_size, seed, self.engine_logprobs)
            result = self.engine.generate(policy, request)
            result.check_rows(request)
            rollout = self._build_rollout(
                dicts, group_size, tokenizer, self._sequences(policy, request, result), temperature
            )
            rollout.metrics["time/generate_s"] = time.perf_counter() - start
            rollout.metrics.update(result.metrics)
            self._rescore(policy, rollout)
            self._record_engine_logprobs(rollout, result)
        finally:
            module.train(was_training)
        return rollout

    def _sampling_params(self, policy: Policy, tokenizer: Any, model: nn.Module, temperature: float) -> SamplingParams:
        """This sampler's settings as engine `SamplingParams`, falling back to the policy's."""
        eos = self._eos_ids(tokenizer, model)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else None)
        if pad is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with")
        top_p = self.top_p if self.top_p is not None else float(getattr(policy, "top_p", 1.0))
        top_k = self.top_k if self.top_k is not None else (getattr(policy, "top_k", None) or 0)
        return SamplingParams(
            self.max_new_tokens, temperature, top_p, top_k, self.do_sample, tuple(eos), tuple(self.stop_strings), pad
        )

    def _sequences(
        self, policy: Policy, request: GenerationRequest, result: GenerationResult
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Left-padded prompts [N, L] (+ bool mask), right-padded responses [N, T], lengths [N] and finished [N]."""
        device = next(unwrap(policy.module).parameters()).device
        pad = request.params.pad_token_id
        assert pad is not None  # set by _sampling_params
        prompt_ids, prompt_mask = left_pad(request.rows(), pad, device)
        response_ids = result.padded_tokens(pad)
        lengths = torch.tensor([len(ids) for ids in result.token_ids], dtype=torch.long, device=device)
        finished = torch.tensor([reason == "stop" for reason in result.finish_reasons], device=device)
        return prompt_ids, prompt_mask, response_ids.to(device), lengths, finished

    def _record_engine_logprobs(self, rollout: Rollout, result: GenerationResult) -> None:
        """Keep the engine's log-probs [N, T] and log their mean/max |Δ| to the re-scored old_logprobs (when there
        are re-scored ones to compare with)."""
        record_engine_logprobs(rollout, result, compare=self.compute_old_logprobs and not self.defer_old_logprobs)

    def _rescore(self, policy: Policy, rollout: Rollout) -> None:
        """old_logprobs from one no-grad forward of the policy itself: the on-policy ratio is exactly 1.

        Skipped (zeros) when `defer_old_logprobs`: the trainer then uses its first training forward's, detached.
        """
        if not self.compute_old_logprobs:
            return
        if self.defer_old_logprobs:
            rollout.metrics["time/old_logprobs_s"] = 0.0
            return
        start = time.perf_counter()
        with torch.no_grad():
            rollout.old_logprobs = policy.log_probs(rollout).detach()
        rollout.metrics["time/old_logprobs_s"] = time.perf_counter() - start

    def _prepare(
        self, policy: Policy, prompts: list[Any], group_size: int, generator: torch.Generator
    ) -> tuple[Any, float, list[dict[str, Any]], list[list[int]], int]:
        """Validate, then (tokenizer, temperature, prompt dicts, encoded prompts, generation seed)."""
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if not prompts:
            raise ValueError("sample needs at least one prompt")
        tokenizer = getattr(policy, "tokenizer", None)
        if tokenizer is None:
            name = type(self).__name__
            raise ValueError(f"{name} needs a policy with a tokenizer (CausalLMPolicy(tokenizer=...))")
        temperature = self._sampling_temperature(policy)
        dicts = [_as_prompt_dict(p) for p in prompts]
        encoded = [self._encode(tokenizer, d) for d in dicts]
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
        return tokenizer, temperature, dicts, encoded, seed

    def _sampling_temperature(self, policy: Policy) -> float:
        policy_temperature = float(getattr(policy, "temperature", 1.0))
        temperature = policy_temperature if self.temperature is None else float(self.temperature)
        if self.compute_old_logprobs and temperature != policy_temperature:
            raise ValueError(
                f"sampler temperature {temperature} differs from the policy's {policy_temperature}: the "
                "re-scored old_logprobs would not be the sampling distribution's. Set the policy's "
                "temperature, or compute_old_logprobs=False for evaluation"
            )
        return temperature

    def _encode(self, tokenizer: Any, prompt: dict[str, Any]) -> list[int]:
        content = prompt["prompt"]
        if isinstance(content, str) and not self.chat_template:
            ids = list(tokenizer(content, add_special_tokens=True)["input_ids"])
        else:
            messages = [{"role": "user", "content": content}] if isinstance(content, str) else list(content)
            if getattr(tokenizer, "chat_template", None) is None:
                raise ValueError("chat prompts need a tokenizer with a chat_template")
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError(f"prompt {prompt.get('id', content)!r} encodes to no tokens")
        limit = self.max_prompt_length
        if limit is not None and len(ids) > limit:
            if self.prompt_truncation == "error":
                raise ValueError(
                    f"prompt {prompt.get('id', '')!r} has {len(ids)} tokens > max_prompt_length={limit} "
                    "(set prompt_truncation='left' to keep its last tokens)"
                )
            ids = ids[-limit:]
        return ids

    def _build_rollout(
        self,
        dicts: list[dict[str, Any]],
        group_size: int,
        tokenizer: Any,
        sequences: tuple[Tensor, Tensor, Tensor, Tensor, Tensor],
        temperature: float,
    ) -> Rollout:
        prompt_ids, prompt_mask, response_ids, lengths, finished = sequences
        rows = [d for d in dicts for _ in range(group_size)]
        device = response_ids.device
        response_mask = torch.arange(response_ids.shape[1], device=device)[None, :] < lengths[:, None]
        completions = tokenizer.batch_decode(
            [ids[:n] for ids, n in zip(response_ids.tolist(), lengths.tolist(), strict=True)], skip_special_tokens=True
        )
        return Rollout(
            group_ids=torch.arange(len(rows), device=device) // group_size,
            old_logprobs=torch.zeros(response_ids.shape, dtype=torch.float32, device=device),
            mask=response_mask.clone(),
            lengths=lengths,
            truncated=~finished,
            prompts=rows,
            completions=completions,
            dataset_ids=_row_labels(dicts, group_size, "dataset"),
            task_ids=_row_labels(dicts, group_size, "task"),
            prompt_keys=[_prompt_key(d) for d in rows],
            data={
                "prompt_ids": prompt_ids,
                "prompt_attention_mask": prompt_mask,
                "response_ids": response_ids,
                "response_attention_mask": response_mask,
                "temperature": temperature,
            },
            metrics={
                "rollout/length_mean": float(lengths.float().mean()),
                "rollout/length_max": float(lengths.max()),
                "rollout/truncated_frac": float((~finished).float().mean()),
                "rollout/prompt_length_mean": float(prompt_mask.sum(1).float().mean()),
            },
        )

    def _eos_ids(self, tokenizer: Any, module: nn.Module) -> list[int]:
        return model_eos_ids(tokenizer, module) if self.eos_token_ids is None else list(self.eos_token_ids)


def _as_prompt_dict(prompt: Any) -> dict[str, Any]:
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, dict) and "prompt" in prompt:
        return prompt
    raise ValueError(
        f"a prompt must be a string or a dict with a 'prompt' key, got {type(prompt).__name__}: {prompt!r:.80}"
    )


def _row_labels(dicts: list[dict[str, Any]], group_size: int, key: str) -> list[str] | None:
    """Per-row `key` values as strings ("default" where a prompt lacks it); None when no prompt has it."""
    if not any(key in d for d in dicts):
        return None
    return [str(d.get(key, "default")) for d in dicts for _ in range(group_size)]


def _prompt_key(prompt: dict[str, Any]) -> str:
    """The prompt's "id" if it has one, else its text (chat messages as sorted JSON)."""
    if "id" in prompt:
        return str(prompt["id"])
    content = prompt["prompt"]
    return content if isinstance(content, str) else json.dumps(content, sort_keys=True)
