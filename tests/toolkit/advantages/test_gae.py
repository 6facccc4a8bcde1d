"""GAE with a critic and batch-wide masked whitening: docs/methods/ppr.md P3, loop references, properties,
robustness."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit.advantages.gae import GAENormalizer, gae_advantages, masked_whiten
from toolkit.interfaces import Normalizer
from toolkit.rollout import Rollout

ATOL = 1e-5


def make_rollout(
    token_rewards: torch.Tensor | None,
    values: torch.Tensor | None,
    mask: torch.Tensor,
    scores: torch.Tensor | None = None,
    data: dict[str, torch.Tensor] | None = None,
) -> Rollout:
    n, t = mask.shape
    return Rollout(
        group_ids=torch.arange(n),
        old_logprobs=torch.zeros(n, t),
        mask=mask,
        token_rewards=token_rewards,
        values=values,
        scores=scores,
        data=dict(data or {}),
    )


def p3_rollout() -> Rollout:
    """docs/methods/ppr.md P3: A judged at t = 2, 5 (4/6, 3/5), final t = 7, r_o = 1, V = 0.2; B judged 1/4 at t = 3,
    final t = 5."""
    rewards = torch.zeros(2, 8)
    rewards[0, 2], rewards[0, 5], rewards[0, 7] = 4 / 6 + 1 - 1, 3 / 5 + 1 - 1, 1.0
    rewards[1, 3] = 1 / 4 + 0 - 1
    values = torch.tensor([[0.2] * 8, [0.1] * 6 + [0.0] * 2])
    mask = torch.tensor([[True] * 8, [True] * 6 + [False] * 2])
    return make_rollout(rewards, values, mask)


def test_p3_returns_raw_and_whitened_advantages() -> None:
    rollout = p3_rollout()
    raw = GAENormalizer(gamma=1.0, lam=1.0, whiten=False)(rollout)
    assert raw.returns is not None
    expected_returns = [[2.266667] * 3 + [1.6] * 3 + [1.0] * 2, [-0.75] * 4 + [0.0] * 2 + [0.0] * 2]
    torch.testing.assert_close(raw.returns, torch.tensor(expected_returns), atol=ATOL, rtol=0)
    expected_raw = [[2.066667] * 3 + [1.4] * 3 + [0.8] * 2, [-0.85] * 4 + [-0.1] * 2 + [0.0] * 2]
    torch.testing.assert_close(raw.values, torch.tensor(expected_raw), atol=ATOL, rtol=0)
    norm = GAENormalizer(gamma=1.0, lam=1.0, whiten=True, std="unbiased", eps=1e-8, eps_placement="rsqrt_var_eps")
    out = norm(rollout)
    expected = [[1.251887] * 3 + [0.682847] * 3 + [0.170712] * 2, [-1.237661] * 4 + [-0.597492] * 2 + [0.0] * 2]
    torch.testing.assert_close(out.values, torch.tensor(expected), atol=ATOL, rtol=0)
    assert out.returns is not None and torch.equal(out.returns, raw.returns)  # returns are not whitened
    assert out.metrics["advantage/raw_mean"] == pytest.approx(float(torch.tensor(expected_raw)[rollout.mask].mean()))


def test_p3_pad_values_do_not_leak() -> None:
    rollout = p3_rollout()
    assert rollout.values is not None
    rollout.values[1, 6:] = 123.0  # critic garbage on padding
    out = GAENormalizer(whiten=False)(rollout)
    torch.testing.assert_close(out.values[1, :6], torch.tensor([-0.85] * 4 + [-0.1] * 2), atol=ATOL, rtol=0)


def test_mask_key_runs_gae_over_information_tokens() -> None:
    # PPR: the boundary reward sits on an <information> token (loss mask False, attention mask True).
    rollout = p3_rollout()
    loss_mask = rollout.mask.clone()
    loss_mask[0, 2] = False
    rollout.mask = loss_mask
    with pytest.raises(ValueError, match="outside the step mask"):
        GAENormalizer()(rollout)
    rollout.data["attention_mask"] = p3_rollout().mask
    out = GAENormalizer(mask_key="attention_mask")(rollout)
    torch.testing.assert_close(out.values, GAENormalizer()(p3_rollout()).values)


def loop_gae(rewards: list[list[float]], values: list[list[float]], mask: list[list[bool]], gamma: float, lam: float):  # type: ignore[no-untyped-def]
    adv = [[0.0] * len(r) for r in rewards]
    for i, row in enumerate(mask):
        steps = [t for t, m in enumerate(row) if m]
        last = 0.0
        for k in reversed(range(len(steps))):
            t = steps[k]
            next_v = values[i][steps[k + 1]] if k + 1 < len(steps) else 0.0
            last = rewards[i][t] + gamma * next_v - values[i][t] + gamma * lam * last
            adv[i][t] = last
    returns = [
        [a + v if m else 0.0 for a, v, m in zip(ra, rv, rm, strict=True)]
        for ra, rv, rm in zip(adv, values, mask, strict=True)
    ]
    return adv, returns


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0), (0.9, 1.0)])
def test_vectorised_matches_loop(seed: int, gamma: float, lam: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(5, 9, generator=gen) < 0.7  # interior holes: skipped steps (tool observations)
    rewards = torch.randn(5, 9, generator=gen) * mask
    values = torch.randn(5, 9, generator=gen)
    adv, ret = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = loop_gae(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(ref_adv), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, torch.tensor(ref_ret), atol=1e-5, rtol=1e-5)


def test_matches_classic_recursion_for_trailing_padding() -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([7, 3, 5, 1])
    mask = torch.arange(7)[None] < lengths[:, None]
    rewards, values = torch.randn(4, 7, generator=gen) * mask, torch.randn(4, 7, generator=gen) * mask
    gamma, lam = 0.97, 0.9
    last, classic = torch.zeros(4), torch.zeros(4, 7)
    for t in reversed(range(7)):  # verl's pre-multi-turn recursion, V := 0 beyond the end
        next_v = values[:, t + 1] if t + 1 < 7 else torch.zeros(4)
        last = rewards[:, t] + gamma * next_v - values[:, t] + gamma * lam * last
        classic[:, t] = last
    adv, _ = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(adv, classic * mask, atol=1e-5, rtol=1e-5)


def test_masked_whiten_matches_manual_formula() -> None:
    gen = torch.Generator().manual_seed(3)
    x, mask = torch.randn(4, 6, generator=gen), torch.rand(4, 6, generator=gen) < 0.6
    out, mean, std = masked_whiten(x, mask, std="unbiased", eps=1e-8, eps_placement="rsqrt_var_eps")
    sel = x[mask]
    expected = (x - sel.mean()) * torch.rsqrt(sel.var(unbiased=True) + 1e-8) * mask
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert mean == pytest.approx(float(sel.mean()), abs=1e-6) and std == pytest.approx(float(sel.std()), abs=1e-6)


def test_reinforce_pp_without_critic() -> None:
    # No values: γ = 1 returns are reverse cumulative sums; score placed at the last valid step.
    mask = torch.tensor([[True, True, True], [True, True, False]])
    kl = torch.tensor([[-0.1, 0.0, -0.2], [0.0, -0.3, 0.0]])
    rollout = make_rollout(kl, None, mask, scores=torch.tensor([1.0, 0.0]))
    out = GAENormalizer(whiten=False, score_at_last_step=True)(rollout)
    torch.testing.assert_close(out.values, torch.tensor([[0.7, 0.8, 0.8], [-0.3, -0.3, 0.0]]), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------- properties


@settings(max_examples=30, deadline=None)
@given(
    rewards=st.lists(st.floats(-100, 100, width=32), min_size=12, max_size=12),
    values=st.lists(st.floats(-100, 100, width=32), min_size=12, max_size=12),
    lengths=st.lists(st.integers(0, 4), min_size=3, max_size=3),
    gamma=st.floats(0, 1),
    lam=st.floats(0, 1),
)
def test_whitened_output_is_finite_masked_and_centred(
    rewards: list[float], values: list[float], lengths: list[int], gamma: float, lam: float
) -> None:
    mask = torch.arange(4)[None] < torch.tensor(lengths)[:, None]
    r = torch.tensor(rewards).view(3, 4) * mask
    rollout = make_rollout(r, torch.tensor(values).view(3, 4), mask)
    out = GAENormalizer(gamma=gamma, lam=lam, std="population")(rollout)
    assert torch.isfinite(out.values).all() and torch.equal(out.values * ~mask, torch.zeros(3, 4))
    if int(mask.sum()) > 0:
        assert abs(float(out.values[mask].mean())) < 1e-3


def test_constant_advantages_whiten_to_exact_zeros() -> None:
    mask = torch.ones(3, 4, dtype=torch.bool)
    out = GAENormalizer(gamma=1.0, lam=0.0)(make_rollout(torch.full((3, 4), 0.3), torch.zeros(3, 4), mask))
    assert torch.equal(out.values, torch.zeros(3, 4))


# ---------------------------------------------------------------------------------------- robustness


def test_nan_score_rows_are_not_applicable() -> None:
    mask = torch.ones(3, 3, dtype=torch.bool)
    values = torch.full((3, 3), 0.5)
    scores = torch.tensor([1.0, float("nan"), 0.0])
    out = GAENormalizer(score_at_last_step=True)(make_rollout(None, values, mask, scores=scores))
    assert torch.equal(out.values[1], torch.zeros(3)) and out.metrics["normalizer/nan_rewards"] == 1.0
    assert out.returns is not None and torch.equal(out.returns[1], values[1])
    ref = GAENormalizer(score_at_last_step=True)(
        make_rollout(None, values[[0, 2]], mask[[0, 2]], scores=scores[[0, 2]])
    )
    torch.testing.assert_close(out.values[[0, 2]], ref.values)


def test_errors() -> None:
    mask = torch.ones(2, 3, dtype=torch.bool)
    bad = torch.zeros(2, 3)
    bad[1, 2] = math.inf
    with pytest.raises(ValueError, match=r"token_rewards is not finite.*rows \[1\]"):
        GAENormalizer()(make_rollout(bad, None, mask))
    with pytest.raises(ValueError, match=r"values is not finite.*rows \[1\]"):
        GAENormalizer()(make_rollout(torch.zeros(2, 3), bad, mask))
    with pytest.raises(ValueError, match="token_rewards"):
        GAENormalizer()(make_rollout(None, None, mask))
    with pytest.raises(ValueError, match=r"rows \[0\]"):
        GAENormalizer(score_at_last_step=True)(make_rollout(None, None, mask, scores=torch.tensor([math.inf, 0.0])))
    with pytest.raises(ValueError, match="mask_key"):
        GAENormalizer(mask_key="nope")(make_rollout(torch.zeros(2, 3), None, mask))
    with pytest.raises(ValueError, match="gamma"):
        GAENormalizer(gamma=1.5)
    with pytest.raises(ValueError, match="eps_placement"):
        GAENormalizer(eps_placement="inside")  # type: ignore[arg-type]


def test_bf16_inputs_and_clip() -> None:
    rollout = p3_rollout()
    assert rollout.token_rewards is not None and rollout.values is not None
    ref = GAENormalizer()(p3_rollout())
    rollout.token_rewards = rollout.token_rewards.bfloat16()
    rollout.values = rollout.values.bfloat16()
    out = GAENormalizer(clip=1.0)(rollout)
    assert out.values.dtype == torch.float32 and float(out.values.abs().max()) <= 1.0
    torch.testing.assert_close(out.values, ref.values.clamp(-1, 1), atol=2e-2, rtol=0)
    assert isinstance(GAENormalizer(), Normalizer)
