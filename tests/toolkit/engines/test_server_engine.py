"""The `server` engine against `renorm serve-policy` on loopback threads: versioned weight pushes (full and LoRA),
a restarted server detected as stale and re-pushed, a dead one retried a bounded number of times then a clear
error, refusals not retried; the completions protocol parsed as vLLM writes it; the server's limits and log."""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
import torch

from modalities.text_agent.policy_server import INITIAL_VERSION, PolicyServer, PolicyServerLimits
from modalities.text_agent.tools.retriever_server import serving
from tests.modalities.text_agent.test_text_policy import LORA, sgd_step
from tests.tiny import tiny_prompts, tiny_text_policy
from tests.toolkit.engines.test_engine_contract import request_for
from toolkit.engines import EngineUnavailableError, GenerationRequest, HFEngine, ServerEngine
from toolkit.engines.server import completion_body, parse_completions
from toolkit.engines.weights import decode_weights, encode_weights, policy_weights

LOGGER = "modalities.text_agent.policy_server"


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, headers=headers or {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def completions(server: PolicyServer, **fields: Any) -> tuple[int, dict[str, Any]]:
    body = {"prompt": [[5, 6, 7]], "max_tokens": 4, **fields}
    return post(server.url + "/completions", json.dumps(body).encode())


def a_rollout(policy: Any) -> Any:
    from modalities.text_agent.sampler import SingleTurnSampler

    return SingleTurnSampler(max_new_tokens=6).sample(policy, tiny_prompts(2), 2, torch.Generator().manual_seed(0))


def test_weights_are_pushed_once_per_update_and_versioned(policy_server: PolicyServer) -> None:
    policy, engine = tiny_text_policy(), ServerEngine(policy_server.url, retry_backoff_s=0.01)
    request = request_for()
    first = engine.generate(policy, request)
    again = engine.generate(policy, request)
    assert engine.num_pushes == 1 and first.weights_version == again.weights_version == engine.served_version
    assert first.metrics["engine/weight_pushed"] == 1.0 and again.metrics["engine/weight_pushed"] == 0.0
    sgd_step(policy, a_rollout(policy))
    after = engine.generate(policy, request)
    assert engine.num_pushes == 2 and after.weights_version == engine.served_version != first.weights_version
    assert after.token_ids == HFEngine().generate(policy, request).token_ids


def test_lora_adapters_are_pushed_alone_and_served_unmerged() -> None:
    policy = tiny_text_policy(lora=LORA)
    sgd_step(policy, a_rollout(policy))  # adapters away from their zero init
    weights, kind = policy_weights(policy)
    assert kind == "lora" and weights and all("lora_" in name for name in weights)
    # The server builds the same config: the same base weights, its adapters still at their zero init.
    with serving(PolicyServer(tiny_text_policy(lora=LORA), ("127.0.0.1", 0))) as server:
        base = {k: v.clone() for k, v in server.policy.module.state_dict().items() if "lora_" not in k}
        local = HFEngine().generate(policy, request_for())
        assert local.logprobs != HFEngine().generate(server.policy, request_for()).logprobs  # the push matters
        served = ServerEngine(server.url, retry_backoff_s=0.01).generate(policy, request_for())
        assert served.token_ids == local.token_ids
        state = server.policy.module.state_dict()
        assert all(torch.equal(state[k], v) for k, v in base.items())  # base untouched: adapters kept apart
        assert all(torch.equal(state[k], weights[k]) for k in weights)
        full = tiny_text_policy()
        with pytest.raises(ValueError, match="pushed full weights but this server's policy trains lora"):
            ServerEngine(server.url, max_retries=0).generate(full, request_for())


def test_a_restarted_server_is_detected_as_stale_and_pushed_again() -> None:
    policy, request = tiny_text_policy(), request_for()
    with serving(PolicyServer(tiny_text_policy(seed=1), ("127.0.0.1", 0))) as server:
        port = server.server_address[1]
        engine = ServerEngine(server.url, retry_backoff_s=0.01)
        before = engine.generate(policy, request)
    with serving(PolicyServer(tiny_text_policy(seed=2), ("127.0.0.1", port))) as restarted:
        assert restarted.weights_version == INITIAL_VERSION
        after = engine.generate(policy, request)  # 409 (serves "initial"), push, retry
        assert restarted.weights_version == engine.served_version and engine.num_pushes == 2
        assert after.metrics["engine/retries"] == 1.0
    assert after.token_ids == before.token_ids


def test_a_dead_server_is_retried_then_named_in_a_clear_error() -> None:
    with serving(PolicyServer(tiny_text_policy(seed=1), ("127.0.0.1", 0))) as server:
        url = server.url
    engine = ServerEngine(url, max_retries=2, retry_backoff_s=0.05)
    start = time.perf_counter()
    with pytest.raises(EngineUnavailableError, match=rf"{re.escape(url)} failed 3 attempts \(max_retries=2\)"):
        engine.generate(tiny_text_policy(), request_for())
    assert 0.15 <= time.perf_counter() - start < 10  # backoff 0.05 + 0.1, then the error: bounded


def test_a_refused_request_is_not_retried(policy_server: PolicyServer) -> None:
    engine = ServerEngine(policy_server.url, max_retries=5, retry_backoff_s=5.0)
    request = request_for(max_new_tokens=policy_server.caps.max_new_tokens + 1)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"refused POST /completions: 400 .*max_new_tokens=4096"):
        engine.generate(tiny_text_policy(), request)
    assert time.perf_counter() - start < 5


