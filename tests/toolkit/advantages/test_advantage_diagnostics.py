"""Tests for toolkit.advantages.diagnostics: the illusory-advantage fraction (hand oracle, loop oracle, properties)."""

from __future__ import annotations

import math
import statistics
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit.advantages.diagnostics import ILLUSORY_METRIC, illusory_advantage_fraction, illusory_advantage_metrics
from toolkit.advantages.group import group_normalized_advantages
from toolkit.rollout import Rollout

NAN = math.nan
# group 0: rewards differ by float noise (std 7.1e-5); 1: a real 0/1 split; 2: constant; 3: one applicable score
SCORES = [0.5, 0.5001, 0.5, 0.4999, 0.0, 1.0, 0.0, 1.0, 0.3, 0.3, 0.3, 0.3, NAN, 0.7, NAN, NAN]
GROUP_IDS = [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
# hand-written advantages: group 0 z-scored to ±1.2247 (RMS 0.866), group 1 ±1, constant group 2 exactly 0
ADVANTAGES = [0.0, 1.2247, 0.0, -1.2247, -1.0, 1.0, -1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def _t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_hand_computed_oracle() -> None:
    scores, advantages, ids = _t(SCORES), _t(ADVANTAGES), torch.tensor(GROUP_IDS)
    # eligible groups: 0, 1, 2 (group 3 has one applicable score); illusory: group 0 only
    assert illusory_advantage_fraction(scores, advantages, ids) == pytest.approx(1 / 3)
    # Dr. GRPO (no std division) leaves group 0's advantages at noise scale (±1e-4): nothing illusory
    mean_only = _t([0.0, 1e-4, 0.0, -1e-4] + ADVANTAGES[4:])
    assert illusory_advantage_fraction(scores, mean_only, ids) == 0.0
    # the threshold: absolute 1e-5 < std 7.1e-5, or 1e-3 of a reward range of 1e-3 (= 1e-6)
    assert illusory_advantage_fraction(scores, advantages, ids, spread_threshold=1e-5) == 0.0
    assert illusory_advantage_fraction(scores, advantages, ids, reward_range=1e-3) == 0.0
    assert illusory_advantage_fraction(scores, advantages, ids, reward_range=10.0) == pytest.approx(1 / 3)
    # unit_scale above group 0's RMS (0.866)
    assert illusory_advantage_fraction(scores, advantages, ids, unit_scale=0.9) == 0.0


def test_token_level_advantages_respect_the_mask() -> None:
    scores, ids = _t(SCORES), torch.tensor(GROUP_IDS)
    per_token = _t(ADVANTAGES)[:, None].repeat(1, 3)
    mask = torch.ones(16, 3, dtype=torch.bool)
    mask[:, 2] = False
    per_token[:, 2] = 100.0  # masked-out steps never count
    assert illusory_advantage_fraction(scores, per_token, ids, mask=mask) == pytest.approx(1 / 3)
    assert illusory_advantage_fraction(scores, per_token, ids) == pytest.approx(2 / 3)  # no mask: group 2 too


def test_grpo_manufactures_unit_advantages_from_noise() -> None:
    scores = _t([0.5, 0.5 + 2e-4, 0.5 - 1e-4, 0.5, 0.0, 1.0, 1.0, 0.0])
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    grpo, _ = group_normalized_advantages(scores, ids)
    dr_grpo, _ = group_normalized_advantages(scores, ids, scale_by_std=False)
    assert illusory_advantage_fraction(scores, grpo, ids) == 0.5
    assert illusory_advantage_fraction(scores, dr_grpo, ids) == 0.0


def test_no_group_with_two_scores_is_nan() -> None:
    value = illusory_advantage_fraction(_t([1.0, NAN, 2.0]), _t([0.0, 0.0, 0.0]), torch.tensor([0, 0, 1]))
    assert math.isnan(value)


def test_bad_inputs_fail_loudly() -> None:
    scores, advantages, ids = _t([1.0, 2.0]), _t([0.5, -0.5]), torch.tensor([0, 0])
    with pytest.raises(ValueError, match="advantages must be"):
        illusory_advantage_fraction(scores, _t([0.5]), ids)
    with pytest.raises(ValueError, match="group_ids must be"):
        illusory_advantage_fraction(scores, advantages, torch.tensor([0]))
    with pytest.raises(ValueError, match="mask shape"):
        illusory_advantage_fraction(scores, advantages[:, None], ids, mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="non-finite"):
        illusory_advantage_fraction(scores, _t([NAN, 0.0]), ids)
    with pytest.raises(ValueError, match="inf"):
        illusory_advantage_fraction(_t([math.inf, 1.0]), advantages, ids)
    with pytest.raises(ValueError, match="spread_threshold"):
        illusory_advantage_fraction(scores, advantages, ids, spread_threshold=-1.0)
    with pytest.raises(ValueError, match="reward_range"):
        illusory_advantage_fraction(scores, advantages, ids, reward_range=0.0)
    with pytest.raises(ValueError, match="unit_scale"):
        illusory_advantage_fraction(scores, advantages, ids, unit_scale=math.nan)


def test_rollout_metrics_wrapper() -> None:
    n = 4
    rollout = Rollout(
        group_ids=torch.tensor([0, 0, 1, 1]),
        old_logprobs=torch.zeros(n, 2),
        mask=torch.ones(n, 2, dtype=torch.bool),
        scores=torch.tensor([0.5, 0.5001, 0.0, 1.0]),
    )
    assert illusory_advantage_metrics(rollout) == {}  # no advantages yet
    rollout.advantages = torch.tensor([-0.7071, 0.7071, -0.7071, 0.7071])
    assert illusory_advantage_metrics(rollout) == {ILLUSORY_METRIC: 0.5}


def _reference(scores: list[float], advantages: list[float], ids: list[int], threshold: float) -> float:
    """Loop oracle: per group, population std of the applicable scores and RMS of their advantages."""
    eligible = illusory = 0
    for gid in sorted(set(ids)):
        rows = [i for i, g in enumerate(ids) if g == gid and not math.isnan(scores[i])]
        if len(rows) < 2:
            continue
        eligible += 1
        spread = statistics.pstdev(scores[i] for i in rows)
        rms = math.sqrt(sum(advantages[i] ** 2 for i in rows) / len(rows))
        illusory += spread < threshold and rms >= 0.5
    return illusory / eligible if eligible else math.nan


@st.composite
def _batches(draw: st.DrawFn) -> tuple[list[float], list[float], list[int]]:
    """Groups whose spread is 0, float noise (<= 3e-4) or real (>= 0.15), advantages at 0, 1e-3 or unit scale."""
    scores: list[float] = []
    advantages: list[float] = []
    ids: list[int] = []
    for gid in range(draw(st.integers(1, 5))):
        size = draw(st.integers(1, 6))
        base = draw(st.sampled_from([0.0, 0.5, 3.0]))
        spread = draw(st.sampled_from([0.0, 1e-4, 0.3]))
        adv_scale = draw(st.sampled_from([0.0, 1e-3, 1.0]))
        for _ in range(size):
            nan = draw(st.booleans()) and draw(st.booleans())
            scores.append(NAN if nan else base + spread * draw(st.integers(-3, 3)))
            advantages.append(adv_scale * draw(st.integers(-3, 3)))
            ids.append(gid * 7)  # sparse, unsorted-looking ids
    return scores, advantages, ids


@settings(max_examples=200, deadline=None)
@given(_batches(), st.randoms(use_true_random=False))
def test_matches_loop_oracle_and_is_permutation_invariant(
    batch: tuple[list[float], list[float], list[int]], rng: object
) -> None:
    scores, advantages, ids = batch
    got = illusory_advantage_fraction(_t(scores), _t(advantages), torch.tensor(ids))
    want = _reference(scores, advantages, ids, 1e-3)
    assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)
    assert math.isnan(got) or 0.0 <= got <= 1.0
    order = list(range(len(ids)))
    rng.shuffle(order)  # type: ignore[attr-defined]
    shuffled = illusory_advantage_fraction(
        _t([scores[i] for i in order]), _t([advantages[i] for i in order]), torch.tensor([ids[i] for i in order])
    )
    assert (math.isnan(got) and math.isnan(shuffled)) or shuffled == pytest.approx(got)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=2, max_size=8), st.integers(1, 4))
