"""Trainer: one GRPO-family loop for every modality, read as named stages.

step = sample → score → transform rewards → advantages → (reference) → update, where update is
`num_inner_epochs` × minibatches × accumulation micro-batches of the PolicyObjective. Everything
modality-specific lives behind Policy / Sampler / RewardModel; everything algorithm-specific in the
normalizer, transforms and objective. Distributed: each rank samples whole groups for its slice of
the prompts; batch statistics are gathered inside the normalizers; accelerate wraps the module (DDP, FSDP2 or
DeepSpeed ZeRO: their specifics are in toolkit.train.sharding).
"""

from __future__ import annotations

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
    EntropyPolicy,
    Normalizer,
    OldLogprobsDeferringSampler,
    Policy,
    ReferenceConsumer,
    ReferencePolicy,
    ReferenceSnapshotPolicy,
    RewardTransform,
    Sampler,
    Stateful,
    StepHookPolicy,
    TrainableStatePolicy,
)
from toolkit.io.checkpoint import CheckpointManager, CheckpointState, capture_rng_state, restore_rng_state
from toolkit.io.redaction import redact
from toolkit.objective.policy_objective import ObjectiveOutput, PolicyObjective, loss_denominators
from toolkit.rollout import Rollout
from toolkit.train import sharding
from toolkit.train.async_rollouts import AsyncRollouts, build_async_rollouts
from toolkit.train.config_drift import apply_new_hyperparameters, group_settings
from toolkit.train.critic import RETURNS_KEY, CriticUpdater
from toolkit.train.filters import refill
from toolkit.train.rollout_stats import normalizes_within_groups, rollout_metrics
from toolkit.train.schedules import OptimizerFactory, Scheduler, default_optimizer
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
        # TRL's rule: one epoch over one minibatch is on-policy, so the old log-probs are the first training forward's,
        # detached (ratio exactly 1), and a sampler that re-scores for them skips that forward (`defer_old_logprobs`).
        # Not when a transform reads rollout.old_logprobs before the update (KL-in-reward, a `needs_reference` one).
        self.old_logprobs_from_update = (
            cfg.num_inner_epochs == 1
            and cfg.num_minibatches == 1
            and not self._transforms_need_reference
            and isinstance(sampler, OldLogprobsDeferringSampler)
        )
        needs_reference = objective.needs_reference or self._transforms_need_reference
        reference = None
        if needs_reference and isinstance(policy, ReferenceSnapshotPolicy):
            reference = policy.init_reference()  # snapshot before any update or resume; sharded with the policy
        params = [p for p in policy.module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the policy has no trainable parameters (all requires_grad=False)")
        # The `optimizer:` / `scheduler:` sections (toolkit.train.schedules); AdamW lr 1e-6 and a constant lr if unset.
        built = (optimizer or default_optimizer)(params)
        updates = cfg.num_steps * cfg.num_inner_epochs * cfg.num_minibatches
        self.scheduler = (scheduler or Scheduler()).build(built, updates)
        policy.module, self.optimizer = sharding.prepare(
            self.accelerator, policy.module, built, cfg, reference=reference, has_critic=critic is not None
        )
        decay = float(built.defaults.get("weight_decay", 0.0))  # the critic's AdamW shares the policy's decay
        self.critic = (
            CriticUpdater(critic, self.accelerator, cfg.critic_lr, decay, cfg.max_grad_norm, cfg.value_clip)
            if critic is not None
            else None
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
        out = self.normalizer(rollout)
        if not torch.isfinite(out.values).all():
            raise FloatingPointError(f"{type(self.normalizer).__name__} produced non-finite advantages")
        rollout.advantages = out.values
        if out.returns is not None:
            rollout.data[RETURNS_KEY] = out.returns
        rollout.metrics.update(out.metrics)
        return rollout

    def reference_log_probs(self, rollout: Rollout) -> torch.Tensor:
        if not isinstance(self.policy, ReferencePolicy):
            raise ValueError(f"kl_coef > 0 but {type(self.policy).__name__} has no ref_log_probs()")
        with torch.no_grad():
            ref: torch.Tensor = self.policy.ref_log_probs(rollout).detach()
        return ref

    def update(self, rollout: Rollout) -> dict[str, float]:
        """`num_inner_epochs` × `num_minibatches` optimizer steps over the rollout."""
        cfg = self.config
        totals: dict[str, list[float]] = {}
        start = time.perf_counter()
        # During the warm-up the actor is neither differentiated nor stepped (its lr schedule waits too); the critic
        # and self-training reward models (the DiDi discriminator trains inside its reward call) keep learning.
        train_actor = self.global_step >= cfg.critic_warmup_steps
        for _ in range(cfg.num_inner_epochs):
            for minibatch in rollout.minibatches(
                cfg.num_minibatches, self.update_generator, cfg.shuffle_minibatches, cfg.keep_groups_in_minibatch
            ):
                # Global denominators, so token_mean is exact across accumulation and ranks.
                tokens, seqs = loss_denominators(minibatch.mask)
                num_tokens = float(dist.all_reduce_sum(tokens))
                num_seqs = float(dist.all_reduce_sum(seqs))
                num_rows = None  # all rows, empty ones too: the denominator of `count_empty_rows` only
                if self.objective.count_empty_rows:
                    num_rows = float(dist.all_reduce_sum(torch.tensor(float(minibatch.mask.shape[0]))))
                micros = list(minibatch.minibatches(cfg.gradient_accumulation_steps, shuffle=False))
                for index, micro in enumerate(micros):
                    with sharding.micro_step(self.accelerator, last=index == len(micros) - 1):
                        metrics = self.micro_backward(micro, num_tokens, num_seqs, train_actor, num_rows)
                    for key, value in metrics.items():
                        totals.setdefault(key, []).append(value)
                if train_actor:
                    totals.setdefault("optim/grad_norm", []).append(self.optimizer_step())
                if self.critic is not None:
                    totals.setdefault("critic/grad_norm", []).append(self.critic.step())
        metrics = {key: float(np.mean(values)) for key, values in totals.items()}
        metrics["optim/lr"] = float(self.scheduler.get_last_lr()[0])
        metrics["time/update_s"] = time.perf_counter() - start
        return metrics

    def micro_backward(
        self, micro: Rollout, num_tokens: float, num_seqs: float, train_actor: bool, num_rows: float | None = None
    ) -> dict[str, float]:
        """Backward of one micro-batch's actor loss (and critic loss); returns their metrics."""
        metrics: dict[str, float] = {}
        if train_actor:
            out = self.micro_loss(micro, num_tokens, num_seqs, num_rows)
            # DDP, FSDP and ZeRO average gradients over ranks; the loss already divides by global counts.
            sharding.backward(self.accelerator, out.loss * dist.world_size())
            metrics.update(out.metrics)
        if self.critic is not None:
            metrics.update(self.critic.backward(micro, num_tokens, dist.world_size()))
        return metrics

    def micro_loss(
        self, micro: Rollout, num_tokens: float, num_seqs: float, num_rows: float | None = None
    ) -> ObjectiveOutput:
        entropy = kl = None
        if self.objective.entropy_coef > 0:
            if not isinstance(self.policy, EntropyPolicy):
                raise ValueError(f"entropy_coef > 0 but {type(self.policy).__name__} returns no entropy")
            logprobs, entropy = self.policy.log_probs_and_entropy(micro)
        else:
            logprobs = self.policy.log_probs(micro)
        if self.old_logprobs_from_update:
            micro.old_logprobs = logprobs.detach()
        if self.objective.kl_coef > 0 and isinstance(self.policy, AnalyticKLPolicy):
            kl = self.policy.analytic_kl(micro)
        assert micro.advantages is not None
        return self.objective(
            logprobs,
            micro.old_logprobs,
            micro.advantages,
            micro.mask,
            ref_logprobs=micro.ref_logprobs,
            entropy=entropy,
            kl=kl,
            num_tokens=num_tokens,
            num_seqs=num_seqs,
            num_rows=num_rows,
        )

    def optimizer_step(self) -> float:
        grad_norm = sharding.grad_norm(self.accelerator, self.policy.module.parameters(), self.config.max_grad_norm)
        self.optimizer.step()  # a no-op under DeepSpeed: the engine stepped in the last micro-batch's backward
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if isinstance(self.policy, StepHookPolicy):
            self.policy.after_optimizer_step()  # e.g. an EMA update of the policy's weights
        return grad_norm

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
        policy, kind = self.policy, sharding.engine(self.accelerator)
        if weights is None and kind == "fsdp":  # one rank holds only its shards: a checkpoint needs every rank
            raise RuntimeError("under FSDP a checkpoint is written by trainer.save(manager) on every rank")
        if weights is None:
            module = dist.unwrap(policy.module)
            weights = policy.trainable_state_dict() if isinstance(policy, TrainableStatePolicy) else module.state_dict()
        parts: dict[str, Any] = {
            # ZeRO's optimizer state needs unsafe unpickling to load: a DeepSpeed run checkpoints no optimizer state.
            "optimizer": None if kind == "deepspeed" else self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": self.data.state_dict(),
            "generator": self.generator.get_state(),
        }
        for name, part in self.stateful_parts():
            parts[name] = part.state_dict()
        parts.update(objects)
        meta = {"step": self.global_step, "config": redact(self.run_config)}
        rng = capture_rng_state() | ({"ranks": rank_states} if rank_states else {})
        return CheckpointState(step=self.global_step, model=dict(weights), objects=parts, rng=rng, meta=meta)

    def stateful_parts(self) -> list[tuple[str, Stateful]]:
        """(name, object) pairs checkpointed through their state_dict/load_state_dict (the `Stateful` ones)."""
        parts: list[tuple[str, object]] = [("normalizer", self.normalizer), ("critic", self.critic)]
        # A policy or reward model may carry state beyond the trained weights (an EMA copy, a discriminator
        # that trains itself with its own optimizer): checkpointed when it is Stateful.
        # nn.Module reward models (a frozen CLIP scorer) are skipped: their weights are not training state.
        extra = [("policy_state", self.policy)] + [(f"reward/{name}", m) for name, m in self.rewards.items()]
        parts += [(name, part) for name, part in extra if not isinstance(part, torch.nn.Module)]
        parts += [(f"transform{i}", t) for i, t in enumerate(self.transforms)]
        return [(name, part) for name, part in parts if isinstance(part, Stateful)]

    def save(self, manager: CheckpointManager | None = None) -> Path | None:
        """Write a checkpoint into `manager` (this run's by default); every rank calls it, rank 0 writes.

        Every rank's RNG and sampling generator are kept; FSDP shards and ZeRO-3 weights: toolkit.train.sharding.
        """
        if self.rollouts is not None:
            self.rollouts.wait()  # the rollout in flight draws from the data stream and the generator saved here
        ranks = sharding.rank_states(self.generator)

        def state(weights: Mapping[str, torch.Tensor] | None = None, **objects: Any) -> CheckpointState:
            return self.state(weights, rank_states=ranks, **objects)

        return sharding.save_checkpoint(
            self.accelerator, self.policy, self.optimizer, manager or self.checkpoints, state
        )

    def load(self, path: str | Path, keep_new_hyperparameters: bool = False) -> None:
        """Restore a checkpoint; `keep_new_hyperparameters` keeps this config's optimizer settings (lr, betas ...)."""
        fresh = group_settings(self.optimizer)
        state = sharding.load_checkpoint(
            self.accelerator, self.checkpoints, Path(path), self.policy.module, self.optimizer
        )
        self.scheduler.load_state_dict(state.objects["scheduler"])
        if keep_new_hyperparameters:
            apply_new_hyperparameters(self.optimizer, self.scheduler, fresh)
        self.data.load_state_dict(state.objects["data"])
        for name, part in self.stateful_parts():
            if name in state.objects:
                part.load_state_dict(state.objects[name])
        own = sharding.own_rank_state(state.rng)  # this rank's streams; rank 0's from a one-process checkpoint
        restore_rng_state(own["rng"] if own else state.rng)
        self.generator.set_state(own["generator"] if own else state.objects["generator"])
        self.global_step = state.step
        self._batches = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _shard_size(num_prompts: int) -> int:
    return len(range(dist.rank(), num_prompts, dist.world_size()))
