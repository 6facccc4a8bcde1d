"""Beta normalization of outcome rewards (BNPO, arXiv:2506.02864): A = (s − p̂)/f_N(p̂; α, β).

Not TRL's `loss_type="bnpo"` (a loss aggregation). Stateless: (a, b) are fitted by the method of
moments to the current batch's per-prompt success rates every call, α = max(1, 1 + a/3) (our
reconstruction of the paper's variance-minimising rule, matching the official code). The paper
text was not available; defaults follow the official code plus the spec's edge-case policy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor

from toolkit.advantages.stats import (
    StdMode,
    check_clip,
    check_nonnegative,
    check_option,
    check_positive,
    checked_scores,
    finish_advantages,
    group_index,
    group_moments,
    rollout_scores,
)
from toolkit.distributed import gather_rows
from toolkit.interfaces import Advantages
from toolkit.rollout import Rollout

DecompositionReduce = Literal["mean", "sum"]


class BetaFit(NamedTuple):
    """Method-of-moments fit over per-prompt p̂ and the normalizing Beta's parameters (0-d tensors)."""

    mu: Tensor
    var: Tensor
    a: Tensor
    b: Tensor
    alpha: Tensor
    beta: Tensor
    fallback: bool


def fit_beta(
    p_hat: Tensor, *, variance: StdMode = "unbiased", ab_min: float = 1.0, var_floor: float = 1e-12
) -> BetaFit:
    """Fit Beta(a, b) to per-prompt success rates and pick α = max(ab_min, 1 + a/3), β likewise.

    docs/methods/bnpo.md §4–5: k = μ(1 − μ)/σ² − 1, a = kμ, b = k(1 − μ). One prompt: μ := 0, σ² := 1 (official),
    giving α = β = 1. `fallback` is True when σ² <= var_floor or α/β are non-finite (callers then
    use α = β = 1, or raise under `official_compat`).

    Args:
        p_hat: [P] per-prompt mean of the [0, 1]-mapped rewards, P >= 1.
        variance: estimator of σ² over prompts (official: unbiased).
    """
    if p_hat.numel() > 1:
        mu, var = p_hat.mean(), p_hat.var(unbiased=variance == "unbiased")
    else:
        mu, var = p_hat.new_tensor(0.0), p_hat.new_tensor(1.0)
    k = mu * (1 - mu) / var - 1
    a, b = k * mu, k * (1 - mu)
    alpha = torch.clamp(1 + a / 3, min=ab_min)
    beta = torch.clamp(1 + b / 3, min=ab_min)
    fallback = bool(var <= var_floor) or not bool(torch.isfinite(alpha) & torch.isfinite(beta))
    return BetaFit(mu, var, a, b, alpha, beta, fallback)


def inverse_beta_density(p: Tensor, alpha: Tensor, beta: Tensor, w_max: float = 1e6) -> tuple[Tensor, Tensor]:
    """1/f_N(p; α, β) computed in log space (xlogy, lgamma), clamped to [0, w_max].

    Returns:
        The weights (same shape as p) and a bool mask of the entries that hit w_max.
    """
    log_norm = torch.lgamma(alpha) + torch.lgamma(beta) - torch.lgamma(alpha + beta)
    log_f = torch.xlogy(alpha - 1, p) + torch.xlogy(beta - 1, 1 - p) - log_norm
    raw = torch.exp(-log_f)
    return raw.clamp(0, w_max), raw > w_max


