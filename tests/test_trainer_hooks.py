"""Trainer extension points: `policy.after_optimizer_step()` runs after each optimizer step, and a policy or
reward model with state_dict/load_state_dict (not an nn.Module) is checkpointed and restored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.test_trainer import tiny_config
from toolkit.train.runner import build_trainer


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
