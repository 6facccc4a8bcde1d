"""CausalLMCritic: a causal-LM trunk with a scalar value head, for PPO + GAE (PPR's official path).

The value of step t is read at the position that predicts response token t — the same positions
the policy's log-probs come from — so values, log-probs and rewards line up on the [N, T] grid.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from modalities.text_agent.policy import position_ids_from_mask, sequence_tensors
from toolkit.rollout import Rollout


class ValueModel(nn.Module):
    """The trunk of a causal LM (its `.model`, or the module itself) plus Linear(hidden, 1)."""

    def __init__(self, lm: nn.Module, head_init_std: float = 0.0) -> None:
        super().__init__()
        self.trunk = getattr(lm, "model", lm)
        hidden = int(lm.config.hidden_size)
        self.head = nn.Linear(hidden, 1)
        nn.init.normal_(self.head.weight, std=head_init_std) if head_init_std > 0 else nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        hidden = self.trunk(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
        out: Tensor = self.head(hidden.float()).squeeze(-1)
        return out


class CausalLMCritic:
    """Critic over a rollout's response tokens.

    Args:
        model: a hub id/path (`AutoModelForCausalLM.from_pretrained`) or a built causal LM module
            (e.g. a `_component_` node; usually the same architecture as the policy).
        head_init_std: std of the value head's initial weights (0 = zeros, values start at 0).
        gradient_checkpointing: trade compute for memory in the trunk.
    """

    def __init__(
        self,
        model: str | nn.Module | Mapping[str, Any],
        head_init_std: float = 0.0,
        gradient_checkpointing: bool = False,
    ) -> None:
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model)
        if not isinstance(model, nn.Module):
            raise ValueError(f"CausalLMCritic needs a model id/path or a built module, got {type(model).__name__}")
        if gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.module: nn.Module = ValueModel(model, head_init_std)

    def values(self, rollout: Rollout) -> Tensor:
        """[N, T] float32 values; 0 where the mask is False."""
        num_steps = rollout.num_steps
        device = next(self.module.parameters()).device
        input_ids, attention_mask = (t.to(device) for t in sequence_tensors(rollout.data, num_steps))
        values = self.module(
            input_ids=input_ids,
            attention_mask=attention_mask.long(),
            position_ids=position_ids_from_mask(attention_mask),
        )
        values = values[:, -(num_steps + 1) : -1].float()
        return torch.where(rollout.mask.to(device), values, torch.zeros_like(values))
