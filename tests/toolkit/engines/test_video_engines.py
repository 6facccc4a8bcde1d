"""Video requests outside the `hf` engine: `renorm serve-policy` built from the tiny MedGRPO config serves the video
sampler's requests (also split into byte-bounded chunks) as the `hf` engine samples them; bad `renorm_multimodal`
payloads get 4xx answers naming the field, and the request cap counts only what is outside the tensors; a server
that ignores the field is caught; and the `vllm` engine's
payload (a stand-in `LLM`: no GPU or vLLM here) carries the trainer's own vision embeddings once per prompt."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from modalities.medical_video.data import load_medvidbench
from modalities.medical_video.policy import VideoVLMPolicy
from modalities.medical_video.sampler import VideoSampler, video_prompt_inputs
from modalities.medical_video.synthetic import make_synthetic_medvidbench
from modalities.medical_video.tiny import EOS_TOKEN_ID, build_tiny_processor, build_tiny_qwen2_5_vl
from modalities.text_agent.policy_requests import parse_body
from modalities.text_agent.policy_server import PolicyServer, PolicyServerLimits
from modalities.text_agent.serve_policy import build_server, register
from modalities.text_agent.tools.retriever_server import BadRequest, serving
from tests.modalities.medical_video.test_video_policy import ROOT, TINY_VIDEO
from tests.toolkit.engines.test_server_engine import post
from toolkit.engines import GenerationRequest, HFEngine, SamplingParams, ServerEngine, VLLMEngine
from toolkit.engines import vllm_engine as vllm_module
from toolkit.engines.multimodal import MultimodalInputs, prompt_chunks
from toolkit.engines.server import completion_body, parse_completions


def video_policy(seed: int = 0) -> VideoVLMPolicy:
    return VideoVLMPolicy(build_tiny_qwen2_5_vl(seed=seed), build_tiny_processor())


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    folder = make_synthetic_medvidbench(tmp_path_factory.mktemp("medvid"), seed=0, num_videos=2, num_frames=6)
    rows = load_medvidbench(folder)
    return [dict(rows[i]) for i in (0, 1, 9)]  # two questions on one video, one on the other


@pytest.fixture(scope="module")
def server() -> Iterator[PolicyServer]:
    """The test policy's own weights (seed 0), a multimodal cap that one prompt fits and three do not."""
    caps = PolicyServerLimits(max_multimodal_bytes=400_000)
    with serving(PolicyServer(video_policy(), ("127.0.0.1", 0), caps=caps)) as s:
        yield s


def video_request(policy: VideoVLMPolicy, prompts: list[dict[str, Any]], **changes: Any) -> GenerationRequest:
    """The video sampler's request for `prompts` (2 samples each, greedy), its multimodal form changed by `changes`."""
    sampler = VideoSampler(video=TINY_VIDEO)
    videos = [sampler.video_features(policy, p) for p in prompts]
    ids = [sampler._encode(policy, p, v) for p, v in zip(prompts, videos, strict=True)]
    form = video_prompt_inputs(ids, videos, policy.video_token_id, policy.image_token_id)
    per_prompt = [{**p, **changes} for p in form.prompts]
    batching = {**form.batching, **{key: "concat" for key in changes if key not in form.batching}}
    form = MultimodalInputs(tuple(per_prompt), batching)
    params = SamplingParams(max_new_tokens=4, do_sample=False, eos_token_ids=(EOS_TOKEN_ID,), pad_token_id=0)
    return GenerationRequest(ids, params, 2, 5, True, form.model_inputs(2), form)


def refusal(server: PolicyServer, body: dict[str, Any]) -> tuple[int, str]:
    status, answer = post(server.url + "/completions", json.dumps(body).encode())
    return status, str(answer.get("error"))


