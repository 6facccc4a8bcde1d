"""BetaNormalizer (BNPO, arXiv:2506.02864): docs/methods/bnpo.md E1–E8, loop reference, properties, edge cases."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit.advantages.beta import BetaNormalizer, fit_beta, inverse_beta_density
from toolkit.advantages.group import GroupNormalizer
from toolkit.interfaces import Normalizer
from toolkit.rollout import Rollout

ATOL = 1e-5
MODES = [False, True]  # official_compat


def make_rollout(
    scores: Sequence[float], group_size: int, rewards: dict[str, Sequence[float]] | None = None
) -> Rollout:
    n = len(scores)
    return Rollout(
        group_ids=torch.arange(n) // group_size,
        old_logprobs=torch.zeros(n, 3),
        mask=torch.ones(n, 3, dtype=torch.bool),
        scores=torch.tensor(scores, dtype=torch.float32),
        rewards={k: torch.tensor(v, dtype=torch.float32) for k, v in (rewards or {}).items()},
    )


def official_conventions(official_compat: bool, **kwargs: object) -> BetaNormalizer:
    """Every convention the spec's oracles assume, set explicitly."""
    options: dict[str, object] = dict(
        r_min=0.0,
        r_max=1.0,
        variance="unbiased",
        ab_min=1.0,
        w_max=1e6,
        var_floor=1e-12,
        official_compat=official_compat,
    )
    options.update(kwargs)
    return BetaNormalizer(**options)  # type: ignore[arg-type]


def close(actual: torch.Tensor, expected: Sequence[float]) -> None:
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), atol=ATOL, rtol=0)


def fitted(metrics: dict[str, float], suffix: str = "") -> dict[str, float]:
    return {k: metrics[f"normalizer/{k}{suffix}"] for k in ("mu", "var", "a", "b", "alpha", "beta")}


@pytest.mark.parametrize("compat", MODES)
def test_e1_fit_reproduces_grpo(compat: bool) -> None:
    out = official_conventions(compat)(make_rollout([1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0], 4))
    stats = fitted(out.metrics)
    assert stats == pytest.approx(dict(mu=0.5, var=0.0625, a=1.5, b=1.5, alpha=1.5, beta=1.5), abs=ATOL)
    close(
        out.values,
        [0.680175, -0.226725, -0.226725, -0.226725, 0.392699, 0.392699, -0.392699, -0.392699]
        + [0.226725, 0.226725, 0.226725, -0.680175],
    )
    assert out.values[0].item() == pytest.approx(math.pi / 8 * 0.75 / math.sqrt(0.25 * 0.75), abs=ATOL)
    w, _ = inverse_beta_density(torch.tensor([0.25, 0.5, 0.75]), torch.tensor(1.5), torch.tensor(1.5))
    close(w, [0.906900, math.pi / 4, 0.906900])


def test_e1_equals_pi_over_8_times_population_grpo() -> None:
    rollout = make_rollout([1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0], 4)
    grpo = GroupNormalizer(std="population", eps=0.0, eps_placement="std_plus_eps")(rollout).values
    close(official_conventions(False)(rollout).values, (math.pi / 8 * grpo).tolist())


def test_special_case_density_values() -> None:
    w, _ = inverse_beta_density(torch.tensor([0.25, 0.5]), torch.tensor(1.5), torch.tensor(1.5))
    close(1 / w, [1.102658, 1.273240])


@pytest.mark.parametrize("compat", MODES)
def test_e2_all_zero_and_all_one_groups(compat: bool) -> None:
    out = official_conventions(compat)(make_rollout([0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1], 4))
    stats = fitted(out.metrics)
    assert stats == pytest.approx(dict(mu=0.5, var=0.208333, a=0.1, b=0.1, alpha=1.033333, beta=1.033333), abs=ATOL)
    expected = [0.0] * 4 + [0.742179, -0.247393, -0.247393, -0.247393, 0.247393, 0.247393, 0.247393, -0.742179]
    close(out.values, expected + [0.0] * 4)
    assert torch.equal(out.values[:4], torch.zeros(4)) and torch.equal(out.values[12:], torch.zeros(4))
    assert out.metrics["normalizer/clamped_weights"] == 2.0  # p̂ = 0 and p̂ = 1 hit w_max
    assert out.metrics["normalizer/zero_advantage_groups"] == 0.5
    w, _ = inverse_beta_density(torch.tensor(0.25), torch.tensor(stats["alpha"]), torch.tensor(stats["beta"]))
    assert float(w) == pytest.approx(0.989572, abs=ATOL)


