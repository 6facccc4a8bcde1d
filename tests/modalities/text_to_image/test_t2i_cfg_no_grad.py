"""SD3 true CFG in training with the unconditional half under no_grad (issue 19): the same loss and gradients as one
batched [uncond; cond] forward with a detach (the code before), with and without checkpointing, full and LoRA; the
unconditional forward records no graph; FLUX (guidance embedding, no unconditional half) is unchanged; and the
diffusers attention backend is chosen by name with clear errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from modalities.text_to_image.attention import resolve_attention_backend
from modalities.text_to_image.policy import FlowMatchingPolicy
from modalities.text_to_image.sampler import FlowSDESampler
from modalities.text_to_image.tiny import build_tiny_policy
from toolkit.rollout import Rollout

PROMPTS = [{"prompt": "a red apple", "id": "p0"}, {"prompt": "a blue car", "id": "p1"}]
LORA = {"r": 4, "lora_alpha": 8, "init_lora_weights": "gaussian"}


def rollout_for(arch: str) -> Rollout:
    sampler = FlowSDESampler(
        num_steps=4,
        guidance_scale=4.5 if arch == "sd3" else 3.5,
        height=32,
        width=32,
        train_step_fraction=0.67,
        init_same_noise=False,
    )
    return sampler.sample(build_tiny_policy(arch, with_vae=False), PROMPTS, 2, torch.Generator().manual_seed(0))


def loss_and_grads(policy: FlowMatchingPolicy, rollout: Rollout) -> tuple[Tensor, Tensor]:
    """A ratio surrogate (unclipped: a clip boundary would turn rounding into a jump) plus the analytic KL (both
    re-scoring paths), and the gradient of every trainable weight."""
    advantages = torch.tensor([1.0, -0.5, 0.25, -2.0])[:, None]
    with torch.no_grad():  # move the policy off the reference so the KL has a gradient
        for name, p in policy.module.named_parameters():
            if p.requires_grad:
                p.add_(1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    ratio = torch.exp(policy.log_probs(rollout) - rollout.old_logprobs)
    loss = -(advantages * ratio)[rollout.mask].mean() + policy.analytic_kl(rollout)[rollout.mask].mean()
    loss.backward()
    grads = [p.grad.flatten() for p in policy.module.parameters() if p.requires_grad and p.grad is not None]
    return loss.detach(), torch.cat(grads)


@pytest.mark.parametrize("arch", ["sd3", "flux"])
@pytest.mark.parametrize("options", [{}, {"gradient_checkpointing": True, "micro_batch_size": 3}, {"lora": LORA}])
def test_uncond_without_grad_gives_the_same_loss_and_gradients(arch: str, options: dict[str, Any]) -> None:
    rollout = rollout_for(arch)
    reference = "copy" if "lora" not in options else "adapters_off"
    results = []
    for split in (False, True):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # peft draws the LoRA init from the global RNG: the same adapters on both sides
            policy = build_tiny_policy(arch, with_vae=False, uncond_without_grad=split, reference=reference, **options)
        policy.init_reference()
        results.append(loss_and_grads(policy, rollout))
    (loss_before, grads_before), (loss_after, grads_after) = results
    assert grads_before.numel() > 0 and float(grads_before.abs().sum()) > 0
    if arch == "flux":  # no unconditional half: the very same computation
        assert torch.equal(loss_before, loss_after) and torch.equal(grads_before, grads_after)
        return
    torch.testing.assert_close(loss_after, loss_before, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads_after, grads_before, rtol=1e-4, atol=1e-7)


def record_calls(module: nn.Module) -> list[tuple[int, bool]]:
    """(batch size, grad enabled) of every forward call of `module`, appended as they happen."""
    calls: list[tuple[int, bool]] = []

    def hook(_: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        calls.append((int(kwargs["hidden_states"].shape[0]), torch.is_grad_enabled()))

    module.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def test_the_unconditional_half_runs_under_no_grad_and_sampling_stays_batched() -> None:
    rollout = rollout_for("sd3")
    count = int(rollout.mask.sum())
    for split, expected in ((True, [(count, False), (count, True)]), (False, [(2 * count, True)])):
        policy = build_tiny_policy("sd3", with_vae=False, uncond_without_grad=split)
        calls = record_calls(policy.module)
        policy.log_probs(rollout)
        assert calls == expected
    policy = build_tiny_policy("sd3", with_vae=False)
    calls = record_calls(policy.module)
    FlowSDESampler(num_steps=3, guidance_scale=4.5, height=32, width=32, train_step_fraction=1.0).sample(
        policy, PROMPTS[:1], 2, torch.Generator().manual_seed(0)
    )
    assert calls == [(4, False)] * 3, "sampling: one batched [uncond; cond] forward per step"


def test_cfg_gradient_both_keeps_the_batched_forward() -> None:
    rollout = rollout_for("sd3")
    policy = build_tiny_policy("sd3", with_vae=False, cfg_gradient="both")
    calls = record_calls(policy.module)
    policy.log_probs(rollout)
    assert calls == [(2 * int(rollout.mask.sum()), True)]


def test_attention_backend_by_name() -> None:
    rollout = rollout_for("sd3")
    default = build_tiny_policy("sd3", with_vae=False).log_probs(rollout).detach()
    for name in ("native", "sdpa"):
        chosen = build_tiny_policy("sd3", with_vae=False, attn_implementation=name)
        torch.testing.assert_close(chosen.log_probs(rollout).detach(), default, rtol=0, atol=1e-6)
    assert resolve_attention_backend("flash_attention_2") == "flash"
    with pytest.raises(ValueError, match="attn_implementation='flash_attn_9'.*native"):
        build_tiny_policy("sd3", with_vae=False, attn_implementation="flash_attn_9")
    with pytest.raises(ImportError, match="attn_implementation='flash_attention_2'.*flash"):
        build_tiny_policy("sd3", with_vae=False, attn_implementation="flash_attention_2")
