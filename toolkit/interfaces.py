"""The protocols every modality plugs into: Policy, Sampler, Normalizer, RewardTransform, DataSource.

A modality provides a Policy (owns weights, re-scores its rollouts) and a Sampler (owns the
generation algorithm, records what re-scoring needs). Reward models live in `rewards.base`. Every
optional hook the trainer calls is declared here and checked with `isinstance`, never `hasattr`.
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
class ReferenceSnapshotPolicy(Protocol):
    """Optional: a policy whose reference must be captured before any update (a frozen copy of its weights).

    The trainer calls `init_reference()` once in its constructor, before the first optimizer step or a
    checkpoint load, when the objective's KL term or a `ReferenceConsumer` transform needs a reference.
    """

    def init_reference(self) -> nn.Module:
        """Take the reference snapshot now (idempotent); returns the module that scores the reference."""
        ...


@runtime_checkable
class StepHookPolicy(Protocol):
    """Optional: a policy told about each optimizer step (an EMA update, a "weights changed" flag)."""

    def after_optimizer_step(self) -> None:
        """Called by the trainer right after every optimizer step of the policy (after the scheduler step)."""
        ...


@runtime_checkable
class TrainableStatePolicy(Protocol):
    """Optional: a policy that checkpoints only what it trains (LoRA adapters) instead of `module.state_dict()`."""

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The trained weights, named as in the unwrapped `module` (no DDP "module." prefix)."""
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


@runtime_checkable
class Critic(Protocol):
    """A value model over the rollout's steps (the PPO + GAE path; trained by `toolkit.train.critic.CriticUpdater`)."""

    module: nn.Module

    def values(self, rollout: Rollout) -> Tensor:
        """[N, T] float32 value predictions, differentiable."""
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
class Stateful(Protocol):
    """State carried across steps beyond the policy's weights; the trainer checkpoints and restores it.

    The trainer checks this on the normalizer, the critic updater, the transforms, and the policy and
    reward models that are not `nn.Module`s (a module's `state_dict` is its weights, not training state).
    """

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@runtime_checkable
class StatefulNormalizer(Normalizer, Stateful, Protocol):
    """A normalizer with state across steps (trackers, history); checkpointed by the trainer."""


@runtime_checkable
class RewardTransform(Protocol):
    """A reward-level transform run before the normalizer.

    Returns the rollout with `scores`, `rewards` or `token_rewards` updated (it may mutate and
    return the same object), recording what it did in `rollout.metrics`.
    """

    def __call__(self, rollout: Rollout) -> Rollout: ...


@runtime_checkable
class ReferenceConsumer(Protocol):
    """Optional on a RewardTransform that reads `rollout.ref_logprobs` (e.g. a KL-in-reward penalty).

    `needs_reference = True` makes the trainer take the policy's reference snapshot in its constructor and
    set `rollout.ref_logprobs` (the policy's `ref_log_probs`) before the transforms run.
    """

    needs_reference: bool


@runtime_checkable
class MetricsReport(Protocol):
    """What an `eval.evaluator` hook returns for `trainer.eval_every`: named scalar metrics."""

    def metrics(self) -> Mapping[str, float]:
        """{name: value}, logged as eval/<name>."""
        ...


@runtime_checkable
class DataSource(Protocol):
    """An endless, seedable, resumable stream of prompt batches."""

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[list[Any]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@runtime_checkable
class OldLogprobsDeferringSampler(Protocol):
    """Optional: a sampler that can leave old_logprobs (zeros) to the trainer's first training forward."""

    defer_old_logprobs: bool  # the trainer sets it before every sample() call
