"""What a Trainer checkpoints and restores: the policy's weights, optimizer, lr schedule, data position, RNG streams
and every `Stateful` part (normalizer, critic, transforms, a policy's or reward model's own state).

Plain functions over the trainer's parts, passed explicitly: `Trainer.state`, `Trainer.load` and
`Trainer.stateful_parts` delegate here. Where the weights and optimizer go under FSDP2 or ZeRO (shards, gathers) and
every rank's RNG streams are toolkit.train.sharding's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from rewards.base import RewardModel
from toolkit import distributed as dist
from toolkit.interfaces import DataSource, Normalizer, Policy, RewardTransform, Stateful, TrainableStatePolicy
from toolkit.io.checkpoint import CheckpointState, capture_rng_state, restore_rng_state
from toolkit.io.export import POLICY_STATE
from toolkit.io.redaction import redact
from toolkit.train import sharding
from toolkit.train.config_drift import apply_new_hyperparameters
from toolkit.train.critic import CriticUpdater


def stateful_parts(
    normalizer: Normalizer,
    critic: CriticUpdater | None,
    policy: Policy,
    rewards: Mapping[str, RewardModel],
    transforms: Sequence[RewardTransform],
) -> list[tuple[str, Stateful]]:
    """(name, object) pairs checkpointed through their state_dict/load_state_dict (the `Stateful` ones)."""
    parts: list[tuple[str, object]] = [("normalizer", normalizer), ("critic", critic)]
    # A policy or reward model may carry state beyond the trained weights (an EMA copy, a discriminator
    # that trains itself with its own optimizer): checkpointed when it is Stateful.
    # nn.Module reward models (a frozen CLIP scorer) are skipped: their weights are not training state.
    extra = [(POLICY_STATE, policy)] + [(f"reward/{name}", model) for name, model in rewards.items()]
    parts += [(name, part) for name, part in extra if not isinstance(part, torch.nn.Module)]
    parts += [(f"transform{i}", t) for i, t in enumerate(transforms)]
    return [(name, part) for name, part in parts if isinstance(part, Stateful)]


def policy_weights(policy: Policy, kind: sharding.Engine) -> Mapping[str, torch.Tensor]:
    """The weights one process checkpoints: what the policy trains (LoRA adapters) or its whole unwrapped module.

    Raises RuntimeError under FSDP (`kind`), where one rank holds only its shards.
    """
    if kind == "fsdp":  # one rank holds only its shards: a checkpoint needs every rank
        raise RuntimeError("under FSDP a checkpoint is written by trainer.save(manager) on every rank")
    if isinstance(policy, TrainableStatePolicy):
        return policy.trainable_state_dict()
    weights: Mapping[str, torch.Tensor] = dist.unwrap(policy.module).state_dict()
    return weights


def training_objects(
    kind: sharding.Engine,
    optimizer: Any,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data: DataSource,
    generator: torch.Generator,
    parts: Sequence[tuple[str, Stateful]],
) -> dict[str, Any]:
    """The objects checkpointed beside the weights, by name: optimizer, lr schedule, data position, the sampling
    generator and each of `parts`' state."""
    objects: dict[str, Any] = {
        # ZeRO's optimizer state needs unsafe unpickling to load: a DeepSpeed run checkpoints no optimizer state.
        "optimizer": None if kind == "deepspeed" else optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "data": data.state_dict(),
        "generator": generator.get_state(),
    }
    for name, part in parts:
        objects[name] = part.state_dict()
    return objects


def checkpoint_state(
    step: int,
    weights: Mapping[str, torch.Tensor],
    objects: Mapping[str, Any],
    run_config: Mapping[str, Any],
    rank_states: list[dict[str, Any]] | None,
) -> CheckpointState:
    """The checkpoint of `step`: its meta holds the redacted `run_config`, its RNG this process's global streams and,
    from a multi-rank save, every rank's (`rank_states`: toolkit.train.sharding.rank_states)."""
    meta = {"step": step, "config": redact(run_config)}
    rng = capture_rng_state() | ({"ranks": rank_states} if rank_states else {})
    return CheckpointState(step=step, model=dict(weights), objects=dict(objects), rng=rng, meta=meta)


def restore_state(
    state: CheckpointState,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data: DataSource,
    generator: torch.Generator,
    parts: Sequence[tuple[str, Stateful]],
    fresh: list[dict[str, Any]] | None,
) -> None:
    """Restore all of a loaded checkpoint but its weights and optimizer state (toolkit.train.sharding.load_checkpoint
    restored those): the lr schedule, the data position, each of `parts` it holds and this rank's RNG streams.

    `fresh`: param-group settings taken before the load, put back over the checkpoint's (`keep_new_hyperparameters`,
    toolkit.train.config_drift); None keeps the checkpoint's.
    """
    scheduler.load_state_dict(state.objects["scheduler"])
    if fresh is not None:
        apply_new_hyperparameters(optimizer, scheduler, fresh)
    data.load_state_dict(state.objects["data"])
    for name, part in parts:
        if name in state.objects:
            part.load_state_dict(state.objects[name])
    own = sharding.own_rank_state(state.rng)  # this rank's streams; rank 0's from a one-process checkpoint
    restore_rng_state(own["rng"] if own else state.rng)
    generator.set_state(own["generator"] if own else state.objects["generator"])
