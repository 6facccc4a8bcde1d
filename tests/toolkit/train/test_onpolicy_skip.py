"""On-policy updates take old_logprobs from the first training forward (TRL's rule) instead of a sampler pass.

With one inner epoch over one minibatch the sampler skips its re-scoring forward and the trainer uses its own
log-probs, detached: one step of each demo config (and the tiny video config) then gives bitwise the same losses,
gradients and updated weights as the path with the sampler's extra forward, on CPU in fp32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from toolkit.config import load_config
from toolkit.train.runner import build_trainer
from toolkit.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[3]
COMMON = ["trainer.progress=false", "trainer.save_every=0", "trainer.num_threads=1", "trainer.num_minibatches=1"]
DEMO = [
    "trainer.prompts_per_step=4",
    "trainer.group_size=4",
    "sampler.max_new_tokens=6",
    f"data.path={ROOT / 'data' / 'demo' / 'letters.jsonl'}",
]
# The search agent with a short warm start (rewards then differ within groups) and small budgets.
AGENT = [
    "trainer.prompts_per_step=2",
    "policy.model.warm_start_steps=30",
    "policy.model.copy_steps=0",
    "sampler.max_new_tokens_per_turn=6",
    "sampler.max_response_tokens=48",
    "sampler.max_observation_tokens=24",
    f"data.paths={ROOT / 'data' / 'text_agent' / 'synthetic_qa.jsonl'}",
    f"sampler.tools.0.corpus={ROOT / 'data' / 'text_agent' / 'corpus.jsonl'}",
]
CASES = {
    "demo": ("demo/tiny_grpo.yaml", DEMO),
    "demo_accumulation_entropy": (
        "demo/tiny_grpo.yaml",
        [*DEMO, "trainer.gradient_accumulation_steps=2", "objective.entropy_coef=0.01"],
    ),
    "demo_kl": ("demo/tiny_grpo.yaml", [*DEMO, "objective.kl_coef=0.05"]),
    "search_agent": ("text_agent/tiny.yaml", [*AGENT, "objective.entropy_coef=0.01"]),
    "video": (
        "medical_video/tiny.yaml",
        ["trainer.prompts_per_step=2", "trainer.group_size=2", "objective.entropy_coef=0.01"],
    ),
}


class StepRecorder:
    """Counts the policy's log-prob forwards and keeps the gradients each optimizer step applies."""

    def __init__(self, trainer: Trainer) -> None:
        self.forwards = 0
        self.grads: list[dict[str, torch.Tensor]] = []
        policy: Any = trainer.policy
        for name in ("log_probs", "log_probs_and_entropy"):
            original = getattr(policy, name)
            setattr(policy, name, self._counted(original))
        step = trainer.optimizer_step

        def recorded_step() -> float:
            module = trainer.policy.module
            self.grads.append({k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None})
            return step()

        trainer.optimizer_step = recorded_step  # type: ignore[method-assign]

    def _counted(self, original: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.forwards += 1
            return original(*args, **kwargs)

        return counted


def one_step(path: str, overrides: list[str], run_dir: Path, skip: bool) -> tuple[dict[str, float], StepRecorder, Any]:
    trainer = build_trainer(load_config(ROOT / "configs" / path, [*COMMON, *overrides, f"trainer.run_dir={run_dir}"]))
    assert trainer.old_logprobs_from_update, "one epoch over one minibatch is on-policy"
    trainer.old_logprobs_from_update = skip
    recorder = StepRecorder(trainer)
    metrics, _ = trainer.step()
    weights = {k: v.detach().clone() for k, v in trainer.policy.module.state_dict().items()}
    return metrics, recorder, weights


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_skipping_the_old_logprob_pass_changes_nothing(case: str, tmp_path: Path) -> None:
    path, overrides = CASES[case]
    metrics, recorder, weights = one_step(path, overrides, tmp_path / "rescored", skip=False)
    fast_metrics, fast, fast_weights = one_step(path, overrides, tmp_path / "skipped", skip=True)
    micro_batches = len(recorder.grads) * (2 if "trainer.gradient_accumulation_steps=2" in overrides else 1)
    assert recorder.forwards == fast.forwards + 1 and fast.forwards == micro_batches  # one re-scoring pass less
    # the engine-vs-trainer log-prob mismatch needs the re-scoring pass that skipping saves
    compared = [key for key in metrics if not key.startswith(("time/", "rollout/engine_logprob"))]
    assert {key: metrics[key] for key in compared} == pytest.approx(
        {key: fast_metrics[key] for key in compared}, rel=0, abs=0, nan_ok=True
    )
    assert fast_metrics["policy/clip_frac"] == 0.0
    assert len(recorder.grads) == len(fast.grads) == 1
    for name, grad in recorder.grads[0].items():
        assert torch.equal(grad, fast.grads[0][name]), name
    assert any(grad.abs().sum() > 0 for grad in fast.grads[0].values()), "a zero gradient would make this vacuous"
    for name, value in weights.items():
        assert torch.equal(value, fast_weights[name]), name


@pytest.mark.parametrize(
    "override",
    ["trainer.num_minibatches=2", "trainer.num_inner_epochs=2"],
)
def test_off_policy_updates_keep_the_sampler_pass(override: str, tmp_path: Path) -> None:
    config = load_config(
        ROOT / "configs" / "demo" / "tiny_grpo.yaml", [*COMMON, *DEMO, override, f"trainer.run_dir={tmp_path}"]
    )
    trainer = build_trainer(config)
    assert not trainer.old_logprobs_from_update
    rollout = trainer.sample_and_score()
    assert not getattr(trainer.sampler, "defer_old_logprobs")  # noqa: B009
    assert bool((rollout.old_logprobs[rollout.mask] < 0).all()), "the sampler re-scored the rollout"


def test_on_policy_sampler_leaves_old_logprobs_to_the_update(tmp_path: Path) -> None:
    config = load_config(ROOT / "configs" / "demo" / "tiny_grpo.yaml", [*COMMON, *DEMO, f"trainer.run_dir={tmp_path}"])
    trainer = build_trainer(config)
    rollout = trainer.sample_and_score()
    assert getattr(trainer.sampler, "defer_old_logprobs")  # noqa: B009
    assert bool((rollout.old_logprobs == 0).all()) and rollout.metrics["time/old_logprobs_s"] == 0.0


def test_a_transform_reading_old_logprobs_keeps_the_sampler_pass(tmp_path: Path) -> None:
    """KL-in-reward reads rollout.old_logprobs before the update: they must come from the sampler."""
    kl_reward = {"_component_": "modalities.text_agent.kl_reward.KLRewardPenalty", "kl_coef": 0.01}
    config = load_config(ROOT / "configs" / "demo" / "tiny_grpo.yaml", [*COMMON, *DEMO, f"trainer.run_dir={tmp_path}"])
    config["transforms"] = [kl_reward]
    assert not build_trainer(config).old_logprobs_from_update
