"""The DiDi student's EMA copy taken lazily (modalities.diffusion_lm.student_ema), in one process; its FSDP2
sharding is tested on two ranks in tests/toolkit/train/test_fsdp_copies.py."""

from __future__ import annotations

import pytest
import torch

from modalities.diffusion_lm.didi_policy import StudentPolicy
from modalities.diffusion_lm.tiny import build_tiny_teacher


def _policy(decay: float = 0.5) -> StudentPolicy:
    return StudentPolicy(build_tiny_teacher(seed=0, hidden_size=32, num_blocks=1, num_heads=2), ema_decay=decay)


def test_the_ema_copy_is_taken_from_the_initial_weights_when_the_module_is_handed_back() -> None:
    policy = _policy()
    assert policy._ema is not None and policy._ema.module is None  # nothing copied at construction
    initial = {k: v.clone() for k, v in policy.module.state_dict().items()}
    policy.module = policy.module  # what the Trainer does with the prepared module (one process: the same one)
    ema = policy._ema.module
    assert ema is not None and ema is policy.ema
    with torch.no_grad():
        for p in policy.module.parameters():
            p.add_(1.0)
    policy.after_optimizer_step()
    for key, value in policy.ema.state_dict().items():
        torch.testing.assert_close(value, 0.5 * initial[key] + 0.5 * policy.module.state_dict()[key])


def test_an_ema_first_needed_after_the_weights_changed_is_refused() -> None:
    policy = _policy()
    with torch.no_grad():
        next(policy.module.parameters()).add_(1.0)  # an optimizer step outside the Trainer
    with pytest.raises(RuntimeError, match="EMA copy must be taken from the student's initial weights"):
        policy.after_optimizer_step()
    stepped = _policy()
    stepped.num_updates = 1
    with pytest.raises(RuntimeError, match="an optimizer step has run"):
        _ = stepped.ema


def test_a_fresh_policy_takes_its_ema_from_a_loaded_state_not_from_its_student() -> None:
    trained = _policy()
    _ = trained.ema
    with torch.no_grad():
        for p in trained.module.parameters():
            p.mul_(0.5)
    trained.after_optimizer_step()
    fresh = _policy()
    fresh.load_trainable_state_dict(trained.trainable_state_dict())  # as `renorm export` loads a checkpoint
    fresh.load_state_dict(trained.state_dict())
    assert fresh.num_updates == 1 and fresh.ema is not None and trained.ema is not None
    assert all(torch.equal(fresh.ema.state_dict()[k], v) for k, v in trained.ema.state_dict().items())
    assert fresh.ema_model().backbone is fresh.ema
