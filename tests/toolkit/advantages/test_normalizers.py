"""Sequence-level normalizers: spec oracles, loop references, properties, robustness."""

from __future__ import annotations

import math
import os
import pathlib
import pickle
import subprocess
import sys
from collections.abc import Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit.advantages.batch import BatchWhitenNormalizer, GroupMeanBatchStdNormalizer
from toolkit.advantages.group import GroupNormalizer, LeaveOneOutNormalizer
from toolkit.advantages.history import PromptHistoryNormalizer
from toolkit.advantages.multi_reward import MultiRewardNormalizer
from toolkit.interfaces import Normalizer, StatefulNormalizer
from toolkit.rollout import Rollout

ATOL = 1e-5


def make_rollout(
    scores: Sequence[float] | torch.Tensor,
    group_ids: Sequence[int] | None = None,
    group_size: int | None = None,
    lengths: Sequence[int] | None = None,
    rewards: dict[str, Sequence[float]] | None = None,
    prompt_keys: list[str] | None = None,
) -> Rollout:
    x = torch.as_tensor(scores, dtype=torch.float32) if not isinstance(scores, torch.Tensor) else scores
    n = x.shape[0]
    if group_ids is None:
        group_ids = [i // (group_size or n or 1) for i in range(n)]
    width = max(lengths) if lengths else 4
    mask = torch.zeros(n, width, dtype=torch.bool)
    for i in range(n):
        mask[i, : (lengths[i] if lengths else width)] = True
    return Rollout(
        group_ids=torch.as_tensor(list(group_ids), dtype=torch.long),
        old_logprobs=torch.zeros(n, width),
        mask=mask,
        scores=x,
        rewards={k: torch.as_tensor(v, dtype=torch.float32) for k, v in (rewards or {}).items()},
        prompt_keys=prompt_keys,
    )


def close(actual: torch.Tensor, expected: Sequence[float], atol: float = ATOL) -> None:
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), atol=atol, rtol=0)


# --------------------------------------------------------------------------------------------- oracles


def test_didi_e5_group_normalization() -> None:
    norm = GroupNormalizer(std="unbiased", eps=1e-8, eps_placement="std_plus_eps", clip=3.0)
    close(norm(make_rollout([0.5, -0.2, 1.3, 0.1])).values, [0.115385, -0.961538, 1.346154, -0.5])
    close(norm(make_rollout([5.0, 0, 0, 0])).values, [1.5, -0.5, -0.5, -0.5])
    out = norm(make_rollout([0.3, 0.3, 0.3, 0.3]))
    assert torch.equal(out.values, torch.zeros(4))
    assert out.metrics["normalizer/zero_variance_groups"] == 1.0
    assert out.metrics["normalizer/zero_variance_groups_count"] == 1.0


def test_pref_grpo_p1_p2_win_rate_and_illusory_advantage() -> None:
    norm = GroupNormalizer(std="unbiased", eps=1e-8, eps_placement="std_plus_eps", clip=5.0)
    close(norm(make_rollout([0.667, 0.167, 1.0, 0.167])).values, [0.408589, -0.816565, 1.224541, -0.816565])
    close(norm(make_rollout([0.901, 0.902, 0.903, 0.904])).values, [-1.161886, -0.387295, 0.387295, 1.161886])
    close(norm(make_rollout([0.1, 0.4, 0.6, 0.9])).values, [-1.188177, -0.297044, 0.297044, 1.188177])


def _p6_rollout() -> Rollout:
    rewards = {"pref": [0.667, 0.167, 1.0, 0.167], "clip": [0.31, 0.30, 0.33, 0.29]}
    return make_rollout([0.0] * 4, rewards=rewards)


def test_pref_grpo_p6_advantage_mixture() -> None:
    common = dict(std="unbiased", eps=1e-8, eps_placement="std_plus_eps", scale_by_std=True, clip=5.0)
    only_clip = MultiRewardNormalizer(weights={"clip": 1.0}, **common)  # type: ignore[arg-type]
    close(only_clip(_p6_rollout()).values, [0.146385, -0.439155, 1.317464, -1.024694])
    v1 = MultiRewardNormalizer(weights={"pref": 0.7, "clip": 1.4}, restandardize=False, **common)  # type: ignore[arg-type]
    close(v1(_p6_rollout()).values, [0.490951, -1.186412, 2.701629, -2.006168])
    head = MultiRewardNormalizer(weights={"pref": 0.4, "clip": 0.6}, restandardize=False, **common)  # type: ignore[arg-type]
    close(head(_p6_rollout()).values, [0.251267, -0.590119, 1.280295, -0.941443])
    gdpo = MultiRewardNormalizer(
        weights={"pref": 0.4, "clip": 0.6},
        restandardize=True,
        restandardize_std="unbiased",
        restandardize_eps=1e-8,
        **common,  # type: ignore[arg-type]
    )
    close(gdpo(_p6_rollout()).values, [0.253954, -0.596430, 1.293988, -0.951511])


