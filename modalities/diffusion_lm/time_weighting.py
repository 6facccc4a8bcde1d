"""DiDi-Instruct time weighting ω(τ) and the optional importance correction ω/π (arXiv:2509.25035).

`TimeWeightedNormalizer` wraps a group normalizer (E5) and multiplies its advantages by ω(τ) of each
row's coupled time τ (recorded by `TwoStepStudentSampler` in `rollout.data["tau"]`). With one on-policy
inner epoch and `seq_mean_token_sum` aggregation the trainer's loss is then exactly the spec's
`-(ω·Â·log q).mean()` (spec docs/methods/didi_instruct.md §9, §11).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from toolkit.interfaces import Advantages, Normalizer, Stateful
from toolkit.rollout import Rollout

Weight = Literal["omega", "none"]
Difference = Literal["forward", "central"]


def omega_weight(
    tau: Tensor,
    alpha: Callable[[Tensor], Tensor],
    *,
    clamp_min: float = 0.1,
    clamp_max: float = 10.0,
    fd_step: float = 1e-4,
    difference: Difference = "forward",
) -> Tensor:
    """ω(τ) = −α'(τ) / (1 − α(τ)) by finite differences, clamped (spec §9, E3).

    For the log-linear schedule ω(τ) = 1/τ exactly, so the clamp binds for τ < 0.1.

    Args:
        tau: [N] times in (0, 1].
        alpha: the noise schedule's α(t) (vectorised).
        clamp_min, clamp_max: the clamp [0.1, 10] of the development code.
        fd_step: finite-difference step h (1e-4).
        difference: "forward" (α(τ+h) − α(τ))/h or "central" (α(τ+h) − α(τ−h))/2h.

    Returns:
        [N] float32 weights.
    """
    if difference not in get_args(Difference):
        raise ValueError(f"difference={difference!r} is not one of {get_args(Difference)}")
    t = tau.double()
    if difference == "forward":
        dalpha = (alpha(t + fd_step) - alpha(t)) / fd_step
    else:
        dalpha = (alpha(t + fd_step) - alpha(t - fd_step)) / (2 * fd_step)
    omega = -dalpha / (1.0 - alpha(t))
    return omega.clamp(clamp_min, clamp_max).float()


def beta_density(tau: Tensor, a: float, b: float) -> Tensor:
    """π(τ) = Beta(a, b) probability density at τ (the τ proposal, spec §8), float64.

    Args:
        tau: [N] values in (0, 1).
        a, b: Beta shape parameters > 0.

    Returns:
        [N] float64 densities.
    """
    t = tau.double()
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    return torch.exp(log_norm + (a - 1) * torch.log(t) + (b - 1) * torch.log1p(-t))


def time_weights(
    tau: Tensor,
    alpha: Callable[[Tensor], Tensor],
    *,
    weight: Weight = "omega",
    importance: bool = False,
    density: Tensor | None = None,
    clamp_min: float = 0.1,
    clamp_max: float = 10.0,
    fd_step: float = 1e-4,
) -> Tensor:
    """Per-row weights ω(τ) (or 1), divided by π(τ) when `importance` (spec §5 Theorem 3.1, §9).

    Args:
        tau: [N] coupled times.
        alpha: schedule α(t).
        weight: "omega" or "none" (all ones).
        importance: divide by the proposal density π(τ).
        density: [N] π(τ), required when `importance`.
        clamp_min, clamp_max, fd_step: as in `omega_weight`.

    Returns:
        [N] float32 weights.
    """
    if weight not in get_args(Weight):
        raise ValueError(f"weight={weight!r} is not one of {get_args(Weight)}")
    w = torch.ones_like(tau, dtype=torch.float32)
    if weight == "omega":
        w = omega_weight(tau, alpha, clamp_min=clamp_min, clamp_max=clamp_max, fd_step=fd_step)
    if importance:
        if density is None:
            raise ValueError("importance=True needs the proposal density π(τ) (rollout.data['tau_density'])")
        if not bool((density > 0).all()) or not bool(torch.isfinite(density).all()):
            raise ValueError("the proposal density π(τ) must be finite and > 0 for importance weighting")
        w = (w.double() / density.double()).float()
    return w


class TimeWeightedNormalizer:
    """Base normalizer's advantages × ω(τ) (÷ π(τ) when `importance`): DiDi-Instruct's weighted REINFORCE.

    Reads `rollout.data["tau"]` [N] (and `rollout.data["tau_density"]` [N] for importance) as recorded by
    `TwoStepStudentSampler`. Metrics: the base's, plus `normalizer/time_weight_mean|min|max`.
    """

    def __init__(
        self,
        base: Normalizer,
        weight: Weight = "omega",
        importance: bool = False,
        schedule: str = "loglinear",
        schedule_eps: float = 1e-3,
        clamp_min: float = 0.1,
        clamp_max: float = 10.0,
        fd_step: float = 1e-4,
    ) -> None:
        """Validate and store the config.

        Args:
            base: the advantage normalizer (DiDi: GroupNormalizer unbiased, eps 1e-8, clip 3).
            weight: "omega" (spec) or "none".
            importance: also divide by π(τ) ([Third-party code] `importance_weight: false` in all configs).
            schedule: noise schedule name for α(t) (`modalities.diffusion_lm.schedules.make_schedule`).
            schedule_eps: the schedule's ε (log-linear: 1e-3).
            clamp_min, clamp_max: ω clamp [0.1, 10].
            fd_step: finite-difference step for α'(τ).
        """
        if weight not in get_args(Weight):
            raise ValueError(f"weight={weight!r} is not one of {get_args(Weight)}")
        if not 0 < clamp_min <= clamp_max:
            raise ValueError(f"need 0 < clamp_min <= clamp_max, got clamp_min={clamp_min}, clamp_max={clamp_max}")
        if not fd_step > 0:
            raise ValueError(f"fd_step={fd_step} must be > 0")
        from modalities.diffusion_lm.schedules import make_schedule

        self.base, self.weight, self.importance = base, weight, bool(importance)
        self.schedule = make_schedule(schedule, eps=schedule_eps)
        self.clamp_min, self.clamp_max, self.fd_step = float(clamp_min), float(clamp_max), float(fd_step)

    def __call__(self, rollout: Rollout) -> Advantages:
        out = self.base(rollout)
        if "tau" not in rollout.data:
            raise ValueError("TimeWeightedNormalizer needs rollout.data['tau'] (use TwoStepStudentSampler)")
        tau = rollout.data["tau"].to(out.values.device)
        w = time_weights(
            tau,
            self.schedule.alpha,
            weight=self.weight,
            importance=self.importance,
            density=rollout.data.get("tau_density"),
            clamp_min=self.clamp_min,
            clamp_max=self.clamp_max,
            fd_step=self.fd_step,
        )
        values = out.values * (w if out.values.dim() == 1 else w[:, None])
        metrics = dict(out.metrics)
        metrics.update(
            {
                "normalizer/time_weight_mean": float(w.mean()),
                "normalizer/time_weight_min": float(w.min()),
                "normalizer/time_weight_max": float(w.max()),
            }
        )
        return Advantages(values=values, metrics=metrics, returns=out.returns)

    def state_dict(self) -> dict[str, Any]:
        """The base normalizer's state (stateless bases give {})."""
        return {"base": self.base.state_dict()} if isinstance(self.base, Stateful) else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "base" in state and isinstance(self.base, Stateful):
            self.base.load_state_dict(state["base"])
