"""Reward-level transforms: spec oracles (docs/methods/dler.md D1/D5, docs/methods/medgrpo.md M1/M7,
docs/methods/pref_grpo.md P1, docs/methods/ppr.md P1-P3),
vectorised-vs-loop equivalence, hypothesis properties and robustness."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit.reward_transforms.dler import DifficultyTiers, TruncationPenalty, correctness_ratio, truncation_reward
from toolkit.reward_transforms.medgrpo import (
    LogisticDatasetNorm,
    PercentileTable,
    fit_percentile_table,
    logistic_normalize,
)
from toolkit.reward_transforms.ppr import ReNorm, renorm_token_rewards
from toolkit.reward_transforms.pref_grpo import PairwiseWinRate, all_pairs, preference_matrix, win_rates
from toolkit.reward_transforms.weighted_sum import WeightedSum, weighted_sum
from toolkit.rollout import Rollout

ATOL = 1e-5
nan = math.nan


def make_rollout(n: int, group_size: int | None = None, t: int = 4, **fields: Any) -> Rollout:
    group_ids = torch.arange(n) // (group_size or n)
    return Rollout(
        group_ids=group_ids, old_logprobs=torch.zeros(n, t), mask=torch.ones(n, t, dtype=torch.bool), **fields
    )


def close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(
        actual.float(), torch.tensor(expected, dtype=torch.float32), atol=ATOL, rtol=0, equal_nan=True
    )


# ---------------------------------------------------------------- WeightedSum


def test_weighted_sum_nan_policies() -> None:
    rewards = torch.tensor([[1.0, 0.5], [nan, 0.5], [nan, nan], [2.0, nan]])
    weights = torch.tensor([1.0, 0.2])
    close(weighted_sum(rewards, weights, "zero"), [1.1, 0.1, nan, 2.0])
    # renormalize keeps the weight total 1.2: row 1 -> 0.1 * 1.2 / 0.2, row 3 -> 2.0 * 1.2 / 1.0
    close(weighted_sum(rewards, weights, "renormalize"), [1.1, 0.6, nan, 2.4])
    with pytest.raises(ValueError, match="rows \\[1, 2, 3\\]"):
        weighted_sum(rewards, weights, "error")
    with pytest.raises(ValueError, match="inf"):
        weighted_sum(torch.tensor([[math.inf, 0.0]]), weights)
    with pytest.raises(ValueError, match="nan_policy='bogus'.*allowed"):
        WeightedSum({"a": 1.0}, nan_policy="bogus")  # type: ignore[arg-type]


def test_weighted_sum_transform_modes() -> None:
    rollout = make_rollout(3, rewards={"acc": torch.tensor([1.0, 0.0, nan]), "fmt": torch.tensor([1.0, 1.0, nan])})
    out = WeightedSum({"acc": 1.0, "fmt": 0.5})(rollout)
    close(out.scores, [1.5, 0.5, nan])  # type: ignore[arg-type]
    assert out.metrics["reward/nan_rows"] == 1.0 and out.metrics["reward/acc"] == pytest.approx(0.5)
    summed = WeightedSum()(make_rollout(2, rewards={"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0, 4.0])}))
    close(summed.scores, [4.0, 6.0])  # type: ignore[arg-type]
    preset = make_rollout(2, scores=torch.tensor([0.3, 0.7]), rewards={"a": torch.tensor([9.0, 9.0])})
    close(WeightedSum()(preset).scores, [0.3, 0.7])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown reward components \\['missing'\\]"):
        WeightedSum({"missing": 1.0})(make_rollout(2, rewards={"a": torch.zeros(2)}))
    with pytest.raises(ValueError, match="neither scores nor reward components"):
        WeightedSum()(make_rollout(2))


# ---------------------------------------------------------------- DLER truncation (D1) and DA-DLER (D5)


def test_d1_truncation_paper_and_official() -> None:
    correct, lengths = torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.tensor([1200, 4000, 3500, 4100])
    close(truncation_reward(correct, lengths, 4000), [1, 1, 0, 0])
    rollout = make_rollout(
        4, scores=correct.clone(), lengths=lengths, truncated=torch.tensor([False, True, False, True])
    )
    out = TruncationPenalty(max_length=4000, mode="zero", criterion="length")(rollout)
    close(out.scores, [1, 1, 0, 0])  # type: ignore[arg-type]
    close(out.rewards["raw_score"], [1, 1, 0, 1])
    assert out.metrics["truncation/rate"] == 0.25
    # Official: the response cut at 4000 (finish_reason "length") with raw score 1 gets 0.1.
    official = TruncationPenalty(max_length=4000, official_compat=True)
    assert (official.mode, official.criterion, official.trunc_coef) == ("factor", "finish_reason", 0.1)
    rollout.scores = correct.clone()
    close(official(rollout).scores, [1, 0.1, 0, 0.1])  # type: ignore[arg-type]


def test_d5_difficulty_tiers_feed_truncation() -> None:
    correct = torch.tensor([1.0, 1, 1, 0, 1, 0, 0, 0])
    lengths = torch.tensor([1500, 2500, 1800, 3900, 3000, 3900, 4000, 3990])
    rollout = make_rollout(8, group_size=4, scores=correct.clone(), lengths=lengths)
    tiers = DifficultyTiers(thresholds=(0.5,), lengths=(4000, 2000), boundary="easy", correct_threshold=0.5)
    rollout = tiers(rollout)
    assert rollout.data["max_length"].tolist() == [2000] * 4 + [4000] * 4
    assert rollout.metrics["difficulty/tier_0_groups"] == 1 and rollout.metrics["difficulty/tier_1_groups"] == 1
    out = TruncationPenalty(max_length=4000, mode="zero", criterion="length")(rollout)
    close(out.scores, [1, 0, 1, 0, 1, 0, 0, 0])  # type: ignore[arg-type]
    assert out.metrics["truncation/per_sample_limit"] == 1.0


def test_difficulty_boundary_rule_and_nan_groups() -> None:
    correct = torch.tensor([1.0, 0.0, nan, nan])
    ratio = correctness_ratio(correct, torch.tensor([0, 0, 1, 1]))
    close(ratio, [0.5, 0.5, nan, nan])
    lengths = torch.tensor([100, 100, 100, 100])
    for boundary, expected in (("easy", [2000, 2000, 4000, 4000]), ("hard", [4000, 4000, 4000, 4000])):
        rollout = make_rollout(4, group_size=2, scores=correct.clone(), lengths=lengths)
        out = DifficultyTiers(boundary=boundary)(rollout)  # type: ignore[arg-type]
        assert out.data["max_length"].tolist() == expected
        assert out.metrics["difficulty/undefined_groups"] == 1.0
    with pytest.raises(ValueError, match="len\\(lengths\\) == len\\(thresholds\\) \\+ 1"):
        DifficultyTiers(thresholds=(0.3, 0.6), lengths=(4000, 2000))


def test_difficulty_ratio_vectorised_matches_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    group_ids = torch.randint(0, 7, (50,), generator=gen)
    correct = torch.randint(0, 2, (50,), generator=gen).float()
    ratio = correctness_ratio(correct, group_ids)
    for i in range(50):
        assert ratio[i] == pytest.approx(float(correct[group_ids == group_ids[i]].mean()))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 10), st.integers(0, 8000), st.booleans()), min_size=1, max_size=20),
    st.sampled_from(["zero", "factor"]),
    st.sampled_from(["length", "finish_reason"]),
)
def test_truncation_never_increases_nonnegative_reward(
    rows: list[tuple[float, int, bool]], mode: str, crit: str
) -> None:
    raw = torch.tensor([r for r, _, _ in rows])
    rollout = make_rollout(
        len(rows),
        scores=raw.clone(),
        lengths=torch.tensor([n for _, n, _ in rows]),
        truncated=torch.tensor([b for *_, b in rows]),
    )
    out = TruncationPenalty(max_length=4000, mode=mode, criterion=crit)(rollout)  # type: ignore[arg-type]
    assert bool((out.scores <= raw).all())  # type: ignore[operator]


# ---------------------------------------------------------------- MedGRPO logistic normalization (M1, M7)


def test_m1_logistic_oracle() -> None:
    x = torch.tensor([0.5, 0.6, 0.3, 0.0, 1.0])
    close(
        logistic_normalize(x, torch.full((5,), 0.5), torch.full((5,), 0.2), k=3.0),
        [0.5, 0.817574, 0.047426, 0.000553, 0.999447],
    )
    close(logistic_normalize(x[:2], torch.full((2,), 0.5), torch.full((2,), 0.2), k=1.0), [0.5, 0.622459])
    ego = torch.tensor([0.12, 0.20, 0.05])
    close(logistic_normalize(ego, torch.full((3,), 0.12), torch.full((3,), 0.10), k=3.0), [0.5, 0.916827, 0.109097])


def test_m7_transform_and_fallbacks(tmp_path: Path) -> None:
    table = PercentileTable.from_dict(
        {
            "pairs": {"CoPESD": {"stg": {"p25": 0.4, "p50": 0.5, "p75": 0.6}}},
            "tasks": {"stg": {"p25": 0.07, "p50": 0.12, "p75": 0.17}},
        }
    )
    path = tmp_path / "table.json"
    table.save(path)
    norm = LogisticDatasetNorm(str(path), k=3.0, iqr_floor=1e-3, degenerate_iqr="floor", fallback="task")
    rollout = make_rollout(
        5,
        scores=torch.tensor([0.5, 0.6, 0.3, 0.5, 0.20]),
        dataset_ids=["CoPESD"] * 4 + ["EgoSurgery"],
        task_ids=["stg"] * 5,
    )
    out = norm(rollout)
    close(out.scores, [0.5, 0.817574, 0.047426, 0.5, 0.916827])  # type: ignore[arg-type]
    close(out.rewards["raw_metric"], [0.5, 0.6, 0.3, 0.5, 0.2])
    assert out.metrics["dataset_norm/fallback_rows"] == 1.0
    strict = LogisticDatasetNorm(table, fallback="error")
    rollout.scores = rollout.rewards["raw_metric"].clone()
    with pytest.raises(ValueError, match="\\('EgoSurgery', 'stg'\\)"):
        strict(rollout)
    no_tasks = LogisticDatasetNorm({"pairs": {"CoPESD": {"stg": {"p25": 0.4, "p50": 0.5, "p75": 0.6}}}})
    with pytest.raises(ValueError, match="unknown \\(dataset, task\\) pair \\('EgoSurgery', 'stg'\\)"):
        no_tasks(rollout)


def test_missing_table_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "percentiles.json"
    with pytest.raises(FileNotFoundError, match="nope/percentiles.json"):
        LogisticDatasetNorm(str(missing))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"pairs": {"d": {"t": {"p25": 0.6, "p50": 0.5, "p75": 0.7}}}}))
    with pytest.raises(ValueError, match="not ordered"):
        PercentileTable.load(bad)


def test_fit_percentile_table_and_roundtrip(tmp_path: Path) -> None:
    records = [("A", "tal", float(v)) for v in range(5)] + [{"dataset": "B", "task": "tal", "value": 10.0}]
    records += [("B", "tal", nan)]
    table = fit_percentile_table(records, interpolation="linear", min_count=2)
    assert table.pairs[("A", "tal")].p25 == 1.0 and table.pairs[("A", "tal")].p75 == 3.0
    assert ("B", "tal") not in table.pairs  # one value < min_count: uses the pooled task entry
    pooled = table.tasks["tal"]  # values 0, 1, 2, 3, 4, 10 (linear): 1.25, 2.5, 3.75
    assert (pooled.p25, pooled.p50, pooled.p75, pooled.count) == (1.25, 2.5, 3.75, 6)
    table.save(tmp_path / "t.json")
    assert PercentileTable.load(tmp_path / "t.json") == table
    with pytest.raises(ValueError, match="infinite"):
        fit_percentile_table([("A", "tal", math.inf)])


def test_degenerate_iqr_and_format_failures() -> None:
    table = {"pairs": {"d": {"bin": {"p25": 1.0, "p50": 1.0, "p75": 1.0}}}}
    rollout = make_rollout(3, scores=torch.tensor([1.0, 0.0, nan]), dataset_ids=["d"] * 3, task_ids=["bin"] * 3)
    floored = LogisticDatasetNorm(table, k=3.0, iqr_floor=1e-3, degenerate_iqr="floor")(rollout)
    close(floored.scores, [0.5, 0.0, nan])  # type: ignore[arg-type]
    assert floored.metrics["dataset_norm/degenerate_iqr_rows"] == 3.0
    rollout.scores = torch.tensor([1.0, 0.0, nan])
    close(LogisticDatasetNorm(table, degenerate_iqr="raw")(rollout).scores, [1.0, 0.0, nan])  # type: ignore[arg-type]
    table2 = {"pairs": {"d": {"bin": {"p25": 0.4, "p50": 0.5, "p75": 0.6}}}}
    rollout = make_rollout(
        2,
        scores=torch.tensor([0.0, 0.6]),
        dataset_ids=["d"] * 2,
        task_ids=["bin"] * 2,
        rewards={"format": torch.tensor([0.0, 1.0])},
    )
    out = LogisticDatasetNorm(table2, format_component="format", format_fail_reward=0.0)(rollout)
    close(out.scores, [0.0, 0.817574])  # type: ignore[arg-type]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-2, 2), min_size=2, max_size=30), st.floats(-1, 1), st.floats(1e-3, 2), st.floats(0.1, 10))
def test_logistic_monotone(xs: list[float], p50: float, iqr: float, k: float) -> None:
    x = torch.tensor(sorted(xs))
    r = logistic_normalize(x, torch.full_like(x, p50), torch.full_like(x, iqr), k)
    assert bool((r[1:] >= r[:-1]).all()) and bool(((r >= 0) & (r <= 1)).all())


# ---------------------------------------------------------------- Pref-GRPO win rates (P1)


def p1_matrix() -> torch.Tensor:
    # (0,1)->0, (0,2)->2, (0,3)->0, (1,2)->2, (1,3)->tie, (2,3)->2 ; 1 = lower index wins
    return preference_matrix(torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5, 1.0]), group_size=4)


def test_p1_win_rates_and_advantage() -> None:
    w = win_rates(p1_matrix(), order="one", decimals=3)
    close(w, [0.667, 0.167, 1.0, 0.167])
    advantages = (w - w.mean()) / (w.std(unbiased=True) + 1e-8)
    close(advantages, [0.408589, -0.816565, 1.224541, -0.816565])
    close(win_rates(p1_matrix(), decimals=None), [2 / 3, 0.5 / 3, 1.0, 0.5 / 3])
    assert all_pairs(4).tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]


def test_win_rates_symmetric_unparsable_and_errors() -> None:
    p = p1_matrix()
    garbage = p.clone()
    garbage[1, 3] = nan  # unparsable counts as a tie
    close(win_rates(garbage), [0.667, 0.167, 1.0, 0.167])
    both = p.clone()
    both[1, 0], both[2, 0], both[3, 0] = 0.0, 1.0, 0.0  # reversed order agrees with (0,1), (0,2), (0,3)
    both[2, 1], both[3, 1], both[3, 2] = 1.0, 0.5, 1.0  # (2,1): 2 wins; (3,2): 3 wins (position bias)
    close(win_rates(both, order="symmetric", decimals=None), [2 / 3, 0.5 / 3, 2.5 / 3, 1 / 3])
    with pytest.raises(ValueError, match="group_size >= 2"):
        all_pairs(1)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        win_rates(preference_matrix(torch.tensor([2.0]), 2))


def test_pairwise_transform_layouts_and_loop_equivalence() -> None:
    gen = torch.Generator().manual_seed(1)
    b, g = 3, 5
    outcomes = torch.randint(0, 3, (b, 10), generator=gen).float() / 2
    matrices = preference_matrix(outcomes, g)
    expected = torch.zeros(b, g)
    for k in range(b):  # loop reference straight from the official definition
        for i, j in all_pairs(g).tolist():
            v = float(matrices[k, i, j])
            expected[k, i] += v
            expected[k, j] += 1 - v
    expected = torch.tensor([[round(float(x) / (g - 1), 3) for x in row] for row in expected])
    torch.testing.assert_close(win_rates(matrices), expected, atol=ATOL, rtol=0)
    # [B, G, G] layout, rows shuffled within the rollout (group ids not contiguous)
    perm = torch.randperm(b * g, generator=gen)
    group_ids = (torch.arange(b * g) // g)[perm]
    rollout = Rollout(
        group_ids=group_ids, old_logprobs=torch.zeros(b * g, 2), mask=torch.ones(b * g, 2, dtype=torch.bool)
    )
    rollout.data["pairwise"] = matrices
    out = PairwiseWinRate(order="one", decimals=3)(rollout)
    rows = torch.sort(group_ids, stable=True).indices.reshape(b, g)
    torch.testing.assert_close(out.scores[rows], expected, atol=ATOL, rtol=0)  # type: ignore[index]
    # [N, G] layout: row n holds its own matrix row
    per_row = torch.zeros(b * g, g)
    per_row[rows.flatten()] = matrices.reshape(b * g, g)
    rollout2 = Rollout(
        group_ids=group_ids, old_logprobs=torch.zeros(b * g, 2), mask=torch.ones(b * g, 2, dtype=torch.bool)
    )
    rollout2.data["pairwise"] = per_row
    torch.testing.assert_close(PairwiseWinRate()(rollout2).rewards["win_rate"], out.scores)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 9), st.data(), st.sampled_from(["one", "symmetric"]))
def test_win_rates_bounded_mean_half(g: int, data: st.DataObject, order: str) -> None:
    values = data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, nan]), min_size=g * g, max_size=g * g))
    w = win_rates(torch.tensor(values).reshape(g, g), order=order, decimals=None)  # type: ignore[arg-type]
    assert bool(((w >= 0) & (w <= 1)).all())
    assert float(w.mean()) == pytest.approx(0.5, abs=1e-6)


# ---------------------------------------------------------------- PPR ReNorm (P1-P3)


def turn_ends(n_steps: int, *positions: int) -> torch.Tensor:
    out = torch.zeros(n_steps, dtype=torch.bool)
    out[list(positions)] = True
    return out


def test_p1_p2_renorm_placement() -> None:
    ends = torch.stack([turn_ends(6, 1, 3, 5)] * 2)
    outcome = torch.tensor([1.0, 0.0])
    valid = torch.tensor([[4 / 6, 3 / 5]] * 2)
    r = renorm_token_rewards(ends, valid, outcome, beta=1.0, renorm=True, final_step_mode="raw", invalid_prm="zero")
    close(r[:, [1, 3, 5]].flatten(), [0.666667, 0.6, 1.0, -0.333333, -0.4, 0.0])
    assert float(r[:, [0, 2, 4]].abs().sum()) == 0.0
    broken = torch.tensor([[4 / 6, nan]] * 2)
    expected = {
        "zero": [0.666667, 0.0, 1.0, -0.333333, -1.0, 0.0],
        "neutral": [0.666667, 0.5, 1.0, -0.333333, -0.5, 0.0],
        "skip": [0.666667, 0.0, 1.0, -0.333333, 0.0, 0.0],
    }
    for mode, values in expected.items():
        r = renorm_token_rewards(ends, broken, outcome, 1.0, True, "raw", mode)  # type: ignore[arg-type]
        close(r[:, [1, 3, 5]].flatten(), values)
    centered = renorm_token_rewards(ends, valid, outcome, 1.0, True, "centered", "zero")
    close(centered[:, 5], [0.5, -0.5])
    raw = renorm_token_rewards(ends, valid, outcome, 1.0, False, "raw", "zero")
    close(raw[:, [1, 3, 5]].flatten(), [0.666667, 0.6, 1.0, 0.666667, 0.6, 0.0])


def test_p3_token_level_rewards_and_returns() -> None:
    ends = torch.stack([turn_ends(8, 2, 5, 7), turn_ends(8, 3, 5)])
    rollout = make_rollout(2, t=8, scores=torch.tensor([1.0, 0.0]), turn_ends=ends)
    rollout.mask[1, 6:] = False
    rollout.data["process_rewards"] = [[4 / 6, 3 / 5], [1 / 4]]
    out = ReNorm(beta=1.0, final_step_mode="raw", invalid_prm="zero", enabled=True)(rollout)
    rewards = out.token_rewards
    assert rewards is not None
    close(rewards[0], [0, 0, 0.666667, 0, 0, 0.6, 0, 1])
    close(rewards[1], [0, 0, 0, -0.75, 0, 0, 0, 0])
    returns = torch.flip(torch.cumsum(torch.flip(rewards, [1]), 1), [1])  # gamma = 1
    close(returns[0], [2.266667] * 3 + [1.6] * 3 + [1.0] * 2)
    close(returns[1, :6], [-0.75] * 4 + [0.0] * 2)
    assert out.metrics["prm/validity_rate"] == 1.0 and out.metrics["prm/turns_mean"] == 1.5
    # the padded-tensor layout gives the same result; extra columns are ignored
    rollout.data["process_rewards"] = torch.tensor([[4 / 6, 3 / 5, 0.9], [1 / 4, nan, 0.9]])
    torch.testing.assert_close(ReNorm(invalid_prm="zero")(rollout).token_rewards, rewards)


def test_renorm_matches_loop_reference() -> None:
    gen = torch.Generator().manual_seed(3)
    n, t = 6, 12
    ends = torch.rand(n, t, generator=gen) < 0.3
    ends[:, -1] = True
    k = int(ends.sum(1).max())
    process = torch.rand(n, k, generator=gen)
    process[torch.rand(n, k, generator=gen) < 0.3] = nan
    outcome = torch.randint(0, 2, (n,), generator=gen).float()
    for mode in ("zero", "neutral", "skip"):
        got = renorm_token_rewards(ends, process, outcome, 0.8, True, "raw", mode)
        want = torch.zeros(n, t)
        for i in range(n):
            *mids, last = ends[i].nonzero().flatten().tolist()
            for turn, pos in enumerate(mids):
                v = float(process[i, turn])
                if math.isnan(v):
                    if mode == "skip":
                        continue
                    v = 0.0 if mode == "zero" else 0.5
                want[i, pos] = v + float(outcome[i]) - 0.8
            want[i, last] = outcome[i]
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_renorm_robustness() -> None:
    ends = torch.stack([turn_ends(4, 1, 3)])
    rollout = make_rollout(1, scores=torch.tensor([1.0]), turn_ends=ends)
    rollout.data["process_rewards"] = [[0.5, 0.5]]
    with pytest.raises(ValueError, match="row 0 has 1 intermediate turns but 2 process scores"):
        ReNorm()(rollout)
    rollout.data["process_rewards"] = [[1.5]]
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        ReNorm()(rollout)
    rollout.data["process_rewards"] = [[None]]
    out = ReNorm()(rollout)  # default invalid_prm="neutral"
    close(out.token_rewards[0], [0, 0.5, 0, 1])  # type: ignore[index]
    assert out.metrics["prm/validity_rate"] == 0.0
    with pytest.raises(ValueError, match="no turn end"):
        renorm_token_rewards(torch.zeros(1, 4, dtype=torch.bool), torch.zeros(1, 0), torch.ones(1))
    with pytest.raises(ValueError, match="invalid_prm='bad'"):
        ReNorm(invalid_prm="bad")  # type: ignore[arg-type]
    assert ReNorm(official_compat=True).invalid_prm == "zero"


def test_empty_rollouts() -> None:
    empty = make_rollout(
        0, scores=torch.zeros(0), lengths=torch.zeros(0, dtype=torch.long), rewards={"a": torch.zeros(0)}
    )
    assert WeightedSum({"a": 1.0})(empty).scores.shape == (0,)  # type: ignore[union-attr]
    assert TruncationPenalty()(empty).metrics["truncation/rate"] == 0.0
    assert DifficultyTiers()(empty).data["max_length"].shape == (0,)
    empty.data["pairwise"] = torch.zeros(0, 0)
    assert PairwiseWinRate()(empty).scores.shape == (0,)  # type: ignore[union-attr]
