"""Group-normalized turn-level advantages: GRPO with process (per-turn) rewards, no critic.

DeepSeekMath's process-supervision GRPO (arXiv:2402.03300 §4.1.3): every step reward of a group's G
trajectories enters one set R_g; each is normalized r̃ = (r − mean(R_g)) / std(R_g), and a token's
advantage is the sum of the normalized rewards of its own trajectory's steps that end at or after it.
With PPR's ReNorm step rewards (`toolkit.reward_transforms.ReNorm`) this is the GRPO-family variant of PPR
(arXiv:2509.25598); the official PPR path is GAE with a critic (`toolkit.advantages.GAENormalizer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from toolkit.advantages.stats import (
    EpsPlacement,
    NormalizerConfig,
    StdMode,
    finish_advantages,
    group_index,
    group_moments,
    inverse_scale,
)
from toolkit.interfaces import Advantages
from toolkit.rollout import Rollout


def turn_group_advantages(
    token_rewards: Tensor,
    turn_ends: Tensor,
    group_ids: Tensor,
    *,
    scale_by_std: bool = True,
    std: StdMode = "unbiased",
    eps: float = 1e-6,
    eps_placement: EpsPlacement = "std_plus_eps",
    std_floor: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """Process-supervision GRPO advantages (arXiv:2402.03300 §4.1.3, the equations after Eq. 3).

    r̃_j = (r_j − mean(R_g)) / (std(R_g) + eps) over all step rewards R_g of group g (all rows, all
    turns), then A_{i,t} = Σ_{steps j of row i, position(j) ≥ t} r̃_j; zero after a row's last step.

    Args:
        token_rewards: [N, T] step rewards, non-zero only where `turn_ends` is True.
        turn_ends: [N, T] bool, the step (turn) boundaries; every row needs at least one.
        group_ids: [N] prompt ids.
        scale_by_std: False subtracts the group mean only (Dr. GRPO style).
        std, eps, eps_placement, std_floor: the group std convention (as `GroupNormalizer`).

    Returns:
        [N, T] float32 advantages (a group whose step rewards are all equal: exact zeros, counted)
        and metrics.
    """
    if token_rewards.shape != turn_ends.shape or token_rewards.dim() != 2:
        raise ValueError(f"token_rewards {tuple(token_rewards.shape)} and turn_ends {tuple(turn_ends.shape)} differ")
    if group_ids.shape != token_rewards.shape[:1]:
        raise ValueError(f"group_ids must be [N={token_rewards.shape[0]}], got {tuple(group_ids.shape)}")
    rewards, ends = token_rewards.detach().double(), turn_ends.bool()
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("token_rewards must be finite (ReNorm places no NaN)")
    stray = ((rewards != 0) & ~ends).any(dim=1).nonzero(as_tuple=True)[0].tolist()
    empty = (~ends.any(dim=1)).nonzero(as_tuple=True)[0].tolist()
    if stray or empty:
        raise ValueError(f"rows {stray[:10]} have rewards off a turn end; rows {empty[:10]} have no turn end")
    rows = ends.nonzero(as_tuple=True)[0]
    steps = rewards[ends]  # [M] in row-major order
    index, num_groups = group_index(group_ids.to(rows.device))
    step_groups = index[rows]
    moments = group_moments(steps, torch.ones_like(steps, dtype=torch.bool), step_groups, num_groups, std)
    normalized = steps - moments.mean[step_groups]
    if scale_by_std:
        normalized = normalized * inverse_scale(moments.var, eps, eps_placement, std_floor)[step_groups]
    normalized = torch.where(moments.constant[step_groups], torch.zeros_like(normalized), normalized)
    placed = torch.zeros_like(rewards)
    placed[ends] = normalized
    advantages = placed.flip(1).cumsum(dim=1).flip(1)
    zero_var = moments.constant & (moments.size >= 2)
    metrics = {
        "normalizer/zero_variance_groups": float(zero_var.float().mean()) if num_groups else 0.0,
        "normalizer/zero_variance_groups_count": float(zero_var.sum()),
        "normalizer/steps_per_row": float(steps.numel()) / max(token_rewards.shape[0], 1),
    }
    return advantages.float(), metrics


@dataclass(kw_only=True)
class TurnGroupNormalizer(NormalizerConfig):
    """Turn-level group normalization (DeepSeekMath process supervision; PPR's GRPO-family variant).

    Reads `rollout.token_rewards` [N, T] (ReNorm writes them) and `rollout.turn_ends` [N, T]; returns
    [N, T] advantages (the loss mask decides which of them are trained on). Defaults as `GroupNormalizer`
    (unbiased std, eps 1e-6 added to the std).
    """

    # With one trajectory per group its normalized step rewards sum to 0: the first token's advantage is 0 and
    # the outcome carries no signal, so trainer.group_size >= 2.
    needs_groups: ClassVar[bool] = True
    scale_by_std: bool = True
    std: StdMode = "unbiased"
    eps: float = 1e-6
    eps_placement: EpsPlacement = "std_plus_eps"
    std_floor: float = 0.0
    clip: float | None = None

    def __post_init__(self) -> None:
        self._validate()

    def __call__(self, rollout: Rollout) -> Advantages:
        if rollout.token_rewards is None or rollout.turn_ends is None:
            raise ValueError("TurnGroupNormalizer needs rollout.token_rewards and rollout.turn_ends (run ReNorm first)")
        values, metrics = turn_group_advantages(
            rollout.token_rewards, rollout.turn_ends, rollout.group_ids, **self._options()
        )
        return finish_advantages(values, metrics, self.clip, mask=rollout.mask.bool())
