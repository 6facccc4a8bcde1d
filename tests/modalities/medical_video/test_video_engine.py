"""The video sampler generates through a rollout engine: with the `hf` engine its responses are bitwise those of a
direct HF `generate` call on the same seed (the sampler's code before the engine seam), with and without the reused
vision embeddings and in several generate calls; the lean `hf` engine falls back to `generate`; the `server` engine
(tested in tests/toolkit/engines) fails clearly when its server is down; the policy contract holds with an explicit
`hf` engine."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GenerationConfig

from modalities.medical_video.data import load_medvidbench
from modalities.medical_video.policy import VideoVLMPolicy, mm_token_types, video_batch
from modalities.medical_video.sampler import VideoSampler
from modalities.medical_video.synthetic import make_synthetic_medvidbench
from modalities.medical_video.tiny import build_tiny_processor, build_tiny_qwen2_5_vl
from tests.modalities.medical_video import test_video_policy as video_tests
from tests.modalities.medical_video.test_video_policy import TINY_VIDEO
from toolkit.engines import EngineUnavailableError, HFEngine, ServerEngine
from toolkit.hf.generation import left_pad, plain_generation_config, rng_devices, row_slices
from toolkit.rollout import Rollout


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_medvidbench(tmp_path_factory.mktemp("medvid"), seed=0, num_videos=2, num_frames=6)


def direct_generate(policy: VideoVLMPolicy, rollout: Rollout, seed: int, batch: int, **sampling: Any) -> torch.Tensor:
    """The rollout's prompts answered by `module.generate` itself (no engine): responses [N, T] padded with pad."""
    module, tokenizer = policy.module, policy.tokenizer
    model_eos = module.generation_config.eos_token_id
    model_eos = [model_eos] if isinstance(model_eos, int) else list(model_eos or [])
    eos = list(dict.fromkeys([tokenizer.eos_token_id, *model_eos]))
    pad = tokenizer.pad_token_id
    config = GenerationConfig(
        suppress_tokens=list(policy.suppressed_token_ids) or None,
        max_new_tokens=8,
        eos_token_id=eos,
        pad_token_id=pad,
        use_cache=True,
        **sampling,
    )
    prompt_mask = rollout.data["prompt_attention_mask"]
    rows = [ids[mask].tolist() for ids, mask in zip(rollout.data["prompt_ids"], prompt_mask, strict=True)]
    prompt_ids, mask = left_pad(rows, pad, torch.device("cpu"))
    videos, embeds = rollout.data["videos"], rollout.data.get("video_embeds")
    parts = []
    with (
        torch.random.fork_rng(devices=rng_devices(prompt_ids.device)),
        torch.no_grad(),
        contextlib.ExitStack() as stack,
    ):
        stack.enter_context(plain_generation_config(module))
        torch.manual_seed(seed)
        for part in row_slices(len(rows), batch):
            ids = prompt_ids[part]
            output = module.generate(
                input_ids=ids,
                attention_mask=mask[part].long(),
                mm_token_type_ids=mm_token_types(ids, policy.video_token_id, policy.image_token_id),
                generation_config=config,
                **video_batch(videos[part], ids.device, None if embeds is None else embeds[part]),
            )
            parts.append(output[:, ids.shape[1] :])
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=pad) for p in parts])


def seed_of(generator_seed: int) -> int:
    """The seed the sampler draws from `torch.Generator().manual_seed(generator_seed)` for the engine."""
    return int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(generator_seed)).item())


@pytest.mark.parametrize(
    ("reuse", "batch", "greedy"),
    [(False, None, False), (True, 3, False), (False, 4, True)],
    ids=["one", "reuse", "greedy"],
)
def test_engine_responses_are_bitwise_direct_generate(
    synthetic: Path, reuse: bool, batch: int | None, greedy: bool
) -> None:
    rows = load_medvidbench(synthetic)
    policy = VideoVLMPolicy(build_tiny_qwen2_5_vl(seed=0), build_tiny_processor(), reuse_vision_embeddings=reuse)
    sampler = VideoSampler(video=TINY_VIDEO, max_new_tokens=8, generation_batch_size=batch, do_sample=not greedy)
    rollout = sampler.sample(policy, [dict(rows[i]) for i in (0, 2, 9)], 2, torch.Generator().manual_seed(3))
    assert ("video_embeds" in rollout.data) == reuse
    sampling = {} if greedy else {"do_sample": True, "temperature": policy.temperature, "top_p": policy.top_p}
    if not greedy:
        sampling["top_k"] = policy.top_k or 0
    expected = direct_generate(policy, rollout, seed_of(3), batch or 6, **sampling)
    assert torch.equal(rollout.data["response_ids"], expected)
    assert torch.equal(rollout.mask, rollout.data["response_attention_mask"]) and rollout.mask.any()


def test_lean_engine_falls_back_to_generate_and_other_engines_refuse_video(synthetic: Path) -> None:
    prompts = [dict(r) for r in load_medvidbench(synthetic)[:2]]
    policy = VideoVLMPolicy(build_tiny_qwen2_5_vl(seed=0), build_tiny_processor())
    rollouts = [
        VideoSampler(video=TINY_VIDEO, max_new_tokens=6, engine=engine).sample(
            policy, prompts, 2, torch.Generator().manual_seed(1)
        )
        for engine in ("hf", HFEngine(decode="lean"))
    ]
    assert torch.equal(rollouts[0].data["response_ids"], rollouts[1].data["response_ids"])
    assert torch.equal(rollouts[0].old_logprobs, rollouts[1].old_logprobs)
    dead = ServerEngine("http://127.0.0.1:9", max_retries=0)  # video goes to the server now: a dead one fails clearly
    with pytest.raises(EngineUnavailableError, match="failed 1 attempts"):
        VideoSampler(video=TINY_VIDEO, max_new_tokens=6, engine=dead).sample(policy, prompts, 2, torch.Generator())
    with pytest.raises(ValueError, match="engine"):
        VideoSampler(video=TINY_VIDEO, engine="nope")  # type: ignore[arg-type]


class TestVideoEngineContract(video_tests.TestVideoPolicyContract):
    """The policy contract with the engine named, two rows per generate call."""

    def make_sampler(self) -> VideoSampler:
        return VideoSampler(video=TINY_VIDEO, max_new_tokens=8, engine=HFEngine(generation_batch_size=2))
