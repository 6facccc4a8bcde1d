"""DiDi-Instruct switches for small batches: N-step student rollouts (`TwoStepStudentSampler(num_steps=N)`),
several discriminator updates per reward call and a reward averaged over corruptions, and the trainer warm-up
that trains only the self-training reward model (`trainer.critic_warmup_steps` without a critic)."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch

from modalities.diffusion_lm.didi_policy import StudentPolicy
from modalities.diffusion_lm.didi_sampler import TwoStepStudentSampler
from modalities.diffusion_lm.discriminator import DiscriminatorReward, discriminator_from_teacher, linear_warmup_decay
from tests.contracts import PolicyContract
from tests.modalities.diffusion_lm.test_didi import _policy, _prompts, _tiny_teacher
from toolkit.interfaces import Policy, Sampler

MASK = 64


class TestMultiStepStudentContract(PolicyContract):
    """Re-scored log-probs of an N-step rollout equal the sampler's, for the generic contract."""

    group_size = 2

    def make_policy(self) -> Policy:
        return _policy()

    def make_sampler(self) -> Sampler:
        return TwoStepStudentSampler(num_steps=5)

    def make_prompts(self) -> list[Any]:
        return _prompts()


def test_multi_step_path_follows_the_sampling_grid() -> None:
    policy = _policy(ema_decay=None)
    rollout = TwoStepStudentSampler(num_steps=6).sample(policy, _prompts(3), 2, torch.Generator().manual_seed(0))
    path, times = rollout.data["z_path"], rollout.data["t_path"]
    assert path.shape == (6, 7, 12) and times.shape == (6, 7)
    assert torch.all(path[:, 0] == MASK) and torch.equal(path[:, -1], rollout.data["x"])
    torch.testing.assert_close(times[0], torch.linspace(1.0, 1e-3, 7), atol=1e-6, rtol=0)
    for k in range(6):  # a token once unmasked never changes; masks only disappear
        was_unmasked = path[:, k] != MASK
        assert torch.equal(path[:, k + 1][was_unmasked], path[:, k][was_unmasked])
    assert torch.equal(rollout.mask, (path[:, :-1] == MASK).any(-1))
    assert rollout.old_logprobs.shape == (6, 6) and torch.all(rollout.old_logprobs[~rollout.mask] == 0)
    # Almost everything is unmasked after the last step (α(1e-3) = 0.999): at most a stray position per row.
    assert float((rollout.data["x"] == MASK).float().mean()) < 0.05
    torch.testing.assert_close(policy.log_probs(rollout), rollout.old_logprobs, atol=1e-4, rtol=0)


def test_multi_step_kl_and_entropy_have_one_column_per_step() -> None:
    policy = StudentPolicy(_tiny_teacher(0), _tiny_teacher(1), ema_decay=None)
    rollout = TwoStepStudentSampler(num_steps=4).sample(policy, _prompts(2), 2, torch.Generator().manual_seed(1))
    kl = policy.analytic_kl(rollout)
    logprobs, entropy = policy.log_probs_and_entropy(rollout)
    assert kl.shape == entropy.shape == logprobs.shape == (4, 4)
    assert torch.all(kl[rollout.mask] > 0)  # different teacher → a positive divergence at every live step
    assert torch.all(entropy[rollout.mask] > 0)


def test_sampler_rejects_bad_step_counts() -> None:
    for bad in (1, 0, 2.5):
        with pytest.raises(ValueError, match="num_steps"):
            TwoStepStudentSampler(num_steps=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="remask_prob"):
        TwoStepStudentSampler(num_steps=4, remask_prob=0.1)


def _samples() -> tuple[list[dict[str, Any]], list[list[int]]]:
    generator = torch.Generator().manual_seed(5)
    fake = torch.randint(0, 64, (4, 10), generator=generator)
    real = torch.randint(0, 64, (4, 10), generator=generator)
    samples = [{"tokens": row, "tau": t} for row, t in zip(fake.tolist(), [0.3, 0.5, 0.7, 0.9], strict=True)]
    return samples, real.tolist()


