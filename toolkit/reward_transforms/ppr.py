"""PPR ReNorm: place per-turn process rewards and the outcome reward on turn-boundary tokens.

arXiv:2509.25598 (only the abstract was available; semantics from the official code): at intermediate
turn k, r̂_k = r_p,k + r_o - beta; at the final token, the raw outcome r_o ("raw", official) or r_o - 1/2
("centered", one unverified reading of the paper). The result is a [N, T] token-reward tensor for GAE.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from toolkit.reward_transforms.common import check_choice, reject_inf, safe_mean
from toolkit.rollout import Rollout

FinalStepMode = Literal["raw", "centered"]
InvalidPrm = Literal["zero", "neutral", "skip"]


def renorm_token_rewards(
    turn_ends: Tensor,
    process_rewards: Tensor,
    outcome: Tensor,
    beta: float = 1.0,
    renorm: bool = True,
    final_step_mode: FinalStepMode = "raw",
    invalid_prm: InvalidPrm = "neutral",
) -> Tensor:
    """Token rewards of PPR with ReNorm (arXiv:2509.25598; spec docs/methods/ppr.md §5, §6.1).

    Args:
        turn_ends: [N, T] bool, True at the last token of each turn; a row's last True is the final token
            (outcome) and the K_i - 1 earlier ones are the judged intermediate turns.
        process_rewards: [N, K] process scores r_p in [0, 1] of the intermediate turns, in turn order;
            NaN = invalid judge output. Columns beyond a row's intermediate-turn count are ignored.
        outcome: [N] outcome reward r_o (exact match, 0/1).
        beta: ReNorm shift (1.0).
        renorm: False places raw r_p at intermediate turns (the "no ReNorm" ablation).
        final_step_mode: "raw" puts r_o at the final token (official code); "centered" puts r_o - 0.5.
        invalid_prm: r_p of an invalid turn: "zero" (official), "neutral" (0.5, keeps ReNorm's sign
            consistency; toolkit default) or "skip" (no reward at that boundary).

    Returns:
        [N, T] float32, zero except at turn boundaries.
    """
    check_choice("final_step_mode", final_step_mode, ("raw", "centered"))
    check_choice("invalid_prm", invalid_prm, ("zero", "neutral", "skip"))
    if turn_ends.dim() != 2 or turn_ends.dtype != torch.bool:
        raise ValueError(f"turn_ends must be a bool [N, T] tensor, got {turn_ends.dtype} {tuple(turn_ends.shape)}")
    n = turn_ends.shape[0]
    if outcome.shape != (n,) or process_rewards.dim() != 2 or process_rewards.shape[0] != n:
        raise ValueError(
            f"need outcome [N={n}] and process_rewards [N={n}, K]; got {outcome.shape}, {process_rewards.shape}"
        )
    counts = turn_ends.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError(
            f"rows {(counts == 0).nonzero(as_tuple=True)[0][:5].tolist()} have no turn end (no final token)"
        )
    if bool(torch.isnan(outcome).any()):
        raise ValueError("outcome rewards must not be NaN (every trajectory has a final answer score)")
    reject_inf("outcome", outcome)
    reject_inf("process_rewards", process_rewards)
    num_mid = int((counts - 1).max())
    if num_mid > process_rewards.shape[1]:
        raise ValueError(
            f"a row has {num_mid} intermediate turns but process_rewards has {process_rewards.shape[1]} columns"
        )
    turn_index = turn_ends.long().cumsum(dim=1) - 1  # [N, T] index of the turn each boundary closes
    is_final = turn_ends & (turn_index == (counts - 1)[:, None])
    is_mid = turn_ends & ~is_final
    scores = process_rewards.float().to(turn_ends.device)
    if scores.shape[1] == 0:
        scores = torch.zeros(n, 1, device=turn_ends.device)
    r_p = scores.gather(1, turn_index.clamp(0, scores.shape[1] - 1))
    in_use = r_p[is_mid]
    if bool(((in_use < 0) | (in_use > 1)).any()):
        raise ValueError("process rewards must lie in [0, 1] (SCORE / MAX_SCORE) or be NaN for invalid turns")
    invalid = is_mid & torch.isnan(r_p)
    r_p = torch.where(torch.isnan(r_p), torch.full_like(r_p, 0.5 if invalid_prm == "neutral" else 0.0), r_p)
    r_o = outcome.float().to(turn_ends.device)[:, None].expand_as(r_p)
    mid_value = r_p + r_o - beta if renorm else r_p
    final_value = r_o if final_step_mode == "raw" else r_o - 0.5
    out = torch.where(is_mid, mid_value, torch.zeros_like(r_p))
    if invalid_prm == "skip":
        out = torch.where(invalid, torch.zeros_like(out), out)
    return torch.where(is_final, final_value, out)


def process_reward_tensor(value: Any, n: int) -> Tensor:
    """Padded [N, K] tensor (NaN = invalid or padding) from a tensor or N per-turn lists (None = invalid)."""
    if isinstance(value, Tensor):
        if value.dim() != 2 or value.shape[0] != n:
            raise ValueError(f"process rewards tensor must be [N={n}, K], got {tuple(value.shape)}")
        return value.float()
    rows: Sequence[Sequence[float | None]] = value
    if len(rows) != n:
        raise ValueError(f"process rewards list must have N={n} rows, got {len(rows)}")
    width = max((len(r) for r in rows), default=0)
    out = torch.full((n, width), math.nan)
    for i, row in enumerate(rows):
        for k, v in enumerate(row):
            out[i, k] = math.nan if v is None else float(v)
    return out


class ReNorm:
    """PPR ReNorm transform: writes `rollout.token_rewards` [N, T] from turn ends and process scores.

    Process scores come from `rollout.data[key]`: either N per-row lists with one entry per
    intermediate (judged) turn, `None`/NaN for an invalid judge output (the list length must equal the
    row's number of turn ends minus one), or a padded [N, K] tensor with NaN for invalid turns (extra
    columns ignored). The outcome r_o is `rollout.scores` or component `outcome`. Turn boundaries are
    `rollout.turn_ends`; the last True of each row is the final token.

    Args:
        beta: ReNorm shift (1.0).
        final_step_mode: None -> "raw" (official; the paper's form is unverified); or "centered".
        invalid_prm: None -> "neutral" ("zero" under official_compat).
        enabled: False places raw process scores (no ReNorm shift).
    """

    def __init__(
        self,
        beta: float = 1.0,
        final_step_mode: FinalStepMode | None = None,
        invalid_prm: InvalidPrm | None = None,
        enabled: bool = True,
        official_compat: bool = False,
        key: str = "process_rewards",
        outcome: str | None = None,
    ) -> None:
        self.final_step_mode: FinalStepMode = final_step_mode or "raw"
        self.invalid_prm: InvalidPrm = invalid_prm or ("zero" if official_compat else "neutral")
        check_choice("final_step_mode", self.final_step_mode, ("raw", "centered"))
        check_choice("invalid_prm", self.invalid_prm, ("zero", "neutral", "skip"))
        self.beta, self.enabled, self.key, self.outcome = beta, enabled, key, outcome

    def __call__(self, rollout: Rollout) -> Rollout:
        if rollout.turn_ends is None:
            raise ValueError("ReNorm needs rollout.turn_ends")
        if self.key not in rollout.data:
            raise ValueError(f"ReNorm: rollout.data has no {self.key!r}; keys: {sorted(rollout.data)}")
        outcome = self._outcome(rollout)
        stored = rollout.data[self.key]
        process = process_reward_tensor(stored, len(rollout))
        num_mid = rollout.turn_ends.sum(dim=1).cpu() - 1
        if not isinstance(stored, Tensor):
            lengths = torch.tensor([len(r) for r in stored])
            bad = (lengths != num_mid).nonzero(as_tuple=True)[0]
            if bad.numel():
                i = int(bad[0])
                raise ValueError(
                    f"row {i} has {int(num_mid[i])} intermediate turns but {int(lengths[i])} process scores"
                )
        rollout.token_rewards = renorm_token_rewards(
            rollout.turn_ends, process, outcome, self.beta, self.enabled, self.final_step_mode, self.invalid_prm
        )
        used = torch.arange(process.shape[1])[None, :] < num_mid.clamp_min(0)[:, None]
        judged = process.cpu()[used]
        valid = judged[~torch.isnan(judged)]
        rollout.metrics.update(
            {
                "prm/validity_rate": float(valid.numel()) / judged.numel() if judged.numel() else 1.0,
                "prm/mean": safe_mean(valid),
                "prm/turns_mean": float(num_mid.float().mean()) if len(rollout) else 0.0,
                "reward/outcome": safe_mean(outcome),
                "reward/token_reward_sum": safe_mean(rollout.token_rewards.sum(dim=1)),
            }
        )
        return rollout

    def _outcome(self, rollout: Rollout) -> Tensor:
        if self.outcome is None:
            if rollout.scores is None:
                raise ValueError("ReNorm: rollout.scores (the outcome reward) is not set; name an outcome component")
            return rollout.scores
        if self.outcome not in rollout.rewards:
            raise ValueError(f"unknown reward component {self.outcome!r}; available: {sorted(rollout.rewards)}")
        return rollout.rewards[self.outcome]
