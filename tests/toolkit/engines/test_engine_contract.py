"""One contract for every rollout engine behind SingleTurnSampler and VideoSampler: the policy contract (shapes,
ratio 1 on-policy, masks, gradients, seeding) passes through `hf`, `server` (renorm serve-policy on a loopback
thread, weights pushed; video inputs sent in `renorm_multimodal`) and `vllm` (GPU and vLLM only); the engines'
results agree with each other and with the policy's own scores."""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from modalities.medical_video.data import load_medvidbench
from modalities.medical_video.policy import VideoVLMPolicy
from modalities.medical_video.sampler import VideoSampler
from modalities.medical_video.synthetic import make_synthetic_medvidbench
from modalities.medical_video.tiny import build_tiny_processor, build_tiny_qwen2_5_vl
from modalities.text_agent.policy import CausalLMPolicy
from modalities.text_agent.policy_server import PolicyServer
from modalities.text_agent.sampler import SingleTurnSampler
from modalities.text_agent.tools.retriever_server import serving
from tests.modalities.medical_video import test_video_policy as video_tests
from tests.modalities.medical_video.test_video_policy import TINY_VIDEO
from tests.modalities.text_agent.test_text_policy import TextContract, sgd_step
from tests.tiny import EOS_TOKEN_ID, tiny_prompts, tiny_text_policy, tiny_tokenizer
from toolkit.engines import GenerationRequest, HFEngine, SamplingParams, ServerEngine
from toolkit.engines.base import RolloutEngine
from toolkit.hf.generation import left_pad
from toolkit.rollout import Rollout

HAS_VLLM = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def request_for(prompts: int = 3, samples: int = 4, seed: int = 7, **params: Any) -> GenerationRequest:
    tokenizer = tiny_tokenizer()
    ids = [tokenizer(p["prompt"])["input_ids"] for p in tiny_prompts(prompts)]
    settings = {"max_new_tokens": 10, "eos_token_ids": (EOS_TOKEN_ID,), "pad_token_id": 0, **params}
    return GenerationRequest(ids, SamplingParams(**settings), samples, seed)


class TestHFEngineContract(TextContract):
    sampler_kwargs = {"engine": "hf"}


class TestServerEngineContract(TextContract):
    """The server holds other weights (seed 1) until the engine pushes the test policy's."""

    server: PolicyServer

    @pytest.fixture(autouse=True)
    def _server(self, policy_server: PolicyServer) -> None:
        self.server = policy_server

    def make_sampler(self) -> SingleTurnSampler:
        return SingleTurnSampler(max_new_tokens=10, engine=ServerEngine(self.server.url, retry_backoff_s=0.01))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_VLLM, reason="the vllm engine needs vLLM and CUDA")
class TestVLLMEngineContract(TextContract):
    """vLLM loads the tiny model from a folder (no lm_head bias: vLLM's Qwen2 has none), then gets weights pushed."""

    engine: RolloutEngine | None = None  # one vLLM engine for the class; it syncs from each test's policy

    def make_policy(self) -> CausalLMPolicy:
        return tiny_text_policy(eos_logit=None)

    def make_sampler(self) -> SingleTurnSampler:
        from toolkit.engines.vllm_engine import VLLMEngine

        if TestVLLMEngineContract.engine is None:
            folder = tempfile.mkdtemp(prefix="renorm-tiny-vllm-")
            policy = self.make_policy()
            policy.module.save_pretrained(folder)
            policy.tokenizer.save_pretrained(folder)
            engine = VLLMEngine(folder, gpu_memory_utilization=0.2, dtype="float32", enforce_eager=True)
            TestVLLMEngineContract.engine = engine
        return SingleTurnSampler(max_new_tokens=10, engine=TestVLLMEngineContract.engine)


def test_hf_engine_is_seeded_generate_and_keeps_the_global_rng() -> None:
    """The engine's tokens are exactly `generate` under torch.manual_seed(seed), and the global RNG is untouched."""
    policy, request = tiny_text_policy(), request_for(samples=2)
    rows = request.rows()
    ids, mask = left_pad(rows, 0)
    before = torch.get_rng_state()
    result = HFEngine().generate(policy, request)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(request.seed)
    out = policy.module.generate(
        input_ids=ids,
        attention_mask=mask.long(),
        do_sample=True,
        max_new_tokens=10,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=0,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
    )[:, ids.shape[1] :].tolist()
    for row, (tokens, reason) in enumerate(zip(result.token_ids, result.finish_reasons, strict=True)):
        assert tokens == out[row][: len(tokens)]
        stopped = EOS_TOKEN_ID in out[row]
        assert reason == ("stop" if stopped else "length")
        assert (tokens[-1] == EOS_TOKEN_ID) == stopped and len(tokens) == (
            out[row].index(EOS_TOKEN_ID) + 1 if stopped else 10
        )


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_logprobs_are_the_policy_scores(temperature: float) -> None:
    """The hf engine's log-probs are those the policy re-scores (temperature-scaled full distribution)."""
    policy = tiny_text_policy(temperature=temperature)
    rollout = SingleTurnSampler(max_new_tokens=10).sample(policy, tiny_prompts(3), 4, torch.Generator().manual_seed(0))
    engine, mask = rollout.data["engine_logprobs"], rollout.mask
    torch.testing.assert_close(engine[mask], rollout.old_logprobs[mask], atol=1e-5, rtol=0)
    assert torch.all(engine[~mask] == 0)
    assert rollout.metrics["rollout/engine_logprob_abs_diff_max"] < 1e-5
    assert (
        rollout.metrics["rollout/engine_logprob_abs_diff_mean"]
        <= rollout.metrics["rollout/engine_logprob_abs_diff_max"]
    )


