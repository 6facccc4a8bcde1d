"""Training through a `renorm serve-policy` subprocess whose server dies mid-run: with async rollouts the background
rollout's EngineUnavailableError is raised in the main thread (no thread left, the steps taken are checkpointed and
resume cleanly); a server back on the same port within the retry window answers 409, is pushed the weights again,
and the run goes on exactly as an uninterrupted one, in sync and async modes."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.demo_run import tiny_config
from tests.toolkit.engines.serve_helpers import Restart, port_of, start_server, stop_server
from toolkit.engines import EngineUnavailableError, GenerationRequest, GenerationResult, ServerEngine
from toolkit.interfaces import Policy
from toolkit.io.checkpoint import COMPLETE
from toolkit.train.runner import build_trainer, fit
from toolkit.train.trainer import Trainer

ROWS = 16  # the fast demo: 4 prompts x 4 samples
Steps = list[tuple[dict[str, float], list[Any]]]


def server_trainer(run_dir: Path, url: str, max_retries: int, *overrides: str) -> Trainer:
    """The fast demo trainer generating through the server at `url` (backoff 0.05 s, doubled per retry)."""
    config = tiny_config(run_dir, "trainer.num_minibatches=2", *overrides)  # 2 minibatches: the sampler re-scores
    engine = {"_component_": "toolkit.engines.ServerEngine", "url": url, "max_retries": max_retries}
    config["sampler"]["engine"] = {**engine, "retry_backoff_s": 0.05}
    return build_trainer(config)


def on_call(trainer: Trainer, number: int, action: Callable[[ServerEngine, Policy], None]) -> list[str]:
    """Run `action` in the engine's `number`-th generate call (1-based) before it generates; returns the names of
    the threads that made each call."""
    engine: ServerEngine = trainer.sampler.engine  # type: ignore[attr-defined]
    generate, callers = engine.generate, []

    def wrapped(policy: Policy, request: GenerationRequest) -> GenerationResult:
        callers.append(threading.current_thread().name)
        if len(callers) == number:
            action(engine, policy)
        return generate(policy, request)

    engine.generate = wrapped  # type: ignore[method-assign]
    return callers


def rollout_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("renorm-rollout")]


def logged_steps(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_async_run_raises_the_background_servers_error_then_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    """Steps 0-3, a checkpoint after each; serve-policy is killed as the background rollout of step 2 (generated
    during step 1's update, with step 1's weights) starts: step 1 is still checkpointed, step 2 raises with nothing
    logged, and a resume against a server back at the same address finishes the run."""
    run_dir = tmp_path / "run"
    process, url = start_server(tmp_path / "server.log")
    overrides = ("trainer.num_steps=4", "trainer.save_every=1", "trainer.keep_last=5", "trainer.async_rollouts=true")
    restart = Restart(port_of(url))
    killed_at: list[float] = []

    def kill(engine: ServerEngine, policy: Policy) -> None:
        stop_server(process)
        killed_at.append(time.perf_counter())

    try:
        trainer = server_trainer(run_dir, url, 2, *overrides)
        callers = on_call(trainer, 3, kill)
        with pytest.raises(EngineUnavailableError, match=rf"{url} failed 3 attempts .*Is `renorm serve-policy`"):
            fit(trainer)
        assert time.perf_counter() - killed_at[0] < 30  # retries (0.05 + 0.1 s), then the error: no hang
        assert len(callers) == 3 and callers[0] == "MainThread" and "MainThread" not in callers[1:]  # 2 prefetches
        assert rollout_threads() == []  # the failed rollout's thread has ended
        assert trainer.global_step == 2
        assert [p.name for p in trainer.checkpoints.list()] == ["step_00000001", "step_00000002"]
        assert trainer.checkpoints.latest_verified() == run_dir / "checkpoints" / "step_00000002"
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
        assert [m["step"] for m in logged_steps(run_dir)] == [1, 2]
        restart.serve()
        last = fit(server_trainer(run_dir, url, 2, *overrides))  # the same config: resumes from step 2
    finally:
        stop_server(process)
        restart.stop()
    assert last == run_dir / "checkpoints" / "step_00000004" and (last / COMPLETE).is_file()
    steps = logged_steps(run_dir)
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert [m["async/staleness"] for m in steps] == [0.0, 1.0, 0.0, 1.0]  # on-policy again after the resume
    assert all(m["rollout/engine_logprob_abs_diff_max"] < 1e-5 for m in steps[2:])  # the new server got the weights
    assert rollout_threads() == []


def run_steps(trainer: Trainer, count: int) -> Steps:
    """(metrics, completions) of `count` steps, each rollout checked to be full."""
    out = []
    for _ in range(count):
        metrics, rollout = trainer.step()
        assert len(rollout) == ROWS and rollout.mask.any(dim=1).all()
        out.append((metrics, list(rollout.completions or [])))
    return out


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_server_restarted_within_the_retry_window_is_survived_exactly(
    tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Step 2's rollout (sync: in the main thread; async: in the background during step 1's update) finds
    serve-policy killed just after its weights were pushed. It is retried until the server is back on the same port
    (0.3 s later); that one serves its initial weights and answers 409, is sent the weights again, and the run
    equals an uninterrupted one bitwise."""
    caplog.set_level(logging.INFO, logger="modalities.text_agent.policy_server")  # the restarted server's access log
    overrides = ["trainer.num_steps=3", f"trainer.async_rollouts={str(mode == 'async').lower()}"]
    process, url = start_server(tmp_path / "server.log")
    restart = Restart(port_of(url))

    def kill_and_restart(engine: ServerEngine, policy: Policy) -> None:
        assert engine.sync_weights(policy)  # pushed: the generate call itself then only finds the server gone
        stop_server(process)
        restart.begin()

    try:
        uninterrupted = server_trainer(tmp_path / "a", url, 0, *overrides)
        expected = run_steps(uninterrupted, 3)
        trainer = server_trainer(tmp_path / "b", url, 6, *overrides)  # retries for up to 0.05 * (2**6 - 1) s
        callers = on_call(trainer, 3, kill_and_restart)
        got = run_steps(trainer, 3)
    finally:
        stop_server(process)
        restart.stop()
    assert (callers[2] == "MainThread") == (mode == "sync") and restart.server is not None
    assert got[2][0]["engine/retries"] >= 2  # refused while it was down, then 409, then served
    access = [r.getMessage() for r in caplog.records]
    assert any("POST /v1/completions 409" in line for line in access)
    assert any("POST /v1/weights 200" in line for line in access)
    for (metrics, completions), (want, want_completions) in zip(got, expected, strict=True):
        assert completions == want_completions
        assert metrics["rollout/engine_logprob_abs_diff_max"] < 1e-5  # the server served the trainer's weights
        for key in ("reward/mean", "loss/policy", "optim/grad_norm", "async/staleness"):
            assert metrics.get(key) == want.get(key), key
    params = zip(trainer.policy.module.parameters(), uninterrupted.policy.module.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in params)
    assert rollout_threads() == []
