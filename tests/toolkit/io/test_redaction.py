"""Secrets never written: redacted in config.yaml, meta.json, tracker configs, `renorm config` and logs;
run dirs created private (issue 24)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from rewards.base import RewardOutput
from tests.demo_run import DEMO, tiny_config
from toolkit.cli import main
from toolkit.io import logging as run_logging
from toolkit.io.checkpoint import CheckpointManager
from toolkit.io.redaction import REDACTED, is_secret_key, redact, register_secrets, secret_values
from toolkit.train.runner import build_trainer, fit

SECRET = "sk-test-0123456789abcdef"
ENV_SECRET = "hf_env_secret_987654321"


# ---------------------------------------------------------------------------------------------- secrets


class KeyedReward:
    """A user's reward model that takes an API key (straight or through an environment variable) and logs it."""

    def __init__(self, api_key: str | None = None, api_key_env: str | None = None) -> None:
        key = api_key if api_key is not None else os.environ[str(api_key_env)]
        logging.getLogger("tests.keyed_reward").warning("connecting with key %s", key)  # a careless library

    def __call__(self, prompts: list[Any], samples: list[Any], **_: Any) -> RewardOutput:
        return RewardOutput(scores=torch.tensor([float(len(str(s))) for s in samples]))


def test_is_secret_key() -> None:
    secret = ["api_key", "OPENAI_API_KEY", "hf_token", "hub_token", "access_token", "token", "password", "secret"]
    plain = ["pad_token", "eos_token", "max_tokens", "num_tokens", "tokenizer", "api_key_env", "token_ids", "lr"]
    assert all(is_secret_key(k) for k in secret) and not any(is_secret_key(k) for k in plain)
    config = {"judge": {"api_key": SECRET, "url": f"http://h/?key={SECRET}", "pad_token": "<pad>"}, "n": [1]}
    assert redact(config) == {"judge": {"api_key": REDACTED, "url": f"http://h/?key={REDACTED}", "pad_token": "<pad>"},
                              "n": [1]}  # fmt: skip


def test_no_secret_reaches_a_run_dir_a_tracker_or_the_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("RENORM_TEST_JUDGE_KEY", ENV_SECRET)
    recorded: list[Any] = []
    monkeypatch.setattr(run_logging, "check_trackers", lambda trackers: None)
    monkeypatch.setattr(
        run_logging, "init_trackers", lambda acc, trackers, project, config, init_kwargs=None: recorded.append(config)
    )
    run_dir = tmp_path / "run"
    config = tiny_config(
        run_dir,
        "trainer.num_steps=1",
        "trainer.save_every=1",
        "trainer.trackers=[tensorboard]",
        "+rewards.keyed._component_=tests.toolkit.io.test_redaction.KeyedReward",
        f"+rewards.keyed.api_key={SECRET}",
        "+rewards.env_keyed._component_=tests.toolkit.io.test_redaction.KeyedReward",
        "+rewards.env_keyed.api_key_env=RENORM_TEST_JUDGE_KEY",
        f"description=judge at http://judge.local/?key={SECRET}",
    )
    with caplog.at_level(logging.INFO):
        fit(build_trainer(config))
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"config.yaml", "meta.json", "metrics.jsonl", "objects.pt"}
    for path in files:
        data = path.read_bytes()
        assert SECRET.encode() not in data and ENV_SECRET.encode() not in data, path
    assert json.loads((CheckpointManager(run_dir).latest() / "meta.json").read_text())["config"]["rewards"]["keyed"][
        "api_key"
    ] == REDACTED  # fmt: skip
    assert recorded and SECRET not in json.dumps(recorded) and REDACTED in json.dumps(recorded)
    assert "connecting with key" in caplog.text and SECRET not in caplog.text and ENV_SECRET not in caplog.text
    assert run_dir.stat().st_mode & 0o777 == 0o700


def test_renorm_config_prints_no_secret(capsys: pytest.CaptureFixture[str]) -> None:
    keyed = [
        "+rewards.keyed._component_=tests.toolkit.io.test_redaction.KeyedReward",
        f"+rewards.keyed.api_key={SECRET}",
    ]
    assert main(["config", str(DEMO), f"description=token {SECRET}", *keyed]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out and f"api_key: {REDACTED}" in out and f"token {REDACTED}" in out


def test_registered_secrets_are_scrubbed_from_any_log_record(caplog: pytest.LogCaptureFixture) -> None:
    assert register_secrets({"x": {"password": "hunter2-long"}}) == {"hunter2-long"}
    assert secret_values({"judge": {"api_key": SECRET, "api_key_env": "UNSET_VARIABLE_NAME"}}) == {SECRET}
    with caplog.at_level(logging.INFO):
        logging.getLogger("anything.else").info("login with %s", "hunter2-long")
    assert "login with <redacted>" in caplog.text and "hunter2" not in caplog.text
