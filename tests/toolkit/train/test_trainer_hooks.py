"""Trainer extension points: `policy.after_optimizer_step()` runs after each optimizer step, and a policy or
reward model with state_dict/load_state_dict (not an nn.Module) is checkpointed and restored. Every optional
hook is a `toolkit.interfaces` protocol checked with isinstance: an object without it is never called."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from modalities.text_agent.kl_reward import KLRewardPenalty
from tests.toolkit.train.test_trainer import ROOT, tiny_config
from toolkit.interfaces import ReferenceConsumer, ReferencePolicy, Stateful, StepHookPolicy, TrainableStatePolicy
from toolkit.rollout import Rollout
from toolkit.train.runner import build_trainer
from toolkit.train.trainer import Trainer


class Counting:
    """Counts calls; state_dict/load_state_dict carry the count."""

    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])


def test_after_optimizer_step_hook_and_policy_state_survive_resume(tmp_path: Path) -> None:
    trainer = build_trainer(tiny_config(tmp_path, "trainer.num_steps=2"))
    counter = Counting()
    trainer.policy.after_optimizer_step = lambda: setattr(counter, "count", counter.count + 1)  # type: ignore[attr-defined]
    trainer.policy.state_dict = counter.state_dict  # type: ignore[attr-defined]
    trainer.policy.load_state_dict = counter.load_state_dict  # type: ignore[attr-defined]
    trainer.step()
    updates = trainer.config.num_inner_epochs * trainer.config.num_minibatches
    assert counter.count == updates
    path = trainer.save()
    assert path is not None
    counter.count = -5
    trainer.load(path)
    assert counter.count == updates


def test_stateful_reward_model_is_checkpointed_but_module_rewards_are_not(tmp_path: Path) -> None:
    trainer = build_trainer(tiny_config(tmp_path, "trainer.num_steps=1"))
    name = next(iter(trainer.rewards))
    base = trainer.rewards[name]

    class StatefulReward(Counting):
        def __call__(self, prompts: Any, samples: Any, **metadata: Any) -> Any:
            self.count += 1
            return base(prompts, samples, **metadata)

    reward = StatefulReward()
    trainer.rewards = {name: reward, "frozen": torch.nn.Linear(1, 1)}  # type: ignore[dict-item]
    names = [n for n, _ in trainer.stateful_parts()]
    assert f"reward/{name}" in names and "reward/frozen" not in names
    trainer.rewards.pop("frozen")
    trainer.step()
    path = trainer.save()
    assert path is not None
    reward.count = 100
    trainer.load(path)
    assert reward.count == 1


def test_num_threads_is_applied_before_models_are_built_and_validated(tmp_path: Path) -> None:
    import pytest

    before = torch.get_num_threads()
    try:
        build_trainer(tiny_config(tmp_path, "trainer.num_threads=1"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="num_threads"):
        build_trainer(tiny_config(tmp_path, "trainer.num_threads=0"))


# ------------------------------------------------------------------------------------------ declared hooks only
class PlainPolicy:
    """The bare Policy protocol (module + log_probs) over a real policy: none of the optional hooks."""

    def __init__(self, inner: Any) -> None:
        self.module: nn.Module = inner.module
        self.inner = inner

    def log_probs(self, rollout: Rollout) -> Tensor:
        logprobs: Tensor = self.inner.log_probs(rollout)
        return logprobs


class HookedPolicy(PlainPolicy):
    """PlainPolicy plus the step hook and a trainable-state override."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.steps = 0

    def after_optimizer_step(self) -> None:
        self.steps += 1

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {"only": torch.ones(1)}


class ReadsReference:
    """A reward transform that records whether the rollout carried reference log-probs when it ran."""

    def __init__(self, needs_reference: bool | None) -> None:
        if needs_reference is not None:
            self.needs_reference = needs_reference
        self.saw_reference: list[bool] = []

    def __call__(self, rollout: Rollout) -> Rollout:
        self.saw_reference.append(rollout.ref_logprobs is not None)
        return rollout


class SavesOnly:
    """Has state_dict but no load_state_dict: not Stateful, so never checkpointed (it could not be restored)."""

    def __call__(self, rollout: Rollout) -> Rollout:
        return rollout

    def state_dict(self) -> dict[str, Any]:
        return {"never": "saved"}


class StatefulTransform(SavesOnly):
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, rollout: Rollout) -> Rollout:
        self.calls += 1
        return rollout

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])