def test_bad_multimodal_payloads_are_refused_naming_the_field(server: PolicyServer, prompts: list[Any]) -> None:
    policy = server.policy
    good = completion_body(video_request(policy, prompts[:1]), "policy", None)
    assert post(server.url + "/completions", json.dumps(good).encode())[0] == 200
    broken = {**good["renorm_multimodal"], "tensors": "%%%"}
    assert refusal(server, {**good, "renorm_multimodal": broken}) == (
        400,
        "renorm_multimodal.tensors is not base64: Only base64 data is allowed",
    )
    extra = completion_body(video_request(policy, prompts[:1], not_an_input=torch.zeros(1)), "policy", None)
    status, error = refusal(server, extra)
    assert status == 400 and error.startswith("renorm_multimodal.batching names ['not_an_input'], which this model")
    grid = completion_body(video_request(policy, prompts[:1], video_grid_thw=torch.tensor([[1, 4, 4]])), "policy", None)
    assert refusal(server, grid) == (
        400,
        "renorm_multimodal.prompts[0].video_grid_thw describes 16 patches but pixel_values_videos has 48",
    )
    width = len(good["prompt"][0])
    fewer = {**good, "prompt": [good["prompt"][0][1:]]}  # token types for one token more than the prompt has
    assert refusal(server, fewer) == (
        400,
        f"renorm_multimodal.prompts[0].mm_token_type_ids has {width} entries for a prompt of {width - 1} tokens",
    )
    status, error = refusal(server, completion_body(video_request(policy, prompts), "policy", None))
    assert status == 413 and "over max_multimodal_bytes=400000" in error


def test_the_request_cap_applies_outside_the_multimodal_tensors() -> None:
    """A body may pass max_request_bytes by its base64 tensors only; a long body of small JSON items is refused
    before it is parsed, and so is one whose long part is anything else."""
    tensors = json.dumps({"prompt": [[5]], "renorm_multimodal": {"tensors": "A" * 1000}}).encode()
    assert parse_body(tensors, 200)["renorm_multimodal"]["tensors"] == "A" * 1000
    for body in (b"[" + b"1," * 300 + b"1]", json.dumps({"prompt": "x" * 300}).encode(), b" " * 300):
        with pytest.raises(BadRequest, match=f"body of {len(body)} bytes is over max_request_bytes=200") as error:
            parse_body(body, 200)
        assert error.value.status == 413


def test_placeholders_that_miss_the_grid_are_a_400(server: PolicyServer, prompts: list[Any]) -> None:
    """Token types and ids agree, but the prompt holds one video token fewer than its grid makes: refused before
    the model runs (it would fail inside its position computation, a 500 the client retries)."""
    request = video_request(server.policy, prompts[:1])
    ids = [t for i, t in enumerate(request.prompt_ids[0]) if i != request.prompt_ids[0].index(6)]
    assert request.multimodal is not None
    form = request.multimodal.prompts[0]
    types = (torch.tensor(ids) == 6).long() * 2
    multimodal = MultimodalInputs(({**form, "mm_token_type_ids": types},), request.multimodal.batching)
    shorter = GenerationRequest([ids], request.params, 2, 5, True, multimodal.model_inputs(2), multimodal)
    count = request.prompt_ids[0].count(6)
    assert refusal(server, completion_body(shorter, "policy", None)) == (
        400,
        f"renorm_multimodal.prompts[0].video_grid_thw makes {count} placeholder tokens (id 6), but the prompt has "
        f"{count - 1}",
    )


def test_chunked_video_requests_and_an_unacknowledged_field(server: PolicyServer, prompts: list[Any]) -> None:
    policy, request = server.policy, video_request(server.policy, prompts)
    local = HFEngine().generate(policy, request)
    engine = ServerEngine(server.url, weight_sync="none", max_retries=0, multimodal_chunk_bytes=300_000)
    assert request.multimodal is not None and prompt_chunks(request.multimodal, 300_000) == [range(0, 2), range(2, 3)]
    served = engine.generate(policy, request)  # 3 prompts, 2 videos, over the server's cap: sent as 2 requests
    assert served.token_ids == local.token_ids and served.finish_reasons == local.finish_reasons  # greedy
    assert served.logprobs is not None and local.logprobs is not None
    torch.testing.assert_close(served.padded_logprobs(4), local.padded_logprobs(4), atol=1e-5, rtol=0)
    answer = {"choices": [{"index": i, "finish_reason": "length", "token_ids": [9]} for i in range(6)]}
    with pytest.raises(ValueError, match="did not acknowledge renorm_multimodal: it generated without the video"):
        parse_completions(answer, dataclasses.replace(request, return_logprobs=False))


