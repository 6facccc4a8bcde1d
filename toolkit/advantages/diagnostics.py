"""Advantage diagnostics: signals that the advantage estimator manufactured a learning signal from noise.

The "illusory advantage": GRPO's per-group std normalization A = (r − mean_g)/(std_g + eps) rescales any
non-constant group to unit scale, so a group whose rewards differ only by float noise (a judge's jitter, a
1e-6 tie-break) gets advantages as large as a group with a real right and wrong answer.
`illusory_advantage_fraction` counts those groups; it is logged as `advantage/illusory_frac`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from toolkit.advantages.stats import checked_scores, group_index, group_moments
from toolkit.rollout import Rollout

ILLUSORY_METRIC = "advantage/illusory_frac"


def illusory_advantage_fraction(
    scores: Tensor,
    advantages: Tensor,
    group_ids: Tensor,
    spread_threshold: float = 1e-3,
    *,
    reward_range: float | None = None,
    unit_scale: float = 0.5,
    mask: Tensor | None = None,
) -> float:
    """Fraction of groups whose reward spread is tiny yet whose advantages are unit-scale.

    A group counts when it has at least 2 applicable (non-NaN) scores. It is illusory when the population
    std of those scores is below the threshold (`spread_threshold`, or `spread_threshold × reward_range`
    when `reward_range` is given) and the root-mean-square of its advantages is at least `unit_scale`.
    Constant groups (std exactly 0) get zero advantages from every shipped normalizer and are not illusory.

    Args:
        scores: [N] the scalar rewards the normalizer saw; NaN = not applicable (row ignored).
        advantages: [N] or [N, T] advantages computed from `scores`.
        group_ids: [N] prompt ids.
        spread_threshold: a group's reward std below this is noise (absolute, or relative to `reward_range`).
        reward_range: the reward's natural range (1.0 for a [0, 1] reward); None: the threshold is absolute.
        unit_scale: the advantage RMS from which a group's advantages count as a real signal.
        mask: [N, T] bool, the trained steps of [N, T] advantages (default: all steps); unused for [N].

    Returns:
        The fraction in [0, 1], or NaN when no group has 2 applicable scores.

    Raises:
        ValueError: mismatched shapes, ±inf scores, non-finite advantages, or a bad threshold.
    """
    _check_arguments(spread_threshold, reward_range, unit_scale)
    x, valid = checked_scores(scores.detach().cpu())  # a per-step metric: small, so CPU float64
    n = x.shape[0]
    squares, steps = _row_square_sums(advantages, mask, n)
    if group_ids.shape != (n,):
        raise ValueError(f"group_ids must be [N={n}], got shape {tuple(group_ids.shape)}")
    index, num_groups = group_index(group_ids.detach().cpu())
    moments = group_moments(x, valid, index, num_groups, "population")
    w = valid.to(x.dtype)
    group_squares = torch.zeros(num_groups, dtype=x.dtype).index_add_(0, index, squares * w)
    group_steps = torch.zeros(num_groups, dtype=x.dtype).index_add_(0, index, steps * w)
    rms = torch.sqrt(group_squares / group_steps.clamp_min(1))
    threshold = spread_threshold * (reward_range if reward_range is not None else 1.0)
    eligible = moments.size >= 2
    tiny = moments.var.sqrt() < threshold
    illusory = eligible & tiny & (rms >= unit_scale)
    count = int(eligible.sum())
    return float(illusory.sum()) / count if count else math.nan


def illusory_advantage_metrics(rollout: Rollout, spread_threshold: float = 1e-3) -> dict[str, float]:
    """`{"advantage/illusory_frac": ...}` for a rollout with scores and advantages; `{}` otherwise."""
    if rollout.scores is None or rollout.advantages is None:
        return {}
    fraction = illusory_advantage_fraction(
        rollout.scores, rollout.advantages, rollout.group_ids, spread_threshold, mask=rollout.mask
    )
    return {ILLUSORY_METRIC: fraction}


def _check_arguments(spread_threshold: float, reward_range: float | None, unit_scale: float) -> None:
    if not (math.isfinite(spread_threshold) and spread_threshold >= 0):
        raise ValueError(f"spread_threshold={spread_threshold!r} must be a finite number >= 0")
    if reward_range is not None and not (math.isfinite(reward_range) and reward_range > 0):
        raise ValueError(
            f"reward_range={reward_range!r} must be a finite number > 0 (or None for an absolute threshold)"
        )
    if not (math.isfinite(unit_scale) and unit_scale > 0):
        raise ValueError(f"unit_scale={unit_scale!r} must be a finite number > 0")


def _row_square_sums(advantages: Tensor, mask: Tensor | None, n: int) -> tuple[Tensor, Tensor]:
    """Per row: [N] sum of squared advantages over its (masked) steps and [N] number of those steps, float64."""
    if advantages.dim() not in (1, 2) or advantages.shape[0] != n:
        raise ValueError(f"advantages must be [N={n}] or [N={n}, T], got shape {tuple(advantages.shape)}")
    a = advantages.detach().double().cpu()
    if not bool(torch.isfinite(a).all()):
        raise ValueError("advantages hold non-finite values")
    if a.dim() == 1:
        return a * a, torch.ones_like(a)
    if mask is None:
        keep = torch.ones_like(a)
    elif mask.shape != a.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal advantages shape {tuple(a.shape)}")
    else:
        keep = mask.detach().cpu().to(a.dtype)
    return (a * a * keep).sum(dim=1), keep.sum(dim=1)
