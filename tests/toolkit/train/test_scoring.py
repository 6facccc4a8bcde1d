"""The reward stage: retries, failures and non-finite scores are counted, never propagated."""

from __future__ import annotations

import math

import pytest
import torch

from rewards.base import FunctionReward, RewardOutput
from rewards.text.toy import TargetCharReward
from toolkit.rollout import Rollout
from toolkit.train.scoring import RewardFailure, check_judge_failures, score_rollout


def rollout(completions: list[str], targets: list[str]) -> Rollout:
    n = len(completions)
    return Rollout(
        group_ids=torch.zeros(n, dtype=torch.long),
        old_logprobs=torch.zeros(n, 2),
        mask=torch.ones(n, 2, dtype=torch.bool),
        prompts=[{"prompt": "q", "target": t} for t in targets],
        completions=completions,
    )


def test_target_char_reward_oracle() -> None:
    r = score_rollout(rollout(["aab", "", "a a"], ["a", "a", "a"]), {"letters": TargetCharReward()})
    assert r.scores.tolist() == pytest.approx([2 / 3, 0.0, 1.0])
    assert r.metrics["reward/mean"] == pytest.approx((2 / 3 + 1) / 3)


def test_flaky_reward_is_retried() -> None:
    calls = {"n": 0}

    def flaky(prompt: str, sample: str, **_: object) -> float:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("judge timed out")
        return 1.0

    r = score_rollout(rollout(["x"], ["a"]), {"flaky": FunctionReward(flaky)}, retries=1)
    assert r.scores.tolist() == [1.0] and r.metrics["reward_stats/failed_models"] == 0.0


def test_failing_reward_becomes_not_applicable_and_is_counted() -> None:
    def broken(prompt: str, sample: str, **_: object) -> float:
        raise RuntimeError("unreachable judge")

    models = {"broken": FunctionReward(broken), "letters": TargetCharReward()}
    r = score_rollout(rollout(["a", "b"], ["a", "a"]), models, retries=2, max_failure_frac=1.0)
    assert r.metrics["reward_stats/failed_models"] == 1.0
    assert torch.isnan(r.rewards["broken"]).all()
    assert r.scores.tolist() == [1.0, 0.0]  # the working reward still counts


def test_a_failing_reward_stops_the_step_by_default_naming_type_message_and_input(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def gold(prompt: str, sample: str, **row: object) -> float:
        return float(row["gold"] == sample)  # the data has no "gold" field: KeyError on every row

    with pytest.raises(RewardFailure) as raised:
        score_rollout(rollout(["ab", "b"], ["a", "a"]), {"judge": FunctionReward(gold)}, retries=1)
    message = str(raised.value)
    assert "reward 'judge' failed" in message and "after 2 attempt(s)" in message
    assert "KeyError: 'gold'" in message and "prompt='q', sample='ab'" in message
    assert "max_reward_failure_frac=0" in message
    assert isinstance(raised.value.__cause__, KeyError)
    assert "KeyError" in caplog.text  # each attempt is logged with the exception's type


def test_nonfinite_scores_are_counted_and_stored_as_nan() -> None:
    class Bad:
        def __call__(self, prompts, samples, **_):
            return RewardOutput(scores=torch.tensor([math.inf, math.nan, 0.5]))

    r = score_rollout(rollout(["a", "b", "c"], ["a"] * 3), {"bad": Bad()})
    assert r.metrics["reward_stats/nonfinite"] == 2.0
    assert torch.isnan(r.scores[:2]).all() and r.scores[2] == 0.5


def test_wrong_length_output_is_an_error() -> None:
    class Short:
        def __call__(self, prompts, samples, **_):
            return RewardOutput(scores=torch.zeros(1))

    with pytest.raises(ValueError, match="returned"):
        score_rollout(rollout(["a", "b"], ["a", "a"]), {"short": Short()})


def test_no_reward_models_leaves_scores_to_a_transform() -> None:
    r = score_rollout(rollout(["a", "b"], ["a", "a"]), {})
    assert r.rewards == {} and r.scores.shape == (2,) and torch.isnan(r.scores).all()


def test_trainer_without_rewards_or_transforms_is_an_error(tmp_path) -> None:
    from tests.toolkit.train.test_trainer import tiny_config
    from toolkit.train.runner import build_trainer

    with pytest.raises(ValueError, match="no reward models and no reward transforms"):
        build_trainer(tiny_config(tmp_path, "rewards={}", "transforms=[]"))


def test_a_judge_outage_stops_the_step_and_a_few_fallbacks_do_not() -> None:
    check_judge_failures({"judge/failure_rate": 0.04, "reward/medical/judge/failure_rate": 0.05}, 0.05)
    with pytest.raises(RewardFailure, match=r"reward/medical/judge/failure_rate = 6% this step"):
        check_judge_failures({"reward/medical/judge/failure_rate": 0.06}, 0.05)
    with pytest.raises(RewardFailure, match=r"judge/failure_rate = 100% .*ties"):  # Pref-GRPO pairs all ties
        check_judge_failures({"judge/failure_rate": 1.0, "judge/tie_rate": 1.0}, 0.05)
    check_judge_failures({"judge/failure_rate": 1.0}, 1.0)  # tolerated: train on the fallbacks