def test_serve_policy_builds_and_serves_the_tiny_medgrpo_config(prompts: list[Any]) -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    config = str(ROOT / "configs" / "medical_video" / "tiny.yaml")
    args = parser.parse_args(["serve-policy", config, "--port", "0", "--max-multimodal-bytes", "5000000"])
    built = build_server(args)
    assert built.caps.max_multimodal_bytes == 5_000_000 and isinstance(built.policy, VideoVLMPolicy)
    with serving(built) as server:
        policy = video_policy()  # the config's model: the same seed-0 tiny Qwen2.5-VL
        engines = ("hf", ServerEngine(server.url))
        samplers = [VideoSampler(video=TINY_VIDEO, max_new_tokens=6, engine=e) for e in engines]
        local, served = (s.sample(policy, prompts, 2, torch.Generator().manual_seed(4)) for s in samplers)
    assert torch.equal(local.data["response_ids"], served.data["response_ids"])
    assert torch.equal(local.old_logprobs, served.old_logprobs) and served.mask.any()


# ------------------------------------------------------------------------------------------------------- vLLM
class StandInLLM:
    """Records what `VLLMEngine` hands vLLM and answers every prompt's n samples with two tokens."""

    def __init__(self, model: str, **options: Any) -> None:
        self.model, self.options, self.calls = model, options, []

    def generate(self, prompts: list[dict[str, Any]], params: Any, **_: Any) -> list[Any]:
        self.calls.append((prompts, params))
        step = {40: SimpleNamespace(logprob=-0.5), EOS_TOKEN_ID: SimpleNamespace(logprob=-1.5)}
        sample = SimpleNamespace(token_ids=[40, EOS_TOKEN_ID], finish_reason="stop", logprobs=[step, step])
        return [SimpleNamespace(outputs=[sample] * params.n) for _ in prompts]

    def collective_rpc(self, function: Any, args: tuple[Any, ...]) -> None:
        self.loaded = len(args[0])

    def wake_up(self) -> None: ...

    def sleep(self, level: int) -> None: ...


@pytest.fixture()
def stand_in_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = SimpleNamespace(
        LLM=StandInLLM, SamplingParams=lambda **kw: SimpleNamespace(**kw), inputs=SimpleNamespace(TokensPrompt=dict)
    )
    monkeypatch.setattr(vllm_module, "require_vllm", lambda: fake)


@pytest.mark.usefixtures("stand_in_vllm")
def test_the_vllm_payload_holds_the_trainers_embeddings_once_per_prompt(prompts: list[Any]) -> None:
    policy = video_policy()
    engine = VLLMEngine("tiny", enable_mm_embeds=True)
    rollout = VideoSampler(video=TINY_VIDEO, engine=engine).sample(policy, prompts, 2, torch.Generator().manual_seed(0))
    llm = engine.llm
    assert isinstance(llm, StandInLLM) and llm.options["enable_mm_embeds"] is True and llm.loaded > 0
    ((sent, params),) = llm.calls
    assert params.n == 2 and params.logit_bias == {t: float("-inf") for t in policy.suppressed_token_ids}
    assert params.ignore_eos is True and params.stop_token_ids  # exactly the sampler's EOS ids end a completion
    videos = rollout.data["videos"][::2]
    embeds = policy.video_embeddings(videos)
    assert embeds is not None and len(sent) == 3
    for row, (prompt, video, embed) in enumerate(zip(sent, videos, embeds, strict=True)):
        ids = rollout.data["prompt_ids"][2 * row][rollout.data["prompt_attention_mask"][2 * row]].tolist()
        data = prompt["multi_modal_data"]["video"]
        assert prompt["prompt_token_ids"] == ids and torch.equal(data["video_embeds"], embed)
        assert torch.equal(data["video_grid_thw"], video.video_grid_thw)
        assert torch.equal(data["second_per_grid_ts"], torch.tensor([2.0]))  # temporal patch 2 at 1 fps
    assert sent[0]["multi_modal_data"]["video"]["video_embeds"] is sent[1]["multi_modal_data"]["video"]["video_embeds"]
    assert torch.equal(rollout.data["engine_logprobs"][:, :2], torch.tensor([[-0.5, -1.5]] * 6))
    assert "enable_mm_embeds" not in VLLMEngine("tiny").options  # older vLLM has no such option
    odd = video_request(policy, prompts[:1], not_an_input=torch.zeros(1)).multimodal
    assert odd is not None
    with pytest.raises(ValueError, match=r"prompt 0 has inputs .*not_an_input"):
        vllm_module.video_data(policy, odd.prompts)
