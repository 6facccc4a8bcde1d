"""Batch-wide normalizers: whitening over the batch (REINFORCE++, arXiv:2501.03262) and group mean with
the batch's standard deviation (DLER arXiv:2510.15110 Eq. 3, Lite-PPO). Batch statistics go through
`gather_rows`, so they span every rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from toolkit.advantages.stats import (
    Baseline,
    EpsPlacement,
    NormalizerConfig,
    SingletonPolicy,
    StdMode,
    StdSource,
    Weighting,
    checked_scores,
    finish_advantages,
    group_index,
    group_metrics,
    group_moments,
    rollout_scores,
    singleton_rows,
    whiten,
)
from toolkit.interfaces import Advantages
from toolkit.rollout import Rollout


def batch_normalized_advantages(
    scores: Tensor,
    group_ids: Tensor,
    token_counts: Tensor | None = None,
    *,
    baseline: Baseline = "group_mean",
    weighting: Weighting = "sequence",
    std: StdMode = "unbiased",
    eps: float = 1e-8,
    eps_placement: EpsPlacement = "std_plus_eps",
    subtract_batch_mean: bool = True,
    std_source: StdSource = "advantages",
    singleton_groups: SingletonPolicy = "raw",
    zero_constant_groups: bool = True,
) -> tuple[Tensor, dict[str, float]]:
    """Group-mean baseline (optional) then batch-wide mean/std: DLER Eq. 3 (arXiv:2510.15110), REINFORCE++.

    A_i = r_i − mean_g(r) (baseline "group_mean"; a singleton gets baseline 0 under "raw", as verl),
    then (A − mean_batch)·scale with the batch statistics over all ranks, each response weighted
    once ("sequence", paper) or by its token count ("token", verl `masked_whiten`).
    REINFORCE++ (arXiv:2501.03262) is baseline "none"; TRL/Lite-PPO "batch" scaling
    (arXiv:2508.08221) is std_source "scores" with subtract_batch_mean False.

    Args:
        scores: [N] rewards, NaN = not applicable (advantage 0, excluded everywhere).
        group_ids: [N] prompt ids.
        token_counts: [N] trained-token counts (required for weighting "token").
        zero_constant_groups: constant groups get exact 0 after whitening (False: −mean_batch·scale, official).

    Returns:
        [N] float32 advantages and metrics incl. `normalizer/batch_mean` and `normalizer/batch_std`.
    """
    x, valid = checked_scores(scores)
    index, num_groups = group_index(group_ids)
    moments = group_moments(x, valid, index, num_groups, "population")
    metrics = group_metrics(moments, valid)
    adv, keep, constant = x, valid, torch.zeros_like(valid)
    if baseline == "group_mean":
        single = singleton_rows(moments, index, group_ids, singleton_groups)
        constant = moments.constant[index] & ~single
        adv = torch.where(constant, torch.zeros_like(x), x - moments.mean[index])
        adv = torch.where(single, x if singleton_groups == "raw" else torch.zeros_like(x), adv)
        keep = valid & ~single if singleton_groups == "zero" else valid
    if weighting == "token":
        if token_counts is None:
            raise ValueError("weighting='token' needs per-row token counts (rollout.mask)")
        weights = token_counts.to(x.device, x.dtype) * keep
    else:
        weights = keep.to(x.dtype)
    std_values = x if std_source == "scores" else None
    out, mean, scale_std = whiten(
        adv, weights, std=std, eps=eps, eps_placement=eps_placement, center=subtract_batch_mean, std_values=std_values
    )
    if zero_constant_groups:
        out = torch.where(constant, torch.zeros_like(out), out)
    metrics["normalizer/batch_mean"] = mean
    metrics["normalizer/batch_std"] = scale_std
    return torch.where(valid, out, torch.zeros_like(out)).float(), metrics


@dataclass(kw_only=True)
class BatchWhitenNormalizer(NormalizerConfig):
    """Batch whitening of scores (REINFORCE++, arXiv:2501.03262), optionally after a group-mean baseline.

    Reads `rollout.scores` (and `rollout.mask` for token weighting). Defaults follow verl/OpenRLHF:
    token-weighted, unbiased, rsqrt(var + 1e-8). For per-token rewards use `toolkit.advantages.GAENormalizer`
    without values (γ = λ = 1 returns, then the same whitening).
    """

    baseline: Baseline = "none"
    weighting: Weighting = "token"
    std: StdMode = "unbiased"
    eps: float = 1e-8
    eps_placement: EpsPlacement = "rsqrt_var_eps"
    subtract_batch_mean: bool = True
    std_source: StdSource = "advantages"
    singleton_groups: SingletonPolicy = "raw"
    zero_constant_groups: bool = True
    clip: float | None = None

    @classmethod
    def needs_groups(cls, kwargs: Mapping[str, Any]) -> bool:
        """A group-mean baseline needs trainer.group_size >= 2 (with one response it is the reward itself)."""
        return bool(kwargs.get("baseline", cls.baseline) == "group_mean")

    def __post_init__(self) -> None:
        self._validate()

    def __call__(self, rollout: Rollout) -> Advantages:
        values, metrics = batch_normalized_advantages(
            rollout_scores(rollout), rollout.group_ids, rollout.mask.sum(dim=1), **self._options()
        )
        return finish_advantages(values, metrics, self.clip)


@dataclass(kw_only=True)
class GroupMeanBatchStdNormalizer(BatchWhitenNormalizer):
    """Group-mean baseline + batch mean/std (DLER Eq. 3, arXiv:2510.15110; Lite-PPO arXiv:2508.08221).

    Paper default: sequence-weighted, unbiased [Our decision], eps 1e-8 added to the std. DLER's
    official code (verl `masked_whiten`): `weighting="token", eps_placement="rsqrt_var_eps",
    zero_constant_groups=False` (a constant group then gets −mean_batch·scale, not 0).
    TRL `scale_rewards="batch"`: `std_source="scores", subtract_batch_mean=False, eps=1e-4`.
    """

    baseline: Baseline = field(default="group_mean", init=False)
    weighting: Weighting = "sequence"
    eps_placement: EpsPlacement = "std_plus_eps"
