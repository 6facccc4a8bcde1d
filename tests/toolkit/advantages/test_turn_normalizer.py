"""TurnGroupNormalizer: process-supervision GRPO (arXiv:2402.03300 §4.1.3) over ReNorm's turn rewards."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit.advantages.turn import TurnGroupNormalizer, turn_group_advantages
from toolkit.reward_transforms.ppr import ReNorm
from toolkit.rollout import Rollout


def _ends(n: int, t: int, positions: list[list[int]]) -> torch.Tensor:
    ends = torch.zeros(n, t, dtype=torch.bool)
    for i, row in enumerate(positions):
        ends[i, row] = True
    return ends


def test_hand_computed_oracle() -> None:
    # Group 0: row A steps (0.5 at t=1, 1.0 at t=3), row B step 0.0 at t=2. R = {0.5, 1, 0}: mean 0.5,
    # unbiased std 0.5 -> r~ = (0, 1, -1). A = [1, 1, 1, 1, 0]; B = [-1, -1, -1, 0, 0].
    # Group 1: one row, one step: constant -> zeros.
    ends = _ends(3, 5, [[1, 3], [2], [4]])
    rewards = torch.zeros(3, 5)
    rewards[0, 1], rewards[0, 3], rewards[2, 4] = 0.5, 1.0, 0.7
    advantages, metrics = turn_group_advantages(
        rewards, ends, torch.tensor([0, 0, 1]), std="unbiased", eps=0.0, eps_placement="std_plus_eps"
    )
    expected = torch.tensor([[1.0, 1, 1, 1, 0], [-1, -1, -1, 0, 0], [0, 0, 0, 0, 0]])
    torch.testing.assert_close(advantages, expected, atol=1e-6, rtol=0)
    assert metrics["normalizer/zero_variance_groups_count"] == 0.0  # a single step is not a zero-variance group
    population, _ = turn_group_advantages(rewards, ends, torch.tensor([0, 0, 1]), std="population", eps=0.0)
    torch.testing.assert_close(population[0, 0], torch.tensor(0.5 / (1 / 6) ** 0.5), atol=1e-5, rtol=0)


def _loop(rewards: torch.Tensor, ends: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(rewards, dtype=torch.float64)
    for g in groups.unique().tolist():
        members = [i for i in range(len(groups)) if groups[i] == g]
        values = [float(rewards[i, t]) for i in members for t in range(rewards.shape[1]) if ends[i, t]]
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
        for i in members:
            for t in range(rewards.shape[1]):
                later = [float(rewards[i, s]) for s in range(t, rewards.shape[1]) if ends[i, s]]
                out[i, t] = 0.0 if std == 0 else sum((v - mean) / (std + 1e-6) for v in later)
    return out.float()


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_matches_loop_and_group_sums_are_zero(data: st.DataObject) -> None:
    groups, size, t = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 6))
    n = groups * size
    ends = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=n, max_size=n)))
    ends[:, -1] = True
    values = data.draw(st.lists(st.sampled_from([-1.0, -0.5, 0.0, 0.25, 1.0]), min_size=n * t, max_size=n * t))
    rewards = torch.tensor(values).reshape(n, t) * ends
    group_ids = torch.arange(n) // size
    advantages, _ = turn_group_advantages(rewards, ends, group_ids)
    torch.testing.assert_close(advantages, _loop(rewards, ends, group_ids), atol=1e-4, rtol=1e-4)
    # The first token's advantage sums a row's normalized steps; over a group they sum to zero.
    sums = torch.zeros(groups).index_add_(0, group_ids, advantages[:, 0])
    torch.testing.assert_close(sums, torch.zeros(groups), atol=1e-4, rtol=0)


def test_normalizer_after_renorm_and_errors() -> None:
    ends = _ends(2, 4, [[1, 3], [3]])
    rollout = Rollout(
        group_ids=torch.tensor([0, 0]),
        old_logprobs=torch.zeros(2, 4),
        mask=torch.ones(2, 4, dtype=torch.bool),
        turn_ends=ends,
        scores=torch.tensor([1.0, 0.0]),
        data={"process_rewards": [[0.5], []]},
    )
    rollout = ReNorm(beta=1.0, final_step_mode="raw", invalid_prm="neutral")(rollout)
    out = TurnGroupNormalizer(eps=0.0)(rollout)
    # Steps: row 0 -> (0.5 + 1 - 1, 1) = (0.5, 1); row 1 -> 0. mean 0.5, std 0.5: r~ = (0, 1, -1).
    torch.testing.assert_close(out.values, torch.tensor([[1.0, 1, 1, 1], [-1, -1, -1, -1]]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="std='bad'|std="):
        TurnGroupNormalizer(std="bad")  # type: ignore[arg-type]
    rollout.token_rewards = torch.tensor([[0.0, 0.5, 0.2, 1.0], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match="off a turn end"):
        TurnGroupNormalizer()(rollout)
    rollout.token_rewards = None
    with pytest.raises(ValueError, match="run ReNorm first"):
        TurnGroupNormalizer()(rollout)
