"""Statistics shared by the advantage normalizers: validated scores, group and batch moments, whitening.

Conventions, documented once and used by every module of `toolkit.advantages`:
NaN = not applicable → advantage 0, excluded from every statistic and counted; ±inf → ValueError;
empty batch → ValueError; statistics in float64 from any input dtype, advantages returned as float32;
constant groups → exact zeros, counted. Batch-wide statistics go through `gather_rows`.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, Literal, NamedTuple, get_args

import torch
from torch import Tensor

from toolkit.distributed import gather_rows
from toolkit.interfaces import Advantages
from toolkit.rollout import Rollout

StdMode = Literal["unbiased", "population"]
EpsPlacement = Literal["std_plus_eps", "rsqrt_var_eps"]
SingletonPolicy = Literal["zero", "raw", "error"]
Weighting = Literal["sequence", "token"]
Baseline = Literal["none", "group_mean"]
StdSource = Literal["advantages", "scores"]


# ----------------------------------------------------------------------------------------------- validation


def check_option(name: str, value: object, allowed: object) -> None:
    """Raise a ValueError naming `value` and the allowed values of the Literal type `allowed`."""
    options = get_args(allowed)
    if value not in options:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {list(options)}")


def check_clip(clip: float | None) -> None:
    """`clip` bounds |A|: a finite number > 0 (0 would zero every advantage), or None for no clipping."""
    if clip is not None and not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip={clip!r} must be a finite number > 0 (or None for no clipping)")


def check_nonnegative(name: str, value: float) -> None:
    """ValueError naming `name` and `value` unless it is a finite number >= 0."""
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}={value!r} must be a finite number >= 0")


def check_positive(name: str, value: float) -> None:
    """ValueError naming `name` and `value` unless it is a finite number > 0."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value!r} must be a finite number > 0")


def rollout_scores(rollout: Rollout) -> Tensor:
    """`rollout.scores`, or a ValueError when the reward stage has not set them."""
    if rollout.scores is None:
        raise ValueError("rollout.scores is None; run the reward stage (and transforms) before the normalizer")
    return rollout.scores


def checked_scores(scores: Tensor, name: str = "scores") -> tuple[Tensor, Tensor]:
    """Float64 copy of [N] scores (NaN → 0) and the [N] bool mask of applicable (non-NaN) rows.

    Statistics run in float64: a float32 mean of close scores (0.901 … 0.904) is off by ~5e-5
    after standardisation; float64 on the float32 inputs is exact to ~1e-7.

    Raises:
        ValueError: empty or non-1-D scores, or ±inf scores (the rows are named).
    """
    if scores.dim() != 1:
        raise ValueError(f"{name} must be [N], got shape {tuple(scores.shape)}")
    if scores.numel() == 0:
        raise ValueError(f"{name} is empty: cannot normalize an empty batch")
    x = scores.detach().double()
    inf_rows = torch.isinf(x).nonzero(as_tuple=True)[0].tolist()
    if inf_rows:
        raise ValueError(f"{name} has ±inf at rows {inf_rows[:20]}; use NaN for 'not applicable'")
    valid = ~torch.isnan(x)
    return torch.where(valid, x, torch.zeros_like(x)), valid


# ------------------------------------------------------------------------------------------- statistics


class GroupMoments(NamedTuple):
    """Per-group statistics over applicable rows, each [num_groups]."""

    size: Tensor
    mean: Tensor
    var: Tensor
    constant: Tensor


def group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """[N] dense group index in 0..num_groups-1 (sorted-id order) and num_groups."""
    _, index = torch.unique(group_ids, return_inverse=True)
    return index, int(index.max()) + 1 if index.numel() else 0


