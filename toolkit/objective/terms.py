"""Policy terms: the per-step surrogate loss of `PolicyObjective`, one small component per method.

A term maps the importance ratio (already at the objective's token or sequence level), the current
log-probs and the advantages to per-step losses and clip indicators. Each term validates its own options;
a new term is a new `PolicyTerm` subclass named in YAML (`term: {_component_: ...}`), with no dispatcher
to edit. The pure math lives in module-level functions (`ppo_clip_loss`, `cispo_loss`, `sapo_loss`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "CISPOTerm",
    "ClipTerm",
    "PolicyTerm",
    "PolicyTermOutput",
    "SAPOTerm",
    "cispo_loss",
    "ppo_clip_loss",
    "sapo_loss",
]


@dataclass
class PolicyTermOutput:
    """Per-step losses [N, T] of a policy term and where its clips were active ([N, T] bool)."""

    losses: Tensor
    clipped_low: Tensor
    clipped_high: Tensor
    dual_clipped: Tensor


def ppo_clip_loss(
    ratio: Tensor, advantages: Tensor, clip_low: float, clip_high: float, dual_clip: float | None = None
) -> PolicyTermOutput:
    """PPO clip with decoupled bounds (clip-higher, DAPO arXiv:2503.14476) and optional dual clip.

    l = max(−A·ρ, −A·clip(ρ, 1 − clip_low, 1 + clip_high)); with dual clip c (arXiv:1912.09729),
    l = min(l, −c·A) where A < 0. Clipped branches are constants, so their gradient is zero.

    Args:
        ratio: [N, T] importance ratio π/π_old (differentiable).
        advantages: [N, T] advantages.
        clip_low: ε_low.
        clip_high: ε_high.
        dual_clip: c > 1, or None for no dual clip.

    Returns:
        Per-step losses and the low/high/dual clip indicators.
    """
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    losses = torch.maximum(unclipped, clipped)
    negative = advantages < 0
    dual = torch.zeros_like(negative)
    if dual_clip is not None:
        bound = -advantages * dual_clip
        dual = negative & (losses > bound)
        losses = torch.where(dual, bound, losses)
    with torch.no_grad():
        low = negative & (ratio < 1.0 - clip_low)
        high = (advantages > 0) & (ratio > 1.0 + clip_high)
    return PolicyTermOutput(losses, low, high, dual)


def cispo_loss(
    ratio: Tensor, logprobs: Tensor, advantages: Tensor, eps_low: float | None, eps_high: float
) -> PolicyTermOutput:
    """CISPO: l = −sg(clip(ρ, 1 − ε_low, 1 + ε_high))·A·log π (MiniMax-M1, arXiv:2506.13585).

    Every token keeps its gradient; only the (stop-gradient) IS weight is clipped. The paper sets no
    lower bound (`eps_low=None`) and tunes ε_high only.

    Args:
        ratio: [N, T] importance ratio (only its value is used).
        logprobs: [N, T] current log-probs (differentiable).
        advantages: [N, T] advantages.
        eps_low: lower clip distance, or None for no lower bound.
        eps_high: upper clip distance.

    Returns:
        Per-step losses; `clipped_low/high` mark clipped IS weights.
    """
    weight = ratio.detach()
    lower = None if eps_low is None else 1.0 - eps_low
    weight = weight.clamp(lower, 1.0 + eps_high)
    losses = -weight * advantages * logprobs
    high = ratio.detach() > 1.0 + eps_high
    low = torch.zeros_like(high) if lower is None else ratio.detach() < lower
    return PolicyTermOutput(losses, low, high, torch.zeros_like(high))


def sapo_loss(ratio: Tensor, advantages: Tensor, tau_pos: float, tau_neg: float) -> PolicyTermOutput:
    """SAPO soft gate: l = −(4/τ)·σ(τ(ρ − 1))·A, τ = τ_pos if A > 0 else τ_neg (arXiv:2511.20347).

    The gradient weight 4σ(1 − σ)·ρ is 1 on-policy and decays smoothly off-policy (faster for the
    larger τ_neg), replacing the hard clip band. Formula as stated in the paper's abstract/objective
    and implemented identically in TRL (`sapo_temperature_pos/neg`, defaults 1.0/1.05).

    Args:
        ratio: [N, T] importance ratio (differentiable).
        advantages: [N, T] advantages.
        tau_pos: temperature for positive advantages.
        tau_neg: temperature for non-positive advantages.

    Returns:
        Per-step losses; no hard clips (indicators all False).
    """
    tau = torch.where(advantages > 0, tau_pos, tau_neg)
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    none = torch.zeros_like(advantages, dtype=torch.bool)
    return PolicyTermOutput(-gate * advantages, none, none, none)


def _check_number(name: str, value: float, low: float, *, strict: bool = False, high: float = math.inf) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > low if strict else value >= low)
    if not ok or not value < high:
        bound = f"> {low}" if strict else f">= {low}"
        raise ValueError(
            f"{name}={value!r} must be a finite number {bound}" + (f" and < {high}" if high < math.inf else "")
        )


class PolicyTerm(ABC):
    """The per-step policy loss of `PolicyObjective` (`term:` in YAML); subclass it for a new method."""

    @abstractmethod
    def __call__(self, ratio: Tensor, logprobs: Tensor, advantages: Tensor) -> PolicyTermOutput:
        """Per-step losses and clip indicators.

        Args:
            ratio: [N, T] importance ratio at the objective's level (differentiable; 1 at masked steps).
            logprobs: [N, T] current log-probs in float32 (differentiable; 0 at masked steps).
            advantages: [N, T] advantages in float32 (0 at masked steps).
        """

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({options})"


class ClipTerm(PolicyTerm):
    """PPO clip (arXiv:1707.06347), clip-higher when `clip_high > clip_low` (DAPO), optional dual clip."""

    def __init__(self, clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = None) -> None:
        """Validate and store the options (keyword names are the YAML keys).

        Args:
            clip_low: ε_low, in [0, 1).
            clip_high: ε_high >= 0 (clip-higher when > clip_low, arXiv:2503.14476 §3.1).
            dual_clip: bound c > 1 on the loss of negative advantages (arXiv:1912.09729, verl
                `clip_ratio_c`), or None.
        """
        _check_number("clip_low", clip_low, 0.0, high=1.0)
        _check_number("clip_high", clip_high, 0.0)
        if dual_clip is not None:
            _check_number("dual_clip", dual_clip, 1.0, strict=True)
        self.clip_low, self.clip_high, self.dual_clip = float(clip_low), float(clip_high), dual_clip

    def __call__(self, ratio: Tensor, logprobs: Tensor, advantages: Tensor) -> PolicyTermOutput:
        return ppo_clip_loss(ratio, advantages, self.clip_low, self.clip_high, self.dual_clip)


class CISPOTerm(PolicyTerm):
    """CISPO (MiniMax-M1, arXiv:2506.13585): REINFORCE with a clipped, stop-gradient IS weight."""

    def __init__(self, clip_low: float | None = None, clip_high: float = 0.28) -> None:
        """Validate and store the options (keyword names are the YAML keys).

        Args:
            clip_low: lower IS-weight clip distance >= 0; None = no lower bound (the paper).
            clip_high: upper IS-weight clip distance >= 0; the paper does not publish its value, 0.28
                (DAPO's ε_high) is [Our decision]: tune it.
        """
        if clip_low is not None:
            _check_number("clip_low", clip_low, 0.0)
        _check_number("clip_high", clip_high, 0.0)
        self.clip_low, self.clip_high = clip_low, float(clip_high)

    def __call__(self, ratio: Tensor, logprobs: Tensor, advantages: Tensor) -> PolicyTermOutput:
        return cispo_loss(ratio, logprobs, advantages, self.clip_low, self.clip_high)


class SAPOTerm(PolicyTerm):
    """SAPO (arXiv:2511.20347): a soft sigmoid gate on the ratio instead of a hard clip band."""

    def __init__(self, tau_pos: float = 1.0, tau_neg: float = 1.05) -> None:
        """Validate and store the options (keyword names are the YAML keys).

        Args:
            tau_pos: temperature > 0 for A > 0 (TRL default 1.0).
            tau_neg: temperature > 0 for A <= 0 (TRL default 1.05).
        """
        _check_number("tau_pos", tau_pos, 0.0, strict=True)
        _check_number("tau_neg", tau_neg, 0.0, strict=True)
        self.tau_pos, self.tau_neg = float(tau_pos), float(tau_neg)

    def __call__(self, ratio: Tensor, logprobs: Tensor, advantages: Tensor) -> PolicyTermOutput:
        return sapo_loss(ratio, advantages, self.tau_pos, self.tau_neg)