def test_parse_completions_reads_vllm_token_strings_and_rejects_bad_answers() -> None:
    request = GenerationRequest([[5, 6]], request_for().params, num_samples=2)
    choices = [
        {
            "index": 1,
            "finish_reason": "length",
            "logprobs": {"tokens": ["token_id:9", "token_id:4"], "token_logprobs": [-1.0, -2.0]},
        },
        {"index": 0, "finish_reason": "stop", "logprobs": {"tokens": ["token_id:3"], "token_logprobs": [-0.5]}},
    ]
    result = parse_completions({"choices": choices}, request)
    assert result.token_ids == [[3], [9, 4]] and result.finish_reasons == ["stop", "length"]
    assert result.logprobs == [[-0.5], [-1.0, -2.0]]
    with pytest.raises(ValueError, match="1 choices for 2 requested rows"):
        parse_completions({"choices": choices[:1]}, request)
    with pytest.raises(ValueError, match="finished with 'abort'"):
        parse_completions({"choices": [choices[0], {**choices[1], "finish_reason": "abort"}]}, request)
    with pytest.raises(ValueError, match="no token ids"):
        parse_completions({"choices": [choices[0], {"index": 0, "finish_reason": "stop", "text": "x"}]}, request)
    empty = {"index": 0, "finish_reason": "length", "token_ids": [], "logprobs": {"token_logprobs": []}}
    with pytest.raises(ValueError, match=r"no tokens for rows \[0\].*max_model_len"):
        parse_completions({"choices": [empty, choices[0]]}, request)
    body = completion_body(request, "m", "v1")
    assert body["prompt"] == [[5, 6]] and body["n"] == 2 and body["logprobs"] == 0 and body["top_k"] == -1
    assert body["renorm_weights_version"] == "v1" and body["return_token_ids"] and body["return_tokens_as_token_ids"]


def test_weights_round_trip_and_bad_payloads() -> None:
    policy = tiny_text_policy()
    weights, kind = policy_weights(policy, "bfloat16")
    assert kind == "full" and all(t.dtype == torch.bfloat16 for t in weights.values() if t.is_floating_point())
    back, version, kind_back = decode_weights(encode_weights(weights, "s-3", kind))
    assert version == "s-3" and kind_back == "full" and all(torch.equal(back[k], weights[k]) for k in weights)
    with pytest.raises(ValueError, match="not safetensors"):
        decode_weights(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(ValueError, match="no renorm_weights_version"):
        from safetensors.torch import save

        decode_weights(save({"w": torch.zeros(2)}))


def test_server_limits_refusals_and_endpoints(policy_server: PolicyServer) -> None:
    assert completions(policy_server, n=policy_server.caps.max_rows + 1)[0] == 413
    status, answer = completions(policy_server, prompt=[[5, 100000]])
    assert status == 400 and "token ids must be in [0, 128)" in answer["error"]
    assert completions(policy_server, stream=True) == (
        400,
        {"error": "'stream' is not supported by renorm serve-policy"},
    )
    assert completions(policy_server, logprobs=5)[0] == 400
    status, answer = completions(policy_server, renorm_weights_version="someone-else")
    assert status == 409 and answer["renorm_weights_version"] == policy_server.weights_version
    status, answer = completions(policy_server, prompt="ab", n=2, seed=3, logprobs=0)
    assert (
        status == 200
        and len(answer["choices"]) == 2
        and answer["choices"][0]["logprobs"]["tokens"][0].startswith("token_id:")
    )
    assert post(policy_server.url + "/weights", b"junk", {"Content-Type": "application/octet-stream"})[0] == 400
    assert post(policy_server.url.replace("/v1", "/nope"), b"{}")[0] == 404
    with urllib.request.urlopen(policy_server.url + "/models", timeout=10) as response:
        assert json.loads(response.read())["data"][0]["id"] == "policy"


def test_small_caps_bearer_token_and_one_access_log_line(caplog: pytest.LogCaptureFixture) -> None:
    caps = PolicyServerLimits(max_request_bytes=200, timeout_s=5)
    server = PolicyServer(tiny_text_policy(), ("127.0.0.1", 0), caps=caps, api_key="s3cret")
    with serving(server), caplog.at_level(logging.INFO, logger=LOGGER):
        assert completions(server)[0] == 401
        ok = post(
            server.url + "/completions", b'{"prompt": [[5]], "max_tokens": 2}', {"Authorization": "Bearer s3cret"}
        )
        big = post(server.url + "/completions", b" " * 300, {"Authorization": "Bearer s3cret"})
        deadline = time.monotonic() + 5  # a line is written after its answer is sent: wait for the last one
        while len([r for r in caplog.records if r.name == LOGGER]) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert ok[0] == 200 and big == (413, {"error": "body of 300 bytes is over max_request_bytes=200"})
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    # Each line follows its answer, so a quick 413 may be logged before the generating 200: match by status.
    assert sorted(line.split()[3] for line in lines) == ["200", "401", "413"]
    served = r"127\.0\.0\.1 POST /v1/completions 200 rows=1 tokens=\d weights=initial [\d.]+ms"
    assert sum(bool(re.fullmatch(served, line)) for line in lines) == 1
    with pytest.raises(ValueError, match="api_key_env='RENORM_TEST_UNSET_KEY' names an environment variable"):
        ServerEngine(server.url, api_key_env="RENORM_TEST_UNSET_KEY")
