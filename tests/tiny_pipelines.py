"""Tiny diffusers pipelines saved as folders, for the tests that load a policy `from_pretrained`.

`save_pipeline(folder, "sd3")` writes a `StableDiffusion3Pipeline` (tiny SD3 transformer and VAE, two CLIP text
towers 16 + 16 wide, a T5) and `save_pipeline(folder, "flux")` a `FluxPipeline` (tiny FLUX transformer, CLIP-L pooled
32, T5): the recipes' SD3.5 / FLUX.1 stand-ins (tests/recipe_models.py) and the pipeline-export tests
(tests/modalities/text_to_image/test_export_t2i.py) load the same builder's folders. Seeded: the same files every run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from modalities.text_to_image.tiny import TEXT_DIM, build_tiny_flux, build_tiny_sd3, build_tiny_vae

ARCHS = ("sd3", "flux")


def clip_tokenizer(folder: Path) -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with no merges (every byte a token), written to `folder`."""
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate([*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def clip_text_config(vocab_size: int, width: int, max_length: int, **extra: Any) -> CLIPTextConfig:
    """A 1-layer, 2-head CLIP text tower config (MLP 2 × `width`) whose last two ids are BOS and EOS (= pad)."""
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        **extra,
    )


def clip_encoder(seed: int, vocab_size: int) -> CLIPTextModelWithProjection:
    """SD3's CLIP-L / CLIP-G stand-in: a 1-layer `CLIPTextModelWithProjection`, width 16."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModelWithProjection(clip_text_config(vocab_size, 16, 16, projection_dim=16))


def vocab_folder(folder: Path) -> Path:
    """A scratch folder beside `folder` for the CLIP tokenizer's vocab files (the model folder gets its own copy)."""
    scratch = folder.with_name(folder.name + "_vocab")
    scratch.mkdir(parents=True, exist_ok=True)
    return scratch


def t5_parts(seed: int) -> tuple[T5EncoderModel, PreTrainedTokenizerFast]:
    """A 1-layer T5 encoder (width 32) and a whitespace word-level tokenizer of a few caption words."""
    words = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "apple", "cat", "on", "the", "table"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    config = T5Config(vocab_size=len(words), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T5EncoderModel(config), tokenizer


def save_pipeline(folder: Path, arch: str) -> Path:
    """A `StableDiffusion3Pipeline` ("sd3": CLIP-L/G 16 + 16 wide and T5) or `FluxPipeline` ("flux": CLIP-L pooled 32,
    T5, guidance embedding) folder around the tiny transformer and VAE, written with `save_pretrained`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r} is not one of {list(ARCHS)}")
    tokenizer = clip_tokenizer(vocab_folder(folder))
    t5, t5_tokenizer = t5_parts(2)
    common = {"vae": build_tiny_vae(0), "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0), "tokenizer": tokenizer}
    pipeline: Any
    if arch == "sd3":
        clip_g = {"text_encoder_2": clip_encoder(1, len(tokenizer)), "tokenizer_2": tokenizer}
        t5_pair = {"text_encoder_3": t5, "tokenizer_3": t5_tokenizer}
        clip_l = clip_encoder(0, len(tokenizer))
        pipeline = StableDiffusion3Pipeline(
            transformer=build_tiny_sd3(0, num_layers=1), text_encoder=clip_l, **clip_g, **t5_pair, **common
        )
    else:
        pooled_clip = flux_clip_encoder(len(tokenizer), tokenizer.model_max_length)
        pipeline = FluxPipeline(
            transformer=build_tiny_flux(0),
            text_encoder=pooled_clip,
            text_encoder_2=t5,
            tokenizer_2=t5_tokenizer,
            **common,
        )
    pipeline.save_pretrained(folder)
    return folder


def flux_clip_encoder(vocab_size: int, max_length: int) -> CLIPTextModel:
    """FLUX's CLIP-L stand-in: a 1-layer `CLIPTextModel` whose pooled output (width 32) is the pooled projection."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        return CLIPTextModel(clip_text_config(vocab_size, TEXT_DIM, max_length))