@pytest.mark.parametrize("compat", MODES)
def test_e3_two_prompts_of_two(compat: bool) -> None:
    out = official_conventions(compat)(make_rollout([1, 0, 1, 1], 2))
    stats = fitted(out.metrics)
    assert stats == pytest.approx(dict(mu=0.75, var=0.125, a=0.375, b=0.125, alpha=1.125, beta=1.041667), abs=ATOL)
    close(out.values, [0.477390, -0.477390, 0.0, 0.0])


@pytest.mark.parametrize("compat", MODES)
def test_e4_single_prompt_is_reinforce(compat: bool) -> None:
    out = official_conventions(compat)(make_rollout([1, 0, 1, 0], 4))
    assert out.metrics["normalizer/alpha"] == 1.0 and out.metrics["normalizer/beta"] == 1.0
    assert out.metrics["normalizer/fallbacks"] == 0.0
    close(out.values, [0.5, -0.5, 0.5, -0.5])


@pytest.mark.parametrize("compat", MODES)
def test_e5_low_accuracy(compat: bool) -> None:
    successes = [1, 2, 0, 4]
    scores = [float(i < k) for k in successes for i in range(8)]
    out = official_conventions(compat)(make_rollout(scores, 8))
    stats = fitted(out.metrics)
    expected = dict(mu=0.218750, var=0.045573, a=0.601562, b=2.148438, alpha=1.200521, beta=1.716146)
    assert stats == pytest.approx(expected, abs=ATOL)
    table = {0: (0.659397, -0.094200), 1: (0.549264, -0.183088), 2: (None, 0.0), 3: (0.426024, -0.426024)}
    for group, (correct, incorrect) in table.items():
        rows = out.values[group * 8 : (group + 1) * 8]
        if correct is not None:
            assert rows[0].item() == pytest.approx(correct, abs=ATOL)
        assert rows[-1].item() == pytest.approx(incorrect, abs=ATOL)


@pytest.mark.parametrize("compat", MODES)
def test_e6_advantage_decomposition(compat: bool) -> None:
    rewards = {"accuracy": [1, 0, 0, 0, 1, 1, 0, 0], "format": [1, 1, 0, 1, 1, 0, 0, 1]}
    rollout = make_rollout([0.0] * 8, 4, rewards=rewards)
    norm = official_conventions(compat, components={"accuracy": (0.0, 1.0), "format": (0.0, 1.0)})
    out = norm(rollout)
    assert fitted(out.metrics, "/accuracy")["alpha"] == pytest.approx(1.8125, abs=ATOL)
    assert fitted(out.metrics, "/accuracy")["beta"] == pytest.approx(2.354167, abs=ATOL)
    assert fitted(out.metrics, "/format")["alpha"] == pytest.approx(2.354167, abs=ATOL)
    assert fitted(out.metrics, "/format")["beta"] == pytest.approx(1.8125, abs=ATOL)
    close(out.values, [0.345697, 0, -0.345697, 0, 0.340852, 0, -0.340852, 0])
    summed = official_conventions(compat, components={"accuracy": (0.0, 1.0), "format": (0.0, 1.0)})
    summed.decomposition_reduce = "sum"
    close(summed(rollout).values, (2 * out.values).tolist())


def test_e6_summed_reward_contrast() -> None:
    total = [a + f for a, f in zip([1, 0, 0, 0, 1, 1, 0, 0], [1, 1, 0, 1, 1, 0, 0, 1], strict=True)]
    rollout = make_rollout(total, 4)
    out = official_conventions(False, r_max=2.0)(rollout)  # p̂ = (0.5, 0.5): σ² = 0 → α = β = 1 fallback
    assert out.metrics["normalizer/fallbacks"] == 1.0
    close(out.values, [(s / 2 - 0.5) for s in total])
    with pytest.raises(ValueError, match="degenerate"):
        official_conventions(True, r_max=2.0)(rollout)


@pytest.mark.parametrize("compat", MODES)
def test_e7_bounded_reward(compat: bool) -> None:
    out = official_conventions(compat, r_min=0.0, r_max=2.0)(make_rollout([2, 1, 0, 0, 2, 2, 1, 0, 2, 2, 2, 1], 4))
    stats = fitted(out.metrics)
    expected = dict(mu=0.625, var=0.0625, a=1.71875, b=1.03125, alpha=1.572917, beta=1.34375)
    assert stats == pytest.approx(expected, abs=ATOL)
    close(
        out.values,
        [0.551928, 0.110386, -0.331157, -0.331157, 0.294573, 0.294573, -0.098191, -0.490956]
        + [0.118131, 0.118131, 0.118131, -0.354393],
    )


