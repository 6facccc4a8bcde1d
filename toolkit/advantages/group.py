"""Group normalizers: the GRPO z-score and Dr. GRPO mean-only baseline (arXiv:2402.03300,
arXiv:2503.20783) and the leave-one-out baseline (RLOO, arXiv:2402.14740).

The statistics conventions shared by every normalizer (NaN = not applicable, float64 statistics, constant
groups → exact zeros) are documented in `toolkit.advantages.stats`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from toolkit.advantages.stats import (
    EpsPlacement,
    NormalizerConfig,
    SingletonPolicy,
    StdMode,
    checked_scores,
    finish_advantages,
    group_index,
    group_metrics,
    group_moments,
    inverse_scale,
    rollout_scores,
    singleton_rows,
)
from toolkit.interfaces import Advantages
from toolkit.rollout import Rollout


def group_normalized_advantages(
    scores: Tensor,
    group_ids: Tensor,
    *,
    scale_by_std: bool = True,
    std: StdMode = "unbiased",
    eps: float = 1e-6,
    eps_placement: EpsPlacement = "std_plus_eps",
    std_floor: float = 0.0,
    singleton_groups: SingletonPolicy = "zero",
) -> tuple[Tensor, dict[str, float]]:
    """GRPO group z-score A = (r − mean_g)/(std_g + eps) (arXiv:2402.03300 §4.1.2); Dr. GRPO mean-only.

    Args:
        scores: [N] rewards, NaN = not applicable (advantage 0, excluded from statistics).
        group_ids: [N] prompt ids.
        scale_by_std: False gives Dr. GRPO's A = r − mean_g (arXiv:2503.20783).
        std, eps, eps_placement, std_floor: the group std convention (verl: unbiased, 1e-6, std + eps).
        singleton_groups: one applicable response: "zero" (A = 0), "raw" (mean 0, std 1 as verl: A = r), "error".

    Returns:
        [N] float32 advantages (constant groups exactly 0) and metrics.
    """
    x, valid = checked_scores(scores)
    index, num_groups = group_index(group_ids)
    moments = group_moments(x, valid, index, num_groups, std)
    out = x - moments.mean[index]
    if scale_by_std:
        out = out * inverse_scale(moments.var, eps, eps_placement, std_floor)[index]
    single = singleton_rows(moments, index, group_ids, singleton_groups)
    out = torch.where(moments.constant[index], torch.zeros_like(out), out)
    out = torch.where(single, x if singleton_groups == "raw" else torch.zeros_like(x), out)
    return torch.where(valid, out, torch.zeros_like(out)).float(), group_metrics(moments, valid)


def leave_one_out_advantages(
    scores: Tensor, group_ids: Tensor, *, singleton_groups: SingletonPolicy = "zero"
) -> tuple[Tensor, dict[str, float]]:
    """RLOO: A_i = r_i − mean_{j≠i, j∈g} r_j = n/(n−1)·(r_i − mean_g) (arXiv:2402.14740 Eq. 5).

    Args:
        scores: [N] rewards, NaN = not applicable (excluded; n counts applicable rows).
        group_ids: [N] prompt ids.
        singleton_groups: "zero", "raw" (baseline 0: A = r) or "error".
    """
    x, valid = checked_scores(scores)
    index, num_groups = group_index(group_ids)
    moments = group_moments(x, valid, index, num_groups, "population")
    n = moments.size[index]
    others = (moments.mean[index] * n - x) / (n - 1).clamp_min(1)
    out = torch.where(moments.constant[index], torch.zeros_like(x), x - others)
    single = singleton_rows(moments, index, group_ids, singleton_groups)
    out = torch.where(single, x if singleton_groups == "raw" else torch.zeros_like(x), out)
    return torch.where(valid, out, torch.zeros_like(out)).float(), group_metrics(moments, valid)


@dataclass(kw_only=True)
class GroupNormalizer(NormalizerConfig):
    """GRPO group z-score, or Dr. GRPO mean-only with `scale_by_std=False`. Reads `rollout.scores`.

    Presets: verl GRPO (unbiased, 1e-6, std + eps), TRL (unbiased, 1e-4), DanceGRPO/Pref-GRPO
    (unbiased, 1e-8, clip 5), DiDi-Instruct (unbiased, 1e-8, clip 3), MedGRPO (unbiased, 1e-6).
    """

    needs_groups: ClassVar[bool] = True  # trainer.group_size >= 2 (toolkit.train.trainer_config.check_group_size)
    scale_by_std: bool = True
    std: StdMode = "unbiased"
    eps: float = 1e-6
    eps_placement: EpsPlacement = "std_plus_eps"
    std_floor: float = 0.0
    singleton_groups: SingletonPolicy = "zero"
    clip: float | None = None

    def __post_init__(self) -> None:
        self._validate()

    def __call__(self, rollout: Rollout) -> Advantages:
        values, metrics = group_normalized_advantages(rollout_scores(rollout), rollout.group_ids, **self._options())
        return finish_advantages(values, metrics, self.clip)


@dataclass(kw_only=True)
class LeaveOneOutNormalizer(NormalizerConfig):
    """RLOO leave-one-out baseline (arXiv:2402.14740). Reads `rollout.scores`."""

    needs_groups: ClassVar[bool] = True
    singleton_groups: SingletonPolicy = "zero"
    clip: float | None = None

    def __post_init__(self) -> None:
        self._validate()

    def __call__(self, rollout: Rollout) -> Advantages:
        values, metrics = leave_one_out_advantages(rollout_scores(rollout), rollout.group_ids, **self._options())
        return finish_advantages(values, metrics, self.clip)
