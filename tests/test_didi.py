"""DiDi-Instruct: spec oracles E3–E8, discriminator gradients, RGAS invariants, the policy/sampler contract,
a tiny end-to-end training step through the generic Trainer and checkpoint resume (spec didi_instruct.md)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modalities.diffusion_lm.discriminator import (
    discriminator_log_odds,
    discriminator_loss,
    linear_warmup_decay,
    sequence_reward,
    smoothed_bce,
)
from modalities.diffusion_lm.evaluation import first_eos_valid_mask, generative_perplexity_from_nll, unigram_entropy
from modalities.diffusion_lm.rgas import rerank_probs, rgas_schedule, tilt_logits
from modalities.diffusion_lm.schedules import LogLinearSchedule
from modalities.diffusion_lm.time_weighting import beta_density, omega_weight, time_weights
from toolkit.normalizers import group_normalized_advantages

ATOL = 1e-5


# ------------------------------------------------------------------------------------------ E3 ω(τ)
def test_e3_omega_oracle() -> None:
    alpha = LogLinearSchedule(eps=1e-3).alpha
    tau = torch.tensor([0.5, 0.2, 0.05, 0.02, 0.98])
    w = omega_weight(tau, alpha, clamp_min=0.1, clamp_max=10.0, fd_step=1e-4, difference="forward")
    torch.testing.assert_close(w, torch.tensor([2.0, 5.0, 10.0, 10.0, 1.0204082]), atol=ATOL, rtol=0)
    central = omega_weight(tau, alpha, clamp_min=0.1, clamp_max=10.0, fd_step=1e-4, difference="central")
    torch.testing.assert_close(central, w, atol=ATOL, rtol=0)


def test_e3_unclamped_is_one_over_tau() -> None:
    alpha = LogLinearSchedule(eps=1e-3).alpha
    tau = torch.tensor([0.05, 0.02])
    w = omega_weight(tau, alpha, clamp_min=1e-9, clamp_max=1e9, fd_step=1e-4, difference="forward")
    torch.testing.assert_close(w, torch.tensor([20.0, 50.0]), atol=1e-4, rtol=0)


def test_importance_divides_by_density() -> None:
    alpha = LogLinearSchedule(eps=1e-3).alpha
    tau = torch.tensor([0.5, 0.25])
    density = beta_density(tau, 2.0, 2.0)
    torch.testing.assert_close(density, torch.tensor([1.5, 1.125], dtype=torch.float64), atol=1e-12, rtol=0)
    w = time_weights(tau, alpha, weight="omega", importance=True, density=density)
    torch.testing.assert_close(w, torch.tensor([2.0 / 1.5, 4.0 / 1.125]), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="density"):
        time_weights(tau, alpha, importance=True, density=None)
    with pytest.raises(ValueError, match="weight="):
        time_weights(tau, alpha, weight="bogus")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ E4 reward
def test_e4_reward_oracle() -> None:
    logits = torch.tensor([[2.0, -1.0, 10.0, 0.5]])
    mask = torch.tensor([[True, True, True, False]])
    odds = discriminator_log_odds(logits, eps=1e-6, clip=8.0)
    torch.testing.assert_close(odds, torch.tensor([[1.999993, -0.999998, 8.0, 0.5]]), atol=ATOL, rtol=0)
    r = sequence_reward(logits, mask, eps=1e-6, clip=8.0)
    torch.testing.assert_close(r, torch.tensor([2.999998]), atol=ATOL, rtol=0)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-20, 20), min_size=2, max_size=8), st.integers(0, 2**31 - 1))
def test_reward_masking_and_clamp_properties(values: list[float], seed: int) -> None:
    logits = torch.tensor([values])
    mask = torch.rand(logits.shape, generator=torch.Generator().manual_seed(seed)) < 0.5
    mask[0, 0] = True
    r = sequence_reward(logits, mask, clip=8.0)
    assert -8.0 - ATOL <= float(r) <= 8.0 + ATOL
    changed = torch.where(mask, logits, logits + 100.0)  # unmasked positions must not matter
    torch.testing.assert_close(sequence_reward(changed, mask, clip=8.0), r)
    loop = sum(float(discriminator_log_odds(logits[:, i : i + 1])) for i in range(len(values)) if mask[0, i])
    assert abs(float(r) - loop / int(mask.sum())) < 1e-4


# ------------------------------------------------------------------------------------------ E5 group normalization
@pytest.mark.parametrize(
    ("rewards", "expected"),
    [
        ([0.5, -0.2, 1.3, 0.1], [0.115385, -0.961538, 1.346154, -0.5]),
        ([5.0, 0.0, 0.0, 0.0], [1.5, -0.5, -0.5, -0.5]),
        ([0.7, 0.7, 0.7, 0.7], [0.0, 0.0, 0.0, 0.0]),
    ],
)
def test_e5_group_normalization_oracle(rewards: list[float], expected: list[float]) -> None:
    adv, _ = group_normalized_advantages(
        torch.tensor(rewards), torch.zeros(4, dtype=torch.long), std="unbiased", eps=1e-8, eps_placement="std_plus_eps"
    )
    torch.testing.assert_close(adv.clamp(-3, 3), torch.tensor(expected), atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------ E6 BCE
def test_e6_smoothed_bce_oracle() -> None:
    one = torch.ones(1, 1, dtype=torch.bool)
    real = smoothed_bce(torch.tensor([[2.0]]), 0.9, one)
    fake = smoothed_bce(torch.tensor([[-1.0]]), 0.1, one)
    assert abs(float(real) - 0.326928) < ATOL and abs(float(fake) - 0.413262) < ATOL
    loss = discriminator_loss(torch.tensor([[2.0, 50.0]]), torch.tensor([[True, False]]), torch.tensor([[-1.0]]), one)
    assert abs(float(loss) - 0.5 * (0.326928 + 0.413262)) < ATOL  # the unmasked real position is ignored


def test_lr_schedule_warmup_then_linear_decay() -> None:
    lrs = [linear_warmup_decay(s, warmup_steps=2, total_steps=6, lr=1.0, min_lr=0.0) for s in range(7)]
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0])


# ------------------------------------------------------------------------------------------ E7 RGAS schedule
def test_e7_rgas_schedule_oracle() -> None:
    plan = rgas_schedule(8, rerank_ratio=0.5, h_start=30.0, h_end=40.0, reranker="released")
    assert plan.num_tilt_steps == 4
    assert plan.guidance[:4] == pytest.approx([30.0, 33.333333, 36.666667, 40.0], abs=ATOL)
    expected = [1, 0.875001, 0.750003, 0.625004, 0.500005, 0.375006, 0.250007, 0.125009, 1e-5]
    torch.testing.assert_close(plan.timesteps.float(), torch.tensor(expected), atol=ATOL, rtol=0)
    assert abs(plan.dt - 0.12499875) < 1e-9
    dev = rgas_schedule(8, rerank_ratio=0.5, h_start=30.0, h_end=40.0, reranker="dev")
    assert dev.guidance[0] == 30.0 and dev.guidance[-1] == pytest.approx(40.0)


def test_e7_rerank_and_tilt_oracles() -> None:
    probs = rerank_probs(torch.tensor([[1.0, 2.0, 0.5, -1.0]]), reranker="released")
    torch.testing.assert_close(probs, torch.tensor([[0.224208, 0.609460, 0.135989, 0.030343]]), atol=ATOL, rtol=0)
    dev = rerank_probs(torch.tensor([[1.0, 2.0]]), h=2.0, reranker="dev")
    torch.testing.assert_close(dev, torch.softmax(torch.tensor([[2.0, 4.0]]), -1))
    tilted = tilt_logits(
        torch.tensor([[[2.0, 1.0, 0.0, -1.0]]]), torch.tensor([[[0.5, -2.0, 0.1, 0.0]]]), torch.tensor([[True]]), 30.0
    )
    torch.testing.assert_close(tilted, torch.tensor([[[17.0, -29.0, 3.0, -1.0]]]), atol=ATOL, rtol=0)
    untouched = tilt_logits(torch.zeros(1, 1, 4), torch.ones(1, 1, 4), torch.tensor([[False]]), 30.0)
    assert torch.all(untouched == 0)


# ------------------------------------------------------------------------------------------ E8 metrics
def test_e8_entropy_and_perplexity_oracles() -> None:
    ent = unigram_entropy(torch.tensor([[1, 1, 2, 3]]))
    assert abs(float(ent[0]) - 1.039721) < ATOL
    nll = torch.tensor([[2.0, 3.0, 1.0], [4.0, 0.5, math.nan]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    assert abs(generative_perplexity_from_nll(nll, valid) - 8.166170) < ATOL


def test_first_eos_counted_later_eos_not() -> None:
    targets = torch.tensor([[5, 0, 0, 0], [5, 6, 7, 8]])
    valid = first_eos_valid_mask(targets, eos_id=0)
    assert valid.tolist() == [[True, True, False, False], [True, True, True, True]]