def test_updates_per_call_steps_the_discriminator_that_often() -> None:
    samples, real = _samples()
    reward = DiscriminatorReward(
        discriminator_from_teacher(_tiny_teacher(), 1), lr=1e-3, warmup_steps=0, total_steps=100, updates_per_call=3
    )
    reward([None] * 4, samples, input_ids=real)
    assert reward.num_updates == 3 and reward.optimizer.state_dict()["state"]
    first = next(iter(reward.optimizer.state_dict()["state"].values()))
    assert int(first["step"]) == 3
    with pytest.raises(ValueError, match="updates_per_call"):
        DiscriminatorReward(discriminator_from_teacher(_tiny_teacher(), 1), updates_per_call=0)


def test_reward_averages_independent_corruptions() -> None:
    """K corruptions: the reward is the mean of K single-corruption scores drawn from the same generator stream."""
    samples, _ = _samples()
    disc = discriminator_from_teacher(_tiny_teacher(), 1)
    averaged = DiscriminatorReward(disc, train=False, seed=3, reward_num_corruptions=4)
    single = DiscriminatorReward(disc, train=False, seed=3)
    got = averaged([None] * 4, samples).scores
    draws = torch.stack([single([None] * 4, samples).scores for _ in range(4)])
    torch.testing.assert_close(got, draws.mean(0), atol=1e-5, rtol=0)
    assert not torch.allclose(draws[0], draws[1])  # the corruptions differ, so averaging changes the reward


def test_kl_reuses_the_student_forward_with_identical_value_and_gradient() -> None:
    """analytic_kl right after log_probs on the same rollout reuses the student forward: same value and gradient."""
    policy = StudentPolicy(_tiny_teacher(0), _tiny_teacher(1), ema_decay=None)
    rollout = TwoStepStudentSampler(num_steps=3).sample(policy, _prompts(2), 2, torch.Generator().manual_seed(2))
    params = [p for p in policy.module.parameters() if p.requires_grad]
    fresh = policy.analytic_kl(rollout)
    fresh_grads = torch.autograd.grad(fresh.sum(), params, allow_unused=True)
    calls = 0
    original = policy.x0_logits

    def counting(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return original(z, t)

    policy.x0_logits = counting  # type: ignore[method-assign]
    logprobs = policy.log_probs(rollout)
    reused = policy.analytic_kl(rollout)
    assert calls == 3  # three steps, one forward each, shared by the log-probs and the KL
    torch.testing.assert_close(reused, fresh)
    reused_grads = torch.autograd.grad((reused.sum() + 0 * logprobs.sum()), params, allow_unused=True)
    for a, b in zip(fresh_grads, reused_grads, strict=True):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b)
    with torch.no_grad():  # a no-grad forward is never reused where gradients are wanted
        policy.log_probs(rollout)
    assert policy.analytic_kl(rollout).requires_grad and calls == 9  # 3 reused, 3 no-grad, 3 recomputed


def test_positions_all_scores_every_position() -> None:
    """positions="all": the reward is the mean clamped log-odds over every position, masked or not."""
    from modalities.diffusion_lm.discriminator import sequence_reward

    samples, _ = _samples()
    disc = discriminator_from_teacher(_tiny_teacher(), 1).eval()
    reward = DiscriminatorReward(disc, train=False, seed=4, positions="all")
    got = reward([None] * 4, samples).scores
    z = DiscriminatorReward(disc, train=False, seed=4).corrupt(torch.tensor([s["tokens"] for s in samples]),
                                                                torch.tensor([s["tau"] for s in samples]))  # fmt: skip
    assert bool((z != MASK).any()) and bool((z == MASK).any())
    logits = disc(z, reward.sigma(torch.tensor([s["tau"] for s in samples])))
    torch.testing.assert_close(got, sequence_reward(logits, torch.ones_like(z, dtype=torch.bool)), atol=1e-5, rtol=0)
    masked_only = DiscriminatorReward(disc, train=False, seed=4)([None] * 4, samples).scores
    assert not torch.allclose(got, masked_only)
    with pytest.raises(ValueError, match="positions"):
        DiscriminatorReward(disc, positions="some")  # type: ignore[arg-type]


