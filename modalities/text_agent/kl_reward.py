"""KL-in-reward (PPR's official 3B setting, docs/methods/ppr.md §6.2): r_t <- r_t - beta_KL * (log pi_old(t) - log
pi_ref(t)).

The per-token penalty uses the k1 estimator on model-generated tokens only (`<information>` tokens and padding
get none, as verl's `apply_kl_penalty` multiplied by the info mask) and is added to `rollout.token_rewards`
before GAE. The trainer computes `rollout.ref_logprobs` before the transforms for a transform that declares
`needs_reference = True`, so this transform must come after the one that writes the token rewards (ReNorm).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from toolkit.rollout import Rollout

KLEstimator = Literal["k1"]


def kl_in_reward(
    token_rewards: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """Token rewards minus the k1 KL penalty on the masked tokens (docs/methods/ppr.md §6.2; verl `apply_kl_penalty`).

    Args:
        token_rewards: [N, T] rewards (e.g. ReNorm's), float.
        old_logprobs: [N, T] log-probs of the sampling policy.
        ref_logprobs: [N, T] log-probs of the reference policy.
        mask: [N, T] bool, True on model-generated tokens (observations, prompts, padding False).
        kl_coef: beta_KL >= 0 (PPR: 1e-3 for the 3B policy, 0 for 7B).

    Returns:
        ([N, T] penalised rewards, [N, T] k1 estimate log pi_old - log pi_ref, zero off the mask).
    """
    kl = torch.where(mask.bool(), old_logprobs.float() - ref_logprobs.float(), torch.zeros_like(old_logprobs.float()))
    return token_rewards.float() - kl_coef * kl, kl


class KLRewardPenalty:
    """Subtracts `kl_coef` x k1 KL(pi_old || pi_ref) from `rollout.token_rewards` on the trained tokens.

    Args:
        kl_coef: beta_KL (docs/methods/ppr.md §7: 1e-3 for Qwen2.5-3B, 0.0 for 7B); a fixed controller.
        estimator: "k1" (log pi_old - log pi_ref; PPR's `kl_penalty = kl`).

    Metrics: `kl/reward_penalty_kl` (token-mean k1 over the mask) and `kl/reward_coef`.
    """

    needs_reference = True

    def __init__(self, kl_coef: float = 1e-3, estimator: KLEstimator = "k1") -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        if estimator not in get_args(KLEstimator):
            raise ValueError(f"estimator={estimator!r} is not one of {list(get_args(KLEstimator))}")
        self.kl_coef, self.estimator = kl_coef, estimator

    def __call__(self, rollout: Rollout) -> Rollout:
        if rollout.ref_logprobs is None:
            raise ValueError(
                "KLRewardPenalty needs rollout.ref_logprobs: run it through toolkit.train.trainer.Trainer (which "
                "computes them for transforms with needs_reference) with a policy that has ref_log_probs()"
            )
        if rollout.token_rewards is None:
            raise ValueError("KLRewardPenalty needs rollout.token_rewards: place it after ReNorm in `transforms`")
        mask = rollout.mask.bool()
        rollout.token_rewards, kl = kl_in_reward(
            rollout.token_rewards, rollout.old_logprobs, rollout.ref_logprobs, mask, self.kl_coef
        )
        rollout.metrics["kl/reward_penalty_kl"] = float(kl.sum() / mask.sum().clamp_min(1))
        rollout.metrics["kl/reward_coef"] = float(self.kl_coef)
        return rollout
