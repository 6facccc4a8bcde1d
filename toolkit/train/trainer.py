"""Trainer: one GRPO-family loop for every modality, read as named stages.

step = sample → score → transform rewards → advantages → (reference) → update, where update is
`num_inner_epochs` × minibatches × accumulation micro-batches of the PolicyObjective. Everything
modality-specific lives behind Policy / Sampler / RewardModel; everything algorithm-specific in the
normalizer, transforms and objective. Distributed: each rank samples whole groups for its slice of
the prompts; batch statistics are gathered inside the normalizers; accelerate wraps the module (DDP, FSDP2 or
DeepSpeed ZeRO: their specifics are in toolkit.train.sharding). The update's micro-batch loop is in
toolkit.train.update, what a checkpoint holds in toolkit.train.trainer_state.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rewards.base import RewardModel
from toolkit import distributed as dist
from toolkit.interfaces import (
    AnalyticKLPolicy,
    Critic,
    DataSource,
    Normalizer,
    OldLogprobsDeferringSampler,
    Policy,
    ReferenceConsumer,
    ReferencePolicy,
    ReferenceSnapshotPolicy,
    RewardTransform,
    Sampler,
    Stateful,
)
from toolkit.io.checkpoint import CheckpointManager, CheckpointState
from toolkit.objective.policy_objective import ObjectiveOutput, PolicyObjective
from toolkit.rollout import Rollout
from toolkit.train import sharding, trainer_state, update
from toolkit.train.async_rollouts import AsyncRollouts, build_async_rollouts
from toolkit.train.config_drift import group_settings
from toolkit.train.critic import RETURNS_KEY
from toolkit.train.filters import refill
from toolkit.train.rollout_stats import normalizes_within_groups, rollout_metrics
from toolkit.train.schedules import OptimizerFactory, Scheduler
from toolkit.train.scoring import check_judge_failures, nanmean, score_rollout
from toolkit.train.trainer_config import TrainerConfig


class Trainer:
    """Trains `policy` with `sampler` + `rewards` → `transforms` → `normalizer` → `objective`."""

    def __init__(
        self,
        policy: Policy,
        sampler: Sampler,
        rewards: Mapping[str, RewardModel],
        normalizer: Normalizer,
        objective: PolicyObjective,
        data: DataSource,
        transforms: Sequence[RewardTransform] = (),
        config: TrainerConfig | None = None,
        run_config: Mapping[str, Any] | None = None,
        critic: Critic | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: Scheduler | None = None,
    ) -> None:
        self.config = cfg = config or TrainerConfig()
        if not rewards and not transforms:
            raise ValueError("no reward models and no reward transforms configured: set `rewards:` in the config")
        seed_everything(cfg.seed)
        self.policy, self.sampler, self.rewards = policy, sampler, dict(rewards)
        self.normalizer, self.objective, self.data, self.transforms = normalizer, objective, data, list(transforms)
        self._within_groups = normalizes_within_groups(normalizer)  # the illusory-advantage diagnostic applies
        self.run_config = dict(run_config or {})
        self.run_dir = Path(cfg.run_dir)
        self.accelerator: Any = dist.make_accelerator(cfg.mixed_precision, project_dir=str(self.run_dir))
        # A transform declaring `needs_reference` (KL-in-reward) gets rollout.ref_logprobs before it runs.
        self._transforms_need_reference = any(
            isinstance(t, ReferenceConsumer) and t.needs_reference for t in self.transforms
        )
        # On-policy (one epoch, one minibatch): the old log-probs are the update's first forward's (TRL's rule).
        self.old_logprobs_from_update = update.old_logprobs_from_update(cfg, sampler, self._transforms_need_reference)
        needs_reference = objective.needs_reference or self._transforms_need_reference
        reference = None
        if needs_reference and isinstance(policy, ReferenceSnapshotPolicy):
            reference = policy.init_reference()  # snapshot before any update or resume; sharded with the policy
        # Replaces policy.module with the module prepared for the launch's engine (DDP, FSDP2, ZeRO).
        self.optimizer, self.scheduler, self.critic = update.build_optimization(
            policy, self.accelerator, cfg, optimizer, scheduler, reference, critic
        )
        self.generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + dist.rank())
        self.update_generator = self.generator  # minibatch shuffling (its own with overlapped async rollouts)
        self.rollouts: AsyncRollouts | None = build_async_rollouts(self) if cfg.async_rollouts else None
        self.global_step = 0
        self.checkpoints = CheckpointManager(self.run_dir, keep_last=cfg.keep_last)
        self._batches: Iterator[list[Any]] | None = None
        # The `eval.evaluator` hook and its data for trainer.eval_every (set by toolkit.train.runner.build_trainer).
        self.evaluator: Any = None
        self.eval_data: Any = None

    # ---------------------------------------------------------------- stages
    def step(self) -> tuple[dict[str, float], Rollout]:
        """One training step; returns its metrics and the scored rollout."""
        start = time.perf_counter()
        rollout = self.rollouts.next(self.global_step) if self.rollouts is not None else self.collect()
        sampled = time.perf_counter()
        if self.critic is not None:
            rollout.values = self.critic.record_values(rollout)
        rollout = self.compute_advantages(rollout)
        if self.rollouts is not None:  # a rollout of the previous step's weights: truncated importance sampling
            rollout = self.rollouts.correct(rollout)
        # Reference log-probs were already taken before the transforms when one of them needs them.
        reference_missing = not self._transforms_need_reference or rollout.ref_logprobs is None
        if self.objective.needs_reference and reference_missing and not isinstance(self.policy, AnalyticKLPolicy):
            rollout.ref_logprobs = self.reference_log_probs(rollout)
        metrics = self.update(rollout)
        self.global_step += 1
        metrics.update(rollout.metrics)
        metrics.update(rollout_metrics(rollout, self._within_groups))
        metrics["time/sample_s"] = sampled - start
        metrics["time/step_s"] = time.perf_counter() - start
        return metrics, rollout

    def collect(self, policy: Policy | None = None) -> Rollout:
        """Sample (with `policy`, the trained one by default), score and transform; with dynamic sampling, refill
        until no group is degenerate.

        Sharded weights are gathered once for all of it: ranks may need different numbers of refill rounds.
        """
        policy = policy or self.policy
        with sharding.gathered_weights(self.accelerator, policy.module):
            if not self.config.drop_zero_variance_groups:
                return self.sample_and_score(policy)
            num_groups = _shard_size(self.config.prompts_per_step)
            rollout, metrics = refill(
                lambda: self.sample_and_score(policy),
                num_groups,
                self.config.max_sampling_rounds,
                self.config.on_sampling_cap,
                on=self.config.dynamic_sampling_on,
                sync=sharding.any_rank if sharding.in_lockstep(self.accelerator) else None,
            )
        rollout.metrics.update(metrics)
        return rollout

    def sample_and_score(self, policy: Policy | None = None) -> Rollout:
        """One sampling round of this rank's prompts (with `policy`, the trained one by default), scored and
        transformed; reference log-probs first when a transform needs them."""
        policy = policy or self.policy
        prompts = self.local_prompts()
        policy.module.eval()
        if isinstance(self.sampler, OldLogprobsDeferringSampler):
            self.sampler.defer_old_logprobs = self.old_logprobs_from_update
        with torch.no_grad():
            rollout = self.sampler.sample(policy, prompts, self.config.group_size, self.generator)
        policy.module.train()
        cfg = self.config
        rollout = score_rollout(rollout, self.rewards, cfg.reward_retries, cfg.max_reward_failure_frac)
        if self._transforms_need_reference:
            rollout.ref_logprobs = self.reference_log_probs(rollout)
        for transform in self.transforms:
            rollout = transform(rollout)
        check_judge_failures(rollout.metrics, cfg.max_reward_failure_frac)
        if (
            self.transforms and rollout.scores is not None
        ):  # `reward/mean` is the score the normalizer sees, not the sum of the raw components
            rollout.metrics["reward/mean"] = nanmean(rollout.scores)
        return rollout

    def compute_advantages(self, rollout: Rollout) -> Rollout:
        """The normalizer's advantages (and returns, for a critic) into `rollout`; non-finite ones raise."""
        out = self.normalizer(rollout)
        if not torch.isfinite(out.values).all():
            raise FloatingPointError(f"{type(self.normalizer).__name__} produced non-finite advantages")
        rollout.advantages = out.values
        if out.returns is not None:
            rollout.data[RETURNS_KEY] = out.returns
        rollout.metrics.update(out.metrics)
        return rollout

    def reference_log_probs(self, rollout: Rollout) -> torch.Tensor:
        """[N, T] reference log-probs of `rollout`, without gradients."""
        if not isinstance(self.policy, ReferencePolicy):
            raise ValueError(f"kl_coef > 0 but {type(self.policy).__name__} has no ref_log_probs()")
        with torch.no_grad():
            ref: torch.Tensor = self.policy.ref_log_probs(rollout).detach()
        return ref

    def update(self, rollout: Rollout) -> dict[str, float]:
        """`num_inner_epochs` × `num_minibatches` optimizer steps over the rollout (toolkit.train.update)."""
        start = time.perf_counter()
        # During the warm-up the actor is neither differentiated nor stepped (its lr schedule waits too); the critic
        # and self-training reward models (the DiDi discriminator trains inside its reward call) keep learning.
        train_actor = self.global_step >= self.config.critic_warmup_steps
        steps = {"optim/grad_norm": self.optimizer_step} if train_actor else {}
        if self.critic is not None:
            steps["critic/grad_norm"] = self.critic.step

        def backward(micro: Rollout, num_tokens: float, num_seqs: float, num_rows: float | None) -> dict[str, float]:
            return self.micro_backward(micro, num_tokens, num_seqs, train_actor, num_rows)

        count_empty_rows = self.objective.count_empty_rows
        totals = update.run_update(
            rollout, self.config, self.update_generator, self.accelerator, count_empty_rows, backward, steps
        )
        metrics = {key: float(np.mean(values)) for key, values in totals.items()}
        metrics["optim/lr"] = float(self.scheduler.get_last_lr()[0])
        metrics["time/update_s"] = time.perf_counter() - start
        return metrics

    def micro_backward(
        self, micro: Rollout, num_tokens: float, num_seqs: float, train_actor: bool, num_rows: float | None = None
    ) -> dict[str, float]:
        """Backward of one micro-batch's actor loss (and critic loss); returns their metrics."""
        actor_loss = self.micro_loss(micro, num_tokens, num_seqs, num_rows) if train_actor else None
        return update.backpropagate(self.accelerator, micro, num_tokens, actor_loss, self.critic)

    def micro_loss(
        self, micro: Rollout, num_tokens: float, num_seqs: float, num_rows: float | None = None
    ) -> ObjectiveOutput:
        """The objective's loss of one micro-batch, given its minibatch's global denominators."""
        denominators = (num_tokens, num_seqs, num_rows)
        return update.policy_loss(self.policy, self.objective, micro, denominators, self.old_logprobs_from_update)

    def optimizer_step(self) -> float:
        """One optimizer and lr-schedule step of the policy (then its step hook); returns the grad norm."""
        cfg = self.config
        return update.step_optimizer(self.accelerator, self.policy, self.optimizer, self.scheduler, cfg.max_grad_norm)

    def local_prompts(self) -> list[Any]:
        """This rank's slice of the next prompt batch (every rank reads the same stream)."""
        if self._batches is None:
            self._batches = self.data.batches(self.config.prompts_per_step, self.generator)
        batch = next(self._batches)
        return batch[dist.rank() :: dist.world_size()]

    # ---------------------------------------------------------------- state
    def state(
        self,
        weights: Mapping[str, torch.Tensor] | None = None,
        rank_states: list[dict[str, Any]] | None = None,
        **objects: Any,
    ) -> CheckpointState:
        """This rank's checkpoint; `weights`, every rank's RNG `rank_states` and `objects` come from a sharded save."""
        kind = sharding.engine(self.accelerator)
        if weights is None:
            weights = trainer_state.policy_weights(self.policy, kind)
        parts = self.stateful_parts()
        owned = trainer_state.training_objects(kind, self.optimizer, self.scheduler, self.data, self.generator, parts)
        return trainer_state.checkpoint_state(self.global_step, weights, owned | objects, self.run_config, rank_states)

    def stateful_parts(self) -> list[tuple[str, Stateful]]:
        """(name, object) pairs checkpointed through their state_dict/load_state_dict (the `Stateful` ones)."""
        parts = (self.normalizer, self.critic, self.policy, self.rewards, self.transforms)
        return trainer_state.stateful_parts(*parts)

    def save(self, manager: CheckpointManager | None = None) -> Path | None:
        """Write a checkpoint into `manager` (this run's by default); every rank calls it, rank 0 writes.

        Every rank's RNG and sampling generator are kept; FSDP shards and ZeRO-3 weights: toolkit.train.sharding.
        """
        if self.rollouts is not None:
            self.rollouts.wait()  # the rollout in flight draws from the data stream and the generator saved here
        state = functools.partial(self.state, rank_states=sharding.rank_states(self.generator))
        return sharding.save_checkpoint(
            self.accelerator, self.policy, self.optimizer, manager or self.checkpoints, state
        )

    def load(self, path: str | Path, keep_new_hyperparameters: bool = False) -> None:
        """Restore a checkpoint; `keep_new_hyperparameters` keeps this config's optimizer settings (lr, betas ...)."""
        fresh = group_settings(self.optimizer) if keep_new_hyperparameters else None
        if self.rollouts is not None:
            self.rollouts.close()  # a rollout prefetched with the weights being replaced is dropped
        state = sharding.load_checkpoint(
            self.accelerator, self.checkpoints, Path(path), self.policy.module, self.optimizer
        )
        parts = self.stateful_parts()
        trainer_state.restore_state(state, self.optimizer, self.scheduler, self.data, self.generator, parts, fresh)
        self.global_step = state.step
        self._batches = None


def seed_everything(seed: int) -> None:
    """Seed python's `random`, numpy's global RNG and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _shard_size(num_prompts: int) -> int:
    """How many of `num_prompts` this rank samples (`local_prompts` takes every world_size-th from its rank)."""
    return len(range(dist.rank(), num_prompts, dist.world_size()))
