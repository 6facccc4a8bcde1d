"""The `hf` engine's lean decode loop (`HFEngine(decode="lean")`, see `toolkit.engines.hf`): a KV cache made once per
call, one prefill per distinct prompt, HF's warpers in `generate`'s order, inverse-CDF sampling, finished rows tracked
on the device, and on a static or chunked cache the model's attention masks made once per `MASK_CHUNK` steps.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import (
    DynamicCache,
    LogitsProcessor,
    StaticCache,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.masking_utils import create_masks_for_generate

from toolkit.engines.base import FinishReason, GenerationRequest, SamplingParams

CacheKind = Literal["dynamic", "static", "chunked"]
MASK_CHUNK = 32  # decode steps whose attention masks are made in one call (static and chunked caches)


def sampling_warpers(params: SamplingParams) -> list[LogitsProcessor]:
    """HF's warpers for `params`, in `generate`'s order (temperature, top-k, top-p); none when greedy."""
    if not params.do_sample:
        return []
    warpers: list[LogitsProcessor] = []
    if params.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=params.top_p))
    return warpers


def sample_rows(scores: Tensor) -> Tensor:
    """One token per row of `scores` [n, V] (processed logits, -inf = excluded), drawn from softmax(scores).

    Inverse-CDF sampling: a uniform per row scaled to the row's total mass, the first index whose running sum
    exceeds it. The draw is kept strictly below the total, so it always lands on a token of positive probability.
    Same distribution as `torch.multinomial(softmax(scores), 1)`, one random number per row instead of V.
    """
    cdf = torch.softmax(scores, dim=-1).cumsum_(dim=-1)
    total = cdf[:, -1:]
    draw = torch.rand(total.shape, dtype=cdf.dtype, device=cdf.device).mul_(total)
    draw = torch.minimum(draw, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, draw, right=True).squeeze(1)


def new_cache(module: nn.Module, kind: CacheKind, max_len: int) -> Any:
    """An empty KV cache for `module`: grown by concatenation ("dynamic") or allocated at `max_len` ("static", and
    "chunked", which `grown_cache` later replaces by longer ones)."""
    config: Any = module.config
    if kind in ("static", "chunked"):
        return StaticCache(config=config, max_cache_len=max_len)
    return DynamicCache(config=config)


def forward_keywords(module: nn.Module) -> tuple[str, bool]:
    """The name `module.forward` takes the KV cache under (`cache` in transformers 5, else `past_key_values`) and
    whether it accepts `logits_to_keep`."""
    names = inspect.signature(module.forward).parameters
    return ("cache" if "cache" in names else "past_key_values"), "logits_to_keep" in names


def prefill(module: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, positions: Tensor, **kwargs: Any) -> Tensor:
    """Run the prompts [n, L] into the KV cache in `kwargs`; the logits [n, V] after each row's last prompt token.

    Identical rows (the G samples of a prompt) are run once and their cache entries copied to every copy
    (`Cache.reorder_cache`, beam search's row gather): G times less prefill work for a GRPO group.
    """
    keys = prompt_ids * 2 + prompt_mask.long()  # a pad id may also be a real token: rows match on ids and mask
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
    if unique.shape[0] == keys.shape[0]:
        output = module(input_ids=prompt_ids, attention_mask=prompt_mask.long(), position_ids=positions, **kwargs)
        return output.logits[:, -1]  # type: ignore[no-any-return]
    rows = torch.arange(keys.shape[0], device=keys.device)
    first = torch.full((unique.shape[0],), keys.shape[0], device=keys.device).scatter_reduce_(0, inverse, rows, "amin")
    output = module(
        input_ids=prompt_ids[first], attention_mask=prompt_mask[first].long(), position_ids=positions[first], **kwargs
    )
    kwargs[next(key for key in ("cache", "past_key_values") if key in kwargs)].reorder_cache(inverse)
    return output.logits[:, -1][inverse]  # type: ignore[no-any-return]


class StepMasks:
    """The model's own attention masks for the next `C` one-token decode steps, made in one call.

    `create_masks_for_generate` (what `generate` calls before every step on a static cache) is asked once for a
    C-token query starting at the cache's length: row i of its causal mask is exactly the mask of the one-token query
    i steps later, so step i takes a slice instead of rebuilding the padding and causal masks.
    """

    def __init__(self, masks: Mapping[str, Tensor]) -> None:
        self.masks = masks

    def at(self, row: int) -> dict[str, Tensor]:
        """The masks of the query `row` steps after the chunk's first one (each [n, 1, 1, K])."""
        return {name: mask[:, :, row : row + 1].contiguous() for name, mask in self.masks.items()}


def step_masks(module: nn.Module, mask: Tensor, positions: Tensor, cache: Any) -> StepMasks | None:
    """`StepMasks` for the next `positions.shape[1]` decode steps of `module` (`mask` [n, K]: the full padding mask
    of a static cache of K positions); None when the model's masks are not plain [n, 1, C, K] tensors per layer type
    (then each step passes the 2-D mask, as before)."""
    rows, chunk = positions.shape
    create = getattr(module, "create_masks_for_generate", create_masks_for_generate)
    dtype = next(module.parameters()).dtype
    made = create(
        config=module.config,
        inputs_embeds=torch.empty((rows, chunk, 0), dtype=dtype, device=mask.device),
        attention_mask=mask,
        cache=cache,
        position_ids=positions,
    )
    expected = (rows, 1, chunk, mask.shape[1])
    if not isinstance(made, dict) or not made:
        return None
    if not all(isinstance(value, Tensor) and tuple(value.shape) == expected for value in made.values()):
        return None
    return StepMasks(made)


def grown_cache(module: nn.Module, cache: Any, filled: int, capacity: int) -> StaticCache:
    """A static cache of `capacity` positions holding the first `filled` positions of `cache` (a static one)."""
    config: Any = module.config
    grown = StaticCache(config=config, max_cache_len=capacity)
    for index, layer in enumerate(cache.layers):
        grown.update(layer.keys[:, :, :filled], layer.values[:, :, :filled], index)
    return grown


def room_for_chunk(module: nn.Module, cache: Any, width: int, step: int, budget: int) -> tuple[Any, int]:
    """(cache, its capacity) with room for the `MASK_CHUNK` steps from `step` on: `cache` itself, or a copy with the
    generated part doubled (at least that room, at most the budget), so there are O(log budget) copies."""
    capacity = cache.layers[0].max_cache_len
    if min(step - 1 + MASK_CHUNK, budget) <= capacity - width:
        return cache, capacity
    room = min(budget, max(step - 1 + MASK_CHUNK, 2 * (capacity - width)))
    return grown_cache(module, cache, width + step - 1, width + room), width + room


def lean_decode(
    module: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    eos: Tensor,
    pad: int,
    request: GenerationRequest,
    cache: CacheKind = "static",
    stop_check_every: int = 1,
) -> tuple[list[list[int]], list[FinishReason], list[list[float]]]:
    """Decode left-padded prompts [n, L] token by token: (tokens, finish reasons, log-probs) of each row.

    Positions and the attention mask follow `generate` (pads attend to nothing and sit at position 0; token s of a
    row with m real prompt tokens is at position m + s). Finished rows keep decoding pad tokens until every row has
    ended or the budget is spent; their outputs are cut at the end token, as `generate`'s are. Runs under
    `torch.inference_mode` (nothing it makes is kept but Python lists) except in a distributed job, where FSDP or
    DeepSpeed hooks may keep tensors made during the forward, and only `no_grad` (the caller's) applies.
    """
    params = request.params
    rows, width = prompt_ids.shape
    budget = params.max_new_tokens
    device = prompt_ids.device
    cache_key, keeps_logits = forward_keywords(module)
    capacity = width + (min(budget, MASK_CHUNK) if cache == "chunked" else budget)
    kwargs: dict[str, Any] = {"use_cache": True, cache_key: new_cache(module, cache, capacity)}
    if keeps_logits:
        kwargs["logits_to_keep"] = 1
    mask = torch.cat([prompt_mask.long(), torch.ones(rows, budget, dtype=torch.long, device=device)], dim=1)
    prompt_positions = (prompt_mask.long().cumsum(-1) - 1).clamp_(min=0)
    positions = prompt_positions[:, -1:] + torch.arange(1, budget + 1, device=device)  # [n, budget]
    warpers = sampling_warpers(params)
    temperature = params.temperature if params.do_sample else 1.0
    tokens = torch.full((rows, budget), pad, dtype=torch.long, device=device)
    values = torch.zeros(rows, budget, dtype=torch.float32, device=device)
    ends = torch.full((rows,), -1, dtype=torch.long, device=device)
    pad_token = torch.tensor(pad, dtype=torch.long, device=device)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    masks: StepMasks | None = None
    with torch.inference_mode(not distributed):
        logits = prefill(module, prompt_ids, prompt_mask, prompt_positions, **kwargs)
        for step in range(budget):
            if step > 0:
                token_input, position = tokens[:, step - 1 : step], positions[:, step - 1 : step]
                if cache != "dynamic" and (step - 1) % MASK_CHUNK == 0:
                    if cache == "chunked":
                        kwargs[cache_key], capacity = room_for_chunk(module, kwargs[cache_key], width, step, budget)
                    chunk_positions = positions[:, step - 1 :][:, :MASK_CHUNK]
                    masks = step_masks(module, mask[:, :capacity], chunk_positions, kwargs[cache_key])
                output = module(
                    input_ids=token_input,
                    attention_mask=mask[:, : width + step] if masks is None else masks.at((step - 1) % MASK_CHUNK),
                    position_ids=position,
                    **kwargs,
                )
                logits = output.logits[:, -1]
            logits = logits.float()
            scores = logits
            for warper in warpers:
                scores = warper(prompt_ids, scores)
            token = sample_rows(scores) if params.do_sample else scores.argmax(dim=-1)
            if request.return_logprobs:
                values[:, step] = torch.log_softmax(logits / temperature, dim=-1).gather(1, token[:, None]).squeeze(1)
            running = ends < 0
            tokens[:, step] = torch.where(running, token, pad_token)
            if eos.numel():
                ends.masked_fill_(running & torch.isin(token, eos), step)
                if (step + 1) % stop_check_every == 0 and bool((ends >= 0).all()):
                    break
    ends_list = ends.tolist()
    lengths = [end + 1 if end >= 0 else budget for end in ends_list]
    reasons: list[FinishReason] = ["stop" if end >= 0 else "length" for end in ends_list]
    token_ids = [ids[:n] for ids, n in zip(tokens.tolist(), lengths, strict=True)]
    logprobs: list[list[float]] = []
    if request.return_logprobs:
        logprobs = [row[:n] for row, n in zip(values.tolist(), lengths, strict=True)]
    return token_ids, reasons, logprobs
