"""Tiny, seeded text model and tokenizer factories shared by the tests (built in code, no download)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

from modalities.text_agent.policy import CausalLMPolicy
from modalities.text_agent.tiny import (
    EOS_TOKEN_ID,
    PAD_TOKEN_ID,
    TINY_VOCAB_SIZE,
    build_char_tokenizer,
    build_tiny_qwen2,
)

__all__ = [
    "EOS_TOKEN_ID",
    "PAD_TOKEN_ID",
    "TINY_VOCAB_SIZE",
    "bias_token",
    "tiny_lm",
    "tiny_prompts",
    "tiny_text_policy",
    "tiny_tokenizer",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer (108 ids, eos <|im_end|> = 3, pad <pad> = 0, chat template set)."""
    return build_char_tokenizer()


def tiny_lm(seed: int = 0, eos_logit: float | None = 2.0, **kwargs: Any) -> Qwen2ForCausalLM:
    """A 2-layer Qwen2 (vocab 128); `eos_logit` adds an lm_head bias so EOS is sampled early (~7% a step)."""
    model = build_tiny_qwen2(seed=seed, **kwargs)
    if eos_logit is not None:
        bias_token(model, EOS_TOKEN_ID, eos_logit)
    return model


def bias_token(model: Qwen2ForCausalLM, token_id: int, logit: float) -> None:
    """Add `logit` to one token's output logit through an lm_head bias (created as zeros if absent)."""
    head = model.lm_head
    if head.bias is None:
        head.bias = torch.nn.Parameter(torch.zeros(head.out_features, dtype=head.weight.dtype))
    with torch.no_grad():
        head.bias[token_id] += logit


def tiny_text_policy(seed: int = 0, eos_logit: float | None = 2.0, **kwargs: Any) -> CausalLMPolicy:
    """CausalLMPolicy around `tiny_lm(seed, eos_logit)` and the char tokenizer; kwargs go to the policy."""
    return CausalLMPolicy(model=tiny_lm(seed, eos_logit), tokenizer=tiny_tokenizer(), **kwargs)


def tiny_prompts(num_prompts: int = 3) -> list[dict[str, Any]]:
    """Prompt dicts of different lengths (so left padding is exercised), with ids, datasets and tasks."""
    texts = ["Write the letter a.", "b?", "Say c, please", "dd", "Answer: e"]
    return [
        {"prompt": texts[i % len(texts)], "id": f"p{i}", "dataset": f"d{i % 2}", "task": "letters", "answer": "a"}
        for i in range(num_prompts)
    ]