def rebuilt(trainer: Trainer, **changes: Any) -> Trainer:
    """A new Trainer over `trainer`'s parts with some replaced (so the constructor's hook calls can be observed)."""
    parts: dict[str, Any] = {
        "policy": trainer.policy,
        "sampler": trainer.sampler,
        "rewards": trainer.rewards,
        "normalizer": trainer.normalizer,
        "objective": trainer.objective,
        "data": trainer.data,
        "transforms": trainer.transforms,
        "config": trainer.config,
    }
    return Trainer(**(parts | changes))


def scored_rollout(trainer: Trainer) -> Rollout:
    return trainer.compute_advantages(trainer.collect())


@pytest.mark.parametrize("needs_reference", [True, False, None])
def test_only_reference_consumers_get_reference_log_probs_and_a_snapshot(
    tmp_path: Path, needs_reference: bool | None
) -> None:
    base = build_trainer(tiny_config(tmp_path, "trainer.num_steps=1"))
    policy, snapshots = base.policy, []
    real_init = policy.init_reference  # type: ignore[attr-defined]
    policy.init_reference = lambda: snapshots.append(1) or real_init()  # type: ignore[attr-defined]
    transform = ReadsReference(needs_reference)
    assert isinstance(transform, ReferenceConsumer) == (needs_reference is not None)
    trainer = rebuilt(base, transforms=[transform])
    assert snapshots == ([1] if needs_reference else [])  # taken in the constructor, before any update
    trainer.step()
    assert transform.saw_reference == [bool(needs_reference)]
    assert isinstance(KLRewardPenalty(), ReferenceConsumer) and KLRewardPenalty.needs_reference


def test_a_policy_without_optional_hooks_is_trained_and_checkpointed_whole(tmp_path: Path) -> None:
    trainer = build_trainer(tiny_config(tmp_path, "trainer.num_steps=1"))
    rollout = scored_rollout(trainer)
    plain = PlainPolicy(trainer.policy)
    assert not isinstance(plain, (StepHookPolicy, TrainableStatePolicy, ReferencePolicy, Stateful))
    trainer.policy = plain
    trainer.update(rollout)  # no after_optimizer_step to call
    assert set(trainer.state().model) == set(plain.module.state_dict())
    assert "policy_state" not in dict(trainer.stateful_parts())
    with pytest.raises(ValueError, match=r"PlainPolicy has no ref_log_probs\(\)"):
        trainer.reference_log_probs(rollout)


def test_declared_hooks_are_called_and_not_during_the_actor_warmup(tmp_path: Path) -> None:
    trainer = build_trainer(tiny_config(tmp_path, "trainer.num_steps=2"))
    rollout = scored_rollout(trainer)
    hooked = HookedPolicy(trainer.policy)
    trainer.policy = hooked
    trainer.config = dataclasses.replace(trainer.config, critic_warmup_steps=1)
    trainer.update(rollout)
    assert hooked.steps == 0  # the warm-up step never steps the actor's optimizer
    trainer.global_step = 1
    trainer.update(rollout)
    assert hooked.steps == trainer.config.num_inner_epochs * trainer.config.num_minibatches
    assert set(trainer.state().model) == {"only"}


def test_only_stateful_parts_are_checkpointed_and_restored(tmp_path: Path) -> None:
    base = build_trainer(tiny_config(tmp_path, "trainer.num_steps=1"))
    stateful = StatefulTransform()
    trainer = rebuilt(base, transforms=[SavesOnly(), stateful])
    assert [name for name, _ in trainer.stateful_parts()] == ["transform1"]  # no critic, GroupNormalizer has no state
    trainer.step()
    path = trainer.save()
    assert path is not None
    stateful.calls = 7
    trainer.load(path)
    assert stateful.calls == 1


@pytest.mark.parametrize("name", ["trainer.py", "update.py", "trainer_state.py", "critic.py", "eval_hook.py"])
def test_the_trainer_never_duck_types_hooks(name: str) -> None:
    """No hasattr and no getattr(obj, "name", default) in the trainer's hook call sites: hooks are protocols."""
    tree = ast.parse((ROOT / "toolkit" / "train" / name).read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    duck = [n.lineno for n in calls if n.func.id == "hasattr" or (n.func.id == "getattr" and len(n.args) == 3)]  # type: ignore[attr-defined]
    assert not duck, f"toolkit/train/{name} lines {duck}: declare a protocol in toolkit.interfaces and use isinstance"
