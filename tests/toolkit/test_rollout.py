"""Rollout: validation, select, minibatches, concatenation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit.rollout import Rollout, concat_rollouts


def make_rollout(num_groups: int = 3, group_size: int = 4, steps: int = 5) -> Rollout:
    n = num_groups * group_size
    mask = torch.ones(n, steps, dtype=torch.bool)
    mask[:, -1] = False
    return Rollout(
        group_ids=torch.arange(n) // group_size,
        old_logprobs=-torch.rand(n, steps),
        mask=mask,
        rewards={"acc": torch.arange(n, dtype=torch.float32)},
        prompts=[f"p{i // group_size}" for i in range(n)],
        dataset_ids=["d"] * n,
        data={"input_ids": torch.arange(n * 7).reshape(n, 7), "shared": torch.zeros(3)},
    )


def test_select_takes_rows_everywhere() -> None:
    r = make_rollout()
    s = r.select(torch.tensor([5, 0]))
    assert s.group_ids.tolist() == [1, 0]
    assert s.rewards["acc"].tolist() == [5.0, 0.0]
    assert s.prompts == ["p1", "p0"]
    assert torch.equal(s.data["input_ids"][0], r.data["input_ids"][5])
    assert s.data["shared"] is r.data["shared"]


def test_select_with_bool_mask() -> None:
    r = make_rollout()
    s = r.select(r.group_ids == 2)
    assert len(s) == 4 and set(s.group_ids.tolist()) == {2}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mask": torch.ones(12, 4, dtype=torch.bool)}, "mask shape"),
        ({"mask": torch.ones(12, 5)}, "bool"),
        ({"rewards": {"x": torch.zeros(11)}}, "reward component"),
        ({"prompts": ["a"]}, "prompts has 1 rows"),
        ({"scores": torch.zeros(3)}, "scores has 3 rows"),
    ],
)
def test_validation_names_the_field(kwargs: dict, message: str) -> None:
    base = dict(group_ids=torch.zeros(12, dtype=torch.long), old_logprobs=torch.zeros(12, 5))
    base["mask"] = torch.ones(12, 5, dtype=torch.bool)
    base.update(kwargs)
    with pytest.raises(ValueError, match=message):
        Rollout(**base)


@settings(max_examples=30, deadline=None)
@given(num_groups=st.integers(1, 5), group_size=st.integers(1, 4), parts=st.integers(1, 6), keep=st.booleans())
def test_minibatches_partition_rows(num_groups: int, group_size: int, parts: int, keep: bool) -> None:
    r = make_rollout(num_groups, group_size)
    limit = num_groups if keep else len(r)
    if parts > limit:
        with pytest.raises(ValueError):
            list(r.minibatches(parts, torch.Generator().manual_seed(0), keep_groups=keep))
        return
    batches = list(r.minibatches(parts, torch.Generator().manual_seed(0), keep_groups=keep))
    assert len(batches) == parts
    seen = sorted(v for b in batches for v in b.rewards["acc"].tolist())
    assert seen == r.rewards["acc"].tolist()
    if keep:
        for b in batches:
            for g in b.group_ids.unique():
                assert int((b.group_ids == g).sum()) == group_size


def test_minibatch_shuffle_is_seeded() -> None:
    r = make_rollout()
    a = [b.rewards["acc"].tolist() for b in r.minibatches(3, torch.Generator().manual_seed(1))]
    b = [b.rewards["acc"].tolist() for b in r.minibatches(3, torch.Generator().manual_seed(1))]
    c = [b.rewards["acc"].tolist() for b in r.minibatches(3, shuffle=False)]
    assert a == b and c[0] == [0.0, 1.0, 2.0, 3.0]


def test_concat_pads_steps_and_keeps_rows() -> None:
    a, b = make_rollout(1, 2, steps=3), make_rollout(1, 2, steps=5)
    c = concat_rollouts([a, b])
    assert c.old_logprobs.shape == (4, 5)
    assert not c.mask[:2, 3:].any()
    assert c.prompts == a.prompts + b.prompts
    assert c.data["input_ids"].shape == (4, 7)


def test_concat_rejects_mismatched_components() -> None:
    a, b = make_rollout(1, 2), make_rollout(1, 2)
    b.rewards["other"] = torch.zeros(2)
    with pytest.raises(ValueError, match="reward components"):
        concat_rollouts([a, b])


def test_reward_matrix_names_unknown_component() -> None:
    with pytest.raises(ValueError, match="unknown reward components"):
        make_rollout().reward_matrix(["nope"])
