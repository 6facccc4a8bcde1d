"""The denoiser-backbone protocol every masked-diffusion model in this package implements.

A backbone maps (tokens, σ) to raw float32 logits over V ids (the mask id included); the SUBS processing,
the schedule and the samplers live outside it (`masked_diffusion.py`, `sampling.py`), so our DiT and an
adapted ESM masked LM are interchangeable teachers, students and discriminator trunks.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

MixedPrecision = Literal["no", "bf16"]
MIXED_PRECISION_MODES: tuple[str, ...] = ("no", "bf16")


@runtime_checkable
class DenoiserBackbone(Protocol):
    """An nn.Module called as `backbone(tokens, sigma) -> logits [B, L, V]` (float32, raw, no SUBS).

    `tokens` is a LongTensor [B, L] of ids in [0, V) (the mask id included) or a float tensor [B, L, V]
    of "soft tokens" (embedding = softmax(tokens) @ E). `sigma` [B] is σ_t = −log α_t (a backbone without
    time conditioning may ignore it).

    Attributes:
        vocab_size: V, including the mask token.
        mask_id: the absorbing-state id.
        hidden_size: width of `features`.
        blocks: the transformer blocks, the last one closest to the output.
    """

    vocab_size: int
    mask_id: int
    hidden_size: int
    blocks: nn.ModuleList

    def __call__(self, tokens: Tensor, sigma: Tensor) -> Tensor: ...

    def features(self, tokens: Tensor, sigma: Tensor) -> Tensor:
        """The trunk output before the output layer (after the final norm): [B, L, hidden_size]."""
        ...


def check_mixed_precision(mode: str) -> None:
    """Raise a ValueError naming `mode` and the allowed ones unless it is a MixedPrecision value."""
    if mode not in MIXED_PRECISION_MODES:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION_MODES}, got {mode!r}")


def autocast_context(device: torch.device, mode: str) -> AbstractContextManager[object]:
    """bf16 autocast on `device` for mode "bf16" (CUDA or CPU), a no-op for "no"."""
    check_mixed_precision(mode)
    if mode == "no":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
