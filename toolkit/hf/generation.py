"""Generation helpers for Hugging Face token models that the text and video samplers share: sampler option
checks, left padding/alignment, row chunking and the sampling context (plain generation config, forked RNG
devices).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from toolkit.hf.policy import unwrap_model


def check_sampler_options(
    max_new_tokens: int,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    generation_batch_size: int | None,
) -> None:
    """Validate a token sampler's shared generation options (None = the policy's setting)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature is not None and temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if generation_batch_size is not None and generation_batch_size < 1:
        raise ValueError(f"generation_batch_size must be >= 1 or None, got {generation_batch_size}")


def row_slices(num_rows: int, chunk: int) -> Iterator[slice]:
    """Consecutive row slices of at most `chunk` rows."""
    for start in range(0, num_rows, chunk):
        yield slice(start, min(start + chunk, num_rows))


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Left-pad token lists to one width: ([N, L] int64 ids, [N, L] bool attention mask)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq) :] = True
    return ids.to(device), mask.to(device)


def left_align(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Move each row's attended tokens to the right end, keeping their order ([N, L] -> [N, L]).

    `concat_rollouts` right-pads prompts of different widths, which leaves masked columns between a
    prompt and its response; the response's first token must be predicted from the last real
    prompt token, so prompts are re-left-padded before the forward.
    """
    order = torch.argsort(attention_mask.int(), dim=1, stable=True)
    return input_ids.gather(1, order), attention_mask.gather(1, order)


def rng_devices(device: torch.device) -> list[int]:
    """The CUDA devices `torch.random.fork_rng` must fork so seeded sampling on `device` leaves global RNGs alone."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


@contextlib.contextmanager
def plain_generation_config(module: nn.Module) -> Iterator[None]:
    """Give the model a default GenerationConfig while sampling, so a checkpoint's defaults (repetition penalty,
    top-k, ...) cannot move the sampled distribution away from the one the policy scores."""
    from transformers import GenerationConfig

    model: Any = unwrap_model(module)
    saved = getattr(model, "generation_config", None)
    model.generation_config = GenerationConfig()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        model.generation_config = saved
