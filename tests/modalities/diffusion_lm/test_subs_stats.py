"""Blockwise SUBS statistics (issue 19): the DiDi student's step log-probs, entropy and teacher divergence and the
teacher's NELBO equal the direct fp32 [N, L, V] formulas (values bitwise on CPU, gradients to float rounding), for
fp32 and bf16 logits and any block size, and backward keeps no fp32 [N, L, V] tensor of its own."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from bench.didi_logprob_memory import direct_policy_terms  # the policy's formulas before issue 19
from modalities.diffusion_lm.didi_policy import StudentPolicy, categorical_entropy, teacher_divergence
from modalities.diffusion_lm.didi_sampler import TwoStepStudentSampler
from modalities.diffusion_lm.masked_diffusion import subs_log_probs
from modalities.diffusion_lm.subs_stats import subs_stats
from modalities.diffusion_lm.teacher import blockwise_nelbo
from tests.modalities.diffusion_lm.test_didi import _prompts, _tiny_teacher

MASK = 10


def random_case(dtype: torch.dtype, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(student logits [3, 7, 11] requiring grad, teacher logits, z with ~half masked, targets)."""
    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(3, 7, 11, generator=generator)).to(dtype).requires_grad_()
    teacher = 3 * torch.randn(3, 7, 11, generator=generator)
    z = torch.randint(0, MASK, (3, 7), generator=generator)
    z[torch.rand(3, 7, generator=generator) < 0.5] = MASK
    targets = torch.randint(0, MASK, (3, 7), generator=generator)
    return logits, teacher, z, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("regularization", ["jeffrey", "forward_kl", "reverse_kl"])
@pytest.mark.parametrize("chunk_rows", [1, 4, None])
def test_blockwise_stats_equal_the_direct_formulas(
    dtype: torch.dtype, regularization: str, chunk_rows: int | None
) -> None:
    logits, teacher, z, targets = random_case(dtype)
    masked = z == MASK
    s, t = subs_log_probs(logits.float(), z, MASK), subs_log_probs(teacher, z, MASK)
    direct = [
        s.gather(-1, targets.unsqueeze(-1)).squeeze(-1),
        categorical_entropy(s),
        teacher_divergence(s, t, regularization, 0.3),  # type: ignore[arg-type]
    ]
    stats = subs_stats(logits, z, MASK, targets, True, teacher, regularization, 0.3, chunk_rows)
    blockwise = [stats.picked, stats.entropy, stats.divergence]
    weights = torch.randn(3, *z.shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for values in (direct, blockwise):
        loss = sum(
            (torch.where(masked, value, 0.0) * weight).sum() for value, weight in zip(values, weights, strict=True)
        )
        grads.append(torch.autograd.grad(loss, logits)[0].float())
    for a, b in zip(direct, blockwise, strict=True):
        assert b is not None and b.dtype == torch.float32
        assert torch.equal(torch.where(masked, a, 0.0), b), "values at masked positions, 0 elsewhere"
    scale = float(grads[0].abs().max())
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-6 * scale if dtype == torch.float32 else 0.0)
    assert torch.all(grads[1][~masked] == 0) and torch.all(grads[1][..., MASK] == 0)


def test_only_the_asked_statistics_are_computed_and_bad_input_is_named() -> None:
    logits, teacher, z, targets = random_case(torch.float32)
    stats = subs_stats(logits, z, MASK, targets=targets)
    assert stats.picked is not None and stats.entropy is None and stats.divergence is None
    with pytest.raises(ValueError, match="regularization='kl'"):
        subs_stats(logits, z, MASK, teacher_logits=teacher, regularization="kl")
    with pytest.raises(ValueError, match="logits must be"):
        subs_stats(logits[0], z, MASK)
    with pytest.raises(ValueError, match="teacher_logits must match"):
        subs_stats(logits, z, MASK, teacher_logits=teacher[:2])
    with pytest.raises(ValueError, match="chunk_rows"):
        subs_stats(logits, z, MASK, targets=targets, chunk_rows=0)