@pytest.mark.parametrize("global_std", [False, True])
def test_pref_grpo_p6_flow_grpo_tracker(global_std: bool) -> None:
    tracker = PromptHistoryNormalizer(global_std=global_std, std="population", eps=1e-4, eps_placement="std_plus_eps")
    out = tracker(make_rollout([0.5, -0.2, 1.3, 0.1], prompt_keys=["q"] * 4))
    close(out.values, [0.133211, -1.110092, 1.554128, -0.577248])


def _dler_rollout(lengths: Sequence[int]) -> Rollout:
    return make_rollout([1.0, 0, 0, 0, 1, 1, 1, 0], group_size=4, lengths=lengths)


D2_LENGTHS = [2, 4, 4, 2, 1, 2, 3, 4]


def test_dler_d2_token_weighted_official() -> None:
    norm = GroupMeanBatchStdNormalizer(weighting="token", std="unbiased", eps=1e-8, eps_placement="rsqrt_var_eps")
    out = norm(_dler_rollout(D2_LENGTHS))
    close(out.values, [1.956729, -0.308957, -0.308957, -0.308957, 0.823886, 0.823886, 0.823886, -1.441800])
    assert out.metrics["normalizer/batch_mean"] == pytest.approx(-2.5 / 22, abs=1e-6)
    assert out.metrics["normalizer/batch_std"] == pytest.approx(0.441367, abs=1e-6)


@pytest.mark.parametrize(
    ("std", "expected"),
    [("population", [1.732051] + [-0.577350] * 3 + [0.577350] * 3 + [-1.732051]),
     ("unbiased", [1.620185] + [-0.540062] * 3 + [0.540062] * 3 + [-1.620185])],
)  # fmt: skip
def test_dler_d2_sequence_level(std: str, expected: list[float]) -> None:
    for placement in ("std_plus_eps", "rsqrt_var_eps"):
        norm = GroupMeanBatchStdNormalizer(weighting="sequence", std=std, eps=1e-8, eps_placement=placement)  # type: ignore[arg-type]
        close(norm(_dler_rollout(D2_LENGTHS)).values, expected)


def test_dler_d2_grpo_comparison_and_d3_equal_lengths() -> None:
    grpo = GroupNormalizer(std="unbiased", eps=1e-8, eps_placement="std_plus_eps")
    close(grpo(_dler_rollout(D2_LENGTHS)).values, [1.5, -0.5, -0.5, -0.5, 0.5, 0.5, 0.5, -1.5])
    token = GroupMeanBatchStdNormalizer(weighting="token", std="unbiased", eps=1e-8, eps_placement="rsqrt_var_eps")
    d3 = [1.695582] + [-0.565194] * 3 + [0.565194] * 3 + [-1.695582]
    close(token(_dler_rollout([3] * 8)).values, d3)
    population = GroupMeanBatchStdNormalizer(weighting="sequence", std="population", eps=0.0)
    ratio = math.sqrt(23 / 24)
    torch.testing.assert_close(token(_dler_rollout([3] * 8)).values, population(_dler_rollout([3] * 8)).values * ratio)


def test_dler_official_constant_groups_follow_masked_whiten() -> None:
    rollout = make_rollout([1.0, 0, 0, 0, 1, 1, 1, 1], group_size=4, lengths=D2_LENGTHS)
    centred = torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])
    tokens = centred[:, None].expand_as(rollout.mask)[rollout.mask]
    expected = (centred - tokens.mean()) * torch.rsqrt(tokens.var(unbiased=True) + 1e-8)
    official = GroupMeanBatchStdNormalizer(
        weighting="token", std="unbiased", eps=1e-8, eps_placement="rsqrt_var_eps", zero_constant_groups=False
    )
    close(official(rollout).values, expected.tolist())
    default = GroupMeanBatchStdNormalizer(
        weighting="token", std="unbiased", eps=1e-8, eps_placement="rsqrt_var_eps", zero_constant_groups=True
    )
    out = default(rollout)
    close(out.values, expected[:4].tolist() + [0.0] * 4)
    assert torch.equal(out.values[4:], torch.zeros(4)) and out.metrics["normalizer/zero_variance_groups"] == 0.5


