"""Dynamic sampling (DAPO arXiv:2503.14476 §3.2; DLER arXiv:2510.15110 §3.3) and overlong masking.

A group whose scores are all equal carries no learning signal under a group baseline; dynamic sampling
drops such groups and generates more batches until `target_groups` survive, with a finite round cap
(the official DAPO/DLER loop can run forever). Overlong filtering takes truncated samples out of the loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from toolkit.reward_transforms.common import check_choice, group_inverse, group_range, group_sum
from toolkit.rollout import Rollout, concat_rollouts


class RefillCapError(RuntimeError):
    """Dynamic sampling hit its generation-round cap without enough non-degenerate groups."""


def zero_variance_groups(
    scores: Tensor, group_ids: Tensor, atol: float = 0.0, include_singletons: bool = False
) -> Tensor:
    """[N] bool, True for rows whose group has zero score variance.

    A group is degenerate when max - min of its finite scores is <= `atol`: with `atol=0` this is exactly
    "population std == 0" (official `np.std(...) > 0` keep rule) without its rounding. NaN scores (not
    applicable) are ignored; a group with no finite score is degenerate. Singleton groups are kept by
    default (official: "keep if std > 0 or it has one sample"); `include_singletons=True` flags them too.

    Args:
        scores: [N] float scores (raw score for DLER, before the truncation penalty).
        group_ids: [N] group of each row.
        atol: tolerance on the score range.
        include_singletons: flag one-sample groups as degenerate.

    Returns:
        [N] bool mask (True = drop).
    """
    if scores.shape != group_ids.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and group_ids {tuple(group_ids.shape)} must both be [N]")
    _, inverse = group_inverse(group_ids)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    high, low = group_range(scores, inverse, num_groups)
    degenerate = torch.isnan(high) | (high - low <= atol)
    if not include_singletons:
        sizes = group_sum(torch.ones_like(scores, dtype=torch.float32), inverse, num_groups)
        degenerate &= sizes > 1
    return degenerate[inverse]


def _values(rollout: Rollout, on: str) -> Tensor:
    if on == "scores":
        if rollout.scores is None:
            raise ValueError("filter on='scores' but rollout.scores is not set")
        return rollout.scores
    if on not in rollout.rewards:
        raise ValueError(f"filter on={on!r}: unknown component; use 'scores' or one of {sorted(rollout.rewards)}")
    return rollout.rewards[on]


def drop_zero_variance_groups(
    rollout: Rollout, on: str = "scores", atol: float = 0.0, include_singletons: bool = False
) -> tuple[Rollout, dict[str, float]]:
    """Remove the rows of zero-variance groups; `on` = "scores" or a reward component name (e.g. "raw_score").

    Returns:
        (the kept rows, metrics `filter/groups`, `filter/zero_variance_groups`, `filter/filtered_frac`).
    """
    drop = zero_variance_groups(_values(rollout, on), rollout.group_ids, atol, include_singletons)
    num_groups = int(torch.unique(rollout.group_ids).numel())
    dropped = int(torch.unique(rollout.group_ids[drop]).numel())
    metrics = {
        "filter/groups": float(num_groups),
        "filter/zero_variance_groups": float(dropped),
        "filter/filtered_frac": dropped / num_groups if num_groups else 0.0,
    }
    return rollout.select(~drop), metrics


class ZeroVarianceFilter:
    """RewardTransform form of `drop_zero_variance_groups` (no refill; see `refill` for that)."""

    def __init__(self, on: str = "scores", atol: float = 0.0, include_singletons: bool = False) -> None:
        if atol < 0:
            raise ValueError(f"atol must be >= 0, got {atol}")
        self.on, self.atol, self.include_singletons = on, atol, include_singletons

    def __call__(self, rollout: Rollout) -> Rollout:
        kept, metrics = drop_zero_variance_groups(rollout, self.on, self.atol, self.include_singletons)
        kept.metrics.update(metrics)
        return kept


def _renumber_groups(rollout: Rollout, start: int) -> Rollout:
    """Map group ids to start, start + 1, ... (sorted-id order) so ids stay unique across rounds."""
    _, inverse = group_inverse(rollout.group_ids)
    return dataclasses.replace(rollout, group_ids=inverse + start)


def _first_groups(rollout: Rollout, count: int) -> Rollout:
    """Rows of the first `count` groups (by id; ids are increasing in generation order here)."""
    unique, inverse = group_inverse(rollout.group_ids)
    if unique.numel() <= count:
        return rollout
    return rollout.select(inverse < count)


def refill(
    sample_batch: Callable[[], Rollout],
    target_groups: int,
    max_rounds: int = 8,
    on_cap: Literal["error", "partial"] = "error",
    on: str = "scores",
    atol: float = 0.0,
    include_singletons: bool = False,
    sync: Callable[[bool], bool] | None = None,
) -> tuple[Rollout, dict[str, float]]:
    """Dynamic sampling with a refill cap: generate until `target_groups` non-degenerate groups survive.

    Args:
        sample_batch: returns a freshly generated and scored Rollout (one round).
        target_groups: number of groups to return (exactly; extra surviving groups are cut, as DAPO does).
        max_rounds: generation-round cap; 0 = unlimited (official DAPO/DLER; only by explicit choice).
        on_cap: "error" raises RefillCapError at the cap; "partial" returns the surviving groups (fewer
            than the target) with `filter/cap_hit` = 1. With nothing surviving it raises in both modes.
        on, atol, include_singletons: see `drop_zero_variance_groups`.
        sync: given "this rank needs another round", whether any rank does (sharded training, where every rank
            must sample as often as the others: a rank already done samples along and its extra groups are cut).

    Returns:
        (rollout with group ids 0..target-1 renumbered in generation order, metrics `filter/rounds`,
        `filter/generated_groups`, `filter/kept_groups`, `filter/filtered_frac`, `filter/cap_hit`).
    """
    check_choice("on_cap", on_cap, ("error", "partial"))
    if target_groups < 1 or max_rounds < 0:
        raise ValueError(f"need target_groups >= 1 and max_rounds >= 0, got {target_groups}, {max_rounds}")
    kept: list[Rollout] = []
    generated = survived = rounds = 0
    while True:
        more = survived < target_groups and (max_rounds == 0 or rounds < max_rounds)
        if not (sync(more) if sync is not None else more):
            break
        batch = _renumber_groups(sample_batch(), start=generated)
        rounds += 1
        generated += int(torch.unique(batch.group_ids).numel())
        good, _ = drop_zero_variance_groups(batch, on, atol, include_singletons)
        if len(good):
            kept.append(good)
            survived += int(torch.unique(good.group_ids).numel())
    cap_hit = survived < target_groups
    metrics = {
        "filter/rounds": float(rounds),
        "filter/generated_groups": float(generated),
        "filter/kept_groups": float(min(survived, target_groups)),
        "filter/filtered_frac": 1.0 - survived / generated if generated else 0.0,
        "filter/cap_hit": float(cap_hit),
    }
    if cap_hit and (on_cap == "error" or survived == 0):
        raise RefillCapError(
            f"dynamic sampling: only {survived} of {target_groups} target groups had non-zero score variance "
            f"after {rounds} generation rounds (max_rounds={max_rounds}, {generated} groups generated); raise "
            "max_rounds, use on_cap='partial', or check the reward (all-equal scores)"
        )
    out = _renumber_groups(_first_groups(concat_rollouts(kept), target_groups), start=0)
    out.metrics.update(metrics)
    return out, metrics


def overlong_mask(rollout: Rollout) -> Tensor:
    """[N] bool, False for truncated samples (DAPO overlong filtering, arXiv:2503.14476 §3.4)."""
    if rollout.truncated is None:
        raise ValueError("overlong_mask needs rollout.truncated")
    return ~rollout.truncated.bool()


def mask_overlong(rollout: Rollout) -> tuple[Rollout, dict[str, float]]:
    """Exclude truncated samples from the loss: their `mask` rows become all False (rows are kept,
    so group statistics still see them)."""
    keep = overlong_mask(rollout)
    masked = dataclasses.replace(rollout, mask=rollout.mask & keep.to(rollout.mask.device)[:, None])
    n = len(rollout)
    return masked, {"filter/overlong_frac": float((~keep).sum()) / n if n else 0.0}


class OverlongFilter:
    """RewardTransform form of `mask_overlong`."""

    def __call__(self, rollout: Rollout) -> Rollout:
        masked, metrics = mask_overlong(rollout)
        masked.metrics.update(metrics)
        return masked
