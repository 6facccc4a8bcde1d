"""Padding-free (packed) re-scoring forwards of CausalLMPolicy (issue 19): the same log-probs, entropies and
gradients as the padded forward, one [1, S] forward per micro-batch over exactly the attended tokens, clear errors;
and `attn_implementation` checked and applied for every way a model is given."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch import Tensor

from modalities.text_agent.packing import packed_layout
from modalities.text_agent.policy import CausalLMPolicy
from modalities.text_agent.sampler import SingleTurnSampler
from tests.tiny import tiny_prompts, tiny_text_policy, tiny_tokenizer
from toolkit.rollout import Rollout, concat_rollouts

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}


def mixed_rollout() -> Rollout:
    """Rows of different prompt widths and response lengths (EOS early, padding after), joined as a refill would."""
    policy = tiny_text_policy()
    sampler = SingleTurnSampler(max_new_tokens=12)
    first = sampler.sample(policy, tiny_prompts(3), 2, torch.Generator().manual_seed(0))
    second = sampler.sample(policy, tiny_prompts(5)[3:], 3, torch.Generator().manual_seed(1))
    second = dataclasses.replace(second, group_ids=second.group_ids + 3)
    rollout = concat_rollouts([first, second])
    assert bool((~rollout.data["response_attention_mask"].bool()).any()), "some responses end early"
    return rollout


def scores_and_grads(policy: CausalLMPolicy, rollout: Rollout) -> tuple[Tensor, Tensor, Tensor]:
    policy.module.train()
    logprobs, entropy = policy.log_probs_and_entropy(rollout)
    weights = torch.randn(logprobs.shape, generator=torch.Generator().manual_seed(3))
    ((weights * logprobs).sum() + entropy.sum()).backward()
    grads = torch.cat([p.grad.flatten() for p in policy.module.parameters() if p.grad is not None])
    return logprobs.detach(), entropy.detach(), grads


@pytest.mark.parametrize(
    "options", [{}, {"micro_batch_size": 3}, {"lora": LORA, "gradient_checkpointing": True, "micro_batch_size": 4}]
)
def test_packed_forwards_give_the_padded_log_probs_and_gradients(options: dict[str, Any]) -> None:
    rollout = mixed_rollout()
    results = []
    for packed in (False, True):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # peft draws the LoRA init from the global RNG
            policy = tiny_text_policy(packed=packed, **options)
        results.append(scores_and_grads(policy, rollout))
    (lp_padded, ent_padded, grads_padded), (lp_packed, ent_packed, grads_packed) = results
    mask = rollout.mask
    torch.testing.assert_close(lp_packed, lp_padded, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent_packed, ent_padded, rtol=0, atol=1e-5)
    assert torch.all(lp_packed[~mask] == 0) and torch.all(ent_packed[~mask] == 0)
    torch.testing.assert_close(lp_packed[mask], rollout.old_logprobs[mask], rtol=0, atol=1e-5)
    assert float(grads_padded.abs().sum()) > 0
    torch.testing.assert_close(grads_packed, grads_padded, rtol=1e-4, atol=1e-6)


def test_one_forward_over_the_attended_tokens_without_a_mask() -> None:
    rollout = mixed_rollout()
    policy = tiny_text_policy(packed=True, micro_batch_size=4)
    calls: list[dict[str, Any]] = []
    policy.module.register_forward_pre_hook(lambda _, args, kwargs: calls.append(kwargs), with_kwargs=True)
    policy.log_probs(rollout)
    attended = torch.cat([rollout.data["prompt_attention_mask"], rollout.data["response_attention_mask"]], dim=1).bool()
    sizes = [int(attended[rows].sum()) for rows in (slice(0, 4), slice(4, 8), slice(8, 12))]
    assert [tuple(kwargs["input_ids"].shape) for kwargs in calls] == [(1, size) for size in sizes]
    assert all(kwargs.get("attention_mask") is None for kwargs in calls)
    first = calls[0]["position_ids"][0]
    assert int((first == 0).sum()) == 4, "positions restart at 0 for each of the 4 rows"
    responses = int(rollout.data["response_attention_mask"][:4].sum())
    assert calls[0]["logits_to_keep"].numel() == responses, "logits only where a response token is predicted"


def test_packed_layout_and_its_errors() -> None:
    ids = torch.tensor([[0, 5, 6, 7, 8], [9, 10, 11, 12, 0]])
    attention = torch.tensor([[False, True, True, True, True], [True, True, True, True, False]])
    layout = packed_layout(ids, attention, num_steps=2)
    assert layout.tokens.tolist() == [5, 6, 7, 8, 9, 10, 11, 12]
    assert layout.positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert layout.targets.tolist() == [2, 3, 7] and layout.response.tolist() == [[True, True], [True, False]]
    assert layout.unpack(torch.tensor([1.0, 2.0, 3.0])).tolist() == [[1.0, 2.0], [3.0, 0.0]]
    with pytest.raises(ValueError, match="prompt token before each response"):
        packed_layout(ids, torch.tensor([[False, False, False, True, True], [True] * 5]), num_steps=2)
    rollout = mixed_rollout()
    padded_mask = ~rollout.data["response_attention_mask"].bool()
    bad = dataclasses.replace(rollout, mask=rollout.mask | padded_mask)
    with pytest.raises(ValueError, match="outside the attention mask"):
        tiny_text_policy(packed=True).log_probs(bad)


def test_attn_implementation_is_checked_and_applied() -> None:
    built = tiny_text_policy(attn_implementation="eager")
    assert built.module.config._attn_implementation == "eager"
    config = {
        "model_type": "qwen2",
        "vocab_size": 128,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }
    from_config = CausalLMPolicy(config, tokenizer=tiny_tokenizer(), attn_implementation="eager")
    assert from_config.module.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="attn_implementation='flash'.*sdpa"):
        tiny_text_policy(attn_implementation="flash")
    with pytest.raises(ImportError, match="flash_attention_2.*flash-attn"):
        CausalLMPolicy("no/such-model", attn_implementation="flash_attention_2")  # fails before any download