def assert_gradients_close(direct: tuple[Tensor, ...], blockwise: tuple[Tensor, ...]) -> None:
    """Per weight tensor, the largest difference within 2e-6 of the largest direct gradient (float rounding: the
    blockwise backward sums the same terms in another order)."""
    for a, b in zip(direct, blockwise, strict=True):
        assert float((b - a).abs().max()) <= 2e-6 * float(a.abs().max()), "gradients differ beyond rounding"


@pytest.mark.parametrize("options", [{}, {"regularization": "forward_kl"}, {"logprob_mode": "changed_only"}])
@pytest.mark.parametrize("num_steps", [2, 3])
def test_student_policy_terms_equal_the_direct_path(options: dict[str, Any], num_steps: int) -> None:
    policy = StudentPolicy(_tiny_teacher(0), _tiny_teacher(1), ema_decay=None, **options)
    rollout = TwoStepStudentSampler(num_steps=num_steps).sample(
        policy, _prompts(2), 3, torch.Generator().manual_seed(0)
    )
    params = [p for p in policy.module.parameters() if p.requires_grad]
    weights = torch.randn(3, *rollout.mask.shape, generator=torch.Generator().manual_seed(1))
    direct = direct_policy_terms(policy, rollout)
    logprobs, entropy = policy.log_probs_and_entropy(rollout)
    blockwise = (logprobs, entropy, policy.analytic_kl(rollout))  # the KL reuses the log-prob forward
    for a, b in zip(direct, blockwise, strict=True):
        assert torch.equal(a, b)
    grads = [
        torch.autograd.grad(sum((v * w).sum() for v, w in zip(values, weights, strict=True)), params)
        for values in (direct, blockwise)
    ]
    assert_gradients_close(*grads)
    torch.testing.assert_close(policy.log_probs(rollout), rollout.old_logprobs, rtol=0, atol=0)


def saved_vocab_tensors(run: Any, positions: int, vocab: int) -> list[tuple[int, ...]]:
    """Shapes of the distinct storages autograd saves for backward, while `run()` builds its graph, of the float
    [..., V] tensors with one row per position (logits, log-probs and their derivatives; no weight, no activation)."""
    seen: dict[int, tuple[int, ...]] = {}

    def pack(tensor: Tensor) -> Tensor:
        if tensor.is_floating_point() and tensor.shape[-1] == vocab and tensor.numel() == positions * vocab:
            seen[tensor.untyped_storage().data_ptr()] = tuple(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return list(seen.values())


def test_backward_keeps_no_copy_of_the_logits() -> None:
    """Saved for backward, per step: the student's and the teacher's logits, each once; the direct path saves
    several more [N, L, V] tensors per step (log-softmax output, its exp, differences)."""
    policy = StudentPolicy(_tiny_teacher(0), _tiny_teacher(1), ema_decay=None)
    rollout = TwoStepStudentSampler().sample(policy, _prompts(2, length=12), 2, torch.Generator().manual_seed(0))

    def blockwise() -> None:
        policy.log_probs_and_entropy(rollout)
        policy.analytic_kl(rollout)

    steps = rollout.mask.shape[1]
    positions, vocab = rollout.data["x"].numel(), policy.student.vocab_size  # N·L rows of V logits
    shapes = saved_vocab_tensors(blockwise, positions, vocab)
    assert len(shapes) == 2 * steps, shapes
    direct = saved_vocab_tensors(lambda: direct_policy_terms(policy, rollout), positions, vocab)
    assert len(direct) >= 4 * steps, direct


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_blockwise_nelbo_equals_the_model_nelbo(mixed_precision: str) -> None:
    model = _tiny_teacher(3)
    model.mixed_precision = mixed_precision
    x = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    direct = model.nelbo(x, torch.Generator().manual_seed(5))
    blockwise = blockwise_nelbo(model, x, torch.Generator().manual_seed(5), chunk_rows=5)
    assert torch.equal(direct, blockwise)
    params = list(model.parameters())
    assert_gradients_close(torch.autograd.grad(direct, params), torch.autograd.grad(blockwise, params))