def test_dler_sigma_zero_gives_exact_zeros() -> None:
    for weighting in ("sequence", "token"):
        norm = GroupMeanBatchStdNormalizer(weighting=weighting, eps=1e-8, eps_placement="rsqrt_var_eps")  # type: ignore[arg-type]
        assert torch.equal(norm(make_rollout([1.0, 1, 0, 0], group_ids=[0, 0, 1, 1])).values, torch.zeros(4))


def test_medgrpo_m7_group_input() -> None:
    # Re-derived (docs/methods/medgrpo.md M7 gives only r): unbiased std + 1e-6 [Our decision defaults].
    norm = GroupNormalizer(std="unbiased", eps=1e-6, eps_placement="std_plus_eps")
    close(norm(make_rollout([0.5, 0.817574, 0.047426, 0.5])).values, [0.106528, 1.108912, -1.321968, 0.106528])


def test_dr_grpo_mean_only_and_rloo() -> None:
    dr = GroupNormalizer(scale_by_std=False)
    close(
        dr(make_rollout([1.0, 0, 0, 0, 1, 1, 1, 0], group_size=4)).values,
        [0.75, -0.25, -0.25, -0.25] * 1 + [0.25] * 3 + [-0.75],
    )
    loo = LeaveOneOutNormalizer()
    close(loo(make_rollout([1.0, 0, 0, 0])).values, [1.0, -1 / 3, -1 / 3, -1 / 3])


def test_reinforce_pp_batch_whitening() -> None:
    norm = BatchWhitenNormalizer(baseline="none", weighting="sequence", std="population", eps=0.0)
    x = torch.tensor([1.0, 0, 0, 3])
    close(norm(make_rollout(x)).values, ((x - x.mean()) / x.std(unbiased=False)).tolist())
    official = BatchWhitenNormalizer(baseline="group_mean", weighting="token", eps_placement="rsqrt_var_eps", eps=1e-8)
    same = GroupMeanBatchStdNormalizer(weighting="token", eps_placement="rsqrt_var_eps", eps=1e-8)
    torch.testing.assert_close(official(_dler_rollout(D2_LENGTHS)).values, same(_dler_rollout(D2_LENGTHS)).values)


def test_lite_ppo_trl_batch_scaling() -> None:
    # TRL scale_rewards="batch": (r − mean_g) / (std_batch(r) + eps), no batch-mean subtraction.
    norm = GroupMeanBatchStdNormalizer(std_source="scores", subtract_batch_mean=False, std="unbiased", eps=1e-4)
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 0])
    expected = (r - torch.tensor([0.25] * 4 + [0.75] * 4)) / (r.std() + 1e-4)
    close(norm(make_rollout(r, group_size=4)).values, expected.tolist())


def test_advantage_clip_is_symmetric_and_logged() -> None:
    norm = GroupNormalizer(std="population", eps=0.0, scale_by_std=True, clip=1.0)
    out = norm(make_rollout([10.0, 0, 0, 0]))
    close(out.values, [1.0, -0.57735, -0.57735, -0.57735])
    assert out.metrics["advantage/clip_frac"] == 0.25


# ------------------------------------------------------------------------------------- loop references


def loop_group(x: list[float], g: list[int], *, unbiased: bool, eps: float, scale: bool, single: str) -> list[float]:
    out = [0.0] * len(x)
    for gid in set(g):
        rows = [i for i in range(len(x)) if g[i] == gid and not math.isnan(x[i])]
        vals = [x[i] for i in rows]
        if len(vals) == 1:
            out[rows[0]] = vals[0] if single == "raw" else 0.0
            continue
        if not vals or max(vals) == min(vals):
            continue
        mean = sum(vals) / len(vals)
        var = sum((v - mean) ** 2 for v in vals) / (len(vals) - (1 if unbiased else 0))
        for i in rows:
            out[i] = (x[i] - mean) / (math.sqrt(var) + eps) if scale else x[i] - mean
    return out


