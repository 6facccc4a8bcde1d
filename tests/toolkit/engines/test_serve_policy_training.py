"""End to end on loopback: the tiny GRPO demo trains through `renorm serve-policy` running in its own process,
with the weights pushed every step; then the server is killed and the next step fails clearly after its retries."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest
import torch

from modalities.text_agent.serve_policy import register
from tests.demo_run import tiny_config
from tests.toolkit.engines.serve_helpers import start_server, stop_server
from tests.toolkit.engines.test_engine_contract import request_for
from toolkit.engines import EngineUnavailableError, HFEngine, ServerEngine
from toolkit.train.runner import build_trainer


def test_serve_policy_parses_its_command_line() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve-policy", "c.yaml", "trainer.seed=1", "--port", "0", "--max-rows", "8"])
    assert (args.config, args.overrides, args.host, args.port, args.max_rows) == (
        "c.yaml",
        ["trainer.seed=1"],
        "127.0.0.1",
        0,
        8,
    )


def test_tiny_grpo_trains_through_serve_policy_then_a_dead_server_fails_clearly(tmp_path: Path) -> None:
    process, url = start_server(tmp_path / "server.log")
    try:
        config = tiny_config(tmp_path / "run", "trainer.num_minibatches=2")  # 2: the sampler re-scores (mismatch)
        engine = {"_component_": "toolkit.engines.ServerEngine", "url": url, "max_retries": 2, "retry_backoff_s": 0.05}
        config["sampler"]["engine"] = engine
        trainer = build_trainer(config)
        before = [p.detach().clone() for p in trainer.policy.module.parameters()]
        for _ in range(2):
            metrics, rollout = trainer.step()
            assert metrics["engine/weight_pushed"] == 1.0 and rollout.mask.any()
            assert metrics["rollout/engine_logprob_abs_diff_max"] < 1e-5  # the server served this step's weights
        assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.module.parameters(), strict=True))
        policy, request = trainer.policy, request_for(seed=11, max_new_tokens=4)
        policy.module.eval()
        stale = ServerEngine(url, weight_sync="none").generate(policy, request)  # still step 1's update
        local = HFEngine().generate(policy, request)
        synced = trainer.sampler.engine.generate(policy, request)  # pushes step 2's update first
        assert synced.token_ids == local.token_ids and synced.finish_reasons == local.finish_reasons
        assert synced.logprobs is not None and local.logprobs is not None and stale.logprobs is not None
        gap = max(
            abs(a - b) for rows in zip(synced.logprobs, local.logprobs, strict=True) for a, b in zip(*rows, strict=True)
        )
        stale_gap = max(
            abs(a - b) for rows in zip(stale.logprobs, local.logprobs, strict=True) for a, b in zip(*rows, strict=True)
        )
        assert gap < 1e-5 < stale_gap
        stop_server(process)
        start = time.perf_counter()
        with pytest.raises(EngineUnavailableError, match=r"failed 3 attempts .*Is `renorm serve-policy`"):
            trainer.step()
        assert time.perf_counter() - start < 30
        assert "POST /v1/weights 200" in (tmp_path / "server.log").read_text()  # its access log
    finally:
        stop_server(process)
