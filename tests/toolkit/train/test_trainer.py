"""Trainer: one step moves the weights, resume is bitwise exact, bad rewards never poison a step."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from rewards.base import FunctionReward
from tests.demo_run import run_cli
from toolkit.config import load_config
from toolkit.io.checkpoint import CheckpointManager
from toolkit.io.logging import read_metrics
from toolkit.io.run_dir import RunDirError
from toolkit.train.runner import build_trainer, fit
from toolkit.train.scoring import RewardFailure

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "configs" / "demo" / "tiny_grpo.yaml"
FAST = [
    "trainer.prompts_per_step=4",
    "trainer.group_size=4",
    "trainer.num_minibatches=2",
    "trainer.gradient_accumulation_steps=2",
    "trainer.progress=false",
    "trainer.save_every=0",
    "sampler.max_new_tokens=5",
    f"data.path={ROOT / 'data' / 'demo' / 'letters.jsonl'}",
]


def tiny_config(run_dir: Path, *overrides: str) -> dict[str, Any]:
    return load_config(DEMO, [*FAST, f"trainer.run_dir={run_dir}", *overrides])


def parameters(trainer: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.policy.module.named_parameters()}


def test_one_step_moves_weights_and_reports_finite_metrics(tmp_path: Path) -> None:
    trainer = build_trainer(tiny_config(tmp_path))
    before = parameters(trainer)
    metrics, rollout = trainer.step()
    after = parameters(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for key in ("loss/policy", "reward/mean", "advantage/std", "optim/grad_norm", "rollout/length_mean"):
        assert math.isfinite(metrics[key]), key
    assert rollout.advantages is not None and torch.isfinite(rollout.advantages).all()
    assert trainer.global_step == 1


def _comparable(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def test_resume_is_bitwise_exact(tmp_path: Path) -> None:
    straight = build_trainer(tiny_config(tmp_path / "straight", "trainer.num_steps=4"))
    fit(straight)
    first = build_trainer(tiny_config(tmp_path / "split", "trainer.num_steps=2"))
    fit(first)
    # A new process would rebuild everything from the config: do the same, then resume from step 2.
    second = build_trainer(tiny_config(tmp_path / "split", "trainer.num_steps=4", "trainer.resume=auto"))
    fit(second)
    assert second.global_step == 4
    a, b = parameters(straight), parameters(second)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert _comparable(read_metrics(tmp_path / "straight")) == _comparable(read_metrics(tmp_path / "split"))
    assert straight.optimizer.state_dict()["state"][0]["exp_avg"].equal(
        second.optimizer.state_dict()["state"][0]["exp_avg"]
    )


def test_resume_never_refuses_a_run_dir_holding_a_run_and_overwrite_moves_it_aside(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    fit(build_trainer(tiny_config(run_dir, "trainer.num_steps=2")))
    before = read_metrics(run_dir)
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    with pytest.raises(RunDirError, match=r"resume=never but run dir .*run already holds a run.*--overwrite"):
        fit(build_trainer(tiny_config(run_dir, "trainer.num_steps=1", "trainer.resume=never")))
    assert read_metrics(run_dir) == before  # nothing lost
    again = build_trainer(tiny_config(run_dir, "trainer.num_steps=1", "trainer.resume=never", "trainer.overwrite=true"))
    fit(again)
    assert [r["step"] for r in read_metrics(run_dir)] == [1]
    [old] = tmp_path.glob("run.old-*")
    assert read_metrics(old) == before and sorted(p.name for p in (old / "checkpoints").iterdir()) == checkpoints
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000001"]


def test_a_reward_failing_on_every_call_stops_the_run_with_its_type(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "trainer.num_steps=2", *GOLD)
    with pytest.raises(RewardFailure, match=r"reward 'gold' failed .*KeyError: 'gold'; first failing input: prompt="):
        fit(build_trainer(config))
    assert CheckpointManager(tmp_path).latest() is None and not (tmp_path / "metrics.jsonl").exists()
    code, err = run_cli("train", DEMO, *FAST, f"trainer.run_dir={tmp_path / 'cli'}", "trainer.num_steps=1", *GOLD)
    assert code == 1 and "KeyError: 'gold'" in err and "Traceback" not in err


GOLD = [
    "+rewards.gold._component_=rewards.base.FunctionReward",
    "+rewards.gold.fn._component_=tests.toolkit.train.test_trainer.needs_gold",
    "+rewards.gold.fn._partial_=true",
]


def needs_gold(prompt: Any, sample: Any, **row: Any) -> float:
    """A reward reading a field the data does not have."""
    return float(row["gold"] == sample)


def test_raising_reward_is_retried_then_counted_when_tolerated(tmp_path: Path) -> None:
    trainer = build_trainer(tiny_config(tmp_path, "trainer.max_reward_failure_frac=1.0"))

    def broken(prompt: Any, sample: Any, **_: Any) -> float:
        raise RuntimeError("judge unreachable")

    trainer.rewards["judge"] = FunctionReward(broken)
    metrics, rollout = trainer.step()
    assert metrics["reward_stats/failed_models"] == 1.0
    assert torch.isnan(rollout.rewards["judge"]).all()
    assert torch.isfinite(rollout.advantages).all()


def test_nan_rewards_are_not_propagated(tmp_path: Path) -> None:
    trainer = build_trainer(tiny_config(tmp_path))
    calls = {"n": 0}

    def sometimes_nan(prompt: Any, sample: Any, **_: Any) -> float:
        calls["n"] += 1
        return math.nan if calls["n"] % 3 == 0 else float(len(str(sample)))

    trainer.rewards = {"odd": FunctionReward(sometimes_nan)}
    metrics, rollout = trainer.step()
    assert metrics["normalizer/nan_rewards"] > 0
    nan_rows = torch.isnan(rollout.scores)
    assert nan_rows.any() and (rollout.advantages[nan_rows] == 0).all()
    assert all(math.isfinite(v) for k, v in metrics.items() if k.startswith(("loss/", "advantage/")))


def test_kl_term_builds_a_reference_and_logs_kl(tmp_path: Path) -> None:
    trainer = build_trainer(
        tiny_config(
            tmp_path,
            "objective.kl_coef=0.1",
            "objective.kl_estimator=k3",
            "trainer.num_minibatches=1",
            "scheduler.warmup_steps=0",
        )
    )
    first, rollout = trainer.step()
    assert rollout.ref_logprobs is not None
    assert first["loss/kl"] == pytest.approx(0.0, abs=1e-6)  # reference == policy before the first update
    second, _ = trainer.step()
    assert second["loss/kl"] > 0.0


def test_dynamic_sampling_keeps_only_informative_groups(tmp_path: Path) -> None:
    trainer = build_trainer(
        tiny_config(tmp_path, "trainer.drop_zero_variance_groups=true", "trainer.max_sampling_rounds=3")
    )
    metrics, rollout = trainer.step()
    scores = rollout.scores
    for g in rollout.group_ids.unique():
        group = scores[rollout.group_ids == g]
        assert group.max() > group.min(), "a zero-variance group survived dynamic sampling"
    assert any(k.startswith("sampling/") or k.startswith("filter/") for k in metrics)


def test_constant_schedule_with_warmup_is_rejected() -> None:
    from toolkit.train.schedules import Scheduler

    with pytest.raises(ValueError, match="constant_with_warmup"):
        Scheduler(name="constant", warmup_steps=5)
