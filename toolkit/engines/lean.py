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

from toolkit.engines.base import FinishReason, GenerationRequest, SamplingParams, cut_at_ends

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


class StepForward:
    """The decode forwards of left-padded prompts (`prompt_mask` [n, width]) for `budget` tokens: the KV cache (in
    `kwargs`, under the name `module.forward` takes it), the positions and the 2-D padding mask [n, width + budget] of
    `generate`, and on a static or chunked cache the step masks made once per `MASK_CHUNK` steps (the chunked cache
    first growing when the chunk would not fit)."""

    def __init__(self, module: nn.Module, cache: CacheKind, prompt_mask: Tensor, budget: int) -> None:
        rows, self.width = prompt_mask.shape
        self.module, self.cache = module, cache
        self.cache_key, keeps_logits = forward_keywords(module)
        self.capacity = self.width + (min(budget, MASK_CHUNK) if cache == "chunked" else budget)
        self.kwargs: dict[str, Any] = {"use_cache": True, self.cache_key: new_cache(module, cache, self.capacity)}
        if keeps_logits:
            self.kwargs["logits_to_keep"] = 1
        ones = torch.ones(rows, budget, dtype=torch.long, device=prompt_mask.device)
        self.mask = torch.cat([prompt_mask.long(), ones], dim=1)
        self.prompt_positions = (prompt_mask.long().cumsum(-1) - 1).clamp_(min=0)
        self.positions = self.prompt_positions[:, -1:] + torch.arange(1, budget + 1, device=prompt_mask.device)
        self.masks: StepMasks | None = None

    def prefill(self, prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
        """The logits [n, V] after each row's last prompt token (`prefill` into this decode's cache)."""
        return prefill(self.module, prompt_ids, prompt_mask, self.prompt_positions, **self.kwargs)

    def __call__(self, tokens: Tensor, step: int) -> Tensor:
        """The logits [n, V] after feeding `tokens[:, step - 1]` [n, budget] (step >= 1)."""
        if self.cache != "dynamic" and (step - 1) % MASK_CHUNK == 0:
            if self.cache == "chunked":
                budget = self.positions.shape[1]
                grown = room_for_chunk(self.module, self.kwargs[self.cache_key], self.width, step, budget)
                self.kwargs[self.cache_key], self.capacity = grown
            chunk_positions = self.positions[:, step - 1 :][:, :MASK_CHUNK]
            cache = self.kwargs[self.cache_key]
            self.masks = step_masks(self.module, self.mask[:, : self.capacity], chunk_positions, cache)
        masks = self.mask[:, : self.width + step] if self.masks is None else self.masks.at((step - 1) % MASK_CHUNK)
        output = self.module(
            input_ids=tokens[:, step - 1 : step],
            attention_mask=masks,
            position_ids=self.positions[:, step - 1 : step],
            **self.kwargs,
        )
        return output.logits[:, -1]  # type: ignore[no-any-return]


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
    rows = prompt_ids.shape[0]
    budget = params.max_new_tokens
    device = prompt_ids.device
    forward = StepForward(module, cache, prompt_mask, budget)
    warpers = sampling_warpers(params)
    temperature = params.temperature if params.do_sample else 1.0
    tokens = torch.full((rows, budget), pad, dtype=torch.long, device=device)
    values = torch.zeros(rows, budget, dtype=torch.float32, device=device)
    ends = torch.full((rows,), -1, dtype=torch.long, device=device)
    pad_token = torch.tensor(pad, dtype=torch.long, device=device)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    with torch.inference_mode(not distributed):
        logits = forward.prefill(prompt_ids, prompt_mask)
        for step in range(budget):
            logits = (logits if step == 0 else forward(tokens, step)).float()
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
    return cut_at_ends(tokens.tolist(), values.tolist() if request.return_logprobs else None, ends.tolist(), budget)
