"""Critic (value model) support for the PPO + GAE path (PPR's official setting, arXiv:2509.25598
docs/methods/ppr.md §6).

A critic (`toolkit.interfaces.Critic`) is any object with `module` (its trainable nn.Module) and
`values(rollout) -> [N, T]` (differentiable). The trainer records `rollout.values` under no grad before
the advantages, the `GAENormalizer` turns them into advantages and returns, and `CriticUpdater` fits
the critic to those returns with the clipped value loss and its own AdamW — in the same minibatches as
the policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from toolkit.interfaces import Critic
from toolkit.objective.aggregation import value_loss
from toolkit.rollout import Rollout

__all__ = ["RETURNS_KEY", "Critic", "CriticUpdater"]

RETURNS_KEY = "returns"


class CriticUpdater:
    """Owns the critic's optimizer and applies the clipped value loss (verl `compute_value_loss`).

    Args:
        critic: the value model.
        accelerator: the run's accelerate.Accelerator (wraps the module for DDP/FSDP).
        lr, weight_decay, max_grad_norm: AdamW and clipping for the critic.
        value_clip: PPO value clip c (PPR: 0.5); None disables it.
    """

    def __init__(
        self,
        critic: Critic,
        accelerator: Any,
        lr: float,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = 1.0,
        value_clip: float | None = 0.5,
    ) -> None:
        params = [p for p in critic.module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the critic has no trainable parameters")
        self.critic = critic
        self.accelerator = accelerator
        self.max_grad_norm = max_grad_norm
        self.value_clip = value_clip
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        critic.module, self.optimizer = accelerator.prepare(critic.module, optimizer)

    @torch.no_grad()
    def record_values(self, rollout: Rollout) -> Tensor:
        """[N, T] values at rollout time (the `old_values` of the clipped loss)."""
        values: Tensor = self.critic.values(rollout).detach().float()
        return values

    def backward(self, micro: Rollout, num_tokens: float, world_size: int) -> dict[str, float]:
        """Value loss on one micro-batch, backpropagated; returns its metrics."""
        returns = micro.data.get(RETURNS_KEY)
        if micro.values is None or not isinstance(returns, Tensor):
            raise ValueError(
                "the critic update needs rollout.values and data['returns'] (use toolkit.advantages.GAENormalizer)"
            )
        out = value_loss(
            self.critic.values(micro), micro.values, returns, micro.mask, self.value_clip, num_tokens=num_tokens
        )
        self.accelerator.backward(out.loss * world_size)
        return out.metrics

    def step(self) -> float:
        """Clip, step, zero; returns the critic's gradient norm (NaN when not clipped)."""
        grad_norm = float("nan")
        if self.max_grad_norm is not None:
            grad_norm = float(self.accelerator.clip_grad_norm_(self.critic.module.parameters(), self.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def state_dict(self) -> dict[str, Any]:
        from toolkit.distributed import unwrap

        return {"weights": unwrap(self.critic.module).state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        from toolkit.distributed import unwrap

        unwrap(self.critic.module).load_state_dict(state["weights"])
        self.optimizer.load_state_dict(state["optimizer"])