def test_e8_degenerate_batches() -> None:
    default, official = official_conventions(False), official_conventions(True)
    same = make_rollout([1, 0, 1, 0], 2)
    close(default(same).values, [0.5, -0.5, 0.5, -0.5])
    assert default(same).metrics["normalizer/fallbacks"] == 1.0
    with pytest.raises(ValueError, match="degenerate"):  # official: NaN everywhere
        official(same)
    zeros = make_rollout([0, 0, 0, 0], 2)
    assert torch.equal(default(zeros).values, torch.zeros(4))
    with pytest.raises(ValueError, match="degenerate"):  # official: torch Beta raises
        official(zeros)
    singletons = make_rollout([1, 0, 1], 1)
    with pytest.raises(ValueError, match="at least 2 responses"):
        default(singletons)
    with pytest.raises(ValueError, match="degenerate"):  # official: p̂ := 0 for all, σ² = 0, crash
        official(singletons)
    mixed = make_rollout([0, 0, 0, 0, 1, 1], 2)
    for norm in (default, official):
        out = norm(mixed)
        assert torch.equal(out.values, torch.zeros(6))
        assert out.metrics["normalizer/alpha"] == 1.0 and out.metrics["normalizer/beta"] == 1.0


def test_official_singleton_p_hat_is_zero() -> None:
    # official: a one-response prompt gets p̂ = 0, so its advantage is w(0)·s (not centred).
    out = official_conventions(True)(Rollout(
        group_ids=torch.tensor([0, 0, 0, 0, 1, 2, 2]),
        old_logprobs=torch.zeros(7, 1),
        mask=torch.ones(7, 1, dtype=torch.bool),
        scores=torch.tensor([1.0, 0, 0, 0, 1, 1, 0]),
    ))  # fmt: skip
    p = torch.tensor([0.25, 0.0, 0.5])
    fit = fit_beta(p, variance="unbiased")
    w, _ = inverse_beta_density(p, fit.alpha, fit.beta)
    assert out.values[4].item() == pytest.approx(min(float(w[1]), 1e6) * 1.0, rel=1e-5)


