"""Generalized advantage estimation with a critic, and batch-wide masked whitening (PPO path, e.g. PPR).

GAE (arXiv:1506.02438) over per-step rewards [N, T] and critic values [N, T]; steps where the mask
is False are skipped (their value is not used and the TD chain continues across them, as verl's
multi-turn GAE), which for trailing padding equals the classic recursion with V := 0 beyond the end.
Without values this is REINFORCE++'s discounted return (arXiv:2501.03262) followed by whitening.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from toolkit.advantages.stats import (
    EpsPlacement,
    StdMode,
    check_clip,
    check_nonnegative,
    check_option,
    checked_scores,
    finish_advantages,
    whiten,
)
from toolkit.interfaces import Advantages
from toolkit.rollout import Rollout


def gae_advantages(
    token_rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 1.0
) -> tuple[Tensor, Tensor]:
    """GAE(γ, λ): δ_t = r_t + γV_{t'} − V_t, A_t = δ_t + γλA_{t'} (arXiv:1506.02438 Eq. 16).

    t' is the next step with mask True (none: V := 0, A := 0). Computed in float32, no grad.

    Args:
        token_rewards: [N, T] per-step rewards (must be 0 where mask is False).
        values: [N, T] critic values V_t (ignored where mask is False).
        mask: [N, T] bool, the steps the recursion runs over.
        gamma, lam: discount and GAE λ (PPR: γ = λ = 1).

    Returns:
        advantages [N, T] and returns = advantages + values [N, T], both 0 where mask is False.
    """
    rewards, v, m = token_rewards.detach().float(), values.detach().float(), mask.bool()
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[1])):
        adv_t = rewards[:, t] + gamma * next_value - v[:, t] + gamma * lam * next_adv
        keep = m[:, t]
        advantages[:, t] = torch.where(keep, adv_t, torch.zeros_like(adv_t))
        next_value = torch.where(keep, v[:, t], next_value)
        next_adv = torch.where(keep, adv_t, next_adv)
    returns = torch.where(m, advantages + v, torch.zeros_like(v))
    return advantages, returns


def masked_whiten(
    values: Tensor,
    mask: Tensor,
    *,
    std: StdMode = "unbiased",
    eps: float = 1e-8,
    eps_placement: EpsPlacement = "rsqrt_var_eps",
) -> tuple[Tensor, float, float]:
    """(values − mean)·rsqrt(var + eps) with token-weighted statistics over every rank (verl `masked_whiten`).

    Args:
        values: [N, T].
        mask: [N, T] bool, the entries in the statistics; the output is 0 elsewhere.

    Returns:
        The whitened [N, T] values (all exact zeros when the masked values are constant), the
        batch mean and the batch std.
    """
    flat, keep = values.float().reshape(-1), mask.bool().reshape(-1)
    out, mean, batch_std = whiten(flat, keep.float(), std=std, eps=eps, eps_placement=eps_placement)
    return out.reshape(values.shape), mean, batch_std


def _finite_rows(name: str, x: Tensor, mask: Tensor) -> None:
    bad = (~torch.isfinite(x) & mask).any(dim=1).nonzero(as_tuple=True)[0].tolist()
    if bad:
        raise ValueError(f"{name} is not finite inside the mask at rows {bad[:20]}")


@dataclass(kw_only=True)
class GAENormalizer:
    """GAE advantages [N, T] and critic returns, with batch-wide masked whitening (PPR: arXiv:2509.25598).

    Reads `rollout.token_rewards` [N, T] (None = zeros), `rollout.values` [N, T] (None = zeros:
    REINFORCE++ returns) and the step mask: `rollout.mask`, or `rollout.data[mask_key]` when the
    GAE/whitening mask differs from the loss mask (PPR runs GAE over `<information>` tokens that
    the loss excludes). With `score_at_last_step`, `rollout.scores` is added at each row's last
    masked step; a NaN score marks the row not applicable: advantages 0, returns = values,
    excluded from the whitening statistics, counted in `normalizer/nan_rewards`.
    Defaults follow PPR (γ = λ = 1; whitening unbiased, eps 1e-8, rsqrt(var + eps)).
    """

    gamma: float = 1.0
    lam: float = 1.0
    whiten: bool = True
    std: StdMode = "unbiased"
    eps: float = 1e-8
    eps_placement: EpsPlacement = "rsqrt_var_eps"
    mask_key: str | None = None
    score_at_last_step: bool = False
    clip: float | None = None

    def __post_init__(self) -> None:
        check_option("std", self.std, StdMode)
        check_option("eps_placement", self.eps_placement, EpsPlacement)
        check_nonnegative("eps", self.eps)
        check_clip(self.clip)
        for name, value in (("gamma", self.gamma), ("lam", self.lam)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name}={value!r} must be in [0, 1]")

    def _mask(self, rollout: Rollout) -> Tensor:
        if self.mask_key is None:
            return rollout.mask
        mask = rollout.data.get(self.mask_key)
        if not isinstance(mask, Tensor) or mask.shape != rollout.mask.shape:
            raise ValueError(f"mask_key={self.mask_key!r}: rollout.data[{self.mask_key!r}] must be an [N, T] tensor")
        return mask.bool()

    def _rewards(self, rollout: Rollout, mask: Tensor) -> tuple[Tensor, Tensor]:
        """[N, T] float32 step rewards and the [N] applicable-row mask."""
        rewards = torch.zeros(mask.shape, device=mask.device)
        if rollout.token_rewards is not None:
            rewards = rollout.token_rewards.detach().float().clone()
        elif not self.score_at_last_step:
            raise ValueError("GAENormalizer needs rollout.token_rewards, or score_at_last_step=True with scores")
        _finite_rows("token_rewards", rewards, mask)
        outside = ((rewards != 0) & ~mask).any(dim=1).nonzero(as_tuple=True)[0].tolist()
        if outside:
            raise ValueError(f"token_rewards are non-zero outside the step mask at rows {outside[:20]}")
        applicable = torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
        if self.score_at_last_step:
            if rollout.scores is None:
                raise ValueError("score_at_last_step=True but rollout.scores is None")
            scores, applicable = checked_scores(rollout.scores)
            steps = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
            last = torch.where(mask, steps, -1).max(dim=1).values
            rows = (last >= 0).nonzero(as_tuple=True)[0]
            rewards[rows, last[rows]] += scores[rows]
        return rewards, applicable

    def __call__(self, rollout: Rollout) -> Advantages:
        mask = self._mask(rollout)
        rewards, applicable = self._rewards(rollout, mask)
        values = torch.zeros_like(rewards) if rollout.values is None else rollout.values.detach().float()
        _finite_rows("values", values, mask)
        advantages, returns = gae_advantages(rewards, values, mask, gamma=self.gamma, lam=self.lam)
        used = mask & applicable[:, None]
        advantages = torch.where(used, advantages, torch.zeros_like(advantages))
        returns = torch.where(used, returns, values * mask)
        metrics = {"normalizer/nan_rewards": float((~applicable).sum())}
        if bool(used.any()):
            metrics["advantage/raw_mean"] = float(advantages[used].mean())
            metrics["advantage/raw_std"] = float(advantages[used].std(unbiased=False))
            metrics["returns/mean"] = float(returns[used].mean())
        if self.whiten:
            advantages, mean, batch_std = masked_whiten(
                advantages, used, std=self.std, eps=self.eps, eps_placement=self.eps_placement
            )
            metrics["normalizer/batch_mean"], metrics["normalizer/batch_std"] = mean, batch_std
        out = finish_advantages(advantages, metrics, self.clip, mask=used)
        out.returns = returns
        return out
