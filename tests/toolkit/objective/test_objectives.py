"""Tests for the GRPO-family objective (`toolkit.objective.policy_objective`) and the KL estimators
(`toolkit.objective.kl`).

Spec oracles: docs/methods/pref_grpo.md P5 (clipped loss) and P8 (1/(4·14) loss scale), docs/methods/medgrpo.md §6
(clip-higher
0.2/0.3, token mean), docs/methods/dler.md §4 / docs/methods/bnpo.md §8 (clip-higher + dual clip 10,
seq-mean-token-sum),
docs/methods/ppr.md §6 (clipped value loss), docs/methods/dler.md §8 (k2 = ½ Δ²), docs/methods/pref_grpo.md §4 (Gaussian
mean KL),
docs/methods/didi_instruct.md §11 (REINFORCE policy term). The spec files give formulas, not numbers, for all but
P5 and P8; the numbers below are hand-computed from those formulas.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit.config import ConfigError, instantiate, validate
from toolkit.objective.kl import gaussian_mean_kl, kl_estimate, kl_k1, kl_k2, kl_k3
from toolkit.objective.policy_objective import (
    PolicyObjective,
    aggregate_loss,
    loss_denominators,
    value_loss,
)
from toolkit.objective.terms import CISPOTerm, ClipTerm, PolicyTerm, PolicyTermOutput, SAPOTerm, ppo_clip_loss

ATOL = 1e-5
FAST = settings(max_examples=25, deadline=None)


def _inputs(ratios: list[list[float]], logprobs: list[list[float]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs leaf with grad, old_logprobs) such that exp(logprobs − old) = ratios."""
    r = torch.tensor(ratios, dtype=torch.float64)
    lp = torch.full_like(r, -1.0) if logprobs is None else torch.tensor(logprobs, dtype=torch.float64)
    old = (lp - r.log()).float()
    return lp.float().requires_grad_(True), old


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------------------- spec oracles


@pytest.mark.parametrize(("adv", "expected", "grad"), [(1.5, -1.50015, 0.0), (-1.5, 1.5015, 1.5015)])
def test_pref_grpo_p5_clipped_loss(adv: float, expected: float, grad: float) -> None:
    """docs/methods/pref_grpo.md P5: ε = 1e-4, ρ = 1.001; A = 1.5 clipped (no gradient), A = −1.5 unclipped."""
    lp, old = _inputs([[1.001]])
    obj = PolicyObjective(term=ClipTerm(clip_low=1e-4, clip_high=1e-4), aggregation="token_mean")
    out = obj(lp, old, torch.tensor([adv]), torch.ones(1, 1, dtype=torch.bool))
    assert out.loss.item() == pytest.approx(expected, abs=ATOL)
    out.loss.backward()
    assert lp.grad is not None
    assert lp.grad.item() == pytest.approx(grad, abs=ATOL)  # dℓ/dlogπ = −A·ρ when unclipped
    assert out.metrics["policy/clip_frac"] == (1.0 if adv > 0 else 0.0)


def test_pref_grpo_p8_loss_scale_over_accumulation() -> None:
    """docs/methods/pref_grpo.md P8: 4 samples × 14 trained transitions, each transition's loss scaled by 1/(4·14)."""
    torch.manual_seed(0)
    lp = (torch.randn(4, 14) * 0.1).requires_grad_(True)
    old = lp.detach() + torch.randn(4, 14) * 1e-4
    adv = torch.randn(4)
    obj = PolicyObjective(term=ClipTerm(clip_low=1e-4, clip_high=1e-4), aggregation="token_mean")
    mask = torch.ones(1, 14, dtype=torch.bool)
    losses = [obj(lp[i : i + 1], old[i : i + 1], adv[i : i + 1], mask, num_tokens=56.0).loss for i in range(4)]
    total = torch.stack(losses).sum()
    ratio = (lp - old).exp()
    per_step = torch.maximum(-adv[:, None] * ratio, -adv[:, None] * ratio.clamp(1 - 1e-4, 1 + 1e-4))
    assert float(total.detach()) == pytest.approx(float(per_step.detach().sum() / (4 * 14)), abs=ATOL)