def loop_loo(x: list[float], g: list[int]) -> list[float]:
    out = [0.0] * len(x)
    for i in range(len(x)):
        others = [x[j] for j in range(len(x)) if g[j] == g[i] and j != i and not math.isnan(x[j])]
        if not math.isnan(x[i]) and others:
            out[i] = x[i] - sum(others) / len(others)
    return out


def loop_batch(x: list[float], g: list[int], lengths: list[int], *, token: bool, unbiased: bool) -> list[float]:
    centred = loop_group(x, g, unbiased=False, eps=0.0, scale=False, single="raw")
    w = [(lengths[i] if token else 1) * (not math.isnan(x[i])) for i in range(len(x))]
    n = sum(w)
    mean = sum(wi * a for wi, a in zip(w, centred, strict=True)) / n
    var = sum(wi * (a - mean) ** 2 for wi, a in zip(w, centred, strict=True)) / (n - (1 if unbiased else 0))
    constant = {gid for gid in set(g) if len({x[i] for i in range(len(x)) if g[i] == gid}) == 1}
    constant = {gid for gid in constant if sum(1 for i in range(len(x)) if g[i] == gid) > 1}
    return [
        0.0 if math.isnan(x[i]) or g[i] in constant else (centred[i] - mean) / (math.sqrt(var) + 1e-8)
        for i in range(len(x))
    ]


