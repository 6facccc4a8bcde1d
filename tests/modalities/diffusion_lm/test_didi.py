"""DiDi-Instruct: spec oracles E3–E8, discriminator gradients, RGAS invariants, the policy/sampler contract,
a tiny end-to-end training step through the generic Trainer and checkpoint resume (spec
docs/methods/didi_instruct.md)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modalities.diffusion_lm.didi_policy import StudentPolicy, step_log_probs, teacher_divergence
from modalities.diffusion_lm.didi_sampler import TwoStepStudentSampler
from modalities.diffusion_lm.discriminator import (
    DiscriminatorReward,
    discriminator_from_teacher,
    discriminator_log_odds,
    discriminator_loss,
    linear_warmup_decay,
    sequence_reward,
    smoothed_bce,
)
from modalities.diffusion_lm.evaluation import first_eos_valid_mask, generative_perplexity_from_nll, unigram_entropy
from modalities.diffusion_lm.masked_diffusion import MaskedDiffusionLM
from modalities.diffusion_lm.rgas import rerank_probs, rgas_sample, rgas_schedule, tilt_logits
from modalities.diffusion_lm.schedules import LogLinearSchedule
from modalities.diffusion_lm.time_weighting import TimeWeightedNormalizer, beta_density, omega_weight, time_weights
from modalities.diffusion_lm.tiny import build_tiny_teacher
from tests.contracts import PolicyContract
from toolkit.advantages.group import GroupNormalizer, group_normalized_advantages
from toolkit.interfaces import Policy, Sampler
from toolkit.objective import ClipTerm, PolicyObjective

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


# ------------------------------------------------------------------------------------------ tiny models
def _tiny_teacher(seed: int = 0) -> MaskedDiffusionLM:
    """The spec §19 tiny DiT with its zero-initialised (adaLN, output) weights given small random values."""
    model = build_tiny_teacher(vocab_size=65, seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            if torch.all(p == 0):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model


def _policy(**kwargs: Any) -> StudentPolicy:
    return StudentPolicy(_tiny_teacher(), _tiny_teacher(), **kwargs)


def _prompts(num: int = 2, length: int = 12) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(7)
    return [{"input_ids": torch.randint(0, 64, (length,), generator=generator).tolist()} for _ in range(num)]


class TestStudentPolicyContract(PolicyContract):
    group_size = 3

    def make_policy(self) -> Policy:
        return _policy()

    def make_sampler(self) -> Sampler:
        return TwoStepStudentSampler(tau_a=2.0, tau_b=2.0)

    def make_prompts(self) -> list[Any]:
        return _prompts()


def test_rollout_records_coupled_time_and_steps() -> None:
    policy = _policy()
    rollout = TwoStepStudentSampler().sample(policy, _prompts(), 4, torch.Generator().manual_seed(0))
    tau, z_tau, x = rollout.data["tau"], rollout.data["z_tau"], rollout.data["x"]
    assert tau.min() >= 0.02 and tau.max() <= 0.999
    unmasked = z_tau != 64
    assert torch.equal(x[unmasked], z_tau[unmasked])  # step 2 never changes unmasked tokens
    assert rollout.completions is not None and rollout.completions[0]["tau"] == pytest.approx(float(tau[0]))
    assert torch.equal(rollout.mask[:, 1], (z_tau == 64).any(-1))


def test_step_log_probs_prev_is_mask_vs_loop() -> None:
    log_probs = torch.log_softmax(torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0)), -1)
    z_prev = torch.tensor([[4, 1, 4], [4, 4, 4]])
    z_next = torch.tensor([[2, 1, 4], [0, 3, 4]])
    got = step_log_probs(log_probs, z_prev, z_next, mask_id=4, mode="prev_is_mask")
    for i in range(2):
        expected = sum(
            math.log(math.exp(float(log_probs[i, j, z_next[i, j]])) + 1e-10) for j in range(3) if z_prev[i, j] == 4
        )
        assert abs(float(got[i]) - expected) < 1e-4
    changed = step_log_probs(log_probs, z_prev, z_next, mask_id=4, mode="changed_only")
    assert abs(float(got[0] - changed[0]) - float(log_probs[0, 2, 4].exp().add(1e-10).log())) < 1e-4


def test_teacher_divergence_jeffrey_mixes_forward_and_reverse() -> None:
    s = torch.log_softmax(torch.randn(1, 2, 4, generator=torch.Generator().manual_seed(1)), -1)
    t = torch.log_softmax(torch.randn(1, 2, 4, generator=torch.Generator().manual_seed(2)), -1)
    forward = (t.exp() * (t - s)).sum(-1)
    reverse = (s.exp() * (s - t)).sum(-1)
    torch.testing.assert_close(teacher_divergence(s, t, "forward_kl"), forward)
    torch.testing.assert_close(teacher_divergence(s, t, "jeffrey", 0.5), 0.5 * forward + 0.5 * reverse)
    assert torch.all(teacher_divergence(s, s, "jeffrey").abs() < 1e-6)


def test_loss_equals_hand_written_reinforce() -> None:
    """Trainer objective (on-policy, seq_mean_token_sum, no KL/entropy) == −(ω·Â·log q).mean() in value and gradient."""
    policy = _policy()
    rollout = TwoStepStudentSampler().sample(policy, _prompts(), 4, torch.Generator().manual_seed(3))
    rollout.scores = torch.randn(len(rollout), generator=torch.Generator().manual_seed(4))
    normalizer = TimeWeightedNormalizer(GroupNormalizer(std="unbiased", eps=1e-8, clip=3.0), weight="omega")
    advantages = normalizer(rollout).values
    objective = PolicyObjective(aggregation="seq_mean_token_sum", term=ClipTerm(clip_low=0.2, clip_high=0.2))
    logprobs = policy.log_probs(rollout)
    loss = objective(logprobs, rollout.old_logprobs, advantages, rollout.mask).loss
    grads = torch.autograd.grad(loss, list(policy.module.parameters()), allow_unused=True)
    a_hat, _ = group_normalized_advantages(rollout.scores, rollout.group_ids, std="unbiased", eps=1e-8)
    w = (1.0 / rollout.data["tau"]).clamp(0.1, 10.0)
    hand = -(w * a_hat.clamp(-3, 3) * policy.log_probs(rollout).sum(1)).mean()
    hand_grads = torch.autograd.grad(hand, list(policy.module.parameters()), allow_unused=True)
    steps = rollout.mask.sum(1).float()  # on-policy every ratio is 1: the value is −mean(w·Â·#steps)
    assert abs(float(loss.detach()) - float(-(w * a_hat.clamp(-3, 3) * steps).mean())) < 1e-4
    for g, h in zip(grads, hand_grads, strict=True):
        if g is not None or h is not None:
            torch.testing.assert_close(g, h, atol=1e-5, rtol=1e-4)


def test_ema_update_and_state_round_trip() -> None:
    policy = _policy(ema_decay=0.5)
    assert policy.ema is not None
    with torch.no_grad():
        for p in policy.module.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in policy.ema.state_dict().items()}
    policy.after_optimizer_step()
    key = next(k for k, v in before.items() if v.is_floating_point())
    student = policy.module.state_dict()[key]
    torch.testing.assert_close(policy.ema.state_dict()[key], 0.5 * before[key] + 0.5 * student)
    other = _policy(ema_decay=0.5)
    other.load_state_dict(policy.state_dict())
    assert other.num_updates == 1 and torch.equal(other.ema.state_dict()[key], policy.ema.state_dict()[key])


# ------------------------------------------------------------------------------------------ discriminator
def test_gradients_reach_only_trainable_discriminator_parts() -> None:
    teacher = _tiny_teacher()
    disc = discriminator_from_teacher(teacher, num_trainable_blocks=1)
    z = torch.full((2, 8), 64)
    z[:, :3] = 5
    disc(z, torch.ones(2)).sum().backward()
    trainable = {n for n, p in disc.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("trunk.blocks.1.", "head.")) for n in trainable)
    assert any(n.startswith("trunk.blocks.1.") for n in trainable) and any(n.startswith("head.") for n in trainable)
    for name, p in disc.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert all(p.requires_grad for p in teacher.parameters())  # the copy leaves the teacher's flags alone


def test_discriminator_reward_updates_then_scores() -> None:
    disc = discriminator_from_teacher(_tiny_teacher(), num_trainable_blocks=1)
    reward = DiscriminatorReward(disc, lr=1e-3, warmup_steps=0, total_steps=10)
    head_before = [p.detach().clone() for p in disc.head.parameters()]
    samples = [{"tokens": [3] * 8, "tau": 0.5}, {"tokens": [4] * 8, "tau": 0.9}]
    out = reward([None, None], samples, input_ids=[[1] * 8, [2] * 8])
    assert out.scores.shape == (2,) and torch.isfinite(out.scores).all()
    assert {"loss", "acc_real", "acc_fake", "grad_norm", "lr"} <= set(out.metrics)
    assert any(not torch.equal(a, b) for a, b in zip(head_before, disc.head.parameters(), strict=True))
    frozen = DiscriminatorReward(disc, train=False)
    state = [p.detach().clone() for p in disc.parameters()]
    frozen([None, None], samples)
    assert all(torch.equal(a, b) for a, b in zip(state, disc.parameters(), strict=True))
    with pytest.raises(ValueError, match="real_source"):
        DiscriminatorReward(disc, real_source="bogus")  # type: ignore[arg-type]


def test_discriminator_reward_refuses_to_train_on_several_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its own AdamW outside accelerate would drift apart per rank: a world size of 2 fails before any update."""
    import toolkit.distributed

    disc = discriminator_from_teacher(_tiny_teacher(), num_trainable_blocks=1)
    reward = DiscriminatorReward(disc, lr=1e-3, warmup_steps=0, total_steps=10)
    samples = [{"tokens": [3] * 8, "tau": 0.5}, {"tokens": [4] * 8, "tau": 0.9}]
    weights = [p.detach().clone() for p in disc.parameters()]
    monkeypatch.setattr(toolkit.distributed, "world_size", lambda: 2)
    with pytest.raises(RuntimeError, match=r"2 processes.*drift apart.*Run DiDi on one process"):
        reward([None, None], samples, input_ids=[[1] * 8, [2] * 8])
    assert reward.num_updates == 0 and all(torch.equal(a, b) for a, b in zip(weights, disc.parameters(), strict=True))
    scores = DiscriminatorReward(disc, train=False)([None, None], samples).scores  # a fixed scorer is fine
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    monkeypatch.setattr(toolkit.distributed, "world_size", lambda: 1)
    assert reward([None, None], samples, input_ids=[[1] * 8, [2] * 8]).metrics["loss"] > 0 and reward.num_updates == 1


# ------------------------------------------------------------------------------------------ RGAS
def test_rgas_keeps_unmasked_tokens_and_fills_masks() -> None:
    teacher = _tiny_teacher()
    disc = discriminator_from_teacher(teacher, num_trainable_blocks=1).eval()
    x = torch.full((2, 10), 64)
    x[:, :3] = torch.tensor([5, 6, 7])
    for reranker in ("released", "dev"):
        out = rgas_sample(
            teacher.backbone,
            disc,
            teacher.schedule,
            x,
            4,
            torch.Generator().manual_seed(0),
            num_candidates=3,
            h_start=1.0,
            h_end=2.0,
            rerank_ratio=0.5,
            reranker=reranker,  # type: ignore[arg-type]
        )
        assert torch.equal(out[:, :3], x[:, :3]) and not (out == 64).any()