def test_medgrpo_clip_higher_token_mean() -> None:
    """docs/methods/medgrpo.md §6: J = (1/Σ|o_i|) ΣΣ min(ρA, clip(ρ, 0.8, 1.3)A); hand-computed: loss = −2.45/4."""
    lp, old = _inputs([[1.25, 1.4, 0.7], [0.7, 1.0, 1.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    adv = torch.tensor([1.0, -1.0])
    out = PolicyObjective(term=ClipTerm(clip_low=0.2, clip_high=0.3), aggregation="token_mean")(lp, old, adv, mask)
    assert out.loss.item() == pytest.approx(-0.6125, abs=ATOL)
    assert out.metrics["policy/clip_frac"] == pytest.approx(0.5)
    assert out.metrics["policy/clip_frac_high"] == pytest.approx(0.25)
    assert out.metrics["policy/clip_frac_low"] == pytest.approx(0.25)
    symmetric_objective = PolicyObjective(term=ClipTerm(clip_low=0.2, clip_high=0.2), aggregation="token_mean")
    symmetric = symmetric_objective(lp, old, adv, mask)
    assert symmetric.loss.item() == pytest.approx(-0.575, abs=ATOL)  # 1.25 is clipped at 1.2 instead


def test_dler_bnpo_dual_clip_seq_mean_token_sum() -> None:
    """docs/methods/dler.md §4 / docs/methods/bnpo.md §8: ε 0.2/0.28, c = 10, seq-mean-token-sum; hand-computed loss
    (11.5 − 5.56)/2."""
    lp, old = _inputs([[12.0, 1.5, 1.0], [1.5, 0.5, 1.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    obj = PolicyObjective(term=ClipTerm(clip_low=0.2, clip_high=0.28, dual_clip=10.0), aggregation="seq_mean_token_sum")
    out = obj(lp, old, torch.tensor([-1.0, 2.0]), mask)
    assert out.loss.item() == pytest.approx(2.97, abs=ATOL)
    assert out.metrics["policy/dual_clip_frac"] == pytest.approx(0.2)
    assert out.metrics["policy/clip_frac_high"] == pytest.approx(0.2)
    assert out.metrics["policy/clip_frac_low"] == pytest.approx(0.0)
    out.loss.backward()
    assert lp.grad is not None
    expected = torch.tensor([[0.0, 0.75, 0.0], [0.0, -0.5, -1.0]])  # −A·ρ / 2 rows; clipped → 0
    torch.testing.assert_close(lp.grad, expected, atol=ATOL, rtol=0)
    no_dual = PolicyObjective(term=ClipTerm(clip_low=0.2, clip_high=0.28), aggregation="seq_mean_token_sum")(
        lp, old, torch.tensor([-1.0, 2.0]), mask
    )
    assert no_dual.loss.item() == pytest.approx((13.5 - 5.56) / 2, abs=ATOL)


def test_ppr_value_loss_clipped() -> None:
    """docs/methods/ppr.md §6 (verl value loss, clip 0.5): ½·token_mean(max((V−R)², (V_old + clip(V−V_old) − R)²))."""
    values = torch.tensor([[1.0, 3.0, 0.0]], requires_grad=True)
    old = torch.tensor([[0.2, 1.0, 5.0]])
    returns = torch.tensor([[0.0, 2.9, -7.0]])
    mask = torch.tensor([[True, True, False]])
    out = value_loss(values, old, returns, mask, value_clip=0.5, aggregation="token_mean")
    assert out.loss.item() == pytest.approx(0.74, abs=ATOL)  # ½·(1 + 1.96)/2
    assert out.metrics["value/clip_frac"] == pytest.approx(0.5)
    out.loss.backward()
    assert values.grad is not None
    torch.testing.assert_close(values.grad, torch.tensor([[0.5, 0.0, 0.0]]), atol=ATOL, rtol=0)
    unclipped = value_loss(values, old, returns, mask, value_clip=None, aggregation="token_mean")
    assert unclipped.loss.item() == pytest.approx(0.2525, abs=ATOL)  # ½·(1 + 0.01)/2


def test_kl_estimators_values() -> None:
    """docs/methods/dler.md §8 k2 = ½(logπ − logπ_ref)²; k1 = Δ; k3 = e^{−Δ} − 1 + Δ (Δ = logπ − logπ_ref = 0.5)."""
    lp, ref = torch.tensor([[-1.0]]), torch.tensor([[-1.5]])
    assert kl_k1(lp, ref).item() == pytest.approx(0.5, abs=ATOL)
    assert kl_k2(lp, ref).item() == pytest.approx(0.125, abs=ATOL)
    assert kl_k3(lp, ref).item() == pytest.approx(math.exp(-0.5) - 1 + 0.5, abs=ATOL)
    for alias, canonical in (("kl", kl_k1), ("mse", kl_k2), ("low_var_kl", kl_k3)):
        torch.testing.assert_close(kl_estimate(lp, ref, alias), canonical(lp, ref))  # type: ignore[arg-type]


def test_k3_clamped_like_verl() -> None:
    """low_var_kl: log-ratio clamped to ±20, value to [−10, 10]."""
    lp = torch.tensor([[0.0, -30.0, 0.0]])
    ref = torch.tensor([[-30.0, 0.0, -3.0]])
    k3 = kl_k3(lp, ref)
    assert k3[0, 0].item() == pytest.approx(10.0)  # 19 → 10
    assert k3[0, 1].item() == pytest.approx(10.0)  # e^20 − 21 → 10
    assert k3[0, 2].item() == pytest.approx(math.exp(-3) - 1 + 3, abs=ATOL)
    assert kl_k3(lp, ref, value_clamp=None)[0, 0].item() == pytest.approx(math.exp(-20) - 1 + 20, abs=1e-4)


def test_gaussian_mean_kl_flow_grpo() -> None:
    """docs/methods/pref_grpo.md §4 / Flow-GRPO: ‖μ − μ_ref‖² / (2σ²), squared distance averaged over latent dims."""
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    ref = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(gaussian_mean_kl(mean, ref, 0.5), torch.tensor([5.0, 1.0]))
    torch.testing.assert_close(gaussian_mean_kl(mean, ref, 0.5, reduce="sum"), torch.tensor([10.0, 2.0]))
    per_row = gaussian_mean_kl(mean, ref, torch.tensor([[[0.5]], [[1.0]]]))
    torch.testing.assert_close(per_row, torch.tensor([5.0, 0.25]))
    with pytest.raises(ValueError, match="std"):
        gaussian_mean_kl(mean, ref, torch.ones(3))


def test_didi_reinforce_gradient_equals_on_policy_clip() -> None:
    """docs/methods/didi_instruct.md §11: loss_pg = −mean(w·A·log q); same gradient as the clip term at ratio 1, T =
    1."""
    torch.manual_seed(1)
    logq = torch.randn(6, requires_grad=True)
    weighted_adv = torch.rand(6) * torch.randn(6)
    (-(weighted_adv * logq).mean()).backward()
    assert logq.grad is not None
    reference = logq.grad.clone()
    logq.grad = None
    lp = logq.unsqueeze(-1)
    out = PolicyObjective(aggregation="token_mean")(lp, lp.detach(), weighted_adv, torch.ones(6, 1, dtype=torch.bool))
    out.loss.backward()
    torch.testing.assert_close(logq.grad, reference, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------- 2×3 toy: aggregations, terms

TOY_MASK = torch.tensor([[True, True, False], [True, False, False]])
TOY_RATIOS = [[1.5, 0.5, 1.0], [0.9, 1.0, 1.0]]
TOY_LOGPROBS = [[-1.0, -2.0, -3.0], [-0.5, -1.0, -1.0]]
TOY_ADV = torch.tensor([1.0, -1.0])


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [
        ("token_mean", 7 / 3),
        ("seq_mean_token_mean", 2.75),
        ("seq_mean_token_sum", 3.5),
        ("seq_mean_token_sum_norm", 0.875),
    ],
)
def test_aggregation_toy(aggregation: str, expected: float) -> None:
    values = torch.tensor([[1.0, 2.0, 99.0], [4.0, 99.0, 99.0]])
    got = aggregate_loss(values, TOY_MASK, aggregation, norm_length=4.0)  # type: ignore[arg-type]
    assert got.item() == pytest.approx(expected, abs=ATOL)


@pytest.mark.parametrize(
    ("aggregation", "scale"),
    [
        ("token_mean", 1 / 3),
        ("seq_mean_token_mean", None),
        ("seq_mean_token_sum", 0.5),
        ("seq_mean_token_sum_norm", 1 / 8),
    ],
)
def test_policy_objective_aggregation_toy(aggregation: str, scale: float | None) -> None:
    """The clip losses [[−1.2, −0.5], [0.9]] reduced by each mode (norm_length 4)."""
    lp, old = _inputs(TOY_RATIOS, TOY_LOGPROBS)
    obj = PolicyObjective(aggregation=aggregation, norm_length=4.0)  # type: ignore[arg-type]
    out = obj(lp, old, TOY_ADV, TOY_MASK)
    expected = (-1.7 / 2 + 0.9) / 2 if scale is None else (-1.7 + 0.9) * scale
    assert out.loss.item() == pytest.approx(expected, abs=ATOL)


def test_toy_clip_term() -> None:
    lp, old = _inputs(TOY_RATIOS, TOY_LOGPROBS)
    out = PolicyObjective(term=ClipTerm(clip_low=0.2, clip_high=0.2))(lp, old, TOY_ADV, TOY_MASK)
    assert out.loss.item() == pytest.approx(-0.8 / 3, abs=ATOL)
    out.loss.backward()
    assert lp.grad is not None
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, -0.5, 0.0], [0.9, 0.0, 0.0]]) / 3, atol=ATOL, rtol=0)


def test_toy_cispo_term() -> None:
    """CISPO: −sg(min(ρ, 1.28))·A·logπ, no lower bound: (1.28 + 1.0 − 0.45)/3."""
    lp, old = _inputs(TOY_RATIOS, TOY_LOGPROBS)
    out = PolicyObjective(term=CISPOTerm(clip_high=0.28))(lp, old, TOY_ADV, TOY_MASK)
    assert out.loss.item() == pytest.approx(1.83 / 3, abs=ATOL)
    assert out.metrics["policy/clip_frac_high"] == pytest.approx(1 / 3)
    out.loss.backward()
    assert lp.grad is not None
    torch.testing.assert_close(lp.grad, torch.tensor([[-1.28, -0.5, 0.0], [0.9, 0.0, 0.0]]) / 3, atol=ATOL, rtol=0)
    low = PolicyObjective(term=CISPOTerm(clip_low=0.2, clip_high=0.28))(lp, old, TOY_ADV, TOY_MASK)
    assert low.loss.item() == pytest.approx((1.28 + 1.6 - 0.45) / 3, abs=ATOL)  # 0.5 → 0.8


def test_toy_sapo_term() -> None:
    """SAPO: −(4/τ)σ(τ(ρ − 1))·A, τ = 1 (A > 0) / 1.05 (A < 0); gradient −A·4σ(1 − σ)·ρ."""
    lp, old = _inputs(TOY_RATIOS, TOY_LOGPROBS)
    out = PolicyObjective(term=SAPOTerm(tau_pos=1.0, tau_neg=1.05))(lp, old, TOY_ADV, TOY_MASK)
    cells = [(1.5, 1.0, 1.0), (0.5, 1.0, 1.0), (0.9, -1.0, 1.05)]
    losses = [-(4 / tau) * _sigmoid(tau * (r - 1)) * a for r, a, tau in cells]
    grads = [-a * 4 * _sigmoid(tau * (r - 1)) * (1 - _sigmoid(tau * (r - 1))) * r / 3 for r, a, tau in cells]
    assert out.loss.item() == pytest.approx(sum(losses) / 3, abs=ATOL)
    assert out.metrics["policy/clip_frac"] == 0.0
    out.loss.backward()
    assert lp.grad is not None
    expected = torch.tensor([[grads[0], grads[1], 0.0], [grads[2], 0.0, 0.0]])
    torch.testing.assert_close(lp.grad, expected, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------- properties

finite = st.floats(-3.0, 3.0, allow_nan=False, width=32)


@st.composite
def batches(draw: st.DrawFn, max_n: int = 5, max_t: int = 6) -> tuple[torch.Tensor, ...]:
    n, t = draw(st.integers(1, max_n)), draw(st.integers(1, max_t))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(n, t, generator=g) * 3
    old = lp + torch.randn(n, t, generator=g) * draw(st.sampled_from([0.0, 0.05, 0.5]))
    adv = torch.randn(n, generator=g) if draw(st.booleans()) else torch.randn(n, t, generator=g)
    mask = torch.rand(n, t, generator=g) < draw(st.floats(0.0, 1.0))
    return lp, old, adv, mask


objectives = st.builds(
    PolicyObjective,
    term=st.builds(
        ClipTerm,
        clip_low=st.sampled_from([0.1, 0.2]),
        clip_high=st.sampled_from([0.2, 0.28]),
        dual_clip=st.sampled_from([None, 3.0]),
    ),
    ratio_level=st.sampled_from(["token", "sequence"]),
    aggregation=st.sampled_from(["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]),
    norm_length=st.just(6.0),
)


@FAST
@given(batches(), objectives)
def test_on_policy_clip_is_inactive(batch: tuple[torch.Tensor, ...], obj: PolicyObjective) -> None:
    lp, _, adv, mask = batch
    out = obj(lp, lp.clone(), adv, mask)
    adv_full = adv.unsqueeze(-1).expand_as(lp) if adv.dim() == 1 else adv
    unclipped = aggregate_loss(-adv_full, mask, obj.aggregation, norm_length=obj.norm_length)
    assert out.loss.item() == pytest.approx(unclipped.item(), abs=ATOL)
    assert out.metrics["policy/clip_frac"] == 0.0
    assert out.metrics["policy/dual_clip_frac"] == 0.0
    assert out.metrics["policy/ratio_mean"] == pytest.approx(1.0 if mask.any() else 0.0, abs=1e-6)


@FAST
@given(batches(), objectives, st.sampled_from(["clip", "cispo", "sapo"]))
def test_masked_steps_get_zero_gradient(batch: tuple[torch.Tensor, ...], obj: PolicyObjective, term: str) -> None:
    lp, old, adv, mask = batch
    obj.term = {"clip": obj.term, "cispo": CISPOTerm(), "sapo": SAPOTerm()}[term]
    obj.kl_coef, obj.entropy_coef = 0.1, 0.01
    garbage = torch.where(mask, lp, torch.full_like(lp, float("nan"))).requires_grad_(True)
    ref = torch.where(mask, old, torch.full_like(lp, float("-inf")))
    entropy = torch.where(mask, torch.rand_like(lp), torch.full_like(lp, float("inf")))
    out = obj(garbage, torch.where(mask, old, 0.0), adv, mask, ref_logprobs=ref, entropy=entropy)
    out.loss.backward()
    assert garbage.grad is not None
    assert torch.isfinite(out.loss)
    assert torch.all(garbage.grad[~mask] == 0)
    assert torch.isfinite(garbage.grad).all()


@FAST
@given(batches(max_n=6), objectives, st.integers(1, 5))
def test_global_denominators_make_accumulation_exact(
    batch: tuple[torch.Tensor, ...], obj: PolicyObjective, split: int
) -> None:
    lp, old, adv, mask = batch
    split = min(split, lp.shape[0] - 1) if lp.shape[0] > 1 else 0
    whole = obj(lp, old, adv, mask).loss
    num_tokens, num_seqs = (float(x) for x in loss_denominators(mask))
    parts = [slice(0, split), slice(split, None)]
    total = sum(obj(lp[s], old[s], adv[s], mask[s], num_tokens=num_tokens, num_seqs=num_seqs).loss for s in parts)
    assert float(total) == pytest.approx(float(whole), abs=ATOL)


@FAST
@given(st.integers(2, 8), st.integers(0, 2**31 - 1))
def test_kl_estimators_unbiased_and_signs(vocab: int, seed: int) -> None:
    """Σ_y π(y)·k1 = Σ_y π(y)·k3 = KL(π‖π_ref) ≥ 0; k2, k3 ≥ 0; all zero when π = π_ref."""
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(1, vocab, generator=g, dtype=torch.float64), -1)
    ref = torch.log_softmax(torch.randn(1, vocab, generator=g, dtype=torch.float64), -1)
    exact = (lp.exp() * (lp - ref)).sum()
    assert exact >= 0
    assert float((lp.exp() * kl_k1(lp, ref)).sum()) == pytest.approx(float(exact), abs=1e-9)
    unclamped_k3 = kl_k3(lp, ref, log_ratio_clamp=None, value_clamp=None)  # verl's ±10 clamp biases it
    assert float((lp.exp() * unclamped_k3).sum()) == pytest.approx(float(exact), abs=1e-9)
    assert (kl_k2(lp, ref) >= 0).all() and (kl_k3(lp, ref) >= 0).all()
    for name in ("k1", "k2", "k3"):
        assert torch.all(kl_estimate(lp, lp.clone(), name) == 0)


@FAST
@given(batches(max_t=1), st.sampled_from([None, 3.0]))
def test_gspo_with_one_step_equals_token_ppo(batch: tuple[torch.Tensor, ...], dual: float | None) -> None:
    lp, old, adv, mask = batch
    results = []
    for level in ("token", "sequence"):
        x = lp.clone().requires_grad_(True)
        out = PolicyObjective(term=ClipTerm(clip_high=0.28, dual_clip=dual), ratio_level=level)(x, old, adv, mask)
        out.loss.backward()
        assert x.grad is not None
        results.append((out.loss.item(), x.grad))
    assert results[0][0] == pytest.approx(results[1][0], abs=ATOL)
    torch.testing.assert_close(results[0][1], results[1][1], atol=ATOL, rtol=1e-5)


@FAST
@given(batches(max_n=4, max_t=5))
def test_gspo_matches_sequence_objective(batch: tuple[torch.Tensor, ...]) -> None:
    """GSPO-token + seq_mean_token_mean with sequence advantages == GSPO's sequence-level objective (Eq. 5)."""
    lp, old, _, mask = batch
    adv = torch.randn(lp.shape[0])
    x = lp.clone().requires_grad_(True)
    out = PolicyObjective(
        term=ClipTerm(clip_low=3e-4, clip_high=4e-4), ratio_level="sequence", aggregation="seq_mean_token_mean"
    )(x, old, adv, mask)
    out.loss.backward()
    y = lp.clone().requires_grad_(True)
    count = mask.sum(-1)
    s = torch.exp(torch.where(mask, y - old, 0.0).sum(-1) / count.clamp_min(1))
    per_seq = torch.maximum(-adv * s, -adv * s.clamp(1 - 3e-4, 1 + 4e-4))
    reference = (per_seq * (count > 0)).sum() / (count > 0).sum().clamp_min(1)
    reference.backward()
    assert out.loss.item() == pytest.approx(reference.item(), abs=ATOL)
    assert x.grad is not None and y.grad is not None
    torch.testing.assert_close(x.grad, y.grad, atol=ATOL, rtol=1e-5)


@FAST
@given(batches(), st.sampled_from([0.1, 0.2]), st.sampled_from([None, 2.0]))
def test_vectorised_clip_matches_loop(batch: tuple[torch.Tensor, ...], eps: float, dual: float | None) -> None:
    lp, old, adv, mask = batch
    adv_full = adv.unsqueeze(-1).expand_as(lp) if adv.dim() == 1 else adv
    ratio = (lp - old).exp()
    losses = ppo_clip_loss(ratio, adv_full, eps, eps, dual).losses
    for i in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            a, r = float(adv_full[i, t]), float(ratio[i, t])
            expected = max(-a * r, -a * min(max(r, 1 - eps), 1 + eps))
            if dual is not None and a < 0:
                expected = min(expected, -a * dual)
            assert float(losses[i, t]) == pytest.approx(expected, abs=1e-5, rel=1e-5)


# ---------------------------------------------------------------------------------------- robustness


@pytest.mark.parametrize(
    "aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]
)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_all_false_mask_gives_exact_zero(aggregation: str, level: str) -> None:
    """Defined result for an all-False mask: loss exactly 0, zero gradients, metrics 0.0, no NaN."""
    lp = torch.randn(2, 3).requires_grad_(True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    obj = PolicyObjective(aggregation=aggregation, ratio_level=level, norm_length=3.0, kl_coef=0.1)  # type: ignore[arg-type]
    out = obj(lp, lp.detach() + 1.0, torch.randn(2), mask, ref_logprobs=torch.randn(2, 3), num_tokens=0.0)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert lp.grad is not None and torch.all(lp.grad == 0)
    assert all(v == 0.0 for v in out.metrics.values())


def test_empty_rows_contribute_zero_and_leave_denominators() -> None:
    lp, old = _inputs([[1.5, 0.5, 1.0], [0.9, 1.0, 1.0], [3.0, 3.0, 3.0]])
    mask = torch.cat([TOY_MASK, torch.zeros(1, 3, dtype=torch.bool)])
    adv = torch.tensor([1.0, -1.0, 5.0])
    for aggregation in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum"):
        with_empty = PolicyObjective(aggregation=aggregation)(lp, old, adv, mask)
        without = PolicyObjective(aggregation=aggregation)(lp[:2], old[:2], adv[:2], mask[:2])
        assert with_empty.loss.item() == pytest.approx(without.loss.item(), abs=ATOL)
        assert math.isfinite(with_empty.loss.item())


def test_bf16_inputs_are_computed_in_float32() -> None:
    torch.manual_seed(2)
    lp32 = -torch.rand(3, 4)
    lp = lp32.bfloat16().requires_grad_(True)
    old = (lp32 + 0.05 * torch.randn(3, 4)).bfloat16()
    mask = torch.rand(3, 4) < 0.7
    obj = PolicyObjective(term=ClipTerm(clip_high=0.28), kl_coef=0.05, kl_estimator="k3")
    ref = (lp32 - 0.1).bfloat16()
    out = obj(lp, old, torch.randn(3).bfloat16(), mask, ref_logprobs=ref)
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert lp.grad is not None and lp.grad.dtype == torch.bfloat16
    reference = obj(lp.detach().float(), old.float(), torch.zeros(3), mask, ref_logprobs=ref.float())
    assert reference.loss.dtype == torch.float32 and math.isfinite(reference.loss.item())


def test_bf16_matches_float32_of_the_same_values() -> None:
    torch.manual_seed(3)
    lp = (-torch.rand(3, 4)).bfloat16()
    old = (lp.float() + 0.05 * torch.randn(3, 4)).bfloat16()
    adv = torch.randn(3).bfloat16()
    mask = torch.rand(3, 4) < 0.7
    obj = PolicyObjective(term=ClipTerm(clip_high=0.28))
    assert obj(lp, old, adv, mask).loss.item() == pytest.approx(
        obj(lp.float(), old.float(), adv.float(), mask).loss.item(), abs=1e-6
    )


def test_metrics_sum_to_loss_and_analytic_kl_replaces_estimator() -> None:
    lp, old = _inputs(TOY_RATIOS, TOY_LOGPROBS)
    ref = torch.tensor(TOY_LOGPROBS) - 0.5
    entropy = torch.tensor([[1.0, 2.0, 50.0], [3.0, 50.0, 50.0]])
    analytic = torch.tensor([[0.3, 0.6, 50.0], [0.9, 50.0, 50.0]])
    obj = PolicyObjective(kl_coef=0.1, kl_estimator="k1", entropy_coef=0.01)
    out = obj(lp, old, TOY_ADV, TOY_MASK, ref_logprobs=ref, entropy=entropy)
    m = out.metrics
    assert m["loss/policy"] + m["loss/kl"] + m["loss/entropy"] == pytest.approx(out.loss.item(), abs=ATOL)
    assert m["loss/kl"] == pytest.approx(0.1 * 0.5, abs=ATOL)  # k1 = 0.5 on every token
    assert m["loss/entropy"] == pytest.approx(-0.01 * 2.0, abs=ATOL)
    assert m["policy/entropy"] == pytest.approx(2.0, abs=ATOL)
    with_kl = obj(lp, old, TOY_ADV, TOY_MASK, ref_logprobs=ref, entropy=entropy, kl=analytic)
    assert with_kl.metrics["loss/kl"] == pytest.approx(0.1 * 0.6, abs=ATOL)
    assert with_kl.metrics["policy/kl"] == pytest.approx(0.6, abs=ATOL)
    plain = PolicyObjective()(lp, old, TOY_ADV, TOY_MASK)
    assert "policy/kl" not in plain.metrics and "policy/entropy" not in plain.metrics
    assert plain.metrics["loss/kl"] == 0.0 and plain.metrics["loss/entropy"] == 0.0


def test_approx_kl_metric_is_k3_of_old_vs_new() -> None:
    lp, old = _inputs([[2.0]])
    out = PolicyObjective()(lp, old, torch.tensor([1.0]), torch.ones(1, 1, dtype=torch.bool))
    assert out.metrics["policy/approx_kl"] == pytest.approx(2.0 - 1.0 - math.log(2.0), abs=ATOL)
    assert out.metrics["policy/ratio_mean"] == pytest.approx(2.0, abs=ATOL)


def test_log_ratio_is_clamped() -> None:
    lp = torch.tensor([[0.0]], requires_grad=True)
    out = PolicyObjective(log_ratio_clamp=20.0, term=ClipTerm(clip_high=1e9))(
        lp, torch.tensor([[-100.0]]), torch.tensor([1.0]), torch.ones(1, 1, dtype=torch.bool)
    )
    assert out.loss.item() == pytest.approx(-math.exp(20.0), rel=1e-5)
    out.loss.backward()
    assert lp.grad is not None and lp.grad.item() == 0.0


def test_shape_and_dtype_errors() -> None:
    obj = PolicyObjective()
    lp, mask = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="old_logprobs"):
        obj(lp, torch.zeros(2, 4), torch.zeros(2), mask)
    with pytest.raises(ValueError, match="advantages"):
        obj(lp, lp, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="advantages"):
        obj(lp, lp, torch.zeros(2, 1), mask)
    with pytest.raises(ValueError, match="mask"):
        obj(lp, lp, torch.zeros(2), mask.float())
    with pytest.raises(ValueError, match="mask"):
        obj(lp, lp, torch.zeros(2), mask[:, :2])
    with pytest.raises(ValueError, match="ref_logprobs"):
        PolicyObjective(kl_coef=0.1)(lp, lp, torch.zeros(2), mask, ref_logprobs=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="floating"):
        obj(torch.zeros(2, 3, 1), lp, torch.zeros(2), mask)
    with pytest.raises(ValueError, match="entropy"):
        obj(lp, lp, torch.zeros(2), mask, entropy=torch.zeros(2))


def test_missing_inputs_and_bad_numbers_raise() -> None:
    lp, mask = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="kl_coef"):
        PolicyObjective(kl_coef=0.1)(lp, lp, torch.zeros(2), mask)
    with pytest.raises(ValueError, match="entropy_coef"):
        PolicyObjective(entropy_coef=0.1)(lp, lp, torch.zeros(2), mask)
    with pytest.raises(ValueError, match="non-finite"):
        PolicyObjective()(lp, lp, torch.tensor([float("nan"), 0.0]), mask)
    with pytest.raises(ValueError, match="num_tokens"):
        PolicyObjective()(lp, lp, torch.zeros(2), mask, num_tokens=5.0)
    with pytest.raises(ValueError, match="num_seqs"):
        PolicyObjective(aggregation="seq_mean_token_mean")(lp, lp, torch.zeros(2), mask, num_seqs=1.0)
    with pytest.raises(ValueError, match="num_tokens"):
        aggregate_loss(lp, mask, "token_mean", num_tokens=-1.0)


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (ClipTerm, {"clip_low": 1.0}, "clip_low"),
        (ClipTerm, {"clip_high": -0.1}, "clip_high"),
        (ClipTerm, {"dual_clip": 1.0}, "dual_clip"),
        (PolicyObjective, {"term": "ppo"}, "term"),
        (PolicyObjective, {"ratio_level": "seq"}, "ratio_level"),
        (PolicyObjective, {"kl_estimator": "k4"}, "kl_estimator"),
        (PolicyObjective, {"kl_coef": -1.0}, "kl_coef"),
        (PolicyObjective, {"entropy_coef": float("nan")}, "entropy_coef"),
        (PolicyObjective, {"aggregation": "token-mean"}, "aggregation"),
        (PolicyObjective, {"aggregation": "seq_mean_token_sum_norm"}, "norm_length"),
        (PolicyObjective, {"norm_length": 0.0}, "norm_length"),
        (CISPOTerm, {"clip_high": -1.0}, "clip_high"),
        (CISPOTerm, {"clip_low": -0.1}, "clip_low"),
        (SAPOTerm, {"tau_neg": 0.0}, "tau_neg"),
        (PolicyObjective, {"log_ratio_clamp": 0.0}, "log_ratio_clamp"),
    ],
)
def test_config_validation_names_the_field(cls: Any, kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)


def test_terms_are_components_a_new_term_needs_no_dispatcher() -> None:
    """Any PolicyTerm subclass plugs in; the default term is PPO clip 0.2/0.2."""

    class Reinforce(PolicyTerm):
        def __call__(self, ratio: torch.Tensor, logprobs: torch.Tensor, advantages: torch.Tensor) -> PolicyTermOutput:
            none = torch.zeros_like(advantages, dtype=torch.bool)
            return PolicyTermOutput(-advantages * logprobs, none, none, none)

    lp, old = _inputs(TOY_RATIOS, TOY_LOGPROBS)
    out = PolicyObjective(term=Reinforce())(lp, old, TOY_ADV, TOY_MASK)
    assert out.loss.item() == pytest.approx(float(-(TOY_ADV[:, None] * lp.detach())[TOY_MASK].sum() / 3), abs=ATOL)
    default = PolicyObjective().term
    assert isinstance(default, ClipTerm)
    assert (default.clip_low, default.clip_high, default.dual_clip) == (0.2, 0.2, None)
    assert repr(ClipTerm(clip_high=0.28)) == "ClipTerm(clip_low=0.2, clip_high=0.28, dual_clip=None)"
    with pytest.raises(ValueError, match="is not a PolicyTerm"):
        PolicyObjective(term={"clip_low": 0.2})  # type: ignore[arg-type]


def test_objective_and_terms_build_from_yaml_nodes() -> None:
    """`term:` is a `_component_` node exported from `toolkit.objective`; a string term fails at validation."""
    node = {
        "_component_": "toolkit.objective.PolicyObjective",
        "term": {"_component_": "toolkit.objective.CISPOTerm", "clip_low": None, "clip_high": 0.28},
        "aggregation": "token_mean",
    }
    objective = instantiate(node, "objective")
    assert isinstance(objective.term, CISPOTerm) and objective.term.clip_high == 0.28
    with pytest.raises(ConfigError, match=r"objective\.term: expected PolicyTerm"):
        validate({**node, "term": "cispo"}, "objective")
    with pytest.raises(ConfigError, match=r"objective\.term\.clip_hihg: unknown key.*did you mean 'clip_high'"):
        validate({**node, "term": {"_component_": "toolkit.objective.ClipTerm", "clip_hihg": 0.3}}, "objective")


def test_error_lists_allowed_values() -> None:
    with pytest.raises(ValueError, match="seq_mean_token_sum_norm"):
        PolicyObjective(aggregation="bnpo")  # type: ignore[arg-type]


def test_needs_reference() -> None:
    assert not PolicyObjective().needs_reference
    assert PolicyObjective(kl_coef=1e-3).needs_reference


def test_value_loss_validation_and_aggregation() -> None:
    v = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    with pytest.raises(ValueError, match="value_clip"):
        value_loss(v, v, v, mask, value_clip=0.0)
    with pytest.raises(ValueError, match="returns"):
        value_loss(v, v, v[:1], mask)
    out = value_loss(v, v, torch.zeros(2, 2), mask, value_clip=None, aggregation="seq_mean_token_sum")
    assert out.loss.item() == pytest.approx(0.5 * ((1 + 4) + 9) / 2, abs=ATOL)