def group_moments(x: Tensor, valid: Tensor, index: Tensor, num_groups: int, std: StdMode) -> GroupMoments:
    """Two-pass per-group count, mean, variance and constancy (max == min) over rows where `valid`.

    The unbiased variance of a group with fewer than 2 rows is reported as 0 (callers apply a
    singleton policy). `constant` is exact, so constant groups can be mapped to exact zeros.
    """
    w = valid.to(x.dtype)
    count = torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add_(0, index, w)
    total = torch.zeros_like(count).index_add_(0, index, x * w)
    mean = total / count.clamp_min(1)
    dev = (x - mean[index]) * w
    ss = torch.zeros_like(count).index_add_(0, index, dev * dev)
    denom = count - 1 if std == "unbiased" else count
    var = torch.where(denom > 0, ss / denom.clamp_min(1), torch.zeros_like(ss))
    hi = torch.full_like(count, -torch.inf).scatter_reduce(0, index, torch.where(valid, x, -torch.inf), "amax")
    lo = torch.full_like(count, torch.inf).scatter_reduce(0, index, torch.where(valid, x, torch.inf), "amin")
    return GroupMoments(count, mean, var, (hi == lo) & (count > 0))


def inverse_scale(var: Tensor, eps: float, eps_placement: EpsPlacement, std_floor: float = 0.0) -> Tensor:
    """1/(max(std, floor) + eps) or rsqrt(max(var, floor²) + eps), elementwise."""
    if eps_placement == "std_plus_eps":
        return 1.0 / (var.clamp_min(0).sqrt().clamp_min(std_floor) + eps)
    return torch.rsqrt(var.clamp_min(std_floor**2) + eps)


class BatchMoments(NamedTuple):
    mean: float
    var: float
    weight: float
    constant: bool


def batch_moments(values: Tensor, weights: Tensor, std: StdMode) -> BatchMoments:
    """Weighted mean/variance over all ranks (one summary row per rank through `gather_rows`).

    `weights` [M] are 0 for excluded entries, 1 per sequence or the token count per row (token
    weighting, verl `masked_whiten`). The unbiased variance multiplies by n/(n − 1), n = Σ weights.
    Sums are accumulated in float64; `constant` (global max == min) is exact.

    Raises:
        ValueError: unbiased variance of a non-constant set with total weight <= 1.
    """
    v, w = values.detach().double(), weights.detach().double()
    used = w > 0
    hi = v[used].max() if bool(used.any()) else v.new_tensor(-torch.inf)
    lo = v[used].min() if bool(used.any()) else v.new_tensor(torch.inf)
    rows = gather_rows(torch.stack([w.sum(), (w * v).sum(), hi, -lo])[None])
    n, total = float(rows[:, 0].sum()), float(rows[:, 1].sum())
    constant = n <= 0 or bool(rows[:, 2].max() == -rows[:, 3].max())  # global max == global min
    mean = total / n if n > 0 else 0.0
    if constant:
        return BatchMoments(mean, 0.0, n, True)
    ss = float(gather_rows((w * (v - mean) ** 2).sum()[None]).sum())
    if std == "population":
        return BatchMoments(mean, ss / n, n, False)
    if n <= 1:
        raise ValueError(f"unbiased batch variance needs a total weight > 1, got {n}; use std='population'")
    return BatchMoments(mean, ss / (n - 1), n, False)


def whiten(
    values: Tensor,
    weights: Tensor,
    *,
    std: StdMode,
    eps: float,
    eps_placement: EpsPlacement,
    center: bool = True,
    std_values: Tensor | None = None,
) -> tuple[Tensor, float, float]:
    """(values − batch mean) · batch scale, with statistics over every rank (verl `masked_whiten`).

    Args:
        values: [M] values (sequence level) or flattened token values.
        weights: [M] per-entry weights (0 = excluded from the statistics; returned as exact 0).
        std, eps, eps_placement: the variance estimator and where eps goes.
        center: subtract the batch mean (False: only divide, TRL "batch" scaling).
        std_values: [M] values whose spread sets the scale (default `values`; Lite-PPO uses raw scores).

    Returns:
        The whitened [M] values (all exact zeros when the scale statistic is constant, e.g. a
        single entry), the batch mean of `values` and the batch std used for the scale.
    """
    moments = batch_moments(values, weights, std)
    spread = moments if std_values is None else batch_moments(std_values, weights, std)
    if spread.constant:
        return torch.zeros_like(values), moments.mean, 0.0
    scale = inverse_scale(values.new_tensor(spread.var), eps, eps_placement)
    shifted = values - moments.mean if center else values
    return torch.where(weights > 0, shifted * scale, torch.zeros_like(values)), moments.mean, spread.var**0.5