@pytest.mark.parametrize("num_steps", [2, 4])
def test_tau_per_group_shares_one_time_within_each_group(num_steps: int) -> None:
    policy = _policy(ema_decay=None)
    shared = TwoStepStudentSampler(num_steps=num_steps, tau_per_group=True)
    rollout = shared.sample(policy, _prompts(3), 4, torch.Generator().manual_seed(0))
    tau = rollout.data["tau"].view(3, 4)
    assert torch.all(tau == tau[:, :1]) and len(set(tau[:, 0].tolist())) == 3
    assert [c["tau"] for c in rollout.completions or []] == pytest.approx(rollout.data["tau"].tolist())
    per_sample = TwoStepStudentSampler(num_steps=num_steps).sample(
        policy, _prompts(3), 4, torch.Generator().manual_seed(0)
    )
    assert len(set(per_sample.data["tau"].tolist())) == 12  # the spec default draws one τ per sample


def test_teacher_pool_is_sampled_once_and_checkpointed() -> None:
    samples, _ = _samples()
    teacher = _tiny_teacher(2)
    calls = 0
    original = teacher.sample

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    teacher.sample = counting  # type: ignore[method-assign]
    reward = DiscriminatorReward(
        discriminator_from_teacher(_tiny_teacher(), 1), lr=1e-3, warmup_steps=0, real_source="teacher",
        teacher=teacher, teacher_num_steps=4, teacher_pool_size=6,
    )  # fmt: skip
    reward([None] * 4, samples)
    reward([None] * 4, samples)
    assert calls == 1 and reward.teacher_pool is not None and reward.teacher_pool.shape == (6, 10)
    real = reward.real_batch(torch.Size([4, 10]), {})
    assert all(any(torch.equal(row, pooled) for pooled in reward.teacher_pool) for row in real)
    other = DiscriminatorReward(discriminator_from_teacher(_tiny_teacher(), 1), real_source="teacher", teacher=teacher,
                                teacher_pool_size=6)  # fmt: skip
    other.load_state_dict(reward.state_dict())
    assert other.teacher_pool is not None and torch.equal(other.teacher_pool, reward.teacher_pool)
    with pytest.raises(ValueError, match="teacher_pool_size"):
        DiscriminatorReward(discriminator_from_teacher(_tiny_teacher(), 1), teacher_pool_size=-1)


def _pooled_reward(**kwargs: Any) -> DiscriminatorReward:
    options: dict[str, Any] = dict(lr=1e-3, warmup_steps=0, real_source="teacher", teacher=_tiny_teacher(2),
                                   teacher_num_steps=4, teacher_pool_size=6, seed=1)  # fmt: skip
    torch.manual_seed(0)  # the new head's init
    return DiscriminatorReward(discriminator_from_teacher(_tiny_teacher(), 1), **(options | kwargs))


