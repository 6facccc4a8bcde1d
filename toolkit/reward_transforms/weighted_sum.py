"""Weighted multi-reward combination: the score the normalizer sees as a weighted sum of reward components,
with NaN (not applicable) handled per `nan_policy`. Records what it did in `rollout.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from toolkit.reward_transforms.common import check_choice, reject_inf, safe_mean
from toolkit.rollout import Rollout

NanPolicy = Literal["zero", "renormalize", "error"]
_NAN_POLICIES = ("zero", "renormalize", "error")


def weighted_sum(rewards: Tensor, weights: Tensor, nan_policy: NanPolicy = "zero") -> Tensor:
    """Combine K reward components into one score per row; NaN marks a component as not applicable.

    Args:
        rewards: [N, K] reward components (NaN = not applicable to that row).
        weights: [K] weight of each component.
        nan_policy: "zero" treats a NaN component as 0 (TRL's weighted `nansum`); "renormalize" skips it
            and rescales the remaining weights so they keep the full weight total,
            `sum_k w_k r_k * (sum_all w / sum_applicable w)`; "error" raises on any NaN.

    Returns:
        [N] float32 scores. A row where every component is NaN stays NaN so the normalizer can count it.
    """
    check_choice("nan_policy", nan_policy, _NAN_POLICIES)
    if rewards.dim() != 2 or weights.shape != (rewards.shape[1],):
        raise ValueError(f"rewards must be [N, K] and weights [K]; got {tuple(rewards.shape)}, {tuple(weights.shape)}")
    reject_inf("reward components", rewards)
    rewards, weights = rewards.float(), weights.float().to(rewards.device)
    applicable = ~torch.isnan(rewards)
    if nan_policy == "error" and not bool(applicable.all()):
        rows = (~applicable).any(dim=1).nonzero(as_tuple=True)[0][:5].tolist()
        raise ValueError(f"NaN reward components at rows {rows} with nan_policy='error'")
    scores = torch.where(applicable, rewards * weights, torch.zeros_like(rewards)).sum(dim=1)
    if nan_policy == "renormalize":
        applicable_weight = (applicable.float() * weights).sum(dim=1)
        partial = applicable.any(dim=1) & ~applicable.all(dim=1)
        if bool((partial & (applicable_weight == 0)).any()):
            raise ValueError("nan_policy='renormalize': the applicable weights of some rows sum to zero")
        factor = torch.where(partial, weights.sum() / applicable_weight, torch.ones_like(scores))
        scores = scores * factor
    return torch.where(applicable.any(dim=1), scores, torch.full_like(scores, math.nan))


class WeightedSum:
    """Reward components -> `rollout.scores` as a weighted sum (the "sum then normalize" mixture).

    With `weights=None`: an already set `rollout.scores` is kept as is (identity, only metrics are
    logged); otherwise every component is summed with weight 1.
    """

    def __init__(self, weights: Mapping[str, float] | None = None, nan_policy: NanPolicy = "zero") -> None:
        check_choice("nan_policy", nan_policy, _NAN_POLICIES)
        self.weights = dict(weights) if weights is not None else None
        if self.weights is not None and not self.weights:
            raise ValueError("weights must name at least one reward component (or be None)")
        self.nan_policy: NanPolicy = nan_policy

    def __call__(self, rollout: Rollout) -> Rollout:
        metrics: dict[str, float] = {}
        for name, value in rollout.rewards.items():
            metrics[f"reward/{name}"] = safe_mean(value)
            metrics[f"reward/{name}/nan_frac"] = float(torch.isnan(value).float().mean()) if len(rollout) else 0.0
        if self.weights is None and rollout.scores is not None:
            scores = rollout.scores
        else:
            names = list(self.weights) if self.weights is not None else list(rollout.rewards)
            if not names:
                raise ValueError("WeightedSum: rollout has neither scores nor reward components")
            weights = self.weights or dict.fromkeys(names, 1.0)
            weight_tensor = torch.tensor([weights[k] for k in names], dtype=torch.float32)
            scores = weighted_sum(rollout.reward_matrix(names), weight_tensor, self.nan_policy)
            rollout.scores = scores
        metrics["reward/score"] = safe_mean(scores)
        metrics["reward/nan_rows"] = float(torch.isnan(scores).sum())
        rollout.metrics.update(metrics)
        return rollout
