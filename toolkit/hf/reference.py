"""The frozen reference copy of a policy's weights (`reference="copy"`), taken once and only from the initial weights.

Shared by the causal-LM, video-VLM and flow-matching policies. The copy is a snapshot of the weights the policy
was built with: the Trainer takes it before the first optimizer step (`init_reference()`), and a copy requested
later is refused once the weights may differ from construction, instead of silently becoming the wrong reference.
Under FSDP2 or DeepSpeed ZeRO-3 the Trainer shards the copy like the policy right after taking it
(toolkit.train.sharding.prepare), so no rank keeps a second full copy; a copy of an already sharded module is refused.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from toolkit.distributed import unwrap
from toolkit.train import sharded_copy


def weight_fingerprint(module: nn.Module) -> Tensor:
    """[P] float64 per-parameter sums (on CPU): cheap evidence that the weights have not changed."""
    with torch.no_grad():
        return torch.stack([p.detach().sum(dtype=torch.float64).cpu() for p in module.parameters()])


def is_sharded(module: nn.Module) -> bool:
    """True when `module` holds FSDP2 shards (DTensor parameters) or ZeRO-3 partitions instead of whole weights."""
    return any(type(p).__name__ == "DTensor" or hasattr(p, "ds_id") for p in module.parameters())


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of the unwrapped `module` in eval mode, with no gradients and requires_grad off."""
    reference = copy.deepcopy(unwrap(module)).eval().requires_grad_(False)
    for p in reference.parameters():
        p.grad = None
    return reference


class ReferenceSnapshot:
    """One frozen copy of `module`'s construction-time weights, taken at the first `take()`.

    `take()` is idempotent: later calls return the same copy (moved to the policy's device), never a new
    snapshot of weights that have been trained since. The first `take()` is refused with a RuntimeError once the
    weights may have changed: after `mark_updated()` (the policy's `after_optimizer_step` hook) or when the weights'
    fingerprint differs from the one recorded here (a step outside the Trainer, a checkpoint load).

    Args:
        module: the policy's module as built, before any update (its fingerprint is recorded now).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module: nn.Module | None = None
        self._fingerprint = weight_fingerprint(module)
        self._updated = False

    def mark_updated(self) -> None:
        """Record that an optimizer step has changed the weights (a copy can no longer be taken)."""
        self._updated = True

    def take(self, module: nn.Module) -> nn.Module:
        """The frozen copy, taken now from `module` on the first call; on `module`'s device."""
        if self.module is None:
            self._check_unchanged(module)
            # Under FSDP2 a storage-less skeleton, filled with the sharded policy's own shards by
            # toolkit.train.sharding.prepare: no rank ever holds a second full copy of the weights.
            self.module = sharded_copy.frozen_skeleton(module) if sharded_copy.fsdp_pending() else frozen_copy(module)
        if sharded_copy.is_skeleton(self.module):
            return self.module
        device = next(module.parameters()).device
        if next(self.module.parameters()).device != device:
            self.module.to(device)
        return self.module

    def _check_unchanged(self, module: nn.Module) -> None:
        if is_sharded(module):
            raise RuntimeError(
                "the reference copy must be taken before the policy is sharded (FSDP / ZeRO-3): call "
                "policy.init_reference() before accelerator.prepare (the Trainer does when the KL term needs it)"
            )
        # rtol tolerates device moves (reduction order); an optimizer step changes the sums far more.
        changed = not torch.allclose(weight_fingerprint(module), self._fingerprint, rtol=1e-9, atol=1e-12)
        if self._updated or changed:
            raise RuntimeError(
                "the reference copy must be taken from the initial weights, but "
                + ("an optimizer step has run" if self._updated else "the weights changed since construction")
                + ": call policy.init_reference() before training (or loading a checkpoint)"
            )
