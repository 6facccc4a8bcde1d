"""The shared reference-copy guard (toolkit.hf.reference.ReferenceSnapshot) and the three policies that use it:
one frozen copy of the construction-time weights, taken once; a copy requested after an update is refused."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from modalities.medical_video.policy import VideoVLMPolicy
from modalities.medical_video.tiny import build_tiny_processor, build_tiny_qwen2_5_vl
from modalities.text_to_image.tiny import build_tiny_policy
from tests.tiny import tiny_text_policy
from toolkit.hf.reference import ReferenceSnapshot
from toolkit.interfaces import ReferenceSnapshotPolicy, StepHookPolicy


def linear() -> nn.Linear:
    return nn.Linear(3, 2).requires_grad_(True)


def nudge(module: nn.Module, delta: float = 1e-2) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(delta)


def test_take_returns_a_frozen_copy_of_the_initial_weights() -> None:
    module = linear()
    module(torch.ones(1, 3)).sum().backward()  # the live module has gradients; the copy must not carry them
    snapshot = ReferenceSnapshot(module)
    assert snapshot.module is None
    reference = snapshot.take(module)
    assert reference is not module and snapshot.module is reference and not reference.training
    for (name, p), q in zip(module.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q) and q.data_ptr() != p.data_ptr(), name
        assert not q.requires_grad and q.grad is None and p.grad is not None


def test_a_second_take_returns_the_first_snapshot_not_the_trained_weights() -> None:
    module = linear()
    initial = [p.detach().clone() for p in module.parameters()]
    snapshot = ReferenceSnapshot(module)
    reference = snapshot.take(module)
    nudge(module)
    snapshot.mark_updated()
    assert snapshot.take(module) is reference  # no error, no new copy once taken
    assert all(torch.equal(a, b) for a, b in zip(initial, reference.parameters(), strict=True))


def test_first_take_after_an_optimizer_step_is_refused() -> None:
    module = linear()
    snapshot = ReferenceSnapshot(module)
    snapshot.mark_updated()  # even when the step left the weights as they were (lr 0)
    with pytest.raises(RuntimeError, match=r"an optimizer step has run.*init_reference\(\)"):
        snapshot.take(module)
    assert snapshot.module is None


def test_first_take_after_the_weights_changed_is_refused() -> None:
    module = linear()
    snapshot = ReferenceSnapshot(module)
    nudge(module)  # a step outside the trainer, or a checkpoint load
    with pytest.raises(RuntimeError, match=r"weights changed since construction.*init_reference\(\)"):
        snapshot.take(module)


def test_unchanged_weights_in_another_dtype_round_trip_are_accepted() -> None:
    module = linear()
    snapshot = ReferenceSnapshot(module)
    module.to(torch.float64).to(torch.float32)  # exact round trip: same values, fresh storage
    assert snapshot.take(module) is not None


# ------------------------------------------------------------------------------------------ the three policies
def text_policy(**kwargs: Any) -> Any:
    return tiny_text_policy(**kwargs)


def image_policy(**kwargs: Any) -> Any:
    return build_tiny_policy("sd3", with_vae=False, **kwargs)


def video_policy(**kwargs: Any) -> Any:
    return VideoVLMPolicy(build_tiny_qwen2_5_vl(seed=0), build_tiny_processor(), **kwargs)


POLICIES: list[Callable[..., Any]] = [text_policy, image_policy, video_policy]


@pytest.mark.parametrize("build", POLICIES, ids=lambda f: f.__name__)
def test_policies_snapshot_once_before_training(build: Callable[..., Any]) -> None:
    policy = build(reference="copy")
    assert isinstance(policy, ReferenceSnapshotPolicy) and isinstance(policy, StepHookPolicy)
    initial = {k: v.clone() for k, v in policy.module.state_dict().items()}
    reference = policy.init_reference()
    nudge(policy.module)
    policy.after_optimizer_step()
    assert policy.init_reference() is reference  # idempotent: the snapshot is not retaken
    assert all(torch.equal(reference.state_dict()[k], v) for k, v in initial.items())
    assert not any(p.requires_grad for p in reference.parameters())


@pytest.mark.parametrize("build", POLICIES, ids=lambda f: f.__name__)
def test_policies_refuse_a_lazy_snapshot_after_an_update(build: Callable[..., Any]) -> None:
    stepped = build(reference="copy")
    stepped.after_optimizer_step()
    with pytest.raises(RuntimeError, match="init_reference"):
        stepped.init_reference()
    changed = build(reference="copy")
    nudge(changed.module)
    with pytest.raises(RuntimeError, match="init_reference"):
        changed.init_reference()


@pytest.mark.parametrize("build", POLICIES, ids=lambda f: f.__name__)
def test_policies_without_a_copy_score_the_reference_with_their_module(build: Callable[..., Any]) -> None:
    policy = build(reference="none")
    policy.after_optimizer_step()  # harmless without a snapshot
    assert policy.init_reference() is policy.module


@pytest.mark.gpu
@pytest.mark.parametrize("build", POLICIES, ids=lambda f: f.__name__)
def test_a_lazy_snapshot_after_a_move_to_cuda_is_taken_there(build: Callable[..., Any]) -> None:
    """The fingerprint tolerates a CPU → CUDA move (other reduction order); the copy follows the module's device."""
    policy = build(reference="copy")
    policy.module.cuda()
    reference = policy.init_reference()
    assert next(reference.parameters()).is_cuda
    policy.module.cpu()
    assert policy.init_reference() is reference and not next(reference.parameters()).is_cuda
