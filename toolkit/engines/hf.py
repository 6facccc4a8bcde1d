"""The `hf` rollout engine: Hugging Face `generate` on the policy's own module (KV cache, left padding).

The CPU default and the reference the other engines are tested against. Sampling is seeded with
`torch.manual_seed(request.seed)` inside `torch.random.fork_rng` (HF `generate` draws from the global RNG), so a
request gives the same tokens every time and the global RNG is left alone. The checkpoint's own
generation_config (repetition penalty, its temperature, ...) is ignored: it would move the sampled
distribution away from the one the policy scores.

`HFEngine(decode="lean")` replaces `generate` with a short decode loop for small models, where `generate`'s
per-token bookkeeping and `torch.multinomial` (one exponential draw per vocabulary entry) outweigh the model: a KV
cache made once per call, finished rows tracked on the device (an "all finished?" host check every
`stop_check_every` tokens), HF's own temperature / top-k / top-p warpers in `generate`'s order, and inverse-CDF
sampling (one uniform per row against the cumulative softmax). On a static or chunked cache the model's attention
masks are made once per `MASK_CHUNK` steps with transformers' `create_masks_for_generate`, not every token. Greedy
decoding is token-identical to `generate`; sampling draws from the same distribution but not the same tokens for
a seed. Stop strings, suppressed tokens and multimodal requests (`GenerationRequest.model_inputs`, forwarded to
the model per batch of rows) fall back to `generate`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
)

from toolkit.distributed import unwrap
from toolkit.engines.base import FinishReason, GenerationRequest, GenerationResult, SamplingParams, cut_at_ends
from toolkit.engines.lean import CacheKind, lean_decode
from toolkit.hf.generation import left_pad, plain_generation_config, rng_devices, row_slices
from toolkit.hf.policy import check_choice, unwrap_model
from toolkit.interfaces import Policy


class EndTracker(StoppingCriteria):
    """Stops a row at an EOS id or a stop string and records the step where each row ended (-1: never).

    Being the criterion that decides, it knows exactly which rows `generate` finished and when;
    inferring that afterwards from pad tokens would be ambiguous when the model emits pad itself.
    """

    def __init__(self, prompt_width: int, eos_ids: Tensor, stop: StopStringCriteria | None, num_rows: int) -> None:
        self.prompt_width = prompt_width
        self.eos_ids = eos_ids
        self.stop = stop
        self.ends = torch.full((num_rows,), -1, dtype=torch.long, device=eos_ids.device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        done = torch.isin(input_ids[:, -1], self.eos_ids)
        if self.stop is not None:
            done = done | self.stop(input_ids, scores).to(done.device)
        newly = done & (self.ends < 0)
        self.ends[newly] = input_ids.shape[1] - self.prompt_width - 1
        return done  # type: ignore[return-value]


class TokenLogprobRecorder(LogitsProcessor, StoppingCriteria):
    """Records the log-prob of each sampled token under the temperature-scaled full distribution, in fp32.

    As a logits processor (custom processors run before HF's temperature/top-k/top-p warpers) it keeps the
    current step's log-softmax; as a stopping criterion, called once the token is appended, it reads the
    sampled token's entry and never stops a row. One [n, V] step is held at a time.
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self._step: Tensor | None = None
        self.values: list[Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> Any:  # no **kwargs: HF checks
        if self._step is None:  # the logits-processor call: scores are this step's raw logits
            self._step = torch.log_softmax(scores.float() / self.temperature, dim=-1)
            return scores
        self.values.append(self._step.gather(1, input_ids[:, -1:]).squeeze(1))
        self._step = None
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


DecodeMode = Literal["generate", "lean"]


def generation_config(params: SamplingParams, pad: int) -> GenerationConfig:
    """The HF GenerationConfig of `params` (only what is set here: no checkpoint defaults)."""
    sampling: dict[str, Any] = {}
    if params.do_sample:
        sampling = {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k}
    return GenerationConfig(  # type: ignore[no-untyped-call]
        suppress_tokens=list(params.suppress_token_ids) or None,
        do_sample=params.do_sample,
        max_new_tokens=params.max_new_tokens,
        eos_token_id=list(params.eos_token_ids) or None,
        pad_token_id=pad,
        use_cache=True,
        **sampling,
    )


def model_eos_ids(tokenizer: Any, module: nn.Module) -> list[int]:
    """The tokenizer's EOS id then the model's `generation_config.eos_token_id` (an int or a list), without repeats."""
    model_eos = getattr(getattr(unwrap_model(module), "generation_config", None), "eos_token_id", None)
    ids: list[int] = []
    for value in (tokenizer.eos_token_id, model_eos):
        for token in [value] if isinstance(value, int) else list(value or []):
            if int(token) not in ids:
                ids.append(int(token))
    return ids


def pad_id(params: SamplingParams, tokenizer: Any) -> int:
    """The pad id of `params`, else the tokenizer's, else the first EOS id."""
    if params.pad_token_id is not None:
        return params.pad_token_id
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if params.eos_token_ids:
        return params.eos_token_ids[0]
    raise ValueError("no pad id: set SamplingParams.pad_token_id, a tokenizer pad token or an eos token")


def stop_criterion(params: SamplingParams, tokenizer: Any) -> StopStringCriteria | None:
    """HF's criterion for `params.stop_strings` (None without any); it needs the policy's tokenizer."""
    if not params.stop_strings:
        return None
    if tokenizer is None:
        raise ValueError("stop_strings need a policy with a tokenizer")
    return StopStringCriteria(tokenizer=tokenizer, stop_strings=list(params.stop_strings))


class HFEngine:
    """Generates on the policy's (unwrapped) module, `generation_batch_size` rows per call.

    Args:
        generation_batch_size: rows per `generate` call (None = all rows at once).
        decode: "generate" (HF `generate`, the reference) or "lean" (the loop in this module: same greedy tokens,
            same sampling distribution, other draws; requests with stop strings still go through `generate`).
        cache: the lean loop's KV cache: "chunked" (static blocks: room for `MASK_CHUNK` more tokens at a time,
            doubled when full, so attention spans about the tokens so far), "static" (allocated once at prompt width
            + max_new_tokens: every step attends over all of it) or "dynamic" (grown by concatenation every token).
        stop_check_every: the lean loop asks whether every row has ended once per this many tokens; None = every
            token on CPU (the check is free there), every 8 on accelerators (each check is a host sync; up to 7
            steps are wasted after the last row ends).
    """

    def __init__(
        self,
        generation_batch_size: int | None = None,
        decode: DecodeMode = "generate",
        cache: CacheKind = "chunked",
        stop_check_every: int | None = None,
    ) -> None:
        if generation_batch_size is not None and generation_batch_size < 1:
            raise ValueError(f"generation_batch_size must be >= 1 or None, got {generation_batch_size}")
        check_choice("decode", decode, DecodeMode)
        check_choice("cache", cache, CacheKind)
        if stop_check_every is not None and stop_check_every < 1:
            raise ValueError(f"stop_check_every must be >= 1 or None, got {stop_check_every}")
        self.generation_batch_size = generation_batch_size
        self.decode = decode
        self.cache = cache
        self.stop_check_every = stop_check_every

    def generate(self, policy: Policy, request: GenerationRequest) -> GenerationResult:
        """Sample every row of `request` (prompt-major); the policy's module must be in eval mode for no dropout."""
        module = unwrap(policy.module)  # generate() lives on the bare model, not on its DDP wrapper
        device = next(module.parameters()).device
        params = request.params
        tokenizer = getattr(policy, "tokenizer", None)
        pad = pad_id(params, tokenizer)
        stop = stop_criterion(params, tokenizer)
        rows = request.rows()
        prompt_ids, prompt_mask = left_pad(rows, pad, device)
        eos = torch.tensor(list(params.eos_token_ids), dtype=torch.long, device=device)
        config = generation_config(params, pad)
        autocast = getattr(policy, "autocast_context", contextlib.nullcontext)
        lean = self._lean_applies(module, request, stop)
        check_every = self.stop_check_every or (1 if device.type == "cpu" else 8)
        tokens: list[list[int]] = []
        reasons: list[FinishReason] = []
        logprobs: list[list[float]] = []
        with (
            torch.random.fork_rng(devices=rng_devices(device)),
            torch.no_grad(),
            autocast(),
            plain_generation_config(module),
        ):
            torch.manual_seed(request.seed)
            for part in row_slices(len(rows), self.generation_batch_size or len(rows)):
                ids, mask = prompt_ids[part], prompt_mask[part]
                if lean:
                    out = lean_decode(module, ids, mask, eos, pad, request, self.cache, check_every)
                else:
                    extra = {} if request.model_inputs is None else dict(request.model_inputs(part, ids))
                    out = self._generate_part(module, config, ids, mask, eos, stop, request, extra)
                tokens += out[0]
                reasons += out[1]
                logprobs += out[2]
        return GenerationResult(tokens, reasons, logprobs if request.return_logprobs else None)

    def _lean_applies(self, module: nn.Module, request: GenerationRequest, stop: StopStringCriteria | None) -> bool:
        """Whether `request` runs the lean loop: asked for, and nothing only `generate` handles (see the module)."""
        return (
            self.decode == "lean"
            and stop is None
            and request.model_inputs is None
            and not request.params.suppress_token_ids
            and not module.config.is_encoder_decoder  # type: ignore[union-attr]
        )

    @staticmethod
    def _generate_part(
        module: nn.Module,
        config: GenerationConfig,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        eos: Tensor,
        stop: StopStringCriteria | None,
        request: GenerationRequest,
        model_inputs: dict[str, Any],
    ) -> tuple[list[list[int]], list[FinishReason], list[list[float]]]:
        """One `generate` call with the rows' extra `model_inputs`: (tokens, finish reasons, log-probs) of its rows."""
        tracker = EndTracker(prompt_ids.shape[1], eos, stop, prompt_ids.shape[0])
        criteria: list[StoppingCriteria] = [tracker]
        processors = LogitsProcessorList()
        recorder = None
        if request.return_logprobs:
            recorder = TokenLogprobRecorder(request.params.temperature if request.params.do_sample else 1.0)
            processors.append(recorder)
            criteria.append(recorder)
        output = module.generate(  # type: ignore[operator]
            input_ids=prompt_ids,
            attention_mask=prompt_mask.long(),
            generation_config=config,
            logits_processor=processors,
            stopping_criteria=StoppingCriteriaList(criteria),
            **model_inputs,
        )
        response = output[:, prompt_ids.shape[1] :].tolist()
        values = None if recorder is None else torch.stack(recorder.values, dim=1).tolist()
        # A row that never stopped ran the whole budget (its batch kept generating until max_new_tokens).
        return cut_at_ends(response, values, tracker.ends.tolist(), request.params.max_new_tokens)
