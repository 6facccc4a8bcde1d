"""Pref-GRPO pairwise-preference win rates (arXiv:2508.20751; official `cal_win_rate`).

The judge compares every unordered pair i < j of a group once (the lower index shown first) or in both
orders; the win rate of image i is its wins over G - 1 comparisons, ties and unparsable answers counting
0.5 for each side, rounded to 3 decimals. The judge itself lives in `rewards/`; this is only the math.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from toolkit.reward_transforms.common import check_choice, group_inverse, safe_mean
from toolkit.rollout import Rollout

PairOrder = Literal["one", "symmetric"]


def all_pairs(group_size: int) -> Tensor:
    """[G(G-1)/2, 2] int64 unordered pairs (i, j), i < j, in row-major order (0,1), (0,2), ..., (G-2,G-1)."""
    if group_size < 2:
        raise ValueError(f"pairwise win rates need group_size >= 2, got {group_size}")
    return torch.triu_indices(group_size, group_size, offset=1).T.contiguous()


def preference_matrix(outcomes: Tensor, group_size: int) -> Tensor:
    """Scatter per-pair outcomes [..., P] (pairs in `all_pairs` order) into a [..., G, G] matrix.

    Entry [i, j] (i < j) is the outcome with i shown first: 1 = i wins, 0 = j wins, 0.5 tie/unparsable.
    Entries off the upper triangle are NaN (not judged).
    """
    pairs = all_pairs(group_size).to(outcomes.device)
    if outcomes.shape[-1] != pairs.shape[0]:
        raise ValueError(f"expected {pairs.shape[0]} pair outcomes for G={group_size}, got {outcomes.shape[-1]}")
    out = torch.full((*outcomes.shape[:-1], group_size, group_size), math.nan, device=outcomes.device)
    out[..., pairs[:, 0], pairs[:, 1]] = outcomes.float()
    return out


def win_rates(preferences: Tensor, order: PairOrder = "one", decimals: int | None = 3) -> Tensor:
    """Pref-GRPO win rate w_i = wins_i / (G - 1) from a pairwise judgement matrix (arXiv:2508.20751).

    Args:
        preferences: [..., G, G]; entry [a, b] is the judgement with a shown first: 1 = a wins, 0 = b wins,
            0.5 = tie. NaN = unparsable answer or failed call, counted as 0.5 (official). With order "one"
            only the upper triangle (a < b) is read; with "symmetric" every off-diagonal entry is, and each
            pair's score is the mean of its two orders.
        order: "one" (official: lower index always shown first) or "symmetric" (position bias averaged out).
        decimals: round to this many decimals as Python's `round` does on the float64 value (official: 3);
            None keeps full precision.

    Returns:
        [..., G] float32 win rates in [0, 1]; before rounding their group mean is exactly 0.5.
    """
    check_choice("order", order, ("one", "symmetric"))
    g = preferences.shape[-1]
    if preferences.dim() < 2 or preferences.shape[-2] != g:
        raise ValueError(f"preferences must be [..., G, G], got shape {tuple(preferences.shape)}")
    if g < 2:
        raise ValueError(f"pairwise win rates need group_size >= 2, got {g}")
    p = preferences.double()
    eye = torch.eye(g, dtype=torch.bool, device=p.device)
    used = torch.ones(g, g, dtype=torch.bool, device=p.device).triu(1) if order == "one" else ~eye
    values = p[..., used]
    if bool(((values < 0) | (values > 1)).any()):
        raise ValueError("pairwise judgements must lie in [0, 1] (1 = first shown wins, 0.5 = tie) or be NaN")
    p = torch.where(torch.isnan(p), torch.full_like(p, 0.5), p)
    used_f = used.double()
    wins = (used_f * p).sum(-1) + (used_f * (1 - p)).sum(-2)
    rates = wins / (g - 1) / (1.0 if order == "one" else 2.0)
    if decimals is not None:
        rounded = [round(v, decimals) for v in rates.flatten().tolist()]
        rates = torch.tensor(rounded, dtype=torch.float64, device=p.device).reshape(rates.shape)
    return rates.float()


class PairwiseWinRate:
    """Stored pairwise judgements `rollout.data[key]` -> win-rate component (and `rollout.scores`).

    Accepted layouts of `rollout.data[key]` (every group must have the same size G):
      * [N, G]: row n holds row i of its group's judgement matrix, i = n's position among its group's
        rows (row order). This layout survives `select`/`concat_rollouts`.
      * [B, G, G]: one matrix per group, groups in sorted group-id order.
    """

    def __init__(
        self,
        key: str = "pairwise",
        order: PairOrder = "one",
        decimals: int | None = 3,
        output: str = "win_rate",
        set_scores: bool = True,
    ) -> None:
        check_choice("order", order, ("one", "symmetric"))
        if decimals is not None and decimals < 0:
            raise ValueError(f"decimals must be >= 0 or None, got {decimals}")
        self.key, self.order, self.decimals = key, order, decimals
        self.output, self.set_scores = output, set_scores

    def __call__(self, rollout: Rollout) -> Rollout:
        if self.key not in rollout.data:
            raise ValueError(f"PairwiseWinRate: rollout.data has no {self.key!r}; keys: {sorted(rollout.data)}")
        if len(rollout) == 0:
            rollout.rewards[self.output] = torch.empty(0, device=rollout.group_ids.device)
            if self.set_scores:
                rollout.scores = rollout.rewards[self.output]
            return rollout
        unique, inverse = group_inverse(rollout.group_ids)
        sizes = torch.bincount(inverse, minlength=unique.numel())
        if sizes.numel() and bool((sizes != sizes[0]).any()):
            raise ValueError(f"PairwiseWinRate needs equal group sizes, got {sorted(set(sizes.tolist()))}")
        g = int(sizes[0])
        rows = torch.sort(inverse, stable=True).indices.reshape(unique.numel(), g)  # [B, G] row of each member
        matrices = self._matrices(torch.as_tensor(rollout.data[self.key]), rows, len(rollout), g)
        rates = win_rates(matrices.to(rows.device), self.order, self.decimals)
        scores = torch.empty(len(rollout), dtype=torch.float32, device=rows.device)
        scores[rows.flatten()] = rates.flatten()
        rollout.rewards[self.output] = scores
        if self.set_scores:
            rollout.scores = scores
        used = torch.ones(g, g, dtype=torch.bool).triu(1) if self.order == "one" else ~torch.eye(g, dtype=torch.bool)
        judged = matrices[..., used.to(matrices.device)]
        rollout.metrics[f"reward/{self.output}"] = safe_mean(scores)
        rollout.metrics["pairwise/tie_frac"] = float((judged == 0.5).float().mean()) if judged.numel() else 0.0
        rollout.metrics["pairwise/unparsable"] = float(torch.isnan(judged).sum())
        return rollout

    def _matrices(self, stored: Tensor, rows: Tensor, n: int, g: int) -> Tensor:
        if stored.dim() == 2 and stored.shape == (n, g):
            return stored[rows.to(stored.device)].float()
        if stored.dim() == 3 and stored.shape == (rows.shape[0], g, g):
            return stored.float()
        raise ValueError(
            f"rollout.data[{self.key!r}] must be [N={n}, G={g}] or [B={rows.shape[0]}, G, G], got {tuple(stored.shape)}"
        )
