"""Normalize-then-sum over several rewards (GDPO; the Pref-GRPO reward mixture, arXiv:2508.20751): each
reward component is group-normalized on its own, then the weighted advantages are summed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from toolkit.advantages.group import group_normalized_advantages
from toolkit.advantages.stats import (
    EpsPlacement,
    NormalizerConfig,
    SingletonPolicy,
    StdMode,
    checked_scores,
    finish_advantages,
    whiten,
)
from toolkit.interfaces import Advantages
from toolkit.rollout import Rollout


def multi_reward_advantages(
    rewards: Mapping[str, Tensor],
    group_ids: Tensor,
    weights: Mapping[str, float],
    *,
    scale_by_std: bool = True,
    std: StdMode = "unbiased",
    eps: float = 1e-8,
    eps_placement: EpsPlacement = "std_plus_eps",
    singleton_groups: SingletonPolicy = "zero",
    restandardize: bool = False,
    restandardize_std: StdMode = "unbiased",
    restandardize_eps: float = 1e-8,
) -> tuple[Tensor, dict[str, float]]:
    """Normalize-then-sum: A = Σ_k w_k · z_g(r_k), optionally re-standardised over the batch.

    GDPO (arXiv:2601.05242; TRL `normalize_then_sum`) and the Pref-GRPO advantage mixture
    (arXiv:2508.20751: 0.7·A_pref + 1.4·A_clip, HEAD `--apply_gdpo` re-standardisation).
    A component that is NaN for a row contributes 0 to that row; rows NaN in every component
    get 0 and are excluded from the re-standardisation.

    Args:
        rewards: named [N] reward components.
        group_ids: [N] prompt ids.
        weights: component name → weight (summed in the mapping's order).
        scale_by_std, std, eps, eps_placement, singleton_groups: per-component group z-score options.
        restandardize: finally (A − mean_batch)/(std_batch + restandardize_eps) over all ranks.
    """
    missing = [k for k in weights if k not in rewards]
    if missing or not weights:
        raise ValueError(f"reward components {missing or '(none)'} not found; available: {sorted(rewards)}")
    total: Tensor | None = None
    applicable: Tensor | None = None
    metrics: dict[str, float] = {}
    for name, weight in weights.items():
        _, valid = checked_scores(rewards[name], f"rewards[{name!r}]")
        adv, sub = group_normalized_advantages(
            rewards[name],
            group_ids,
            scale_by_std=scale_by_std,
            std=std,
            eps=eps,
            eps_placement=eps_placement,
            singleton_groups=singleton_groups,
        )
        total = weight * adv if total is None else total + weight * adv
        applicable = valid if applicable is None else applicable | valid
        metrics[f"normalizer/zero_variance_groups/{name}"] = sub["normalizer/zero_variance_groups"]
    assert total is not None and applicable is not None
    metrics["normalizer/nan_rewards"] = float((~applicable).sum())
    if restandardize:
        total, mean, scale_std = whiten(
            total, applicable.float(), std=restandardize_std, eps=restandardize_eps, eps_placement="std_plus_eps"
        )
        metrics["normalizer/batch_mean"] = mean
        metrics["normalizer/batch_std"] = scale_std
    return total.float(), metrics


@dataclass(kw_only=True)
class MultiRewardNormalizer(NormalizerConfig):
    """Per-component group z-score, weighted sum, optional batch re-standardisation (GDPO, Pref-GRPO mix).

    Reads `rollout.rewards` (not `rollout.scores`). `weights=None` weighs every component 1.
    Pref-GRPO v1: `weights={"pref": 0.7, "clip": 1.4}, eps=1e-8, clip=5.0`; HEAD: 0.4/0.6 with
    `restandardize=True`. TRL GDPO: `eps=1e-4, restandardize=True, restandardize_eps=1e-4`.
    """

    needs_groups: ClassVar[bool] = True
    weights: dict[str, float] | None = None
    scale_by_std: bool = True
    std: StdMode = "unbiased"
    eps: float = 1e-8
    eps_placement: EpsPlacement = "std_plus_eps"
    singleton_groups: SingletonPolicy = "zero"
    restandardize: bool = False
    restandardize_std: StdMode = "unbiased"
    restandardize_eps: float = 1e-8
    clip: float | None = None

    def __post_init__(self) -> None:
        self._validate()
        for name, weight in (self.weights or {}).items():
            if not math.isfinite(weight):
                raise ValueError(f"weights[{name!r}]={weight!r} must be a finite number")

    def __call__(self, rollout: Rollout) -> Advantages:
        weights = self.weights if self.weights is not None else dict.fromkeys(rollout.rewards, 1.0)
        values, metrics = multi_reward_advantages(
            rollout.rewards, rollout.group_ids, weights, **self._options("weights")
        )
        return finish_advantages(values, metrics, self.clip)
