"""Masking schedules α_t of absorbing-state diffusion: log-linear (MDLM/SEDD), linear-σ and cosine.

Spec docs/methods/didi_instruct.md §2 (arXiv:2406.07524 Sec. 3, MDLM `noise_schedule.py` semantics). α_t is the
probability that a token is still clean at time t ∈ [0, 1]; σ_t = −log α_t is the network's conditioning
input. All math runs in at least float32 (float64 inputs stay float64), whatever the model precision.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


def _as_float(t: Tensor | float) -> Tensor:
    t = torch.as_tensor(t)
    return t.to(torch.promote_types(t.dtype, torch.float32))


@runtime_checkable
class NoiseSchedule(Protocol):
    """α(t), α'(t) and σ(t) = −log α(t), elementwise on a tensor of times."""

    def alpha(self, t: Tensor | float) -> Tensor: ...

    def dalpha(self, t: Tensor | float) -> Tensor: ...

    def sigma(self, t: Tensor | float) -> Tensor: ...


class MaskingSchedule:
    """Base class: subclasses define `alpha` and `dalpha` (and `sigma` where it has a closed form)."""

    def alpha(self, t: Tensor | float) -> Tensor:
        raise NotImplementedError

    def dalpha(self, t: Tensor | float) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor | float) -> Tensor:
        """σ_t = −log α_t."""
        return -torch.log(self.alpha(t))

    def loss_weight(self, t: Tensor | float) -> Tensor:
        """−α'_t / (1 − α_t) ≥ 0: the MDLM NELBO weight per masked token (= 1/t for log-linear, ε = 0)."""
        return -self.dalpha(t) / (1 - self.alpha(t))


class LogLinearSchedule(MaskingSchedule):
    """α_t = 1 − (1 − ε)·t, α'_t = −(1 − ε) (spec §2, E1; "log-linear" in σ, linear in α)."""

    def __init__(self, eps: float = 1e-3) -> None:
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {eps}")
        self.eps = eps

    def alpha(self, t: Tensor | float) -> Tensor:
        return 1 - (1 - self.eps) * _as_float(t)

    def dalpha(self, t: Tensor | float) -> Tensor:
        return torch.full_like(_as_float(t), -(1 - self.eps))


class LinearSchedule(MaskingSchedule):
    """σ_t = σ_min + t·(σ_max − σ_min) linear in t, α_t = exp(−σ_t) (SEDD/MDLM "linear" noise)."""

    def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0) -> None:
        if not 0.0 <= sigma_min < sigma_max:
            raise ValueError(f"need 0 <= sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def sigma(self, t: Tensor | float) -> Tensor:
        return self.sigma_min + _as_float(t) * (self.sigma_max - self.sigma_min)

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.exp(-self.sigma(t))

    def dalpha(self, t: Tensor | float) -> Tensor:
        return -(self.sigma_max - self.sigma_min) * self.alpha(t)


class CosineSchedule(MaskingSchedule):
    """α_t = ε + (1 − ε)·cos(πt/2) (MDLM `CosineNoise`): α_0 = 1, α_1 = ε."""

    def __init__(self, eps: float = 1e-3) -> None:
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {eps}")
        self.eps = eps

    def alpha(self, t: Tensor | float) -> Tensor:
        return self.eps + (1 - self.eps) * torch.cos(_as_float(t) * (math.pi / 2))

    def dalpha(self, t: Tensor | float) -> Tensor:
        return -(1 - self.eps) * (math.pi / 2) * torch.sin(_as_float(t) * (math.pi / 2))


_SCHEDULES: dict[str, type[MaskingSchedule]] = {
    "loglinear": LogLinearSchedule,
    "linear": LinearSchedule,
    "cosine": CosineSchedule,
}


def make_schedule(name: str, **kwargs: float) -> MaskingSchedule:
    """The schedule called `name` ("loglinear", "linear", "cosine") built with `kwargs`."""
    if name not in _SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(_SCHEDULES)}")
    return _SCHEDULES[name](**kwargs)