def random_batch(seed: int, nan: bool = True) -> tuple[list[float], list[int], list[int]]:
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 6, (7,), generator=gen).tolist()
    g = [k for k, s in enumerate(sizes) for _ in range(s)]
    x = torch.randint(0, 4, (len(g),), generator=gen).float() / 2
    if nan:
        x[torch.rand(len(g), generator=gen) < 0.15] = float("nan")
    lengths = torch.randint(1, 9, (len(g),), generator=gen).tolist()
    return x.tolist(), g, lengths


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_matches_loop(seed: int) -> None:
    x, g, lengths = random_batch(seed)
    roll = make_rollout(x, group_ids=g, lengths=lengths)
    for unbiased in (True, False):
        for scale in (True, False):
            for single in ("zero", "raw"):
                std = "unbiased" if unbiased else "population"
                norm = GroupNormalizer(std=std, eps=1e-6, scale_by_std=scale, singleton_groups=single)  # type: ignore[arg-type]
                expected = loop_group(x, g, unbiased=unbiased, eps=1e-6, scale=scale, single=single)
                close(norm(roll).values, expected, atol=1e-4)
    close(LeaveOneOutNormalizer()(roll).values, loop_loo(x, g))
    for token in (True, False):
        for unbiased in (True, False):
            norm = GroupMeanBatchStdNormalizer(
                weighting="token" if token else "sequence",
                std="unbiased" if unbiased else "population",
                eps=1e-8,
                eps_placement="std_plus_eps",
                singleton_groups="raw",
            )
            close(norm(roll).values, loop_batch(x, g, lengths, token=token, unbiased=unbiased), atol=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_multi_reward_matches_loop(seed: int) -> None:
    a, g, _ = random_batch(seed)
    b, _, _ = random_batch(seed + 100)
    b = (b + b)[: len(a)]
    roll = make_rollout([0.0] * len(a), group_ids=g, rewards={"a": a, "b": b})
    norm = MultiRewardNormalizer(weights={"a": 0.3, "b": 2.0}, std="unbiased", eps=1e-8)
    za = loop_group(a, g, unbiased=True, eps=1e-8, scale=True, single="zero")
    zb = loop_group(b, g, unbiased=True, eps=1e-8, scale=True, single="zero")
    expected = [0.3 * p + 2.0 * q for p, q in zip(za, zb, strict=True)]
    close(norm(roll).values, expected, atol=1e-4)


def loop_tracker(batches: list[tuple[list[float], list[str]]], reset_every: int | None) -> list[list[float]]:
    history: dict[str, list[float]] = {}
    outputs = []
    for call, (x, keys) in enumerate(batches):
        if reset_every is not None and call % reset_every == 0:
            history = {}
        for v, k in zip(x, keys, strict=True):
            history.setdefault(k, []).append(v)
        out = []
        for v, k in zip(x, keys, strict=True):
            h = history[k]
            mean = sum(h) / len(h)
            std = math.sqrt(sum((u - mean) ** 2 for u in h) / len(h))
            out.append(0.0 if max(h) == min(h) else (v - mean) / (std + 1e-4))
        outputs.append(out)
    return outputs


@pytest.mark.parametrize("reset_every", [1, 2, None])
def test_tracker_matches_loop_across_calls(reset_every: int | None) -> None:
    gen = torch.Generator().manual_seed(reset_every or 0)
    batches = []
    for _ in range(4):
        keys = [f"p{int(k)}" for k in torch.randint(0, 3, (6,), generator=gen)]
        batches.append((torch.randint(0, 5, (6,), generator=gen).float().div(4).tolist(), keys))
    tracker = PromptHistoryNormalizer(std="population", eps=1e-4, reset_every=reset_every)
    for (x, keys), expected in zip(batches, loop_tracker(batches, reset_every), strict=True):
        close(tracker(make_rollout(x, prompt_keys=keys)).values, expected, atol=1e-4)


def test_tracker_max_history_keeps_last_rewards() -> None:
    tracker = PromptHistoryNormalizer(max_history=2, reset_every=None)
    tracker(make_rollout([0.0, 1.0], prompt_keys=["a", "a"]))
    out = tracker(make_rollout([5.0], prompt_keys=["a"]))  # history is now [1, 5]
    close(out.values, [(5 - 3) / (2 + 1e-4)])
    assert out.metrics["normalizer/history_mean_size"] == 2.0


# ---------------------------------------------------------------------------------------- properties

small_ints = st.lists(st.integers(0, 6), min_size=1, max_size=24)


@settings(max_examples=30, deadline=None)
@given(values=small_ints, group_size=st.integers(1, 5))
def test_group_normalizers_have_zero_group_mean(values: list[int], group_size: int) -> None:
    roll = make_rollout([float(v) for v in values], group_size=group_size)
    index = roll.group_ids
    for norm in (GroupNormalizer(), GroupNormalizer(scale_by_std=False), LeaveOneOutNormalizer()):
        adv = norm(roll).values
        sums = torch.zeros(int(index.max()) + 1).index_add_(0, index, adv)
        assert sums.abs().max() < 1e-4


@settings(max_examples=30, deadline=None)
@given(values=small_ints, group_size=st.integers(2, 5), a=st.sampled_from([0.25, 0.5, 2.0, 3.0]), b=st.integers(-8, 8))
def test_z_score_normalizers_are_affine_invariant(values: list[int], group_size: int, a: float, b: int) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    for norm in (
        GroupNormalizer(eps=0.0),
        GroupMeanBatchStdNormalizer(eps=0.0, singleton_groups="zero"),  # "raw" (baseline 0) is not shift-invariant
        BatchWhitenNormalizer(weighting="sequence", eps=0.0),
        PromptHistoryNormalizer(eps=0.0),
    ):
        keys = [str(i // group_size) for i in range(len(values))]
        base = norm(make_rollout(x, group_size=group_size, prompt_keys=keys)).values
        moved = norm(make_rollout(a * x + b, group_size=group_size, prompt_keys=keys)).values
        torch.testing.assert_close(moved, base, atol=1e-4, rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(value=st.floats(-1e4, 1e4, width=32), size=st.integers(2, 6), other=st.lists(st.integers(0, 3), min_size=2))
def test_constant_groups_give_exact_zeros(value: float, size: int, other: list[int]) -> None:
    x = [value] * size + [float(v) for v in other]
    g = [0] * size + [1] * len(other)
    roll = make_rollout(x, group_ids=g, prompt_keys=[str(i) for i in g], rewards={"r": x})
    for norm in (
        GroupNormalizer(),
        GroupNormalizer(scale_by_std=False),
        LeaveOneOutNormalizer(),
        GroupMeanBatchStdNormalizer(),
        GroupMeanBatchStdNormalizer(weighting="token"),
        MultiRewardNormalizer(),
        PromptHistoryNormalizer(),
    ):
        assert torch.equal(norm(roll).values[:size], torch.zeros(size)), type(norm).__name__


finite = st.floats(-1e6, 1e6, width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=30, deadline=None)
@given(values=st.lists(finite, min_size=1, max_size=20), groups=st.lists(st.integers(0, 4), min_size=20, max_size=20))
def test_no_nan_for_finite_input(values: list[float], groups: list[int]) -> None:
    g = groups[: len(values)]
    roll = make_rollout(values, group_ids=g, prompt_keys=[str(k) for k in g], rewards={"r": values})
    for norm in (
        GroupNormalizer(),
        GroupNormalizer(singleton_groups="raw", std="population"),
        LeaveOneOutNormalizer(singleton_groups="raw"),
        GroupMeanBatchStdNormalizer(std="population"),
        GroupMeanBatchStdNormalizer(weighting="token", std="population"),
        BatchWhitenNormalizer(std="population"),
        MultiRewardNormalizer(restandardize=True, restandardize_std="population"),
        PromptHistoryNormalizer(global_std=True),
    ):
        assert torch.isfinite(norm(roll).values).all(), type(norm).__name__


@settings(max_examples=25, deadline=None)
@given(
    first=st.lists(st.integers(0, 5), min_size=4, max_size=12),
    second=st.lists(st.integers(0, 5), min_size=4, max_size=12),
)
def test_tracker_state_dict_round_trip(first: list[int], second: list[int]) -> None:
    def keyed(values: list[int]) -> Rollout:
        return make_rollout([float(v) for v in values], prompt_keys=[f"k{i % 3}" for i in range(len(values))])

    tracker = PromptHistoryNormalizer(reset_every=None, max_history=5)
    tracker(keyed(first))
    restored = PromptHistoryNormalizer(reset_every=None, max_history=5)
    restored.load_state_dict(pickle.loads(pickle.dumps(tracker.state_dict())))
    assert restored.state_dict() == tracker.state_dict()
    assert torch.equal(restored(keyed(second)).values, tracker(keyed(second)).values)


# ---------------------------------------------------------------------------------------- robustness


ALL = [
    GroupNormalizer,
    LeaveOneOutNormalizer,
    GroupMeanBatchStdNormalizer,
    BatchWhitenNormalizer,
    MultiRewardNormalizer,
    PromptHistoryNormalizer,
]


def robust_rollout(x: Sequence[float] | torch.Tensor) -> Rollout:
    t = torch.as_tensor(x)
    return make_rollout(t, group_size=4, prompt_keys=[str(i // 4) for i in range(len(t))], rewards={"r": t.float()})


@pytest.mark.parametrize("cls", ALL)
def test_nan_rows_get_zero_and_are_counted(cls: type) -> None:
    x = [1.0, float("nan"), 0.0, 2.0, 3.0, 1.0, 0.0, 2.0]
    out = cls()(robust_rollout(x))
    assert out.values[1] == 0 and torch.isfinite(out.values).all()
    assert out.metrics["normalizer/nan_rewards"] == 1.0
    clean = cls()(robust_rollout([1.0, 0.0, 2.0, 3.0, 1.0, 0.0, 2.0]))
    if cls in (GroupNormalizer, LeaveOneOutNormalizer, MultiRewardNormalizer, PromptHistoryNormalizer):
        dropped = cls()(make_rollout(torch.tensor([1.0, 0, 2]), prompt_keys=["0"] * 3, rewards={"r": [1.0, 0, 2]}))
        close(out.values[[0, 2, 3]], dropped.values.tolist())
    assert clean.values.shape == (7,)


@pytest.mark.parametrize("cls", ALL)
def test_inf_raises_naming_rows(cls: type) -> None:
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        cls()(robust_rollout([1.0, 0.0, float("inf"), 0.0]))


@pytest.mark.parametrize("cls", ALL)
def test_empty_batch_raises(cls: type) -> None:
    with pytest.raises(ValueError, match="empty"):
        cls()(robust_rollout(torch.zeros(0)))


@pytest.mark.parametrize("cls", ALL)
def test_bf16_scores_are_computed_in_float32(cls: type) -> None:
    x = torch.tensor([0.3, 0.7, 0.1, 0.9, 0.5, 0.5, 0.2, 0.8])
    low = cls()(robust_rollout(x.bfloat16()))
    ref = cls()(robust_rollout(x.bfloat16().float()))
    assert low.values.dtype == torch.float32
    torch.testing.assert_close(low.values, ref.values)


def test_all_equal_batch_and_singletons() -> None:
    assert torch.equal(GroupNormalizer()(make_rollout([2.0] * 6, group_size=3)).values, torch.zeros(6))
    single = make_rollout([1.0, 2.0, 3.0], group_size=1)
    assert torch.equal(GroupNormalizer()(single).values, torch.zeros(3))
    close(GroupNormalizer(singleton_groups="raw")(single).values, [1.0, 2.0, 3.0])
    assert GroupNormalizer()(single).metrics["normalizer/singleton_groups"] == 3.0
    with pytest.raises(ValueError, match="single applicable response"):
        GroupNormalizer(singleton_groups="error")(single)
    with pytest.raises(ValueError, match="single applicable response"):
        LeaveOneOutNormalizer(singleton_groups="error")(single)
    # DLER official: a singleton's baseline is 0, so A = R before batch whitening.
    dler = GroupMeanBatchStdNormalizer(std="population", eps=0.0)
    close(dler(single).values, ((torch.tensor([1.0, 2, 3]) - 2) / math.sqrt(2 / 3)).tolist())


def test_bad_options_raise_naming_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"std='sample'.*unbiased"):
        GroupNormalizer(std="sample")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weighting"):
        GroupMeanBatchStdNormalizer(weighting="tokens")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="clip"):
        GroupNormalizer(clip=0.0)
    with pytest.raises(ValueError, match="eps"):
        GroupNormalizer(eps=-1.0)
    with pytest.raises(ValueError, match="reset_every"):
        PromptHistoryNormalizer(reset_every=0)
    with pytest.raises(ValueError, match="prompt_keys"):
        PromptHistoryNormalizer()(make_rollout([1.0, 0.0]))
    with pytest.raises(ValueError, match="not found"):
        MultiRewardNormalizer(weights={"missing": 1.0})(_p6_rollout())
    with pytest.raises(ValueError, match="scores is None"):
        GroupNormalizer()(
            Rollout(
                group_ids=torch.zeros(2, dtype=torch.long),
                old_logprobs=torch.zeros(2, 1),
                mask=torch.ones(2, 1, dtype=torch.bool),
            )
        )


def test_protocols_and_signatures() -> None:
    for cls in ALL:
        assert isinstance(cls(), Normalizer)
    assert isinstance(PromptHistoryNormalizer(), StatefulNormalizer)
    assert "baseline" not in GroupMeanBatchStdNormalizer.__dataclass_fields__ or not (
        GroupMeanBatchStdNormalizer.__dataclass_fields__["baseline"].init
    )


DDP_SCRIPT = r"""
import os, sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from toolkit.advantages.beta import BetaNormalizer
from toolkit.advantages.gae import GAENormalizer
from toolkit.advantages import GroupMeanBatchStdNormalizer, MultiRewardNormalizer, PromptHistoryNormalizer
from toolkit.rollout import Rollout


def batch():
    gen = torch.Generator().manual_seed(0)
    n, t = 12, 5
    lengths = torch.randint(1, t + 1, (n,), generator=gen)
    mask = torch.arange(t)[None] < lengths[:, None]
    scores = torch.randint(0, 3, (n,), generator=gen).float() / 2
    scores[5] = float("nan")
    return Rollout(
        group_ids=torch.arange(n) // 3, old_logprobs=torch.zeros(n, t), mask=mask, scores=scores,
        rewards={"a": scores.nan_to_num(0.5), "b": torch.rand(n, generator=gen)},
        token_rewards=torch.randn(n, t, generator=gen) * mask, values=torch.randn(n, t, generator=gen),
        prompt_keys=[f"p{i // 3 % 2}" for i in range(n)],
    )


def normalizers():
    return [
        GroupMeanBatchStdNormalizer(weighting="token", eps_placement="rsqrt_var_eps"),
        GroupMeanBatchStdNormalizer(weighting="sequence", std="population"),
        MultiRewardNormalizer(restandardize=True),
        PromptHistoryNormalizer(global_std=True),
        BetaNormalizer(),
        GAENormalizer(gamma=0.9, lam=0.8),
    ]


def worker(rank, path):
    full = batch()
    rows = torch.arange(6) + 6 * rank  # whole groups stay on one rank
    expected = [norm(full).values[rows] for norm in normalizers()]  # single process, before the group forms
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    for norm, want in zip(normalizers(), expected):
        got = norm(full.select(rows)).values
        if not torch.allclose(got, want, atol=1e-5):
            print(type(norm).__name__, got, want, file=sys.stderr)
            sys.exit(1)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1],), nprocs=2)
"""


@pytest.mark.integration
@pytest.mark.slow
def test_batch_statistics_are_global_across_ranks(tmp_path: pathlib.Path) -> None:
    script = tmp_path / "ddp_check.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[3])}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "rendezvous")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
