"""The protocols every modality plugs into: Policy, Sampler, Normalizer, RewardTransform, DataSource.

A modality provides a Policy (owns weights, re-scores its rollouts) and a Sampler (owns the
generation algorithm, records what re-scoring needs). Reward models live in `rewards.base`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from toolkit.rollout import Rollout


@runtime_checkable
class Policy(Protocol):
    """Owns the trainable weights and re-scores its own rollouts.

    `module` is the `nn.Module` the optimizer, accelerate and checkpoints see (LoRA-wrapped
    where LoRA is on). `log_probs` must be differentiable and, for the rollout's own sampling
    settings, equal `rollout.old_logprobs` (the on-policy contract: ratio exactly 1).
    """

    module: nn.Module

    def log_probs(self, rollout: Rollout) -> Tensor:
        """[N, T] float32 log-probs of the rollout's steps under the current weights."""
        ...


@runtime_checkable
class EntropyPolicy(Protocol):
    """Optional: a policy that returns per-step entropy along with the log-probs (one forward)."""

    def log_probs_and_entropy(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """([N, T] log-probs, [N, T] entropy), both float32."""
        ...


@runtime_checkable
class ReferencePolicy(Protocol):
    """Optional: a policy that can score under its reference weights (frozen copy or adapters off)."""

    def ref_log_probs(self, rollout: Rollout) -> Tensor:
        """[N, T] float32 log-probs under the reference policy, no grad."""
        ...


@runtime_checkable
class AnalyticKLPolicy(Protocol):
    """Optional: a policy with a closed-form per-step KL to the reference (Gaussian SDE steps)."""

    def analytic_kl(self, rollout: Rollout) -> Tensor:
        """[N, T] float32 KL(pi || ref) per step, differentiable."""
        ...


@runtime_checkable
class Sampler(Protocol):
    """Owns the generation algorithm; returns a Rollout without rewards."""

    def sample(self, policy: Policy, prompts: list[Any], group_size: int, generator: torch.Generator) -> Rollout:
        """Generate `group_size` samples per prompt.

        Rows are ordered group-major: rows [g·G, (g+1)·G) belong to prompts[g], and
        `group_ids[i] = i // G` (the trainer offsets ids when it concatenates batches).
        """
        ...


@dataclass
class Advantages:
    """A normalizer's output: advantages [N] or [N, T], the statistics it fitted, and critic targets.

    `returns` [N, T] is set only by normalizers with a critic (GAE): the value-loss targets.
    """

    values: Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    returns: Tensor | None = None


@runtime_checkable
class Normalizer(Protocol):
    """Rewards → advantages. Reads `rollout.scores` (and whatever else it documents)."""

    def __call__(self, rollout: Rollout) -> Advantages: ...


@runtime_checkable
class StatefulNormalizer(Normalizer, Protocol):
    """A normalizer with state across steps (trackers, history); checkpointed by the trainer."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@runtime_checkable
class RewardTransform(Protocol):
    """A reward-level transform run before the normalizer.

    Returns the rollout with `scores`, `rewards` or `token_rewards` updated (it may mutate and
    return the same object), recording what it did in `rollout.metrics`.
    """

    def __call__(self, rollout: Rollout) -> Rollout: ...


@runtime_checkable
class DataSource(Protocol):
    """An endless, seedable, resumable stream of prompt batches."""

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[list[Any]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...
