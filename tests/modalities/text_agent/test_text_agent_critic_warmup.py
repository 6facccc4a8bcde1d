"""Critic warm-up (trainer.critic_warmup_steps, verl's `critic_warmup`): the first steps train the critic only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from toolkit.config import load_config
from toolkit.train.runner import build_trainer
from toolkit.train.trainer_config import TrainerConfig

ROOT = Path(__file__).resolve().parents[3]
DATA = ROOT / "data" / "text_agent"


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(before: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def test_actor_waits_while_the_critic_warms_up(tmp_path: Path) -> None:
    cfg = load_config(
        ROOT / "configs" / "text_agent" / "tiny_ppr.yaml",
        [
            "trainer.progress=false",
            "trainer.save_every=0",
            "trainer.prompts_per_step=2",
            "trainer.num_minibatches=1",
            "trainer.critic_warmup_steps=1",
            "policy.model.warm_start_steps=0",
            "policy.model.copy_steps=0",
            "sampler.max_new_tokens_per_turn=6",
            "sampler.max_response_tokens=40",
            "sampler.max_observation_tokens=20",
            f"data.paths={DATA / 'synthetic_qa.jsonl'}",
            f"sampler.tools.0.corpus={DATA / 'corpus.jsonl'}",
            f"trainer.run_dir={tmp_path}",
        ],
    )
    trainer = build_trainer(cfg)
    assert trainer.critic is not None
    critic = trainer.critic.critic.module
    actor, value = snapshot(trainer.policy.module), snapshot(critic)
    metrics, _ = trainer.step()
    assert not changed(actor, trainer.policy.module), "the actor moved during the critic warm-up"
    assert changed(value, critic) and "loss/policy" not in metrics
    assert trainer.scheduler.last_epoch == 0, "the actor's lr schedule waits for the warm-up"
    metrics, _ = trainer.step()
    assert changed(actor, trainer.policy.module) and "loss/policy" in metrics


def test_negative_warmup_is_rejected() -> None:
    with pytest.raises(ValueError, match="critic_warmup_steps"):
        TrainerConfig(critic_warmup_steps=-1)