def test_alpha_rule_minimises_gradient_variance() -> None:
    # docs/methods/bnpo.md §5 re-derivation: E[A²] ∝ B(α,β)²·B(a+3−2α, b+3−2β)/B(a,b) is minimal at α = 1 + a/3.
    a, b = 2.0, 5.0

    def log_beta(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.lgamma(x) + torch.lgamma(y) - torch.lgamma(x + y)

    grid = torch.linspace(1.0, 2.45, 146, dtype=torch.float64)
    alpha, beta = torch.meshgrid(grid, grid + 1.0, indexing="ij")
    ok = (alpha < (a + 3) / 2) & (beta < (b + 3) / 2)
    value = 2 * log_beta(alpha, beta) + log_beta(a + 3 - 2 * alpha, b + 3 - 2 * beta)
    value = torch.where(ok, value, torch.inf)
    best = int(value.argmin())
    assert float(alpha.reshape(-1)[best]) == pytest.approx(1 + a / 3, abs=0.011)
    assert float(beta.reshape(-1)[best]) == pytest.approx(1 + b / 3, abs=0.011)


# ------------------------------------------------------------------------------------ loop reference


def loop_bnpo(scores: list[float], groups: list[int], r_min: float, r_max: float) -> list[float]:
    s = [(x - r_min) / (r_max - r_min) for x in scores]
    ids = sorted(set(groups))
    p = {g: sum(s[i] for i in range(len(s)) if groups[i] == g) / groups.count(g) for g in ids}
    values = list(p.values())
    if len(values) > 1:
        mu = sum(values) / len(values)
        var = sum((v - mu) ** 2 for v in values) / (len(values) - 1)
    else:
        mu, var = 0.0, 1.0
    alpha = beta = 1.0
    if var > 1e-12:
        k = mu * (1 - mu) / var - 1
        alpha, beta = max(1.0, 1 + k * mu / 3), max(1.0, 1 + k * (1 - mu) / 3)
    log_b = math.lgamma(alpha) + math.lgamma(beta) - math.lgamma(alpha + beta)
    out = []
    for i, x in enumerate(s):
        ph = p[groups[i]]
        if all(s[j] == x for j in range(len(s)) if groups[j] == groups[i]):
            out.append(0.0)
            continue
        log_f = (alpha - 1) * math.log(ph) + (beta - 1) * math.log(1 - ph) - log_b
        out.append(min(math.exp(-log_f), 1e6) * (x - ph))
    return out


@pytest.mark.parametrize("seed", range(8))
def test_vectorised_matches_loop(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(2, 9, (int(torch.randint(1, 7, (1,), generator=gen)),), generator=gen).tolist()
    groups = [g for g, n in enumerate(sizes) for _ in range(n)]
    scores = torch.randint(0, 5, (len(groups),), generator=gen).float().tolist()
    rollout = Rollout(
        group_ids=torch.tensor(groups),
        old_logprobs=torch.zeros(len(groups), 1),
        mask=torch.ones(len(groups), 1, dtype=torch.bool),
        scores=torch.tensor(scores),
    )
    out = official_conventions(False, r_min=0.0, r_max=4.0)(rollout)
    torch.testing.assert_close(out.values, torch.tensor(loop_bnpo(scores, groups, 0.0, 4.0)), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------- properties


@settings(max_examples=30, deadline=None)
@given(
    values=st.lists(st.floats(0.0, 1.0, width=32), min_size=2, max_size=24),
    group_size=st.integers(2, 6),
)
def test_no_nan_and_constant_groups_are_zero(values: list[float], group_size: int) -> None:
    n = len(values) - len(values) % group_size or group_size
    values = (values * group_size)[:n]
    out = official_conventions(False)(make_rollout(values, group_size)).values
    assert torch.isfinite(out).all()
    for g in range(n // group_size):
        rows = torch.tensor(values[g * group_size : (g + 1) * group_size], dtype=torch.float32)
        if bool((rows == rows[0]).all()):
            assert torch.equal(out[g * group_size : (g + 1) * group_size], torch.zeros(group_size))


@settings(max_examples=20, deadline=None)
@given(successes=st.lists(st.integers(0, 6), min_size=2, max_size=6))
def test_weights_within_clamp_and_signs_follow_reward(successes: list[int]) -> None:
    scores = [float(i < k) for k in successes for i in range(6)]
    out = official_conventions(False, w_max=50.0)(make_rollout(scores, 6))
    p = torch.tensor(successes, dtype=torch.float32).repeat_interleave(6) / 6
    residual = torch.tensor(scores) - p
    assert (out.values.abs() <= 50.0 * residual.abs() + 1e-6).all()
    assert (torch.sign(out.values) == torch.sign(residual)).all()


# ---------------------------------------------------------------------------------------- robustness


def test_range_validation_and_options() -> None:
    with pytest.raises(ValueError, match="outside"):
        official_conventions(False)(make_rollout([1.5, 0, 1, 0], 2))
    with pytest.raises(ValueError, match="r_max > r_min|max > min"):
        BetaNormalizer(r_min=1.0, r_max=1.0)
    with pytest.raises(ValueError, match="max > min"):
        BetaNormalizer(components={"acc": (1.0, 0.0)})
    with pytest.raises(ValueError, match="variance='sample'"):
        BetaNormalizer(variance="sample")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not found"):
        BetaNormalizer(components={"missing": (0.0, 1.0)})(make_rollout([1, 0, 1, 0], 2))
    with pytest.raises(ValueError, match="rows \\[1\\]"):
        BetaNormalizer()(make_rollout([1, float("inf"), 1, 0], 2))
    with pytest.raises(ValueError, match="empty"):
        BetaNormalizer()(make_rollout([], 2))


def test_nan_rows_are_excluded_and_zero() -> None:
    nan = float("nan")
    out = official_conventions(False)(make_rollout([1, 0, 0, nan, 1, 1, 0, 0, 1, 1, 1, 0], 4))
    clean = official_conventions(False)(Rollout(
        group_ids=torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]),
        old_logprobs=torch.zeros(11, 1),
        mask=torch.ones(11, 1, dtype=torch.bool),
        scores=torch.tensor([1.0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0]),
    ))  # fmt: skip
    assert out.values[3] == 0 and out.metrics["normalizer/nan_rewards"] == 1.0
    torch.testing.assert_close(torch.cat([out.values[:3], out.values[4:]]), clean.values)


def test_bf16_and_clip_and_protocol() -> None:
    scores = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0])
    rollout = make_rollout(scores.tolist(), 4)
    rollout.scores = scores.bfloat16()
    out = official_conventions(False, clip=0.5)(rollout)
    assert out.values.dtype == torch.float32
    close(out.values, [0.5, -0.226725, -0.226725, -0.226725, 0.392699, 0.392699, -0.392699, -0.392699]
          + [0.226725, 0.226725, 0.226725, -0.5])  # fmt: skip
    assert out.metrics["advantage/clip_frac"] == pytest.approx(2 / 12)
    assert isinstance(BetaNormalizer(), Normalizer)
