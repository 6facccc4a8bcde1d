"""Reading the weights to push: the hook-free state matches `state_dict()` (tied weights, LoRA), ZeRO-3 placeholders
are refused instead of sent as empty tensors, and the weights version follows in-place updates."""

from __future__ import annotations

import pytest
import torch

from tests.modalities.text_agent.test_text_policy import LORA
from tests.tiny import tiny_text_policy
from toolkit.engines.base import weights_version
from toolkit.engines.weights import current_state, has_sharded_weights, policy_weights


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_hook_free_state_is_the_state_dict(lora: bool) -> None:
    module = tiny_text_policy(lora=LORA if lora else None).module
    module.config.tie_word_embeddings = True  # a tied head: one tensor under two names, as in state_dict()
    module.get_output_embeddings().weight = module.get_input_embeddings().weight
    expected, state = module.state_dict(keep_vars=True), current_state(module)
    assert list(state) == list(expected) and all(state[k] is expected[k] for k in expected)
    assert not has_sharded_weights(tiny_text_policy())


def test_zero3_placeholders_are_refused_not_pushed_empty() -> None:
    policy = tiny_text_policy()
    weight = policy.module.get_input_embeddings().weight
    weight.ds_numel = weight.numel() * 2  # type: ignore[attr-defined]  # as ZeRO-3 marks a partitioned parameter
    with pytest.raises(ValueError, match=r"partitioned by DeepSpeed ZeRO-3 .*gathered_weights"):
        policy_weights(policy)
    weight.ds_numel = weight.numel()  # type: ignore[attr-defined]  # gathered: whole again
    assert policy_weights(policy)[0]


def test_the_weights_version_follows_in_place_updates_only() -> None:
    module = tiny_text_policy().module
    before = weights_version(module)
    module(torch.tensor([[5, 6, 7]]))
    assert weights_version(module) == before
    with torch.no_grad():
        next(module.parameters()).add_(1.0)
    assert weights_version(module) > before
