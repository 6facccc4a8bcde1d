"""weight_sync "vllm_lora" against a loopback stand-in of `vllm serve` with runtime LoRA updating
(tests/toolkit/engines/vllm_stand_in.py): each weights version is a fresh PEFT adapter folder loaded under its own
name and served unmerged, the previous one unloaded and deleted; a restarted server gets the same adapter again;
full weights, missing options and a server without the LoRA routes are refused clearly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from modalities.text_agent.tools.retriever_server import serving
from tests.modalities.text_agent.test_text_policy import LORA, sgd_step
from tests.tiny import tiny_prompts, tiny_text_policy
from tests.toolkit.engines.test_engine_contract import request_for
from tests.toolkit.engines.vllm_stand_in import BASE_MODEL, VLLMStandIn
from toolkit.engines import GenerationResult, HFEngine, ServerEngine
from toolkit.engines.vllm_lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, VLLMLoRA


def trained_lora_policy(steps: int = 1) -> Any:
    """A LoRA policy whose adapters moved away from their zero init (`steps` SGD steps on its own rollouts)."""
    from modalities.text_agent.sampler import SingleTurnSampler

    policy = tiny_text_policy(lora=LORA)
    for step in range(steps):
        rollout = SingleTurnSampler(max_new_tokens=6).sample(
            policy, tiny_prompts(2), 2, torch.Generator().manual_seed(step)
        )
        sgd_step(policy, rollout)
    return policy


def largest_gap(a: GenerationResult, b: GenerationResult) -> float:
    assert a.logprobs is not None and b.logprobs is not None
    return max(abs(x - y) for rows in zip(a.logprobs, b.logprobs, strict=True) for x, y in zip(*rows, strict=True))


def lora_engine(url: str, adapter_dir: Path, **options: Any) -> ServerEngine:
    return ServerEngine(url, weight_sync="vllm_lora", adapter_dir=str(adapter_dir), retry_backoff_s=0.01, **options)


def test_each_version_is_a_fresh_adapter_served_unmerged_and_the_previous_one_is_dropped(tmp_path: Path) -> None:
    policy, request = trained_lora_policy(), request_for()
    with serving(VLLMStandIn(tiny_text_policy(lora=LORA), ("127.0.0.1", 0))) as server:
        base_before = {k: v.clone() for k, v in server.policy.module.state_dict().items() if "lora_" not in k}
        engine = lora_engine(server.url, tmp_path)
        first = engine.generate(policy, request)
        name = engine.served_version
        assert name is not None and name.startswith("renorm-") and server.loads == [name]
        local = HFEngine().generate(policy, request)
        assert first.token_ids == local.token_ids and largest_gap(first, local) < 1e-5  # the trained adapters served
        base = HFEngine().generate(tiny_text_policy(), request)
        assert largest_gap(first, base) > 1e-3  # ... and they matter
        assert engine.generate(policy, request).token_ids == local.token_ids and server.loads == [name]  # no change
        folder = tmp_path / name  # a PEFT folder, with PEFT's saved names (no adapter name inside)
        assert sorted(p.name for p in folder.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
        saved = load_file(str(folder / ADAPTER_WEIGHTS))
        assert saved and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in saved)
        assert json.loads((folder / ADAPTER_CONFIG).read_text())["r"] == LORA["r"]

        sgd_step(policy, first_rollout(policy))
        second = engine.generate(policy, request)
        assert engine.served_version not in (None, name) and server.loads == [name, engine.served_version]
        assert server.unloads == [name] and sorted(p.name for p in tmp_path.iterdir()) == [engine.served_version]
        assert largest_gap(second, HFEngine().generate(policy, request)) < 1e-5
        base_after = {k: v for k, v in server.policy.module.state_dict().items() if "lora_" not in k}
        assert all(torch.equal(base_after[k], v) for k, v in base_before.items())  # the base model never changes


def first_rollout(policy: Any) -> Any:
    from modalities.text_agent.sampler import SingleTurnSampler

    return SingleTurnSampler(max_new_tokens=6).sample(policy, tiny_prompts(2), 2, torch.Generator().manual_seed(7))


def test_a_restarted_server_gets_the_same_adapter_again(tmp_path: Path) -> None:
    policy, request = trained_lora_policy(), request_for()
    with serving(VLLMStandIn(tiny_text_policy(lora=LORA), ("127.0.0.1", 0))) as server:
        port = server.server_address[1]
        engine = lora_engine(server.url, tmp_path)
        before = engine.generate(policy, request)
    with serving(VLLMStandIn(tiny_text_policy(lora=LORA), ("127.0.0.1", port))) as restarted:
        after = engine.generate(policy, request)  # 404 for the adapter's name, load the same folder, retry
        assert restarted.loads == [engine.served_version] and engine.num_pushes == 2
        assert after.metrics["engine/retries"] == 1.0 and after.metrics["engine/weight_pushed"] == 0.0
        # Another rank repairing the same loss finds the adapter loaded already: not an error, nothing loaded twice.
        other_rank = VLLMLoRA(restarted.url, {"Content-Type": "application/json"}, str(tmp_path), 30.0, RuntimeError)
        other_rank.resend(str(engine.served_version), lambda: None)
        assert restarted.loads == [engine.served_version]
    assert after.token_ids == before.token_ids


def test_full_weights_missing_options_and_a_server_without_lora_routes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="adapter_dir=None: it is needed by weight_sync='vllm_lora'"):
        ServerEngine(weight_sync="vllm_lora")
    with pytest.raises(ValueError, match="and only there"):
        ServerEngine(weight_sync="push", adapter_dir=str(tmp_path))
    with serving(VLLMStandIn(tiny_text_policy(lora=LORA), ("127.0.0.1", 0))) as server:
        engine = lora_engine(server.url, tmp_path, max_retries=0)
        with pytest.raises(ValueError, match=r"VLLMLoRA serves \['lora'\] weights only.*renorm serve-policy"):
            engine.generate(tiny_text_policy(), request_for())
        assert server.loads == [] and list(tmp_path.iterdir()) == []
        plain = ServerEngine(server.url, model=BASE_MODEL, weight_sync="none")  # the base model, no adapter
        assert (
            largest_gap(
                plain.generate(tiny_text_policy(), request_for()),
                HFEngine().generate(tiny_text_policy(), request_for()),
            )
            < 1e-5
        )
    with serving(VLLMStandIn(tiny_text_policy(lora=LORA), ("127.0.0.1", 0), runtime_lora_updating=False)) as server:
        engine = lora_engine(server.url, tmp_path / "adapters", max_retries=0)
        with pytest.raises(ValueError, match=r"did not load LoRA adapter .*HTTP 404: Not Found.*VLLM_ALLOW_RUNTIME"):
            engine.generate(trained_lora_policy(), request_for())
