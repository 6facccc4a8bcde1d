"""The policy/sampler contract every modality passes (a pytest class mixin, as in diffusers' tester mixins).

Subclass as `class TestMyPolicy(PolicyContract)` and provide `make_policy`, `make_sampler` and
`make_prompts`. The central check: re-scored log-probs equal the sampler's (on-policy ratio 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from toolkit.interfaces import EntropyPolicy, Policy, ReferencePolicy, Sampler
from toolkit.rollout import Rollout


class PolicyContract:
    """Mixin of contract tests for a Policy + Sampler pair.

    Attributes a subclass may override: `group_size`, `seed`, `logprob_atol`, and
    `reference_equals_policy_at_init` (True when the reference starts as the policy's own weights).
    """

    group_size: int = 2
    seed: int = 0
    logprob_atol: float = 1e-5
    reference_equals_policy_at_init: bool = True

    def make_policy(self) -> Policy:
        raise NotImplementedError

    def make_sampler(self) -> Sampler:
        raise NotImplementedError

    def make_prompts(self) -> list[Any]:
        raise NotImplementedError

    def perturb_masked_steps(self, rollout: Rollout, mask: Tensor) -> Rollout | None:
        """Optionally return `rollout` with the content of steps where `mask` is False changed."""
        return None

    # helpers

    def sample(self, policy: Policy, seed: int | None = None) -> Rollout:
        generator = torch.Generator().manual_seed(self.seed if seed is None else seed)
        return self.make_sampler().sample(policy, self.make_prompts(), self.group_size, generator)

    @staticmethod
    def trainable_parameters(policy: Policy) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in policy.module.named_parameters() if p.requires_grad]

    @staticmethod
    def masked_variant(rollout: Rollout) -> Rollout:
        """The rollout with row 0 and each row's last trained step masked out."""
        mask = rollout.mask.clone()
        mask[0] = False
        steps = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask, steps, -1).amax(dim=1)
        mask[(steps == last[:, None]) & (last[:, None] >= 0)] = False
        return dataclasses.replace(rollout, mask=mask)

    # contract

    def test_rollout_shapes(self) -> None:
        prompts = self.make_prompts()
        rollout = self.sample(self.make_policy())
        n = len(prompts) * self.group_size
        assert len(rollout) == n
        assert torch.equal(rollout.group_ids.cpu(), torch.arange(n) // self.group_size)
        assert rollout.old_logprobs.dtype == torch.float32 and rollout.old_logprobs.dim() == 2
        assert rollout.mask.dtype == torch.bool and rollout.mask.shape == rollout.old_logprobs.shape
        assert rollout.mask.any(), "the rollout has no trained steps"
        assert torch.isfinite(rollout.old_logprobs).all()
        assert torch.all(rollout.old_logprobs[~rollout.mask] == 0)
        for name in ("lengths", "truncated"):
            value = getattr(rollout, name)
            assert value is None or value.shape == (n,)

    def test_log_probs_equal_old_logprobs(self) -> None:
        policy = self.make_policy()
        rollout = self.sample(policy)
        policy.module.train()
        logprobs = policy.log_probs(rollout)
        assert logprobs.shape == rollout.old_logprobs.shape and logprobs.dtype == torch.float32
        mask = rollout.mask
        torch.testing.assert_close(logprobs[mask], rollout.old_logprobs[mask], atol=self.logprob_atol, rtol=0)
        ratio = torch.exp(logprobs - rollout.old_logprobs)[mask]
        assert (ratio - 1).abs().max().item() <= self.logprob_atol
        assert torch.all(logprobs[~mask] == 0)

    def test_gradients_reach_trainable_parameters(self) -> None:
        policy = self.make_policy()
        rollout = self.sample(policy)
        policy.module.train()
        params = self.trainable_parameters(policy)
        assert params, "the policy has no trainable parameters"
        advantages = torch.randn(len(rollout), generator=torch.Generator().manual_seed(1)).to(rollout.device)
        logprobs = policy.log_probs(rollout)
        mask = rollout.mask.float()
        loss = -(advantages[:, None] * logprobs * mask).sum() / mask.sum()
        loss.backward()
        missing = [name for name, p in params if p.grad is None]
        assert not missing, f"no gradient reached {missing[:5]}"
        assert all(torch.isfinite(p.grad).all() for _, p in params if p.grad is not None)
        assert sum(float(p.grad.abs().sum()) for _, p in params if p.grad is not None) > 0

    def test_masked_steps_get_zero_gradient(self) -> None:
        policy = self.make_policy()
        rollout = self.masked_variant(self.sample(policy))
        policy.module.train()
        full = policy.log_probs(dataclasses.replace(rollout, mask=torch.ones_like(rollout.mask)))
        logprobs = policy.log_probs(rollout)
        masked_out = ~rollout.mask
        assert masked_out.any()
        assert torch.all(logprobs[masked_out] == 0)
        torch.testing.assert_close(logprobs[rollout.mask], full[rollout.mask].detach(), atol=self.logprob_atol, rtol=0)
        weights = torch.randn(logprobs.shape, generator=torch.Generator().manual_seed(2)).to(logprobs.device)
        (weights * logprobs)[masked_out].sum().backward()
        for name, p in self.trainable_parameters(policy):
            assert p.grad is None or torch.all(p.grad == 0), f"masked steps sent gradient to {name}"
        perturbed = self.perturb_masked_steps(rollout, rollout.mask)
        if perturbed is not None:
            again = policy.log_probs(perturbed)
            torch.testing.assert_close(again, logprobs.detach(), atol=self.logprob_atol, rtol=0)

    def test_sampling_is_deterministic_given_generator(self) -> None:
        policy = self.make_policy()
        first, second, other = self.sample(policy, seed=3), self.sample(policy, seed=3), self.sample(policy, seed=4)
        assert torch.equal(first.old_logprobs, second.old_logprobs)
        assert torch.equal(first.mask, second.mask)
        for key, value in first.data.items():
            if isinstance(value, Tensor):
                assert torch.equal(value, second.data[key]), f"data[{key!r}] differs between equal seeds"
        same_shape = first.old_logprobs.shape == other.old_logprobs.shape
        assert not (same_shape and torch.equal(first.old_logprobs, other.old_logprobs)), "seed had no effect"

    def test_sampling_restores_train_mode(self) -> None:
        policy = self.make_policy()
        policy.module.train()
        self.sample(policy)
        assert policy.module.training
        policy.module.eval()
        self.sample(policy)
        assert not policy.module.training

    def test_entropy_and_log_probs_agree(self) -> None:
        policy = self.make_policy()
        if not isinstance(policy, EntropyPolicy):
            return
        rollout = self.sample(policy)
        logprobs, entropy = policy.log_probs_and_entropy(rollout)
        assert torch.equal(logprobs, policy.log_probs(rollout))
        assert entropy.shape == logprobs.shape and torch.isfinite(entropy).all()
        assert torch.all(entropy[~rollout.mask] == 0)

    def test_reference_log_probs(self) -> None:
        policy = self.make_policy()
        if not isinstance(policy, ReferencePolicy):
            return
        rollout = self.sample(policy)
        reference = policy.ref_log_probs(rollout)
        assert reference.shape == rollout.old_logprobs.shape and not reference.requires_grad
        assert torch.all(reference[~rollout.mask] == 0)
        if self.reference_equals_policy_at_init:
            torch.testing.assert_close(reference, rollout.old_logprobs, atol=self.logprob_atol, rtol=0)
