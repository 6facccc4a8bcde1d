"""The trainer's update stage: `num_inner_epochs` × minibatches × accumulation micro-batches of the PolicyObjective.

Plain functions over the trainer's parts, passed explicitly: the Trainer builds its optimizer here and its `update`,
`micro_backward`, `micro_loss` and `optimizer_step` delegate here. The loop calls back through the callables it is
given, so a test or hook that wraps a Trainer method sees every call. What differs under DDP, FSDP2 or ZeRO is in
toolkit.train.sharding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from toolkit import distributed as dist
from toolkit.interfaces import (
    AnalyticKLPolicy,
    Critic,
    EntropyPolicy,
    OldLogprobsDeferringSampler,
    Policy,
    Sampler,
    StepHookPolicy,
)
from toolkit.objective.policy_objective import ObjectiveOutput, PolicyObjective, loss_denominators
from toolkit.rollout import Rollout
from toolkit.train import sharding
from toolkit.train.critic import CriticUpdater
from toolkit.train.schedules import OptimizerFactory, Scheduler, default_optimizer
from toolkit.train.trainer_config import TrainerConfig

# (micro-batch, num_tokens, num_seqs, num_rows) -> its metrics, after its backward.
MicroBackward = Callable[[Rollout, float, float, float | None], dict[str, float]]


def build_optimization(
    policy: Policy,
    accelerator: Any,
    config: TrainerConfig,
    optimizer: OptimizerFactory | None,
    scheduler: Scheduler | None,
    reference: nn.Module | None,
    critic: Critic | None,
) -> tuple[Any, torch.optim.lr_scheduler.LRScheduler, CriticUpdater | None]:
    """The policy's optimizer and lr schedule, with `policy.module` replaced by its prepared (DDP, FSDP2, ZeRO) module,
    and the critic's updater; returns (optimizer, scheduler, critic updater or None).

    `optimizer` / `scheduler` are the `optimizer:` / `scheduler:` sections (toolkit.train.schedules): AdamW lr 1e-6
    and a constant lr when unset. `reference` is sharded with the policy.
    """
    params = [p for p in policy.module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the policy has no trainable parameters (all requires_grad=False)")
    built = (optimizer or default_optimizer)(params)
    updates = config.num_steps * config.num_inner_epochs * config.num_minibatches
    schedule = (scheduler or Scheduler()).build(built, updates)
    policy.module, prepared = sharding.prepare(
        accelerator, policy.module, built, config, reference=reference, has_critic=critic is not None
    )
    if critic is None:
        return prepared, schedule, None
    decay = float(built.defaults.get("weight_decay", 0.0))  # the critic's AdamW shares the policy's decay
    updater = CriticUpdater(critic, accelerator, config.critic_lr, decay, config.max_grad_norm, config.value_clip)
    return prepared, schedule, updater


def old_logprobs_from_update(config: TrainerConfig, sampler: Sampler, transforms_need_reference: bool) -> bool:
    """Whether the update takes the old log-probs from its own first forward, detached (ratio exactly 1).

    TRL's rule: one epoch over one minibatch is on-policy, so a sampler that re-scores for the old log-probs skips
    that forward (`defer_old_logprobs`). Not when a transform reads rollout.old_logprobs before the update
    (KL-in-reward, a `needs_reference` one: `transforms_need_reference`).
    """
    return (
        config.num_inner_epochs == 1
        and config.num_minibatches == 1
        and not transforms_need_reference
        and isinstance(sampler, OldLogprobsDeferringSampler)
    )


def run_update(
    rollout: Rollout,
    config: TrainerConfig,
    generator: torch.Generator,
    accelerator: Any,
    count_empty_rows: bool,
    micro_backward: MicroBackward,
    steps: Mapping[str, Callable[[], float]],
) -> dict[str, list[float]]:
    """Every micro-batch's metrics and each optimizer step's grad norm, by name, over the whole update.

    Args:
        generator: shuffles the minibatches.
        count_empty_rows: the objective's `count_empty_rows` (the all-rows denominator is reduced only then).
        micro_backward: the backward of one micro-batch given the minibatch's global denominators.
        steps: metric name -> optimizer step returning its grad norm, called in order after each minibatch.
    """
    totals: dict[str, list[float]] = {}
    for _ in range(config.num_inner_epochs):
        for minibatch in rollout.minibatches(
            config.num_minibatches, generator, config.shuffle_minibatches, config.keep_groups_in_minibatch
        ):
            num_tokens, num_seqs, num_rows = global_denominators(minibatch.mask, count_empty_rows)
            micros = list(minibatch.minibatches(config.gradient_accumulation_steps, shuffle=False))
            for index, micro in enumerate(micros):
                with sharding.micro_step(accelerator, last=index == len(micros) - 1):
                    metrics = micro_backward(micro, num_tokens, num_seqs, num_rows)
                for key, value in metrics.items():
                    totals.setdefault(key, []).append(value)
            for key, step in steps.items():
                totals.setdefault(key, []).append(step())
    return totals


def global_denominators(mask: torch.Tensor, count_empty_rows: bool) -> tuple[float, float, float | None]:
    """(tokens, sequences, rows or None) of a minibatch's [N, T] mask summed over ranks, so token_mean is exact
    across accumulation and ranks. Rows, empty ones too, are the denominator of `count_empty_rows` only."""
    tokens, seqs = loss_denominators(mask)
    num_tokens = float(dist.all_reduce_sum(tokens))
    num_seqs = float(dist.all_reduce_sum(seqs))
    num_rows = float(dist.all_reduce_sum(torch.tensor(float(mask.shape[0])))) if count_empty_rows else None
    return num_tokens, num_seqs, num_rows


def backpropagate(
    accelerator: Any,
    micro: Rollout,
    num_tokens: float,
    actor_loss: ObjectiveOutput | None,
    critic: CriticUpdater | None,
) -> dict[str, float]:
    """Backward of one micro-batch's `actor_loss` (None: the actor is not trained) and critic loss; their metrics."""
    metrics: dict[str, float] = {}
    if actor_loss is not None:
        # DDP, FSDP and ZeRO average gradients over ranks; the loss already divides by global counts.
        sharding.backward(accelerator, actor_loss.loss * dist.world_size())
        metrics.update(actor_loss.metrics)
    if critic is not None:
        metrics.update(critic.backward(micro, num_tokens, dist.world_size()))
    return metrics