PARAMS = [
    {},
    {"eos_token_ids": ()},
    {"stop_strings": ("a",)},
    {"do_sample": False},
    {"top_k": 5, "top_p": 0.8},
    {"suppress_token_ids": (EOS_TOKEN_ID, 5, 6)},
]


@pytest.mark.parametrize("params", PARAMS)
def test_server_results_equal_the_hf_engines(policy_server: PolicyServer, params: dict[str, Any]) -> None:
    """The same request and weights give the same tokens, finish reasons and (to fp noise) log-probs."""
    policy, request = tiny_text_policy(), request_for(**params)
    engines: list[RolloutEngine] = [HFEngine(), ServerEngine(policy_server.url, retry_backoff_s=0.01)]
    local, served = (engine.generate(policy, request) for engine in engines)
    assert served.token_ids == local.token_ids and served.finish_reasons == local.finish_reasons
    assert served.logprobs is not None and local.logprobs is not None
    for a, b in zip(served.logprobs, local.logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-6, rtol=0)
    if params.get("eos_token_ids") == ():  # stops at exactly the sampler's EOS list: none, so never
        assert set(local.finish_reasons) == {"length"}
    elif not params:  # both ways of ending occur (the tiny model samples EOS ~7% of steps)
        assert "stop" in local.finish_reasons and "length" in local.finish_reasons
    if "suppress_token_ids" in params:  # sent as renorm_suppress_token_ids and applied exactly: never sampled
        assert not any(t in params["suppress_token_ids"] for ids in served.token_ids for t in ids)
        assert set(local.finish_reasons) == {"length"}
    if "stop_strings" in params:
        assert any(
            reason == "stop" and "a" in tiny_tokenizer().decode(ids)
            for ids, reason in zip(local.token_ids, local.finish_reasons, strict=True)
        )


def test_server_sampler_rollout_equals_the_hf_samplers_after_an_update(policy_server: PolicyServer) -> None:
    """Same rollout fields, masks, old log-probs and completions through either engine, also after a weight update."""
    policy = tiny_text_policy()
    local = SingleTurnSampler(max_new_tokens=10)
    served = SingleTurnSampler(max_new_tokens=10, engine=ServerEngine(policy_server.url, retry_backoff_s=0.01))
    for step in range(2):
        rollouts = [s.sample(policy, tiny_prompts(3), 4, torch.Generator().manual_seed(step)) for s in (local, served)]
        a, b = rollouts
        assert_same_rollouts(a, b)
        assert b.metrics["engine/weight_pushed"] == 1.0  # pushed at first use and again after the update
        sgd_step(policy, a)


def assert_same_rollouts(a: Rollout, b: Rollout) -> None:
    """Equal rollout fields, data tensors (the engine's log-probs aside), masks, old log-probs and completions."""
    assert set(a.data) == set(b.data) and a.completions == b.completions
    for key, value in a.data.items():
        if isinstance(value, torch.Tensor) and key != "engine_logprobs":
            assert torch.equal(value, b.data[key]), key
    for name in ("old_logprobs", "mask", "lengths", "truncated", "group_ids"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# ------------------------------------------------------------------------------------------- the video sampler
def video_policy(seed: int = 0) -> VideoVLMPolicy:
    return VideoVLMPolicy(build_tiny_qwen2_5_vl(seed=seed), build_tiny_processor())


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_medvidbench(tmp_path_factory.mktemp("medvid"), seed=0, num_videos=2, num_frames=6)


@pytest.fixture(scope="module")
def video_server() -> Iterator[PolicyServer]:
    """A serve-policy thread serving a tiny Qwen2.5-VL with other weights (seed 1) until the engine pushes."""
    with serving(PolicyServer(video_policy(seed=1), ("127.0.0.1", 0))) as server:
        yield server


class TestServerVideoContract(video_tests.TestVideoPolicyContract):
    """The video policy contract with every rollout generated by serve-policy from the sampler's multimodal form."""

    server: PolicyServer

    @pytest.fixture(autouse=True)
    def _server(self, video_server: PolicyServer) -> None:
        self.server = video_server

    def make_sampler(self) -> VideoSampler:
        return VideoSampler(video=TINY_VIDEO, max_new_tokens=8, engine=ServerEngine(self.server.url, max_retries=0))


@pytest.mark.parametrize("greedy", [False, True], ids=["sampled", "greedy"])
def test_video_server_rollouts_equal_the_hf_engines(synthetic: Path, video_server: PolicyServer, greedy: bool) -> None:
    """The same rollout (tokens, masks, old log-probs, data) through either engine for a seed, after an update too;
    the server's log-probs match the hf engine's (pixels there, cached embeddings here: the same numbers on CPU)."""
    rows = load_medvidbench(synthetic)
    prompts, policy = [dict(rows[i]) for i in (0, 2, 9)], video_policy()
    engines = ("hf", ServerEngine(video_server.url, max_retries=0))
    samplers = [VideoSampler(video=TINY_VIDEO, max_new_tokens=8, do_sample=not greedy, engine=e) for e in engines]
    for step in range(2):
        local, served = (s.sample(policy, prompts, 2, torch.Generator().manual_seed(step)) for s in samplers)
        assert_same_rollouts(local, served)
        gap = (local.data["engine_logprobs"] - served.data["engine_logprobs"]).abs().max()
        assert gap < 1e-5 and served.metrics["rollout/engine_logprob_abs_diff_max"] < 1e-5
        assert served.metrics["engine/weight_pushed"] == 1.0  # pushed at first use and after the update
        sgd_step(policy, local)