def _through_disk(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # type: ignore[no-any-return]  # as checkpoints load


def test_pool_refresh_replaces_the_oldest_rows_with_fresh_teacher_samples() -> None:
    samples, _ = _samples()
    reward = _pooled_reward(teacher_pool_refresh=4)
    reward([None] * 4, samples)  # first call: samples the pool, no refresh
    assert reward.teacher_pool is not None
    first = reward.teacher_pool.clone()
    reward([None] * 4, samples)
    second = reward.teacher_pool.clone()
    changed = [not torch.equal(a, b) for a, b in zip(first, second, strict=True)]
    assert changed[4:] == [False, False] and sum(changed[:4]) >= 3  # rows 0-3 replaced (a redraw may repeat one)
    assert reward.pool_cursor == 4
    reward([None] * 4, samples)  # the ring wraps: rows 4, 5, then 0, 1
    third = reward.teacher_pool
    assert torch.equal(third[2:4], second[2:4]) and reward.pool_cursor == 2
    resumed = _pooled_reward(teacher_pool_refresh=4)
    resumed.load_state_dict(reward.state_dict())
    assert resumed.pool_cursor == 2 and torch.equal(resumed.teacher_pool, third)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="teacher_pool_refresh"):
        _pooled_reward(teacher_pool_refresh=7)
    with pytest.raises(ValueError, match="real_source"):
        DiscriminatorReward(discriminator_from_teacher(_tiny_teacher(), 1), teacher_holdout_size=4)


def test_holdout_monitor_does_not_change_training() -> None:
    samples, _ = _samples()
    plain, watched = _pooled_reward(), _pooled_reward(teacher_holdout_size=5)
    for _ in range(3):
        a, b = plain([None] * 4, samples), watched([None] * 4, samples)
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)
        assert {k: v for k, v in b.metrics.items() if k in a.metrics} == a.metrics
    assert {"acc_real_holdout", "reward_real_holdout", "reward_real"} <= set(b.metrics)
    assert watched.holdout_rows is not None and watched.holdout_rows.shape == (5, 10)
    resumed = _pooled_reward(teacher_holdout_size=5)
    resumed.load_state_dict(_through_disk(watched.state_dict()))  # a live optimizer state would be shared
    assert torch.equal(resumed.holdout_rows, watched.holdout_rows)  # type: ignore[arg-type]
    assert resumed([None] * 4, samples).metrics == watched([None] * 4, samples).metrics


def test_holdout_monitor_exposes_a_memorised_pool() -> None:
    """The fakes are fresh draws of the teacher itself (a perfect student), so the only thing a discriminator
    drilled on a 2-row pool can learn is those two rows: it calls them real and held-out teacher rows not."""
    reward = _pooled_reward(lr=3e-3, teacher_pool_size=2, teacher_holdout_size=16, updates_per_call=4)
    source, generator = _tiny_teacher(2), torch.Generator().manual_seed(9)
    history = []
    for _ in range(40):
        fake = source.sample(4, 10, 4, generator)
        history.append(reward([None] * 4, [{"tokens": row, "tau": 0.3} for row in fake.tolist()]).metrics)
    last = {key: sum(m[key] for m in history[-10:]) / 10 for key in history[-1]}
    assert last["reward_real"] > last["reward_real_holdout"] + 1.0
    assert last["acc_real"] > last["acc_real_holdout"] + 0.2


