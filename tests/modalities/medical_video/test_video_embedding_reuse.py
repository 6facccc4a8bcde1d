"""The frozen Qwen2.5-VL vision tower runs once per distinct video per step (issue 19): generation, the old-log-prob
pass, training and reference forwards take the sampler's embeddings, with the same samples, log-probs and gradients
as re-encoding every row in every forward; a trainable tower is never bypassed."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from modalities.medical_video.data import load_medvidbench
from modalities.medical_video.policy import VideoVLMPolicy, vision_tower
from modalities.medical_video.sampler import VideoSampler
from modalities.medical_video.synthetic import make_synthetic_medvidbench
from modalities.medical_video.tiny import build_tiny_processor, build_tiny_qwen2_5_vl
from toolkit.hf.policy import unwrap_model
from toolkit.rollout import Rollout

TINY_VIDEO = {"fps": 1.0, "min_pixels": 3136, "max_pixels": 3136}
LORA = {"r": 2, "lora_alpha": 4, "init_lora_weights": "gaussian"}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    folder = make_synthetic_medvidbench(tmp_path_factory.mktemp("medvid"), seed=0, num_videos=2, num_frames=6)
    rows = load_medvidbench(folder)
    return [dict(rows[i]) for i in (0, 2, 9)]  # both videos, three tasks, one drawn region box


def tiny_policy(**kwargs: Any) -> VideoVLMPolicy:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # peft draws LoRA weights from the global RNG: the same adapters for every build
        return VideoVLMPolicy(build_tiny_qwen2_5_vl(seed=0), build_tiny_processor(), **kwargs)


def sample(policy: VideoVLMPolicy, prompts: list[dict[str, Any]], group_size: int = 3) -> Rollout:
    sampler = VideoSampler(video=TINY_VIDEO, max_new_tokens=6)
    return sampler.sample(policy, prompts, group_size, torch.Generator().manual_seed(0))


def count_tower_calls(module: nn.Module) -> list[int]:
    """Patches per forward call of `module`'s vision tower, appended as they happen."""
    calls: list[int] = []
    vision_tower(module).register_forward_pre_hook(lambda _, args: calls.append(int(args[0].shape[0])))
    return calls


def loss_and_grads(policy: VideoVLMPolicy, rollout: Rollout) -> tuple[Tensor, Tensor]:
    advantages = torch.linspace(-1.0, 1.0, len(rollout))[:, None]
    logprobs, entropy = policy.log_probs_and_entropy(rollout)
    loss = -(advantages * torch.exp(logprobs - rollout.old_logprobs))[rollout.mask].mean() - 0.01 * entropy.mean()
    loss.backward()
    grads = [p.grad.flatten() for p in policy.module.parameters() if p.requires_grad and p.grad is not None]
    return loss.detach(), torch.cat(grads)


@pytest.mark.parametrize(
    "options", [{}, {"micro_batch_size": 4}, {"lora": LORA, "gradient_checkpointing": True, "micro_batch_size": 5}]
)
def test_reused_embeddings_give_the_same_samples_logprobs_and_gradients(
    prompts: list[dict[str, Any]], options: dict[str, Any]
) -> None:
    results = {}
    for reuse in (False, True):
        policy = tiny_policy(reuse_vision_embeddings=reuse, **options)
        assert policy.reuses_vision_embeddings() == reuse
        rollout = sample(policy, prompts)
        assert ("video_embeds" in rollout.data) == reuse
        policy.module.train()
        reference = policy.ref_log_probs(rollout)
        results[reuse] = (rollout, reference, *loss_and_grads(policy, rollout))
    (before, ref_before, loss_before, grads_before), (after, ref_after, loss_after, grads_after) = results.values()
    assert torch.equal(after.data["response_ids"], before.data["response_ids"]), "generation must not change"
    torch.testing.assert_close(after.old_logprobs, before.old_logprobs, rtol=0, atol=1e-6)
    torch.testing.assert_close(ref_after, ref_before, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss_after, loss_before, rtol=1e-6, atol=1e-7)
    assert float(grads_before.abs().sum()) > 0
    torch.testing.assert_close(grads_after, grads_before, rtol=1e-5, atol=1e-7)


def test_the_tower_encodes_each_distinct_video_once_per_step(prompts: list[dict[str, Any]]) -> None:
    counts = {}
    for reuse in (False, True):
        policy = tiny_policy(reuse_vision_embeddings=reuse, reference="copy")
        policy.init_reference()
        calls = count_tower_calls(policy.module)
        reference_calls = count_tower_calls(policy.init_reference())
        rollout = sample(policy, prompts)  # generation + old log-probs
        policy.ref_log_probs(rollout)
        loss_and_grads(policy, rollout)
        counts[reuse] = (len(calls), len(reference_calls))
    distinct = len({id(video) for video in rollout.data["videos"]})
    assert distinct == 3
    assert counts[True] == (distinct, 0), "one encoding per distinct video; the reference takes the same embeddings"
    assert counts[False] == (3, 1), "generation, old log-probs and training each encode all rows; so does the copy"


def test_a_trainable_tower_is_never_bypassed(prompts: list[dict[str, Any]]) -> None:
    policy = tiny_policy(freeze_vision=False)
    assert not policy.reuses_vision_embeddings() and policy.video_embeddings([]) is None
    rollout = sample(policy, prompts[:1], group_size=2)
    assert "video_embeds" not in rollout.data
    frozen = tiny_policy()
    stale = dict(rollout.data, video_embeds=frozen.video_embeddings(rollout.data["videos"]))
    calls = count_tower_calls(policy.module)
    _, grads = loss_and_grads(policy, Rollout(**{**rollout.__dict__, "data": stale}))
    assert calls, "a trainable tower runs in the training forward even when a rollout carries embeddings"
    tower = [p.grad for p in vision_tower(policy.module).parameters() if p.requires_grad]
    assert tower and all(g is not None for g in tower) and sum(float(g.abs().sum()) for g in tower) > 0
    assert grads.numel() > 0


def test_lora_on_the_tower_counts_as_trainable() -> None:
    targets = r".*visual.*\.(qkv|proj)$|.*\.(q_proj|v_proj)$"
    policy = tiny_policy(lora={**LORA, "target_modules": targets})
    assert any(p.requires_grad for p in vision_tower(unwrap_model(policy.module)).parameters())
    assert not policy.reuses_vision_embeddings()


def test_attn_implementation_is_checked_and_applied() -> None:
    eager = tiny_policy(attn_implementation="eager")
    assert eager.module.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="attn_implementation='fast'.*sdpa"):
        tiny_policy(attn_implementation="fast")
    with pytest.raises(ImportError, match="flash_attention_2.*flash-attn"):
        tiny_policy(attn_implementation="flash_attention_2")


def test_a_sharded_tower_keeps_running_inside_the_forward() -> None:
    policy = tiny_policy()
    assert policy.reuses_vision_embeddings()
    weight = next(vision_tower(policy.module).parameters())
    weight.ds_id = 0  # type: ignore[attr-defined]  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    assert not policy.reuses_vision_embeddings(), "its shards are gathered only inside the model's forward"