def test_grpo_on_noise_is_illusory_dr_grpo_is_not(noise: list[int], num_groups: int) -> None:
    """Every non-constant noise-only group is illusory under the z-score and none under the mean-only baseline."""
    scores = _t([0.5 + 1e-4 * ((n + g) % 7 - 3) for g in range(num_groups) for n in noise])
    ids = torch.arange(num_groups).repeat_interleave(len(noise))
    grpo, _ = group_normalized_advantages(scores, ids)
    dr_grpo, _ = group_normalized_advantages(scores, ids, scale_by_std=False)
    non_constant = sum(len({(n + g) % 7 for n in noise}) > 1 for g in range(num_groups))
    assert illusory_advantage_fraction(scores, grpo, ids) == pytest.approx(non_constant / num_groups)
    assert illusory_advantage_fraction(scores, dr_grpo, ids) == 0.0


def test_the_trainer_logs_and_warns_on_illusory_advantages() -> None:
    from toolkit.train.rollout_stats import rollout_metrics

    n = 4
    rollout = Rollout(
        group_ids=torch.tensor([0, 0, 1, 1]),
        old_logprobs=torch.zeros(n, 2),
        mask=torch.ones(n, 2, dtype=torch.bool),
        scores=torch.tensor([0.5, 0.5001, 0.2, 0.2002]),
        advantages=torch.tensor([-0.7071, 0.7071, -0.7071, 0.7071]),
    )
    with pytest.warns(UserWarning, match="100% of this step's groups .* amplifying reward noise"):
        metrics = rollout_metrics(rollout)
    assert metrics[ILLUSORY_METRIC] == 1.0 and metrics["advantage/abs_max"] == pytest.approx(0.7071)
    rollout.scores = torch.tensor([0.0, 1.0, 0.0, 1.0])  # real differences: nothing illusory, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rollout_metrics(rollout)[ILLUSORY_METRIC] == 0.0
    rollout.group_ids = torch.tensor([0, 1, 2, 3])  # singleton groups: no group qualifies, no metric
    assert ILLUSORY_METRIC not in rollout_metrics(rollout)


def test_the_diagnostic_applies_to_normalizers_that_work_within_groups() -> None:
    from modalities.diffusion_lm.time_weighting import TimeWeightedNormalizer
    from toolkit.advantages import (
        BatchWhitenNormalizer,
        CorrectSampleBoost,
        GAENormalizer,
        GroupNormalizer,
        PromptHistoryNormalizer,
    )
    from toolkit.train.rollout_stats import normalizes_within_groups

    assert normalizes_within_groups(GroupNormalizer())
    assert normalizes_within_groups(CorrectSampleBoost(GroupNormalizer()))
    assert normalizes_within_groups(TimeWeightedNormalizer(base=GroupNormalizer()))
    assert not normalizes_within_groups(GAENormalizer())
    assert not normalizes_within_groups(BatchWhitenNormalizer())
    assert normalizes_within_groups(BatchWhitenNormalizer(baseline="group_mean"))
    assert normalizes_within_groups(PromptHistoryNormalizer(reset_every=1))
    assert not normalizes_within_groups(PromptHistoryNormalizer(reset_every=None))
