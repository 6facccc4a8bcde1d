"""PPO + GAE with a learned critic through the trainer (PPR's official path)."""

from __future__ import annotations

from pathlib import Path

import torch

from modalities.text_agent.critic import CausalLMCritic
from modalities.text_agent.tiny import build_tiny_qwen2
from tests.toolkit.train.test_trainer import tiny_config
from toolkit.rollout import Rollout
from toolkit.train.runner import build_trainer, fit

CRITIC = [
    "+critic._component_=modalities.text_agent.critic.CausalLMCritic",
    "+critic.model._component_=modalities.text_agent.tiny.build_tiny_qwen2",
    "critic.model.seed=1",
    "critic.head_init_std=0.01",
    "normalizer._component_=toolkit.advantages.GAENormalizer",
    "~normalizer.std",
    "~normalizer.eps",
    "+normalizer.score_at_last_step=true",
    "+normalizer.gamma=1.0",
    "+normalizer.lam=1.0",
    "trainer.critic_lr=1.0e-3",
]


def test_values_are_masked_and_differentiable() -> None:
    critic = CausalLMCritic(build_tiny_qwen2(seed=3), head_init_std=0.1)
    n, t = 2, 3
    rollout = Rollout(
        group_ids=torch.arange(n),
        old_logprobs=torch.zeros(n, t),
        mask=torch.tensor([[True, True, False], [True, False, False]]),
        data={
            "prompt_ids": torch.tensor([[5, 6], [0, 7]]),
            "prompt_attention_mask": torch.tensor([[True, True], [False, True]]),
            "response_ids": torch.tensor([[8, 9, 0], [10, 0, 0]]),
            "response_attention_mask": torch.tensor([[True, True, False], [True, False, False]]),
        },
    )
    values = critic.values(rollout)
    assert values.shape == (n, t)
    assert (values[~rollout.mask] == 0).all() and (values[rollout.mask] != 0).all()
    values.sum().backward()
    assert critic.module.head.weight.grad is not None and critic.module.head.weight.grad.abs().sum() > 0


def test_ppo_gae_step_fits_the_critic(tmp_path: Path) -> None:
    trainer = build_trainer(tiny_config(tmp_path, *CRITIC, "trainer.num_minibatches=1"))
    head = trainer.critic.critic.module
    head = getattr(head, "module", head).head.weight.detach().clone()
    metrics, rollout = trainer.step()
    assert rollout.values is not None and rollout.advantages.shape == rollout.mask.shape
    assert "loss/value" in metrics and metrics["loss/value"] > 0
    after = trainer.critic.critic.module
    assert not torch.equal(getattr(after, "module", after).head.weight, head), "the value head did not move"


def test_resume_with_a_critic_is_exact(tmp_path: Path) -> None:
    straight = build_trainer(tiny_config(tmp_path / "a", *CRITIC, "trainer.num_steps=2"))
    fit(straight)
    split = build_trainer(tiny_config(tmp_path / "b", *CRITIC, "trainer.num_steps=1"))
    fit(split)
    resumed = build_trainer(tiny_config(tmp_path / "b", *CRITIC, "trainer.num_steps=2"))
    fit(resumed)
    for a, b in zip(straight.critic.critic.module.parameters(), resumed.critic.critic.module.parameters(), strict=True):
        assert torch.equal(a, b)
