"""KL-in-reward (docs/methods/ppr.md §6.2): a hand-computed oracle, error paths, and the trainer hook that supplies ref
log-probs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modalities.text_agent.kl_reward import KLRewardPenalty, kl_in_reward
from toolkit.config import load_config
from toolkit.rollout import Rollout
from toolkit.train.runner import build_trainer

ROOT = Path(__file__).resolve().parents[3]
DATA = ROOT / "data" / "text_agent"


def test_kl_in_reward_oracle_k1_on_generated_tokens_only() -> None:
    rewards = torch.tensor([[0.0, -0.4, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    old = torch.tensor([[-1.0, -2.0, -0.5, -0.2], [-0.3, -0.1, -2.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -0.7], [-0.1, -0.1, -1.0, 0.0]])
    mask = torch.tensor([[True, False, True, True], [True, True, False, False]])  # False: <information>/padding
    penalised, kl = kl_in_reward(rewards, old, ref, mask, kl_coef=0.1)
    # k1 = old - ref on the mask: row 0 -> [0.5, -, 0.0, 0.5]; row 1 -> [-0.2, 0.0, -, -]
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, 0.0, 0.5], [-0.2, 0.0, 0.0, 0.0]]), atol=1e-6, rtol=0)
    expected = torch.tensor([[-0.05, -0.4, 0.0, 0.95], [0.02, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(penalised, expected, atol=1e-6, rtol=0)


def test_penalty_needs_reference_and_token_rewards() -> None:
    rollout = Rollout(
        group_ids=torch.zeros(1, dtype=torch.long),
        old_logprobs=torch.zeros(1, 2),
        mask=torch.ones(1, 2, dtype=torch.bool),
    )
    with pytest.raises(ValueError, match="ref_logprobs"):
        KLRewardPenalty()(rollout)
    rollout.ref_logprobs = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="after ReNorm"):
        KLRewardPenalty()(rollout)
    with pytest.raises(ValueError, match="kl_coef"):
        KLRewardPenalty(kl_coef=-1.0)
    with pytest.raises(ValueError, match="estimator"):
        KLRewardPenalty(estimator="k3")  # type: ignore[arg-type]


def test_trainer_supplies_reference_log_probs_before_the_transforms(tmp_path: Path) -> None:
    """tiny_ppr.yaml + KLRewardPenalty: zero KL on-policy at step 1 (reference = initial weights), non-zero after."""
    cfg = load_config(
        ROOT / "configs" / "text_agent" / "tiny_ppr.yaml",
        [
            "trainer.progress=false",
            "trainer.save_every=0",
            "trainer.prompts_per_step=2",
            "trainer.num_minibatches=1",
            "optimizer.lr=0.01",
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
    cfg["transforms"].append({"_component_": "modalities.text_agent.kl_reward.KLRewardPenalty", "kl_coef": 0.5})
    trainer = build_trainer(cfg)
    assert trainer.objective.kl_coef == 0.0, "no KL loss: the reference is there for the transform alone"
    first, rollout = trainer.step()
    assert rollout.ref_logprobs is not None
    assert first["kl/reward_penalty_kl"] == pytest.approx(0.0, abs=1e-6)
    second, rollout = trainer.step()
    assert abs(second["kl/reward_penalty_kl"]) > 1e-4
    assert rollout.token_rewards is not None and rollout.ref_logprobs is not None
    info = rollout.data["info_mask"].bool()
    drift = (rollout.old_logprobs - rollout.ref_logprobs)[rollout.mask.bool()]
    assert bool((drift != 0).any()) and not bool((info & rollout.mask.bool()).any())
