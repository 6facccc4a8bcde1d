"""Tiny random-init Qwen2 causal LM and a character-level tokenizer, built in code (no download).

Used by the CPU demo, the tiny recipes and the tests. The tokenizer is character-level over a fixed
alphabet, with the chat and search-agent tags as single tokens, so ids are small and deterministic.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

import torch
from tokenizers import Tokenizer, decoders, models
from torch import Tensor
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
# Special tokens (skipped when decoding with skip_special_tokens) get ids 0..3, in this order.
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
# Agent tags are single tokens but ordinary text: they survive decoding, as in real chat tokenizers.
TAG_TOKENS = (
    "<search>",
    "</search>",
    "<answer>",
    "</answer>",
    "<information>",
    "</information>",
    "<think>",
    "</think>",
)
ALPHABET = string.digits + string.ascii_lowercase + string.ascii_uppercase + string.punctuation + " \n"
PAD_TOKEN_ID = 0
UNK_TOKEN_ID = 1
IM_START_TOKEN_ID = 2
EOS_TOKEN_ID = 3
# Qwen-style template: "<|im_start|>{role}\n{content}<|im_end|>\n" per message.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_VOCAB_SIZE = 128


def build_char_tokenizer(
    extra_tokens: Sequence[str] = (), chat_template: str | None = CHAT_TEMPLATE
) -> PreTrainedTokenizerFast:
    """A deterministic character-level tokenizer (108 ids + `extra_tokens`).

    Ids: the 4 special tokens (<pad>=0, <unk>=1, <|im_start|>=2, <|im_end|>=3), the 8 agent tags,
    the alphabet (digits, ASCII letters, punctuation, space, newline), then `extra_tokens` (added
    as ordinary single tokens). eos = <|im_end|>, pad = <pad>; other characters map to <unk>.

    Args:
        extra_tokens: more multi-character tokens to add, in order (duplicates are rejected).
        chat_template: Jinja chat template set on the tokenizer (None leaves it unset).
    """
    pieces = [*SPECIAL_TOKENS, *TAG_TOKENS, *ALPHABET, *extra_tokens]
    if len(set(pieces)) != len(pieces):
        raise ValueError(f"extra_tokens {list(extra_tokens)} repeat a built-in token or each other")
    vocab = {piece: index for index, piece in enumerate(pieces)}
    # BPE with no merges over single characters = a character-level model; Fuse joins pieces back.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.add_tokens([*TAG_TOKENS, *extra_tokens])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD_TOKEN, unk_token=UNK_TOKEN, eos_token=IM_END_TOKEN
    )
    tokenizer.padding_side = "left"
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny_qwen2(
    vocab_size: int = TINY_VOCAB_SIZE,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 1024,
    tie_word_embeddings: bool = False,
    attention_dropout: float = 0.0,
    seed: int = 0,
) -> Qwen2ForCausalLM:
    """A random-init 2-layer Qwen2 causal LM whose special ids match `build_char_tokenizer`.

    The weights depend only on the arguments: initialisation runs under a forked RNG seeded with
    `seed`, so the global RNG state is left untouched.
    """
    if vocab_size < len(SPECIAL_TOKENS) + len(TAG_TOKENS) + len(ALPHABET):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the char tokenizer's 108 built-in ids")
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        attention_dropout=attention_dropout,
        pad_token_id=PAD_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.eos_token_id = EOS_TOKEN_ID
    return model


def supervised_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: Tensor, attention: Tensor, loss_mask: Tensor
) -> Tensor:
    """One optimizer step of next-token cross-entropy, averaged over the tokens `loss_mask` [N, W] selects.

    Used by the tiny models' supervised warm starts; returns the (pre-step) loss.
    """
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    weights = loss_mask[:, 1:].float()
    loss = (per_token * weights).sum() / weights.sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


# Names for YAML `_component_` nodes: `model: {_component_: modalities.text_agent.tiny.tiny_causal_lm}`.
tiny_causal_lm = build_tiny_qwen2
tiny_tokenizer = build_char_tokenizer
