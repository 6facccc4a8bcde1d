"""Tiny DiT backbones and masked-diffusion teachers built in code (no download) for tests, recipes and examples.

`build_tiny_dit` is the spec §19 CPU stand-in (hidden 64, 2 blocks, 2 heads, cond 16, L 32); the
`build_tiny_text_teacher` default is a little larger so it learns the shipped corpus in about a minute of CPU.
"""

from __future__ import annotations

from typing import Any

import torch

from modalities.diffusion_lm.dit import DiT, DiTConfig
from modalities.diffusion_lm.masked_diffusion import MaskedDiffusionLM
from modalities.diffusion_lm.teacher import load_teacher
from modalities.diffusion_lm.text_data import build_text_tokenizer


def build_tiny_dit(vocab_size: int = 65, seed: int = 0, **overrides: Any) -> DiT:
    """A random-init DiT of the "tiny" preset (mask id = vocab_size − 1), seeded; `overrides` set DiTConfig fields."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DiT(DiTConfig.preset("tiny", vocab_size=vocab_size, **overrides))


def build_tiny_teacher(
    vocab_size: int = 65,
    seed: int = 0,
    schedule: str = "loglinear",
    time_conditioning: bool = False,
    mixed_precision: str = "no",
    **overrides: Any,
) -> MaskedDiffusionLM:
    """A random-init tiny masked-diffusion LM (a mechanics stand-in: it has learnt nothing)."""
    return MaskedDiffusionLM(
        build_tiny_dit(vocab_size, seed, **overrides),
        schedule=schedule,
        time_conditioning=time_conditioning,
        mixed_precision=mixed_precision,
    )


def build_tiny_text_teacher(
    checkpoint: str | None = None,
    seed: int = 0,
    hidden_size: int = 128,
    num_blocks: int = 3,
    num_heads: int = 4,
    max_length: int = 64,
    mixed_precision: str = "no",
) -> MaskedDiffusionLM:
    """A teacher over the shipped corpus's word tokenizer: loaded from `checkpoint` (a `train_teacher` run or
    checkpoint directory) when given, else random-init with these sizes (train it with `renorm dlm train-teacher`)."""
    if checkpoint is not None:
        return load_teacher(checkpoint, mixed_precision=mixed_precision)
    vocab_size = len(build_text_tokenizer())
    return build_tiny_teacher(
        vocab_size,
        seed,
        mixed_precision=mixed_precision,
        hidden_size=hidden_size,
        num_blocks=num_blocks,
        num_heads=num_heads,
        cond_dim=32,
        max_length=max_length,
    )