# ------------------------------------------------------------------------------------------ finishing


def clip_advantages(values: Tensor, clip: float | None) -> tuple[Tensor, float]:
    """Symmetric clamp to [−clip, clip] (Flow-GRPO/Pref-GRPO ±5, DiDi-Instruct ±3) and the clipped fraction."""
    if clip is None:
        return values, 0.0
    frac = float((values.abs() > clip).float().mean()) if values.numel() else 0.0
    return values.clamp(-clip, clip), frac


def finish_advantages(
    values: Tensor, metrics: dict[str, float], clip: float | None, mask: Tensor | None = None
) -> Advantages:
    """Clip, check finiteness, add `advantage/*` summary metrics (over `mask` for [N, T] outputs)."""
    values, frac = clip_advantages(values, clip)
    bad = (~torch.isfinite(values)).reshape(values.shape[0], -1).any(dim=1).nonzero(as_tuple=True)[0].tolist()
    if bad:
        raise ValueError(f"non-finite advantages at rows {bad[:20]}; check eps (must be > 0 for tiny spreads)")
    shown = values[mask] if mask is not None else values
    if shown.numel():
        metrics["advantage/mean"] = float(shown.mean())
        metrics["advantage/std"] = float(shown.std(unbiased=False))
        metrics["advantage/min"] = float(shown.min())
        metrics["advantage/max"] = float(shown.max())
    if clip is not None:
        metrics["advantage/clip_frac"] = frac
    return Advantages(values=values, metrics=metrics)


def group_metrics(moments: GroupMoments, valid: Tensor) -> dict[str, float]:
    zero_var = moments.constant & (moments.size >= 2)
    return {
        "normalizer/nan_rewards": float((~valid).sum()),
        "normalizer/zero_variance_groups": float(zero_var.float().mean()),
        "normalizer/zero_variance_groups_count": float(zero_var.sum()),
        "normalizer/singleton_groups": float((moments.size == 1).sum()),
    }


def singleton_rows(moments: GroupMoments, index: Tensor, group_ids: Tensor, policy: SingletonPolicy) -> Tensor:
    singleton = moments.size == 1
    if policy == "error" and bool(singleton.any()):
        ids = torch.unique(group_ids)[singleton].tolist()
        raise ValueError(f"groups {ids[:20]} have a single applicable response; singleton_groups='error'")
    return singleton[index]


# ----------------------------------------------------------------------------------- group normalizers


class NormalizerConfig:
    """Shared behaviour of the normalizer config dataclasses: validation and the math's kwargs."""

    clip: float | None

    def _validate(self) -> None:
        for name, kind in (
            ("std", StdMode),
            ("restandardize_std", StdMode),
            ("eps_placement", EpsPlacement),
            ("singleton_groups", SingletonPolicy),
            ("weighting", Weighting),
            ("baseline", Baseline),
            ("std_source", StdSource),
        ):
            if hasattr(self, name):
                check_option(name, getattr(self, name), kind)
        # eps 0 is allowed: constant groups get exact zeros and a non-finite advantage raises (finish_advantages).
        for name in ("eps", "restandardize_eps", "std_floor"):
            if hasattr(self, name):
                check_nonnegative(name, getattr(self, name))
        check_clip(self.clip)

    def _options(self, *exclude: str) -> dict[str, Any]:
        skip = {"clip", *exclude}
        names = [f.name for f in fields(self)]  # type: ignore[arg-type]  # subclasses are dataclasses
        return {name: getattr(self, name) for name in names if not name.startswith("_") and name not in skip}