def policy_loss(
    policy: Policy,
    objective: PolicyObjective,
    micro: Rollout,
    denominators: tuple[float, float, float | None],
    old_logprobs_from_update: bool,
) -> ObjectiveOutput:
    """The objective's loss of one micro-batch, from one differentiable forward of `policy` (with entropy when the
    objective weighs it, the analytic KL when the policy has one).

    `denominators` are the minibatch's global (tokens, sequences, rows); `old_logprobs_from_update`: the update is
    on-policy, so the micro-batch's old log-probs are this forward's, detached (ratio exactly 1).
    """
    entropy = kl = None
    if objective.entropy_coef > 0:
        if not isinstance(policy, EntropyPolicy):
            raise ValueError(f"entropy_coef > 0 but {type(policy).__name__} returns no entropy")
        logprobs, entropy = policy.log_probs_and_entropy(micro)
    else:
        logprobs = policy.log_probs(micro)
    if old_logprobs_from_update:
        micro.old_logprobs = logprobs.detach()
    if objective.kl_coef > 0 and isinstance(policy, AnalyticKLPolicy):
        kl = policy.analytic_kl(micro)
    assert micro.advantages is not None
    num_tokens, num_seqs, num_rows = denominators
    return objective(
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


def step_optimizer(
    accelerator: Any,
    policy: Policy,
    optimizer: Any,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    max_grad_norm: float | None,
) -> float:
    """Clip, step the optimizer and the lr schedule, zero the gradients, then the policy's step hook; the grad norm."""
    grad_norm = sharding.grad_norm(accelerator, policy.module.parameters(), max_grad_norm)
    optimizer.step()  # a no-op under DeepSpeed: the engine stepped in the last micro-batch's backward
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if isinstance(policy, StepHookPolicy):
        policy.after_optimizer_step()  # e.g. an EMA update of the policy's weights
    return grad_norm