class _Rows:
    """A stand-in held-out dataset: `next_batch(n)` returns its first n rows {"input_ids": [L]}."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows, self.calls = rows, 0

    def __len__(self) -> int:
        return len(self.rows)

    def next_batch(self, count: int) -> list[dict[str, Any]]:
        self.calls += 1
        return [{"input_ids": row} for row in self.rows[:count].tolist()]


def _data_reward(**kwargs: Any) -> DiscriminatorReward:
    torch.manual_seed(0)  # the new head's init
    options: dict[str, Any] = dict(lr=1e-3, warmup_steps=0, seed=1)
    return DiscriminatorReward(discriminator_from_teacher(_tiny_teacher(), 1), **(options | kwargs))


def test_data_holdout_monitor_does_not_change_training_and_is_checkpointed() -> None:
    samples, real = _samples()
    held_out = _Rows(torch.randint(0, 64, (12, 10), generator=torch.Generator().manual_seed(3)))
    plain, watched = _data_reward(), _data_reward(data_holdout=held_out, data_holdout_size=5)
    for _ in range(3):
        a, b = plain([None] * 4, samples, input_ids=real), watched([None] * 4, samples, input_ids=real)
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)
        assert {k: v for k, v in b.metrics.items() if k in a.metrics} == a.metrics
    assert {"acc_real_holdout", "reward_real_holdout", "reward_real"} <= set(b.metrics)
    assert held_out.calls == 1 and watched.holdout_rows is not None
    assert torch.equal(watched.holdout_rows, held_out.rows[:5])  # drawn once, the first data_holdout_size rows
    resumed = _data_reward(data_holdout=_Rows(held_out.rows.flip(0)), data_holdout_size=5)
    resumed.load_state_dict(_through_disk(watched.state_dict()))
    assert torch.equal(resumed.holdout_rows, held_out.rows[:5])  # type: ignore[arg-type]
    assert resumed([None] * 4, samples, input_ids=real).metrics == watched([None] * 4, samples, input_ids=real).metrics
    small = _data_reward(data_holdout=_Rows(held_out.rows[:3]), data_holdout_size=5)
    small([None] * 4, samples, input_ids=real)
    assert small.holdout_rows is not None and small.holdout_rows.shape == (3, 10)  # capped at the dataset's size


def test_data_holdout_errors_name_the_field() -> None:
    samples, real = _samples()
    rows = _Rows(torch.zeros(4, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="data_holdout needs real_source='data'"):
        _data_reward(data_holdout=rows, real_source="teacher", teacher=_tiny_teacher(2))
    with pytest.raises(ValueError, match="next_batch"):
        _data_reward(data_holdout=[[0] * 10])
    with pytest.raises(ValueError, match="data_holdout_size"):
        _data_reward(data_holdout=rows, data_holdout_size=0)
    with pytest.raises(ValueError, match=r"length\(s\) \[7\], the samples 10"):
        _data_reward(data_holdout=_Rows(torch.zeros(4, 7, dtype=torch.long)))([None] * 4, samples, input_ids=real)


def test_data_holdout_monitor_exposes_memorised_data_rows() -> None:
    """Data, fakes and held-out rows are all uniform random rows (a perfect student of that "corpus"); the
    discriminator drilled on the same 2 data rows can only learn those: it calls them real and held-out rows not."""
    generator = torch.Generator().manual_seed(11)
    train_rows = torch.randint(0, 64, (2, 10), generator=generator)
    held_out = _Rows(torch.randint(0, 64, (16, 10), generator=generator))
    reward = _data_reward(lr=3e-3, updates_per_call=4, data_holdout=held_out, data_holdout_size=16)
    history = []
    for _ in range(40):
        fake = torch.randint(0, 64, (4, 10), generator=generator)
        samples = [{"tokens": row, "tau": 0.3} for row in fake.tolist()]
        history.append(reward([None] * 4, samples, input_ids=train_rows.repeat(2, 1).tolist()).metrics)
    last = {key: sum(m[key] for m in history[-10:]) / 10 for key in history[-1]}
    assert last["reward_real"] > last["reward_real_holdout"] + 1.0
    assert last["acc_real"] > last["acc_real_holdout"] + 0.2


def test_lr_schedule_counts_calls_not_updates() -> None:
    """With several updates per call the warm-up/decay still runs over `total_steps` student steps."""
    samples, real = _samples()
    reward = DiscriminatorReward(
        discriminator_from_teacher(_tiny_teacher(), 1), lr=1e-3, warmup_steps=2, total_steps=10, updates_per_call=3
    )
    lrs = [reward([None] * 4, samples, input_ids=real).metrics["lr"] for _ in range(4)]
    # The call index drives the schedule: calls 0, 1 warm up (5e-4, 1e-3), calls 2, 3 decay (1e-3, 8.75e-4).
    expected = [linear_warmup_decay(c, 2, 10, 1e-3, 1e-8) for c in range(4)]
    assert lrs == pytest.approx(expected)
    assert lrs[1] == pytest.approx(1e-3) and lrs[3] < lrs[2] <= lrs[1]
