"""Flow-matching SDE math: docs/methods/pref_grpo.md P3 (Flow-GRPO step), P4 (DanceGRPO step), P8 (trained steps), the σ
= 1
guard, log-prob reduction over latent dims, the shifted grid, the Gaussian KL and loop-vs-batched equivalence."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modalities.text_to_image.sde import (
    dance_grpo_step,
    flow_grpo_step,
    gaussian_kl,
    gaussian_log_prob,
    num_trained_steps,
    sd3_time_shift,
    sde_step,
    sigma_schedule,
    trained_steps,
)

ATOL = 1e-5


def scalar(value: float) -> torch.Tensor:
    return torch.tensor([[value]])  # [N=1, 1 latent dim]


def test_p3_flow_grpo_step() -> None:
    out = flow_grpo_step(
        scalar(1.0), scalar(0.5), 0.5, 0.4, eta=0.7, sigma_guard=0.9, prev_sample=scalar(0.9), reduce="mean"
    )
    assert out.mean.item() == pytest.approx(0.88875, abs=ATOL)
    assert out.std.item() == pytest.approx(0.221359, abs=ATOL)
    assert out.log_prob.item() == pytest.approx(0.587738, abs=ATOL)
    torch.testing.assert_close(out.prev_sample, scalar(0.9))


def test_p3_first_step_guard_and_grid() -> None:
    grid = sigma_schedule(25, shift=3.0)
    assert grid.shape == (26,)
    expected_head = torch.tensor([1.0, 0.986301, 0.971831, 0.956522])
    torch.testing.assert_close(grid[:4], expected_head, atol=ATOL, rtol=0)
    torch.testing.assert_close(grid[-3:], torch.tensor([0.206897, 0.111111, 0.0]), atol=ATOL, rtol=0)
    assert sd3_time_shift(3.0, 0.5).item() == pytest.approx(0.75, abs=ATOL)
    sigma_1 = float(grid[1])
    out = flow_grpo_step(scalar(0.3), scalar(-0.2), 1.0, sigma_1, eta=0.7, sigma_guard=sigma_1, noise=scalar(0.0))
    assert out.std.item() == pytest.approx(0.7, abs=ATOL)  # noise scale at the first step is exactly eta
    # In exact arithmetic sigma_1 = 72/73 and s_0 = 0.7 * sqrt(73); the fp32 grid value shifts s_0 by 1.5e-5.
    assert 0.7 / math.sqrt(1 - 72 / 73) == pytest.approx(5.980803, abs=ATOL)
    assert 0.7 / math.sqrt(1 - sigma_1) == pytest.approx(5.980803, abs=1e-4)
    assert torch.isfinite(out.log_prob).all() and torch.isfinite(out.mean).all()
    # Without the guard sigma / (1 - sigma) would divide by zero.
    unguarded = flow_grpo_step(scalar(0.3), scalar(-0.2), 1.0, sigma_1, eta=0.7, sigma_guard=1.0, noise=scalar(0.0))
    assert not torch.isfinite(unguarded.std).all()


def test_p4_dance_grpo_step() -> None:
    ode = dance_grpo_step(scalar(1.0), scalar(0.5), 0.5, 0.4, eta=0.0, noise=scalar(0.0))
    assert ode.mean.item() == pytest.approx(0.95, abs=ATOL)
    out = dance_grpo_step(scalar(1.0), scalar(0.5), 0.5, 0.4, eta=0.3, prev_sample=scalar(0.9))
    assert out.mean.item() == pytest.approx(0.93875, abs=ATOL)
    assert out.std.item() == pytest.approx(0.094868, abs=ATOL)
    expected = -((0.9 - 0.93875) ** 2) / (2 * 0.094868**2) - math.log(0.094868) - 0.5 * math.log(2 * math.pi)
    assert out.log_prob.item() == pytest.approx(expected, abs=1e-4)


def test_p8_trained_steps_count_and_fresh_permutations() -> None:
    assert num_trained_steps(25, ignore_last=True, train_step_fraction=0.6) == 14
    assert 1 / (4 * num_trained_steps(25, True, 0.6)) == pytest.approx(1 / 56)
    steps = trained_steps(25, True, 0.6, torch.Generator().manual_seed(0), num_samples=8)
    assert steps.shape == (8, 14) and steps.dtype == torch.long
    assert int(steps.max()) <= 23 and int(steps.min()) >= 0  # the last transition (index 24) is never trained
    assert all(len(set(row.tolist())) == 14 for row in steps)
    assert len({tuple(row.tolist()) for row in steps}) > 1, "each sample draws its own permutation"
    full = trained_steps(10, False, 1.0, torch.Generator().manual_seed(0), num_samples=2)
    assert torch.equal(full, torch.arange(10).expand(2, 10))
    with pytest.raises(ValueError, match="train_step_fraction"):
        num_trained_steps(25, True, 0.01)
    with pytest.raises(ValueError, match="train_step_fraction"):
        num_trained_steps(25, True, 1.5)


def test_log_prob_is_mean_over_latent_dims() -> None:
    gen = torch.Generator().manual_seed(0)
    x, v, x_next = (torch.randn(3, 4, 2, 2, generator=gen) for _ in range(3))
    sigma = torch.tensor([0.9, 0.5, 0.3])
    mean_out = flow_grpo_step(x, v, sigma, sigma - 0.1, 0.7, 0.95, prev_sample=x_next, reduce="mean")
    sum_out = flow_grpo_step(x, v, sigma, sigma - 0.1, 0.7, 0.95, prev_sample=x_next, reduce="sum")
    torch.testing.assert_close(sum_out.log_prob, mean_out.log_prob * 16)
    for row in range(3):  # vectorised == a per-element loop on one row
        std = float(mean_out.std[row])
        terms = [
            -((a - m) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
            for a, m in zip(x_next[row].flatten().tolist(), mean_out.mean[row].flatten().tolist(), strict=True)
        ]
        assert mean_out.log_prob[row].item() == pytest.approx(sum(terms) / len(terms), abs=1e-4)


def test_batched_rows_equal_one_row_at_a_time() -> None:
    gen = torch.Generator().manual_seed(1)
    x, v, x_next = (torch.randn(4, 6, generator=gen) for _ in range(3))
    sigma = torch.tensor([1.0, 0.8, 0.5, 0.2])
    for mode in ("flow", "dance"):
        batched = sde_step(mode, x, v, sigma, sigma - 0.1, 0.7, 0.97, prev_sample=x_next)
        for i in range(4):
            one = sde_step(
                mode,
                x[i : i + 1],
                v[i : i + 1],
                float(sigma[i]),
                float(sigma[i]) - 0.1,
                0.7,
                0.97,
                prev_sample=x_next[i : i + 1],
            )
            torch.testing.assert_close(one.log_prob, batched.log_prob[i : i + 1])
            torch.testing.assert_close(one.mean, batched.mean[i : i + 1])


def test_sampled_and_rescored_log_probs_agree_and_bf16_inputs_use_fp32() -> None:
    gen = torch.Generator().manual_seed(2)
    x, v = torch.randn(2, 8, generator=gen), torch.randn(2, 8, generator=gen)
    sampled = flow_grpo_step(x, v, 0.6, 0.5, 0.7, 0.95, generator=torch.Generator().manual_seed(3))
    rescored = flow_grpo_step(x, v, 0.6, 0.5, 0.7, 0.95, prev_sample=sampled.prev_sample)
    torch.testing.assert_close(sampled.log_prob, rescored.log_prob)
    half = flow_grpo_step(x.bfloat16(), v.bfloat16(), 0.6, 0.5, 0.7, 0.95, prev_sample=sampled.prev_sample)
    assert half.log_prob.dtype == torch.float32 and half.mean.dtype == torch.float32
    with pytest.raises(ValueError, match="at most one"):
        flow_grpo_step(x, v, 0.6, 0.5, 0.7, 0.95, noise=x, prev_sample=x)
    with pytest.raises(ValueError, match="step_mode"):
        sde_step("ode", x, v, 0.6, 0.5, 0.7, 0.95)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reduce"):
        gaussian_log_prob(x, x, torch.ones(2, 1), reduce="max")  # type: ignore[arg-type]


def test_gaussian_kl_closed_form() -> None:
    mean, ref = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    assert gaussian_kl(mean, ref, 0.5).item() == pytest.approx((1 + 4) / 2 / (2 * 0.25))
    assert gaussian_kl(mean, ref, 0.5, reduce="sum").item() == pytest.approx(5 / (2 * 0.25))


def test_scheduler_sigmas() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    sigmas = sigma_schedule(10, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert sigmas.shape == (11,) and sigmas[-1] == 0 and bool((sigmas[:-1] > sigmas[1:]).all())


@settings(deadline=None, max_examples=30)
@given(
    sigma=st.floats(0.05, 0.99),
    frac=st.floats(0.05, 0.9),
    eta=st.floats(0.1, 1.0),
    mode=st.sampled_from(["flow", "dance"]),
)
def test_log_prob_peaks_at_the_mean(sigma: float, frac: float, eta: float, mode: str) -> None:
    """Property: the mean is the most likely next sample and the std is positive and finite."""
    sigma_next = sigma * (1 - frac)
    x, v = torch.tensor([[0.3, -0.2]]), torch.tensor([[0.1, 0.4]])
    out = sde_step(mode, x, v, sigma, sigma_next, eta, 0.99)  # type: ignore[arg-type]
    at_mean = sde_step(mode, x, v, sigma, sigma_next, eta, 0.99, prev_sample=out.mean)  # type: ignore[arg-type]
    assert bool(torch.isfinite(out.std).all()) and float(out.std) > 0
    assert float(at_mean.log_prob) >= float(out.log_prob) - 1e-6
