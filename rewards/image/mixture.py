"""Weighted pointwise mixture of reward models: score = Σ_k w_k · score_k.

This mixes *rewards*; Pref-GRPO's CLIP mixture happens at the *advantage* level instead (each reward
z-scored per group, then weighted: toolkit.advantages.MultiRewardNormalizer). Use this one for
score-level baselines (e.g. Flow-GRPO multi-reward runs) and `renorm score`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from rewards.base import RewardModel, RewardOutput

NanPolicy = Literal["propagate", "skip"]


class RewardMixture:
    """score = Σ_k weights[k] · rewards[k].scores; every part is kept as a component `<name>`.

    Args:
        rewards: named reward models.
        weights: name -> weight; None gives every model weight 1. Names must match `rewards`.
        nan_policy: "propagate" (a NaN part makes the row NaN) or "skip" (NaN parts are left out; a row
            with every part NaN stays NaN). Skipped parts are counted in `mixture/nan_parts`.
    """

    def __init__(
        self,
        rewards: Mapping[str, RewardModel],
        weights: Mapping[str, float] | None = None,
        nan_policy: NanPolicy = "propagate",
    ) -> None:
        if nan_policy not in ("propagate", "skip"):
            raise ValueError(f"nan_policy={nan_policy!r} is not supported; allowed: ['propagate', 'skip']")
        if not rewards:
            raise ValueError("RewardMixture needs at least one reward model")
        weights = dict(weights) if weights is not None else {name: 1.0 for name in rewards}
        if set(weights) != set(rewards):
            raise ValueError(f"weights name {sorted(weights)} but rewards are {sorted(rewards)}")
        bad = {k: w for k, w in weights.items() if not math.isfinite(float(w))}
        if bad:
            raise ValueError(f"weights must be finite, got {bad}")
        self.rewards, self.weights, self.nan_policy = (
            dict(rewards),
            {k: float(w) for k, w in weights.items()},
            nan_policy,
        )

    def __call__(self, prompts: Sequence[Any], samples: Sequence[Any], **metadata: Any) -> RewardOutput:
        if len(prompts) != len(samples):
            raise ValueError(f"{len(prompts)} prompts but {len(samples)} samples")
        components: dict[str, torch.Tensor] = {}
        metrics: dict[str, float] = {}
        for name, model in self.rewards.items():
            out = model(prompts, samples, **metadata)
            components[name] = out.scores
            metrics.update({f"{name}/{k}": v for k, v in out.metrics.items()})
        stacked = torch.stack(list(components.values()), dim=1)  # [N, K]
        weights = torch.tensor([self.weights[k] for k in components], dtype=torch.float32)
        nan = stacked.isnan()
        if self.nan_policy == "propagate":
            scores = (stacked * weights).sum(dim=1)
        else:
            scores = torch.where(nan, torch.zeros_like(stacked), stacked * weights).sum(dim=1)
            scores[nan.all(dim=1)] = math.nan
        metrics["mixture/nan_parts"] = float(nan.sum())
        return RewardOutput(scores=scores, components=components, metrics=metrics)
