"""CausalLMPolicy + SingleTurnSampler: the policy contract, LoRA, references, EOS/stop handling, prompts."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from modalities.text_agent.policy import CausalLMPolicy, token_log_probs, token_log_probs_and_entropy
from modalities.text_agent.sampler import SingleTurnSampler
from tests.contracts import PolicyContract
from tests.tiny import EOS_TOKEN_ID, TINY_VOCAB_SIZE, tiny_lm, tiny_prompts, tiny_text_policy, tiny_tokenizer
from toolkit.rollout import Rollout, concat_rollouts

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}


def sample(policy: CausalLMPolicy, seed: int = 0, group_size: int = 2, prompts: Any = None, **kwargs: Any) -> Rollout:
    sampler = SingleTurnSampler(**{"max_new_tokens": 10, **kwargs})
    prompts = tiny_prompts(3) if prompts is None else prompts
    return sampler.sample(policy, prompts, group_size, torch.Generator().manual_seed(seed))


def sgd_step(policy: CausalLMPolicy, rollout: Rollout, lr: float = 0.5) -> None:
    """One plain gradient step on -mean(log-prob), so the weights certainly change."""
    policy.module.train()
    loss = -(policy.log_probs(rollout) * rollout.mask).sum() / rollout.mask.sum()
    loss.backward()
    with torch.no_grad():
        for p in policy.module.parameters():
            if p.grad is not None:
                p -= lr * p.grad
                p.grad = None


class TextContract(PolicyContract):
    policy_kwargs: dict[str, Any] = {}
    sampler_kwargs: dict[str, Any] = {}

    def make_policy(self) -> CausalLMPolicy:
        return tiny_text_policy(**self.policy_kwargs)

    def make_sampler(self) -> SingleTurnSampler:
        return SingleTurnSampler(**{"max_new_tokens": 10, **self.sampler_kwargs})

    def make_prompts(self) -> list[Any]:
        return tiny_prompts(3)

    def perturb_masked_steps(self, rollout: Rollout, mask: torch.Tensor) -> Rollout:
        # Changing a masked token can only affect later (also masked) positions: attention is causal.
        ids = rollout.data["response_ids"]
        data = {**rollout.data, "response_ids": torch.where(mask, ids, (ids + 7) % TINY_VOCAB_SIZE)}
        return dataclasses.replace(rollout, data=data)


class TestCausalLMContract(TextContract):
    pass


class TestLoRACheckpointedContract(TextContract):
    policy_kwargs = {"lora": LORA, "gradient_checkpointing": True, "micro_batch_size": 2}


class TestTemperatureContract(TextContract):
    policy_kwargs = {"temperature": 0.7, "top_p": 0.9, "top_k": 20}
    sampler_kwargs = {"generation_batch_size": 4}


def test_lora_trains_only_adapters_and_state_dict_holds_only_them() -> None:
    policy = tiny_text_policy(lora=LORA)
    trainable = [name for name, p in policy.module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    state = policy.trainable_state_dict()
    assert set(state) == set(trainable)
    other = tiny_text_policy(lora=LORA)
    with torch.no_grad():
        for name, p in other.module.named_parameters():
            if "lora_B" in name:
                p.fill_(0.3)
    other.load_trainable_state_dict(state)
    assert all(torch.equal(other.trainable_state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="missing"):
        other.load_trainable_state_dict({})


def test_full_trainable_state_dict_is_the_whole_model() -> None:
    policy = tiny_text_policy()
    assert set(policy.trainable_state_dict()) == set(policy.module.state_dict())


def test_lora_reference_is_the_base_model_with_adapters_off() -> None:
    policy = tiny_text_policy(lora=LORA)
    base = tiny_text_policy(reference="none")
    rollout = sample(policy)
    sgd_step(policy, rollout)
    moved = policy.log_probs(rollout).detach()
    reference = policy.ref_log_probs(rollout)
    assert (moved - rollout.old_logprobs).abs().max() > 1e-3, "the LoRA step did not change the policy"
    torch.testing.assert_close(reference, base.log_probs(rollout).detach(), atol=1e-5, rtol=0)


def test_copy_reference_keeps_initial_weights_and_is_lazy() -> None:
    policy = tiny_text_policy()
    rollout = sample(policy)
    assert policy.reference_mode == "copy" and policy._reference is None
    policy.init_reference()
    sgd_step(policy, rollout)
    assert (policy.log_probs(rollout).detach() - rollout.old_logprobs).abs().max() > 1e-3
    torch.testing.assert_close(policy.ref_log_probs(rollout), rollout.old_logprobs, atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in policy._reference.parameters())


def test_lazy_copy_after_weights_changed_raises() -> None:
    policy = tiny_text_policy()
    rollout = sample(policy)
    sgd_step(policy, rollout)
    with pytest.raises(RuntimeError, match="init_reference"):
        policy.ref_log_probs(rollout)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reference": "adapters_off"}, "needs lora"),
        ({"reference": "frozen"}, "reference='frozen'"),
        ({"dtype": "float16"}, "dtype='float16'"),
        ({"temperature": 0.0}, "temperature"),
        ({"micro_batch_size": 0}, "micro_batch_size"),
    ],
)
def test_policy_rejects_bad_config(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_text_policy(**kwargs)


def test_reference_none_raises_on_use() -> None:
    policy = tiny_text_policy(reference="none")
    with pytest.raises(ValueError, match="reference='none'"):
        policy.ref_log_probs(sample(policy))


def test_eos_ends_the_mask_and_later_tokens_are_not_trained() -> None:
    policy = tiny_text_policy(eos_logit=2.0)
    rollout = sample(policy, group_size=4)
    ids, mask = rollout.data["response_ids"], rollout.mask
    assert rollout.truncated.any() and (~rollout.truncated).any(), "want both finished and truncated rows"
    for row in range(len(rollout)):
        eos = (ids[row] == EOS_TOKEN_ID).nonzero()
        if rollout.truncated[row]:
            assert eos.numel() == 0 and mask[row].all() and rollout.lengths[row] == 10
        else:
            end = int(eos[0])
            assert rollout.lengths[row] == end + 1
            assert mask[row, : end + 1].all() and not mask[row, end + 1 :].any()
    assert torch.equal(rollout.lengths, mask.sum(1))


def test_certain_eos_gives_one_step_responses() -> None:
    rollout = sample(tiny_text_policy(eos_logit=60.0))
    assert rollout.num_steps == 1 and rollout.mask.all() and not rollout.truncated.any()
    assert rollout.completions == [""] * len(rollout)
    assert torch.all(rollout.old_logprobs > -1e-4)


def test_stop_strings_end_completions_at_their_first_occurrence() -> None:
    policy = tiny_text_policy(eos_logit=None)
    stops = ["a", "e", "i", "o", "u"]
    rollout = sample(policy, group_size=4, max_new_tokens=12, stop_strings=stops)
    tokenizer, stopped = tiny_tokenizer(), 0
    for row in range(len(rollout)):
        ids = rollout.data["response_ids"][row, : rollout.lengths[row]]
        # HF matches stop strings on token strings, special tokens included ("<pad>" contains "a").
        before, full = tokenizer.decode(ids[:-1]), tokenizer.decode(ids)
        assert not any(s in before for s in stops), "generation ran past a stop string"
        if not rollout.truncated[row] and ids[-1] != EOS_TOKEN_ID:
            stopped += 1
            assert any(s in full for s in stops)  # may end inside the last token, e.g. "</think>"
    assert stopped > 0


def test_prompt_length_limit_errors_or_keeps_the_end() -> None:
    policy = tiny_text_policy()
    prompts = [{"prompt": "abcdefgh", "id": "long"}]
    with pytest.raises(ValueError, match="max_prompt_length=4"):
        sample(policy, prompts=prompts, max_prompt_length=4)
    rollout = sample(policy, prompts=prompts, max_prompt_length=4, prompt_truncation="left")
    assert tiny_tokenizer().decode(rollout.data["prompt_ids"][0]) == "efgh"


def test_chat_messages_and_chat_template_flag_use_the_template() -> None:
    policy = tiny_text_policy()
    messages = [{"role": "user", "content": "hi"}]
    expected = tiny_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for prompts, flag in (([{"prompt": messages}], False), (["hi"], True)):
        rollout = sample(policy, prompts=prompts, chat_template=flag)
        assert tiny_tokenizer().decode(rollout.data["prompt_ids"][0]) == expected
    raw = sample(policy, prompts=["hi"])
    assert tiny_tokenizer().decode(raw.data["prompt_ids"][0]) == "hi"


def test_rollout_records_prompt_metadata() -> None:
    rollout = sample(tiny_text_policy(), group_size=2)
    assert rollout.prompt_keys == ["p0", "p0", "p1", "p1", "p2", "p2"]
    assert rollout.dataset_ids == ["d0", "d0", "d1", "d1", "d0", "d0"]
    assert rollout.task_ids == ["letters"] * 6
    assert [p["id"] for p in rollout.prompts] == rollout.prompt_keys
    assert rollout.metrics["rollout/length_mean"] == pytest.approx(float(rollout.lengths.float().mean()))
    assert torch.equal(rollout.data["response_attention_mask"], rollout.mask)


def test_sampler_temperature_must_match_the_policy_when_scoring() -> None:
    policy = tiny_text_policy()
    with pytest.raises(ValueError, match="differs from the policy"):
        sample(policy, temperature=0.5)
    rollout = sample(policy, temperature=0.5, compute_old_logprobs=False)
    with pytest.raises(ValueError, match="sampled at temperature 0.5"):
        policy.log_probs(rollout)


def test_temperature_scales_the_scored_distribution() -> None:
    hot, cold = tiny_text_policy(temperature=1.0), tiny_text_policy(temperature=0.5)
    rollout = sample(hot)
    logits = torch.randn(2, 3, 5)
    tokens = torch.randint(0, 5, (2, 3))
    torch.testing.assert_close(token_log_probs(logits, tokens, 0.5), token_log_probs(2 * logits, tokens, 1.0))
    cold_rollout = dataclasses.replace(rollout, data={**rollout.data, "temperature": 0.5})
    assert not torch.allclose(cold.log_probs(cold_rollout), hot.log_probs(rollout))


def test_entropy_matches_the_definition() -> None:
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 7, (2, 3), generator=torch.Generator().manual_seed(1))
    logprobs, entropy = token_log_probs_and_entropy(logits, tokens, 0.8)
    log_softmax = torch.log_softmax(logits / 0.8, dim=-1)
    torch.testing.assert_close(logprobs, log_softmax.gather(-1, tokens[..., None])[..., 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy, -(log_softmax.exp() * log_softmax).sum(-1), atol=1e-6, rtol=0)
    assert torch.equal(logprobs, token_log_probs(logits, tokens, 0.8))


def test_concatenated_rollouts_rescore_exactly() -> None:
    policy = tiny_text_policy()
    short = sample(policy, seed=1, prompts=[{"prompt": "b"}], max_new_tokens=4)
    long = sample(policy, seed=2, prompts=[{"prompt": "a much longer prompt"}], max_new_tokens=10)
    joined = concat_rollouts([short, long])
    torch.testing.assert_close(
        policy.log_probs(joined), torch.cat([pad_to(short.old_logprobs, 10), long.old_logprobs]), atol=1e-5, rtol=0
    )


def pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def test_joined_input_ids_layout_scores_the_same() -> None:
    policy = tiny_text_policy()
    rollout = sample(policy)
    data = rollout.data
    joined = {
        "input_ids": torch.cat([data["prompt_ids"], data["response_ids"]], 1),
        "attention_mask": torch.cat([data["prompt_attention_mask"], data["response_attention_mask"]], 1),
    }
    torch.testing.assert_close(policy.log_probs(dataclasses.replace(rollout, data=joined)), rollout.old_logprobs)


def test_micro_batches_and_checkpointing_do_not_change_gradients() -> None:
    grads = []
    for kwargs in ({}, {"micro_batch_size": 2, "gradient_checkpointing": True}):
        policy = tiny_text_policy(**kwargs)
        rollout = sample(policy)
        policy.module.train()
        (policy.log_probs(rollout) * rollout.mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.module.parameters()]))
    assert policy.module.is_activation_checkpointing
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_dropout_is_disabled_so_train_mode_scores_like_eval() -> None:
    policy = CausalLMPolicy(model=tiny_lm(attention_dropout=0.5), tokenizer=tiny_tokenizer())
    rollout = sample(policy)
    policy.module.train()
    torch.testing.assert_close(policy.log_probs(rollout), rollout.old_logprobs, atol=1e-6, rtol=0)


def test_sampling_leaves_the_global_rng_untouched() -> None:
    state = torch.get_rng_state()
    sample(tiny_text_policy())
    assert torch.equal(state, torch.get_rng_state())


def test_greedy_sampling_ignores_the_generator() -> None:
    policy = tiny_text_policy()
    first, second = sample(policy, seed=0, do_sample=False), sample(policy, seed=5, do_sample=False)
    assert torch.equal(first.data["response_ids"], second.data["response_ids"])


def test_model_built_from_a_config_mapping() -> None:
    config = {"model_type": "qwen2", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64}
    config |= {"num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
    policy = CausalLMPolicy(model=config, tokenizer=tiny_tokenizer())
    rollout = sample(policy)
    torch.testing.assert_close(policy.log_probs(rollout), rollout.old_logprobs)
    with pytest.raises(ValueError, match="model_type"):
        CausalLMPolicy(model={"vocab_size": 8})


def test_bad_prompts_are_rejected() -> None:
    policy = tiny_text_policy()
    with pytest.raises(ValueError, match="'prompt' key"):
        sample(policy, prompts=[{"question": "x"}])
    with pytest.raises(ValueError, match="at least one prompt"):
        sample(policy, prompts=[])


@pytest.mark.gpu
def test_cuda_bf16_autocast_rescoring_matches() -> None:
    policy = tiny_text_policy(micro_batch_size=3)
    policy.module.cuda()
    rollout = sample(policy, group_size=4)
    assert rollout.old_logprobs.is_cuda
    policy.module.train()
    logprobs = policy.log_probs(rollout)
    torch.testing.assert_close(logprobs, rollout.old_logprobs, atol=1e-5, rtol=0)
    logprobs.sum().backward()
    assert all(p.grad is not None for p in policy.module.parameters())


def test_scores_match_generate_s_own_kv_cache_logits() -> None:
    """Re-scoring (full forward, padding-aware positions) equals what incremental decoding computed."""
    policy = tiny_text_policy(temperature=0.8)
    rollout = sample(policy, do_sample=False, group_size=1, prompts=tiny_prompts(4))
    data = rollout.data
    with torch.no_grad():
        out = policy.module.generate(
            input_ids=data["prompt_ids"],
            attention_mask=data["prompt_attention_mask"].long(),
            do_sample=False,
            max_new_tokens=rollout.num_steps,
            min_new_tokens=rollout.num_steps,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    logits = torch.stack(out.logits, dim=1)
    expected = token_log_probs(logits, data["response_ids"], 0.8)
    mask = rollout.mask
    torch.testing.assert_close(rollout.old_logprobs[mask], expected[mask], atol=1e-4, rtol=0)


def test_checkpoint_generation_config_does_not_leak_into_sampling() -> None:
    plain, tuned = tiny_text_policy(), tiny_text_policy()
    tuned.module.generation_config.repetition_penalty = 5.0
    tuned.module.generation_config.temperature = 0.1
    tuned.module.generation_config.top_k = 3
    first, second = sample(plain, seed=4), sample(tuned, seed=4)
    assert torch.equal(first.data["response_ids"], second.data["response_ids"])
    assert tuned.module.generation_config.repetition_penalty == 5.0
