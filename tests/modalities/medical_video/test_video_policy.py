"""Video VLM policy and sampler: the PolicyContract (re-scored log-probs equal sampling, gradients, masking) with a
tiny Qwen2.5-VL on real video input, the mixture DataSource, and tiny.yaml end to end (a GRPO step with video input,
checkpoint resume) on CPU."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from modalities.medical_video.data import MedVidBenchDataset, load_medvidbench
from modalities.medical_video.policy import VideoVLMPolicy, vision_tower
from modalities.medical_video.sampler import VideoSampler
from modalities.medical_video.synthetic import make_synthetic_medvidbench
from modalities.medical_video.tiny import build_tiny_processor, build_tiny_qwen2_5_vl
from tests.contracts import PolicyContract
from toolkit.config import load_config
from toolkit.rollout import concat_rollouts
from toolkit.train.runner import build_trainer

ROOT = Path(__file__).resolve().parents[3]
TINY_VIDEO = {"fps": 1.0, "min_pixels": 3136, "max_pixels": 3136}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_medvidbench(tmp_path_factory.mktemp("medvid"), seed=0, num_videos=2, num_frames=6)


def tiny_policy(**kwargs: Any) -> VideoVLMPolicy:
    return VideoVLMPolicy(build_tiny_qwen2_5_vl(seed=0), build_tiny_processor(), **kwargs)


class TestVideoPolicyContract(PolicyContract):
    group_size = 2

    @pytest.fixture(autouse=True)
    def _rows(self, synthetic: Path) -> None:
        rows = load_medvidbench(synthetic)
        # different tasks (prompt lengths) and both videos; one region caption (box drawn)
        self.rows = [rows[0], rows[2], rows[9]]

    def make_policy(self) -> VideoVLMPolicy:
        return tiny_policy()

    def make_sampler(self) -> VideoSampler:
        return VideoSampler(video=TINY_VIDEO, max_new_tokens=8)

    def make_prompts(self) -> list[Any]:
        return [dict(r) for r in self.rows]


def test_vision_tower_frozen_and_lora_targets_language_model() -> None:
    policy = tiny_policy()
    assert not any(p.requires_grad for p in vision_tower(policy.module).parameters())
    assert any(p.requires_grad for p in policy.module.parameters())
    lora = tiny_policy(lora={"r": 2, "lora_alpha": 4})
    names = [n for n, p in lora.module.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and "visual" not in n for n in names)
    assert lora.reference_mode == "adapters_off"


def test_rescoring_survives_concat_and_micro_batches(synthetic: Path) -> None:
    """Prompts of different widths concatenated (dynamic-sampling refill) and scored in chunks keep ratio 1."""
    policy = tiny_policy(micro_batch_size=3)
    rows = load_medvidbench(synthetic)
    sampler = VideoSampler(video=TINY_VIDEO, max_new_tokens=6)
    first = sampler.sample(policy, [rows[1]], 2, torch.Generator().manual_seed(0))
    second = sampler.sample(policy, [rows[4], rows[10]], 2, torch.Generator().manual_seed(1))
    second = dataclasses.replace(second, group_ids=second.group_ids + 1)
    merged = concat_rollouts([first, second])
    logprobs = policy.log_probs(merged)
    torch.testing.assert_close(logprobs[merged.mask], merged.old_logprobs[merged.mask], atol=1e-5, rtol=0)
    assert merged.dataset_ids is not None and merged.task_ids == [rows[i]["task"] for i in (1, 4, 10) for _ in range(2)]


def test_mixture_weights_and_resume(synthetic: Path) -> None:
    dataset = MedVidBenchDataset(paths=str(synthetic), mixture={"tal": 3.0, "vs": 1.0}, seed=5)
    tasks = [row["task"] for _ in range(50) for row in dataset.next_batch(8)]
    assert set(tasks) == {"tal", "vs"} and 0.65 < tasks.count("tal") / len(tasks) < 0.85
    state = dataset.state_dict()
    expected = [r["id"] for r in dataset.next_batch(6)]
    again = MedVidBenchDataset(paths=str(synthetic), mixture={"tal": 3.0, "vs": 1.0}, seed=5)
    again.load_state_dict(state)
    assert [r["id"] for r in again.next_batch(6)] == expected
    with pytest.raises(ValueError, match="unknown task strata"):
        MedVidBenchDataset(paths=str(synthetic), mixture={"tql": 1.0})


def test_bad_record_names_the_record(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[{"conversations": [{"value": "<video>\\nq"}], "video": ["a.png"], "qa_type": "bogus"}]')
    with pytest.raises(ValueError, match=r"bad.json, record 0: .*bogus"):
        load_medvidbench(path)


def tiny_config(tmp_path: Path, *overrides: str) -> dict[str, Any]:
    return load_config(
        ROOT / "configs" / "medical_video" / "tiny.yaml",
        [
            f"trainer.run_dir={tmp_path / 'run'}",
            f"data.out_dir={tmp_path / 'data'}",
            "data.num_videos=2",
            "trainer.progress=false",
            "trainer.prompts_per_step=2",
            "trainer.group_size=3",
            "sampler.max_new_tokens=8",
            *overrides,
        ],
    )


def digit_fraction(prompt: Any, sample: str, **row: Any) -> float:
    """A stand-in raw metric in [0, 1] that varies across a random model's samples (so advantages are nonzero)."""
    return sum(c.isdigit() for c in sample) / max(len(sample), 1)


def test_tiny_yaml_grpo_step_with_video(tmp_path: Path) -> None:
    """tiny.yaml as shipped: video in, MedVidReward raw metric, logistic normalization, GRPO update, all finite."""
    trainer = build_trainer(tiny_config(tmp_path))
    metrics, rollout = trainer.step()
    assert len(rollout) == 6 and rollout.metrics["video/cache_misses"] + rollout.metrics["video/cache_hits"] == 2
    for key in ("loss/policy", "normalizer/zero_variance_groups", "advantage/mean", "video/tokens_mean"):
        assert math.isfinite(metrics[key]), key
    assert rollout.advantages is not None and torch.isfinite(rollout.advantages).all()
    assert rollout.scores is not None and ((rollout.scores > 0) & (rollout.scores < 1)).all(), "r_norm lies in (0, 1)"
    assert set(rollout.task_ids or []) <= {"tal", "stg", "rc", "vs"}


def test_tiny_yaml_update_moves_weights_with_a_varying_reward(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    fn = {"_component_": "tests.modalities.medical_video.test_video_policy.digit_fraction", "_partial_": True}
    config["rewards"] = {"digits": {"_component_": "rewards.base.FunctionReward", "fn": fn}}
    trainer = build_trainer(config)
    before = {n: p.detach().clone() for n, p in trainer.policy.module.named_parameters() if p.requires_grad}
    metrics, rollout = trainer.step()
    assert rollout.advantages is not None and rollout.advantages.abs().sum() > 0
    assert math.isfinite(metrics["loss/policy"])
    params = trainer.policy.module.named_parameters()
    moved = [n for n, p in params if p.requires_grad and not torch.equal(p, before[n])]
    assert moved and not any("visual" in n for n in moved)
