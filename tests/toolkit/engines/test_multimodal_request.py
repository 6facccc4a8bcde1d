"""Multimodal requests through the engines: `GenerationRequest.model_inputs` reaches the `hf` engine's `generate` per
batch of rows (the lean loop falls back to `generate`), suppressed tokens are never sampled; the `server` and `vllm`
engines refuse a multimodal request that has no serialisable `multimodal` form, the server body carries suppressed
ids exactly (and as vLLM's logit bias), and the `vllm` engine's payload for the video sampler (a stand-in `LLM`:
no GPU here) holds the trainer's own vision embeddings, grids and seconds per grid step, once per prompt."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from tests.tiny import EOS_TOKEN_ID, tiny_prompts, tiny_text_policy, tiny_tokenizer
from toolkit.engines import GenerationRequest, GenerationResult, HFEngine, SamplingParams, ServerEngine, VLLMEngine
from toolkit.engines.hf import DecodeMode
from toolkit.engines.server import SUPPRESS_FIELD, completion_body


def request_for(seed: int = 3, **fields: Any) -> GenerationRequest:
    tokenizer = tiny_tokenizer()
    prompts = [tokenizer(p["prompt"])["input_ids"] for p in tiny_prompts(3)]
    params: dict[str, Any] = {"max_new_tokens": 6, "eos_token_ids": (EOS_TOKEN_ID,), "pad_token_id": 0}
    params.update(fields.pop("params", {}))
    return GenerationRequest(prompts, SamplingParams(**params), 2, seed, **fields)


class Recorder:
    """model_inputs that records the rows and padded prompt ids it is asked for and returns `extra`."""

    def __init__(self, extra: dict[str, Any] | None = None) -> None:
        self.calls: list[tuple[slice, Tensor]] = []
        self.extra = extra or {}

    def __call__(self, rows: slice, prompt_ids: Tensor) -> dict[str, Any]:
        self.calls.append((rows, prompt_ids.clone()))
        return self.extra


@pytest.mark.parametrize("decode", ["generate", "lean"])
def test_model_inputs_are_asked_per_batch_and_keep_generate_tokens(decode: DecodeMode) -> None:
    """Rows 0-3 and 4-5 of the 6 are two generate calls; the lean loop gives generate's sampled tokens back (its
    own draws differ), so a multimodal request always goes through generate."""
    policy = tiny_text_policy(seed=2)
    reference = HFEngine(generation_batch_size=4).generate(policy, request_for())
    recorder = Recorder()
    result = HFEngine(generation_batch_size=4, decode=decode).generate(policy, request_for(model_inputs=recorder))
    assert result.token_ids == reference.token_ids and result.finish_reasons == reference.finish_reasons
    assert [(rows.start, rows.stop) for rows, _ in recorder.calls] == [(0, 4), (4, 6)]
    width = max(len(ids) for ids in request_for().rows())
    assert all(ids.shape == (rows.stop - rows.start, width) for rows, ids in recorder.calls)
    assert torch.equal(recorder.calls[1][1][1, -len(request_for().rows()[5]) :], torch.tensor(request_for().rows()[5]))
    if decode == "lean":  # without model_inputs the lean loop runs and draws other tokens for this seed
        lean = HFEngine(generation_batch_size=4, decode="lean").generate(policy, request_for())
        assert lean.token_ids != reference.token_ids


def test_model_inputs_reach_the_model() -> None:
    """HF validates generate's model kwargs: an input the model does not take is named in its error."""
    recorder = Recorder({"not_a_model_input": torch.zeros(1)})
    with pytest.raises(ValueError, match="not_a_model_input"):
        HFEngine().generate(tiny_text_policy(), request_for(model_inputs=recorder))


@pytest.mark.parametrize("decode", ["generate", "lean"])
def test_suppressed_tokens_are_never_sampled(decode: DecodeMode) -> None:
    policy = tiny_text_policy(seed=2, eos_logit=None)
    greedy = HFEngine().generate(policy, request_for(params={"do_sample": False}))
    banned = tuple(sorted({ids[0] for ids in greedy.token_ids}))  # every row's greedy first token
    request = request_for(params={"do_sample": False, "suppress_token_ids": banned})
    result = HFEngine(decode=decode).generate(policy, request)
    assert all(ids and ids[0] not in banned for ids in result.token_ids)
    assert not any(token in banned for ids in result.token_ids for token in ids)
    assert result.logprobs is not None and all(v > float("-inf") for row in result.logprobs for v in row)


def test_server_and_vllm_refuse_callable_only_multimodal_requests() -> None:
    multimodal = request_for(model_inputs=Recorder())
    vllm = object.__new__(VLLMEngine)  # refuses before vLLM is needed
    server = ServerEngine("http://127.0.0.1:9", max_retries=0)  # refuses before any connection
    for name, engine in (("server", server), ("vllm", vllm)):
        with pytest.raises(NotImplementedError, match=rf"the {name} engine takes multimodal requests only with"):
            engine.generate(tiny_text_policy(), multimodal)


def test_server_body_carries_suppressed_ids_exactly_and_as_vllm_logit_bias() -> None:
    body = completion_body(request_for(params={"suppress_token_ids": (9, 5)}), "m", None)
    assert body[SUPPRESS_FIELD] == [9, 5] and body["logit_bias"] == {"9": -100.0, "5": -100.0}
    assert SUPPRESS_FIELD not in completion_body(request_for(), "m", None)


def test_bad_model_inputs_and_padded_tokens() -> None:
    with pytest.raises(ValueError, match="model_inputs must be callable"):
        request_for(model_inputs={"pixel_values_videos": torch.zeros(1)})
    result = GenerationResult([[4, 5, 6], [7]], ["length", "stop"])
    assert torch.equal(result.padded_tokens(0), torch.tensor([[4, 5, 6], [7, 0, 0]]))
