"""Dynamic sampling and overlong masking: docs/methods/dler.md D4, refill cap behaviour, hypothesis properties."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit.rollout import Rollout
from toolkit.train.filters import (
    OverlongFilter,
    RefillCapError,
    ZeroVarianceFilter,
    drop_zero_variance_groups,
    mask_overlong,
    overlong_mask,
    refill,
    zero_variance_groups,
)

nan = math.nan


def make_rollout(scores: Sequence[float], group_size: int, t: int = 3, **fields: object) -> Rollout:
    n = len(scores)
    return Rollout(
        group_ids=torch.arange(n) // group_size,
        old_logprobs=torch.zeros(n, t),
        mask=torch.ones(n, t, dtype=torch.bool),
        scores=torch.tensor(list(scores), dtype=torch.float32),
        **fields,  # type: ignore[arg-type]
    )


def test_d4_dynamic_sampling_keeps_b_and_d() -> None:
    scores = [0, 0, 0, 0] + [1, 0, 1, 1] + [1, 1, 1, 1] + [0, 1, 0, 0]
    drop = zero_variance_groups(torch.tensor(scores, dtype=torch.float32), torch.arange(16) // 4)
    assert drop.tolist() == [True] * 4 + [False] * 4 + [True] * 4 + [False] * 4
    kept, metrics = drop_zero_variance_groups(make_rollout(scores, 4), on="scores")
    assert torch.unique(kept.group_ids).tolist() == [1, 3]
    assert metrics == {"filter/groups": 4.0, "filter/zero_variance_groups": 2.0, "filter/filtered_frac": 0.5}


def test_filter_on_raw_component_singletons_nan_and_atol() -> None:
    # penalized scores differ, raw scores are constant -> filtered on the raw component (official)
    rollout = make_rollout([1.0, 0.1], 2, rewards={"raw_score": torch.tensor([1.0, 1.0])})
    assert len(drop_zero_variance_groups(rollout, on="raw_score")[0]) == 0
    assert len(drop_zero_variance_groups(rollout, on="scores")[0]) == 2
    with pytest.raises(ValueError, match="unknown component"):
        drop_zero_variance_groups(rollout, on="nope")
    singleton = torch.tensor([0.5, 1.0, 2.0])
    ids = torch.tensor([0, 1, 1])
    assert zero_variance_groups(singleton, ids).tolist() == [False, False, False]
    assert zero_variance_groups(singleton, ids, include_singletons=True).tolist() == [True, False, False]
    with_nan = torch.tensor([nan, 1.0, 1.0, nan, nan, 0.0, 1.0])
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    assert zero_variance_groups(with_nan, ids).tolist() == [True] * 5 + [False] * 2
    assert zero_variance_groups(torch.tensor([1.0, 1.0 + 1e-7]), torch.zeros(2, dtype=torch.long), atol=1e-6).all()
    empty = zero_variance_groups(torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0,)


def test_zero_variance_vectorised_matches_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 10, (60,), generator=gen)
    scores = torch.randint(0, 2, (60,), generator=gen).float()
    drop = zero_variance_groups(scores, ids)
    for i in range(60):
        group = scores[ids == ids[i]]
        assert bool(drop[i]) == (group.numel() > 1 and float(group.std(unbiased=False)) == 0.0)


def batches(pattern: Sequence[Sequence[float]], group_size: int) -> Callable[[], Rollout]:
    it = iter(pattern)
    return lambda: make_rollout(next(it), group_size)


def test_refill_reaches_target_and_trims() -> None:
    rounds = [[1, 1, 0, 1], [0, 0, 1, 1], [1, 0, 0, 1]]  # group size 2: round 1 keeps 1 group, 2 keeps 0, 3 keeps 2
    out, metrics = refill(batches(rounds, 2), target_groups=2, max_rounds=5, on_cap="error")
    assert out.group_ids.tolist() == [0, 0, 1, 1]
    assert out.scores.tolist() == [0, 1, 1, 0]  # type: ignore[union-attr]
    assert metrics["filter/rounds"] == 3 and metrics["filter/generated_groups"] == 6
    assert metrics["filter/filtered_frac"] == pytest.approx(0.5) and metrics["filter/cap_hit"] == 0.0
    assert out.metrics["filter/rounds"] == 3


def test_refill_in_lockstep_samples_while_any_rank_needs_more() -> None:
    """Sharded training: this rank has its 1 group after round 1, another rank needs 3 rounds; this one samples along
    (every rank must call generate as often) and still returns exactly its target, the first surviving groups."""
    other_rank_needs = iter([True, True, False])
    asked: list[bool] = []

    def sync(mine: bool) -> bool:
        asked.append(mine)
        return mine or next(other_rank_needs)

    rounds = [[1, 0, 1, 1], [0, 1, 0, 0], [1, 0, 0, 0]]
    out, metrics = refill(batches(rounds, 2), target_groups=1, max_rounds=5, sync=sync)
    assert asked == [True, False, False, False] and metrics["filter/rounds"] == 3
    assert out.scores.tolist() == [1, 0] and metrics["filter/kept_groups"] == 1  # type: ignore[union-attr]


def test_refill_cap_error_and_partial() -> None:
    rounds = [[1, 1, 0, 1], [0, 0, 1, 1]]
    with pytest.raises(RefillCapError, match="only 1 of 3 target groups.*after 2 generation rounds"):
        refill(batches(rounds, 2), target_groups=3, max_rounds=2, on_cap="error")
    out, metrics = refill(batches(rounds, 2), target_groups=3, max_rounds=2, on_cap="partial")
    assert out.scores.tolist() == [0, 1] and metrics["filter/cap_hit"] == 1.0  # type: ignore[union-attr]
    with pytest.raises(RefillCapError):
        refill(batches([[1, 1]], 2), target_groups=1, max_rounds=1, on_cap="partial")
    with pytest.raises(ValueError, match="on_cap='drop'"):
        refill(batches([], 2), target_groups=1, on_cap="drop")  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**31 - 1), st.sampled_from(["error", "partial"]))
def test_refill_honours_cap_and_never_returns_degenerate_groups(
    target: int, max_rounds: int, seed: int, on_cap: str
) -> None:
    gen = torch.Generator().manual_seed(seed)
    calls = 0

    def sample() -> Rollout:
        nonlocal calls
        calls += 1
        return make_rollout(torch.randint(0, 2, (6,), generator=gen).float().tolist(), 3)

    try:
        out, metrics = refill(sample, target_groups=target, max_rounds=max_rounds, on_cap=on_cap)  # type: ignore[arg-type]
    except RefillCapError:
        assert calls == max_rounds
        return
    assert calls <= max_rounds and metrics["filter/rounds"] == calls
    assert not bool(zero_variance_groups(out.scores, out.group_ids).any())  # type: ignore[arg-type]
    num_groups = torch.unique(out.group_ids).numel()
    assert num_groups == target or (on_cap == "partial" and metrics["filter/cap_hit"] == 1.0 and num_groups < target)
    assert torch.unique(out.group_ids).tolist() == list(range(num_groups))


def test_overlong_mask_and_transforms() -> None:
    rollout = make_rollout([1.0, 0.0, 1.0], 3, truncated=torch.tensor([False, True, False]))
    assert overlong_mask(rollout).tolist() == [True, False, True]
    masked, metrics = mask_overlong(rollout)
    assert masked.mask.sum(dim=1).tolist() == [3, 0, 3] and metrics["filter/overlong_frac"] == pytest.approx(1 / 3)
    assert rollout.mask.all()  # the input is not modified
    assert OverlongFilter()(rollout).metrics["filter/overlong_frac"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="rollout.truncated"):
        overlong_mask(make_rollout([1.0], 1))
    filtered = ZeroVarianceFilter(on="scores")(make_rollout([1, 1, 0, 1], 2))
    assert filtered.scores.tolist() == [0, 1] and filtered.metrics["filter/zero_variance_groups"] == 1.0  # type: ignore[union-attr]