def _success_rates(
    s: Tensor, valid: Tensor, group_ids: Tensor, official_compat: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-group p̂ ([G]), the row → group index, the group-has-rows mask and the constant-group mask."""
    index, num_groups = group_index(group_ids)
    moments = group_moments(s, valid, index, num_groups, "population")
    single = moments.size == 1
    if bool(single.any()) and not official_compat:
        ids = torch.unique(group_ids)[single].tolist()
        raise ValueError(f"BNPO needs at least 2 responses per prompt; groups {ids[:20]} have one")
    p_hat = torch.where(single, torch.zeros_like(moments.mean), moments.mean)  # official: singleton p̂ = 0
    return p_hat, index, moments.size > 0, moments.constant & ~single


def beta_normalized_advantages(
    scores: Tensor,
    group_ids: Tensor,
    *,
    r_min: float = 0.0,
    r_max: float = 1.0,
    variance: StdMode = "unbiased",
    ab_min: float = 1.0,
    w_max: float = 1e6,
    var_floor: float = 1e-12,
    official_compat: bool = False,
) -> tuple[Tensor, dict[str, float]]:
    """BNPO advantage A = (s − p̂(q))/f_N(p̂(q); α, β) for one reward (docs/methods/bnpo.md §3–§10).

    Args:
        scores: [N] rewards in [r_min, r_max]; NaN = not applicable (advantage 0, excluded from p̂).
        group_ids: [N] prompt ids.
        r_min, r_max: reward range mapped to s ∈ [0, 1] and validated.
        variance, ab_min, w_max, var_floor: fit options (official: unbiased, 1, 1e6, n/a).
        official_compat: singleton groups get p̂ = 0 instead of an error; no α = β = 1 fallback
            (a degenerate fit, where the official code returns NaN or crashes, raises ValueError).

    Returns:
        [N] float32 advantages (every token of a response gets its row's value) and metrics.
    """
    if not r_max > r_min:
        raise ValueError(f"reward range needs r_max > r_min, got ({r_min}, {r_max})")
    x, valid = checked_scores(scores)
    s = (x - r_min) / (r_max - r_min)
    outside = (valid & ((s < 0) | (s > 1))).nonzero(as_tuple=True)[0].tolist()
    if outside and not official_compat:
        raise ValueError(f"BNPO: scores at rows {outside[:20]} lie outside [r_min={r_min}, r_max={r_max}]")
    p_group, index, present, constant = _success_rates(s, valid, group_ids, official_compat)
    if bool(((p_group < 0) | (p_group > 1)).any()):
        raise ValueError(f"BNPO: a prompt's mean reward lies outside [r_min={r_min}, r_max={r_max}]")
    p_all = gather_rows(p_group[present])  # one entry per prompt, every rank (groups stay on one rank)
    if p_all.numel() == 0:
        return torch.zeros_like(x).float(), {"normalizer/nan_rewards": float((~valid).sum())}
    fit = fit_beta(p_all, variance=variance, ab_min=ab_min, var_floor=var_floor)
    alpha, beta = fit.alpha, fit.beta
    if fit.fallback and official_compat:
        raise ValueError(
            f"BNPO degenerate batch (μ={float(fit.mu):.6g}, σ²={float(fit.var):.6g}, α={float(alpha)}, "
            f"β={float(beta)}): the official code returns NaN or crashes here; "
            "official_compat=False falls back to α=β=1"
        )
    if fit.fallback:
        alpha, beta = torch.ones_like(alpha), torch.ones_like(beta)
    weight, clamped = inverse_beta_density(p_group, alpha, beta, w_max)
    adv = weight[index] * (s - p_group[index])
    adv = torch.where(valid & ~constant[index], adv, torch.zeros_like(adv))
    metrics = {
        "normalizer/alpha": float(alpha),
        "normalizer/beta": float(beta),
        "normalizer/a": float(fit.a),
        "normalizer/b": float(fit.b),
        "normalizer/mu": float(fit.mu),
        "normalizer/var": float(fit.var),
        "normalizer/fallbacks": float(fit.fallback),
        "normalizer/clamped_weights": float((clamped & present).sum()),
        "normalizer/zero_advantage_groups": float((constant & present).sum() / present.sum()),
        "normalizer/nan_rewards": float((~valid).sum()),
    }
    return adv.float(), metrics


@dataclass(kw_only=True)
class BetaNormalizer:
    """Beta normalization (BNPO, arXiv:2506.02864) of `rollout.scores`, or of `rollout.rewards` components.

    With `components` (name → [min, max]) each component gets its own fit and advantage, then
    the K advantages are averaged (`decomposition_reduce="mean"`, official) or summed; metrics
    carry a `/<name>` suffix and `normalizer/fallbacks` totals them. Otherwise `rollout.scores`
    is normalized with the range (`r_min`, `r_max`).
    """

    needs_groups: ClassVar[bool] = True  # p̂ is a per-prompt success rate: trainer.group_size >= 2
    r_min: float = 0.0
    r_max: float = 1.0
    components: dict[str, tuple[float, float]] | None = None
    decomposition_reduce: DecompositionReduce = "mean"
    variance: StdMode = "unbiased"
    ab_min: float = 1.0
    w_max: float = 1e6
    var_floor: float = 1e-12
    official_compat: bool = False
    clip: float | None = None

    def __post_init__(self) -> None:
        check_option("variance", self.variance, StdMode)
        check_option("decomposition_reduce", self.decomposition_reduce, DecompositionReduce)
        check_positive("ab_min", self.ab_min)  # α, β <= 0 is no Beta density
        check_positive("w_max", self.w_max)  # 0 would zero every advantage
        check_nonnegative("var_floor", self.var_floor)
        check_clip(self.clip)
        ranges = [(self.r_min, self.r_max), *(self.components or {}).values()]
        for lo, hi in (tuple(r) for r in ranges):
            if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
                raise ValueError(f"reward range needs finite max > min, got ({lo}, {hi})")
        if self.components is not None and not self.components:
            raise ValueError("components must name at least one reward component, or be None")

    def _fit_options(self) -> dict[str, Any]:
        return {
            "variance": self.variance,
            "ab_min": self.ab_min,
            "w_max": self.w_max,
            "var_floor": self.var_floor,
            "official_compat": self.official_compat,
        }

    def __call__(self, rollout: Rollout) -> Advantages:
        if self.components is None:
            values, metrics = beta_normalized_advantages(
                rollout_scores(rollout), rollout.group_ids, r_min=self.r_min, r_max=self.r_max, **self._fit_options()
            )
            return finish_advantages(values, metrics, self.clip)
        return finish_advantages(*self._decomposed(rollout.rewards, rollout.group_ids), self.clip)

    def _decomposed(self, rewards: Mapping[str, Tensor], group_ids: Tensor) -> tuple[Tensor, dict[str, float]]:
        assert self.components is not None
        missing = [k for k in self.components if k not in rewards]
        if missing:
            raise ValueError(f"reward components {missing} not found; available: {sorted(rewards)}")
        total: Tensor | None = None
        metrics: dict[str, float] = {"normalizer/fallbacks": 0.0}
        for name, (lo, hi) in self.components.items():
            adv, sub = beta_normalized_advantages(rewards[name], group_ids, r_min=lo, r_max=hi, **self._fit_options())
            total = adv if total is None else total + adv
            metrics.update({f"{key}/{name}": value for key, value in sub.items()})
            metrics["normalizer/fallbacks"] += sub.get("normalizer/fallbacks", 0.0)
        assert total is not None
        if self.decomposition_reduce == "mean":
            total = total / len(self.components)
        return total, metrics
