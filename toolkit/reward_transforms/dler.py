"""DLER reward shaping (arXiv:2510.15110): the truncation length penalty and its difficulty-aware tiers (DA-DLER).

Each class wraps pure tensor functions and records what it did in `rollout.metrics` (rank-local values: groups
never span ranks and nothing here gathers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from toolkit.reward_transforms.common import check_choice, group_inverse, group_sum, safe_mean
from toolkit.rollout import Rollout


def truncation_reward(
    rewards: Tensor,
    lengths: Tensor | None,
    max_length: int | Tensor,
    truncated: Tensor | None = None,
    trunc_coef: float = 0.0,
) -> Tensor:
    """DLER truncation penalty R' = R * 1[|o| <= L] (arXiv:2510.15110, §2).

    Args:
        rewards: [N] raw rewards (NaN stays NaN).
        lengths: [N] response lengths; used when `truncated` is None.
        max_length: L, an int or a per-sample [N] tensor (DA-DLER tiers).
        truncated: [N] bool; when given, the test is "finished properly" (`~truncated`) instead of the
            length test (official code: finish_reason == "stop").
        trunc_coef: factor applied to failing rows: 0 (paper) or 0.1 (official `stop_properly_penalty`).

    Returns:
        [N] float32 penalized rewards. For R >= 0 the result never exceeds R; a negative R would be raised
        towards 0 (the multiplicative form assumes non-negative rewards such as correctness).
    """
    if truncated is not None:
        ok = ~truncated.bool()
    elif lengths is not None:
        ok = lengths <= torch.as_tensor(max_length, device=lengths.device)
    else:
        raise ValueError("truncation_reward needs lengths (length test) or truncated (finish-reason test)")
    factor = torch.where(ok, torch.ones_like(rewards, dtype=torch.float32), torch.full_like(rewards, trunc_coef))
    return rewards.float() * factor


class TruncationPenalty:
    """DLER truncation reward on `rollout.scores` (or component `source`), keeping the raw value.

    The raw score is stored as component `raw_name` (dynamic sampling filters on it, as the official
    code does) and the penalized reward becomes `rollout.scores`. The limit L is `max_length`, or the
    per-sample tensor `rollout.data[length_key]` when present (written by `DifficultyTiers`).

    Args:
        max_length: L (4000 for the R1-distill models).
        mode: "zero" (paper) multiplies failing rows by 0, "factor" by `trunc_coef`.
        trunc_coef: the factor of mode "factor" (official 0.1).
        criterion: "length" tests `rollout.lengths <= L` (paper); "finish_reason" tests `~rollout.truncated`
            (official: finish reason != "stop" is penalized).
        official_compat: resolves unset `mode`/`criterion` to ("factor", "finish_reason").
    """

    def __init__(
        self,
        max_length: int = 4000,
        mode: Literal["zero", "factor"] | None = None,
        trunc_coef: float = 0.1,
        criterion: Literal["length", "finish_reason"] | None = None,
        official_compat: bool = False,
        source: str | None = None,
        raw_name: str = "raw_score",
        length_key: str | None = "max_length",
    ) -> None:
        self.mode = mode or ("factor" if official_compat else "zero")
        self.criterion = criterion or ("finish_reason" if official_compat else "length")
        check_choice("mode", self.mode, ("zero", "factor"))
        check_choice("criterion", self.criterion, ("length", "finish_reason"))
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if not 0.0 <= trunc_coef <= 1.0:
            raise ValueError(f"trunc_coef must be in [0, 1], got {trunc_coef}")
        self.max_length, self.trunc_coef = max_length, trunc_coef
        self.source, self.raw_name, self.length_key = source, raw_name, length_key

    def __call__(self, rollout: Rollout) -> Rollout:
        raw = _read_scores(rollout, self.source, "TruncationPenalty")
        per_sample = self.length_key is not None and self.length_key in rollout.data
        limit: int | Tensor = rollout.data[str(self.length_key)] if per_sample else self.max_length
        if self.criterion == "finish_reason":
            if rollout.truncated is None:
                raise ValueError("criterion='finish_reason' needs rollout.truncated")
            ok = ~rollout.truncated.bool()
        else:
            if rollout.lengths is None:
                raise ValueError("criterion='length' needs rollout.lengths")
            ok = rollout.lengths <= torch.as_tensor(limit, device=rollout.lengths.device)
        coef = self.trunc_coef if self.mode == "factor" else 0.0
        penalized = truncation_reward(raw, None, limit, truncated=~ok, trunc_coef=coef)
        rollout.rewards[self.raw_name] = raw.float()
        rollout.scores = penalized
        n = max(len(rollout), 1)
        changed = torch.isfinite(raw) & (penalized != raw)
        rollout.metrics.update(
            {
                "truncation/rate": float((~ok).sum()) / n,
                "truncation/penalized_frac": float(changed.sum()) / n,
                "truncation/limit_mean": float(torch.as_tensor(limit, dtype=torch.float32).mean()),
                "truncation/per_sample_limit": float(per_sample),
                f"reward/{self.raw_name}": safe_mean(raw),
            }
        )
        return rollout


def _read_scores(rollout: Rollout, source: str | None, who: str) -> Tensor:
    if source is None:
        if rollout.scores is None:
            raise ValueError(f"{who}: rollout.scores is not set (run WeightedSum first or name a source component)")
        return rollout.scores
    if source not in rollout.rewards:
        raise ValueError(f"{who}: unknown reward component {source!r}; available: {sorted(rollout.rewards)}")
    return rollout.rewards[source]


def correctness_ratio(correct: Tensor, group_ids: Tensor) -> Tensor:
    """Per-prompt correctness ratio c(q) = #correct / #applicable, broadcast to rows.

    Args:
        correct: [N] 1/0 correctness, NaN = not applicable (excluded from both counts).
        group_ids: [N] group of each row.

    Returns:
        [N] float32 c(q) of each row's group; NaN for a group with no applicable row.
    """
    _, inverse = group_inverse(group_ids)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    valid = ~torch.isnan(correct)
    hits = group_sum(
        torch.where(valid, correct.float(), torch.zeros_like(correct, dtype=torch.float32)), inverse, num_groups
    )
    count = group_sum(valid.float(), inverse, num_groups)
    ratio = torch.where(count > 0, hits / count.clamp_min(1.0), torch.full_like(hits, math.nan))
    return ratio[inverse]


def difficulty_tier_lengths(
    ratio: Tensor, thresholds: Sequence[float], lengths: Sequence[int], boundary: Literal["easy", "hard"] = "easy"
) -> tuple[Tensor, Tensor]:
    """DA-DLER tier of each row and its truncation length (arXiv:2510.15110, §3.5).

    Args:
        ratio: [N] correctness ratio c(q); NaN (no applicable rows) goes to the hardest tier 0.
        thresholds: n increasing thresholds d_1 < ... < d_n.
        lengths: n + 1 lengths, hardest tier (lowest c) first.
        boundary: where c == d_i goes: "easy" (the higher tier, `bucketize(right=True)`, spec default) or "hard".

    Returns:
        ([N] int64 tier index, [N] int64 length limit).
    """
    bounds = torch.tensor(list(thresholds), dtype=torch.float32, device=ratio.device)
    tiers = torch.bucketize(ratio.float(), bounds, right=boundary == "easy")
    tiers = torch.where(torch.isnan(ratio), torch.zeros_like(tiers), tiers)
    table = torch.tensor(list(lengths), dtype=torch.int64, device=ratio.device)
    return tiers, table[tiers]


class DifficultyTiers:
    """DA-DLER: per-prompt correctness ratio -> per-sample length limit in `rollout.data[output_key]`.

    Run it before `TruncationPenalty`, which picks the per-sample limit up. c(q) comes from component
    `source` (default "raw_score" when present, else `rollout.scores`): a row counts as correct when its
    value is >= `correct_threshold` and, with `cap_at_max_length`, its length is within the largest tier
    length (the spec's "scored with the ordinary 4000-token truncation reward"). Compute c before dynamic
    sampling (spec default): after filtering, only groups with 0 < c < 1 remain.
    """

    def __init__(
        self,
        thresholds: Sequence[float] = (0.5,),
        lengths: Sequence[int] = (4000, 2000),
        boundary: Literal["easy", "hard"] = "easy",
        source: str | None = None,
        correct_threshold: float = 0.5,
        cap_at_max_length: bool = True,
        output_key: str = "max_length",
    ) -> None:
        check_choice("boundary", boundary, ("easy", "hard"))
        self.thresholds, self.lengths = [float(t) for t in thresholds], [int(n) for n in lengths]
        if len(self.lengths) != len(self.thresholds) + 1:
            raise ValueError(f"need len(lengths) == len(thresholds) + 1, got {self.lengths} and {self.thresholds}")
        if any(b <= a for a, b in zip(self.thresholds, self.thresholds[1:], strict=False)):
            raise ValueError(f"thresholds must be strictly increasing, got {self.thresholds}")
        if any(not 0.0 <= t <= 1.0 for t in self.thresholds) or any(n < 1 for n in self.lengths):
            raise ValueError(
                f"thresholds must lie in [0, 1] and lengths be >= 1; got {self.thresholds}, {self.lengths}"
            )
        self.boundary: Literal["easy", "hard"] = boundary
        self.source, self.correct_threshold = source, correct_threshold
        self.cap_at_max_length, self.output_key = cap_at_max_length, output_key

    def __call__(self, rollout: Rollout) -> Rollout:
        source = self.source if self.source is not None or "raw_score" not in rollout.rewards else "raw_score"
        values = _read_scores(rollout, source, "DifficultyTiers").float()
        correct = torch.where(torch.isnan(values), values, (values >= self.correct_threshold).float())
        if self.cap_at_max_length:
            if rollout.lengths is None:
                raise ValueError("DifficultyTiers(cap_at_max_length=True) needs rollout.lengths")
            correct = torch.where(rollout.lengths.to(correct.device) > max(self.lengths), 0.0 * correct, correct)
        ratio = correctness_ratio(correct, rollout.group_ids)
        tiers, limits = difficulty_tier_lengths(ratio, self.thresholds, self.lengths, self.boundary)
        rollout.data[self.output_key] = limits
        rollout.data["difficulty_tier"] = tiers
        _, inverse = group_inverse(rollout.group_ids)
        num_groups = int(inverse.max()) + 1 if len(rollout) else 0
        first = torch.full((num_groups,), len(rollout), dtype=torch.long, device=inverse.device)
        first = first.scatter_reduce(0, inverse, torch.arange(len(rollout), device=inverse.device), reduce="amin")
        group_tiers, group_ratio = tiers[first], ratio[first]
        for i in range(len(self.lengths)):
            rollout.metrics[f"difficulty/tier_{i}_groups"] = float((group_tiers == i).sum())
        rollout.metrics["difficulty/undefined_groups"] = float(torch.isnan(group_ratio).sum())
        rollout.metrics["difficulty/ratio_mean"] = safe_mean(group_ratio)
        return rollout
