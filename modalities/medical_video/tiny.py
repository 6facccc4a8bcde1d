"""Tiny random-init Qwen2.5-VL, a character-level tokenizer and a Qwen2.5-VL processor, built in code (no download).

The tokenizer's special ids match the model config (pad 0, <|im_start|> 2, <|im_end|> = eos 3, vision start 4,
vision end 5, video pad 6, image pad 7), so generation, the video placeholder expansion and mRoPE all run on CPU
in well under a second. Used by tiny.yaml, the example and the tests (spec docs/methods/medgrpo.md §11).
"""

from __future__ import annotations

import string
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

SPECIAL_TOKENS = (
    "<pad>",
    "<unk>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|video_pad|>",
    "<|image_pad|>",
)
PAD_TOKEN_ID, UNK_TOKEN_ID, IM_START_TOKEN_ID, EOS_TOKEN_ID = 0, 1, 2, 3
VISION_START_TOKEN_ID, VISION_END_TOKEN_ID, VIDEO_TOKEN_ID, IMAGE_TOKEN_ID = 4, 5, 6, 7
ALPHABET = string.digits + string.ascii_lowercase + string.ascii_uppercase + string.punctuation + " \n"
TINY_VOCAB_SIZE = 128
# Qwen2.5-VL-Instruct's layout without the default system message: a video item renders as
# <|vision_start|><|video_pad|><|vision_end|> before the question (spec §3).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A deterministic character-level tokenizer: the 8 special tokens (ids 0-7), then the ASCII alphabet."""
    pieces = [*SPECIAL_TOKENS, *ALPHABET]
    vocab = {piece: index for index, piece in enumerate(pieces)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>"
    )
    tokenizer.padding_side = "left"
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_processor(merge_size: int = 2) -> Qwen2_5_VLProcessor:
    """Qwen2.5-VL processor around the tiny tokenizer and default (patch 14, temporal patch 2) vision processors."""
    image = Qwen2VLImageProcessor(merge_size=merge_size)
    video = Qwen2VLVideoProcessor(merge_size=merge_size)
    return Qwen2_5_VLProcessor(
        image_processor=image, tokenizer=build_tiny_tokenizer(), video_processor=video, chat_template=CHAT_TEMPLATE
    )


def build_tiny_qwen2_5_vl(
    vocab_size: int = TINY_VOCAB_SIZE,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vision_depth: int = 2,
    vision_hidden_size: int = 32,
    spatial_merge_size: int = 2,
    tokens_per_second: int = 2,
    eos_logit: float | None = 2.0,
    seed: int = 0,
) -> Qwen2_5_VLForConditionalGeneration:
    """A random-init Qwen2.5-VL whose special ids match `build_tiny_tokenizer` (weights depend only on the args).

    Args:
        eos_logit: added to the EOS logit through an lm_head bias so completions end early (None: no bias).
        seed: initialisation seed (run under a forked RNG: the global RNG state is untouched).
    """
    if vocab_size < len(SPECIAL_TOKENS) + len(ALPHABET):
        needed = len(SPECIAL_TOKENS) + len(ALPHABET)
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tiny tokenizer's {needed} ids")
    head_dim = hidden_size // num_attention_heads
    quarter = head_dim // 2 // 4
    text: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "rope_scaling": {"type": "mrope", "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter]},
        "pad_token_id": PAD_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "bos_token_id": None,
        "attention_dropout": 0.0,
    }
    vision: dict[str, Any] = {
        "depth": vision_depth,
        "hidden_size": vision_hidden_size,
        "intermediate_size": 2 * vision_hidden_size,
        "num_heads": 2,
        "out_hidden_size": hidden_size,
        "fullatt_block_indexes": [vision_depth - 1],
        "window_size": 112,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": spatial_merge_size,
        "tokens_per_second": tokens_per_second,
    }
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_TOKEN_ID,
        vision_end_token_id=VISION_END_TOKEN_ID,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    if eos_logit is not None:
        head = model.lm_head
        head.bias = torch.nn.Parameter(torch.zeros(head.out_features, dtype=head.weight.dtype))
        with torch.no_grad():
            head.bias[EOS_TOKEN_ID] += eos_logit
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.eos_token_id = EOS_TOKEN_ID
    return model
