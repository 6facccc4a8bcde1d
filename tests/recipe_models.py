"""Tiny stand-ins for every hub model the shipped recipes name, written in each recipe's own checkpoint format.

`build_recipe_models(root)` saves, under `root`, models of the recipes' classes with 1-2 layers and widths of 16-32:
a Qwen2 causal LM + chat tokenizer, a Qwen2.5-VL + processor, SD3 and FLUX pipelines (tests/tiny_pipelines.py:
transformer, VAE, CLIP/T5 text encoders, tokenizers, scheduler), an ESM masked LM (DPLM), an MDLM Lightning-style
checkpoint (an OmegaConf config and a pickled tokenizer in `hyper_parameters`, as MDLM's `save_hyperparameters()`
writes them), a GPT-2 tokenizer, a transformers CLIPModel + tokenizer (PickScore), an open_clip model in its hub
layout (CLIP score, HPS backbone) and an HPS state dict. The recipes load them through their own `from_pretrained` /
checkpoint paths.

The text LM is random-init, but its tokenizer has whole answer phrases as single tokens (`PHRASES`) and its weights
hold a constant hidden unit that raises their logits (Qwen2's lm_head has no bias to save): every completion is a
few phrases drawn at random, so the recipes' rule-based rewards (boxed answers after `</think>`, `<answer>` exact
match, search calls) vary within a group without any training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPConfig,
    CLIPModel,
    EsmForMaskedLM,
    GPT2TokenizerFast,
    Qwen2ForCausalLM,
)

from modalities.diffusion_lm.checkpoint_io import PREFIX
from modalities.diffusion_lm.dit import DiT
from modalities.diffusion_lm.tiny import build_tiny_dit
from modalities.medical_video.tiny import build_tiny_processor, build_tiny_qwen2_5_vl
from modalities.text_agent.tiny import EOS_TOKEN_ID, build_char_tokenizer, build_tiny_qwen2
from rewards.image.clip import CLIP_MEAN, CLIP_STD, build_tiny_open_clip
from tests.tiny_pipelines import clip_text_config, clip_tokenizer, save_pipeline, vocab_folder

# The gold answer of every tiny problem / question; the phrases answer it right ("1") or wrong ("2").
GOLD = "1"
PHRASES = (
    "</think>\\boxed{1}",
    "</think>\\boxed{2}",
    "<answer>1</answer>",
    "<answer>2</answer>",
    "<search>1</search>",
)
PHRASE_LOGIT = 12.0  # the phrases and EOS get this logit, every other token about 0


@dataclass(frozen=True)
class RecipeModels:
    """Where each tiny stand-in was saved: folders for `from_pretrained`, files for checkpoint loaders."""

    causal_lm: Path
    video_lm: Path
    sd3: Path
    flux: Path
    esm: Path
    mdlm: Path
    gpt2_tokenizer: Path
    clip_model: Path
    open_clip: Path
    hps: Path


def build_recipe_models(root: Path) -> RecipeModels:
    """Build and save every stand-in under `root` (seeded: the same files in every session)."""
    gpt2 = save_gpt2_tokenizer(root / "gpt2")
    open_clip_dir = save_open_clip(root / "open_clip")
    return RecipeModels(
        causal_lm=save_causal_lm(root / "qwen2"),
        video_lm=save_video_lm(root / "qwen2_5_vl"),
        sd3=save_pipeline(root / "sd3", "sd3"),
        flux=save_pipeline(root / "flux", "flux"),
        esm=save_esm(root / "esm"),
        mdlm=save_mdlm_checkpoint(root / "mdlm" / "mdlm.ckpt", GPT2TokenizerFast.from_pretrained(str(gpt2))),
        gpt2_tokenizer=gpt2,
        clip_model=save_clip_model(root / "pickscore"),
        open_clip=open_clip_dir,
        hps=save_hps_checkpoint(root / "hps" / "HPS_v2.1_compressed.pt"),
    )


# ---------------------------------------------------------------------------------------------- text


def save_causal_lm(folder: Path) -> Path:
    """A 1-layer Qwen2ForCausalLM (hidden 32) + char tokenizer with a chat template and the answer `PHRASES`."""
    tokenizer = build_char_tokenizer(extra_tokens=PHRASES)
    model = build_tiny_qwen2(hidden_size=32, intermediate_size=64, num_layers=1, seed=0)
    raise_logits(model, [*tokenizer.convert_tokens_to_ids(list(PHRASES)), EOS_TOKEN_ID], PHRASE_LOGIT)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@torch.no_grad()
def raise_logits(model: Qwen2ForCausalLM, token_ids: list[int], logit: float) -> None:
    """Give `token_ids` about `logit` at every position through the weights alone (kept by `save_pretrained`).

    Hidden unit 0 is a constant: every embedding has 1 there and tiny values elsewhere, and no layer writes to it,
    so after the final RMSNorm it is about sqrt(hidden); the lm_head's column 0 turns it into the logit.
    """
    embed = model.model.embed_tokens.weight
    embed.mul_(0.01)
    embed[:, 0] = 1.0
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight[0] = 0.0
        layer.mlp.down_proj.weight[0] = 0.0
    model.lm_head.weight[:, 0] = 0.0
    model.lm_head.weight[token_ids, 0] = logit / model.config.hidden_size**0.5


def save_video_lm(folder: Path) -> Path:
    """A 1-layer Qwen2.5-VL (text hidden 32, vision depth 1) + its processor, saved with `save_pretrained`."""
    model = build_tiny_qwen2_5_vl(
        hidden_size=32, intermediate_size=64, num_layers=1, vision_depth=1, vision_hidden_size=16, eos_logit=None
    )
    model.save_pretrained(folder)
    build_tiny_processor().save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------- images


def save_clip_model(folder: Path) -> Path:
    """A transformers `CLIPModel` (PickScore's class; towers 1 layer, width 16) + a byte-level CLIP tokenizer."""
    tokenizer = clip_tokenizer(vocab_folder(folder))
    text = clip_text_config(len(tokenizer), 16, tokenizer.model_max_length).to_dict()
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision |= {"image_size": 32, "patch_size": 16}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


OPEN_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def save_open_clip(folder: Path) -> Path:
    """An open_clip CLIP in the hub layout `create_model("local-dir:...")` reads (config JSON + safetensors).

    The config is `build_tiny_open_clip`'s; the text tower keeps CLIP's BPE vocabulary so the tokenizer that
    open_clip builds offline fits.
    """
    import safetensors.torch

    model = build_tiny_open_clip(seed=6)
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
    config = {"model_cfg": OPEN_CLIP_CONFIG, "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def save_hps_checkpoint(path: Path) -> Path:
    """An HPS v2.1-style checkpoint: the open_clip backbone's state dict under "state_dict" (torch.save)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": build_tiny_open_clip(seed=7).state_dict()}, path)
    return path


# ---------------------------------------------------------------------------------------------- diffusion LMs


def save_esm(folder: Path) -> Path:
    """A 2-layer `EsmForMaskedLM` (hidden 32) over the ESM-2 vocabulary (33 ids, mask 32): the DPLM stand-in."""
    from modalities.diffusion_lm.protein.esm_teacher import build_tiny_esm_denoiser

    denoiser = build_tiny_esm_denoiser(hidden_size=32, num_layers=2, max_length=64, seed=8)
    # ESM-2's own eps (EsmConfig's default 1e-12 turns the all-mask input's zero embeddings, through the first
    # LayerNorm, into gradients of 1e6 per layer: inf after two).
    denoiser.config.layer_norm_eps = 1e-5
    model = EsmForMaskedLM(denoiser.config)
    model.load_state_dict(denoiser.state_dict())
    model.save_pretrained(folder)
    return folder


def save_gpt2_tokenizer(folder: Path) -> Path:
    """A byte-level GPT-2 tokenizer with no merges: 256 byte ids + <|endoftext|> (bos = eos = unk)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate([*alphabet, "<|endoftext|>"])}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    special = "<|endoftext|>"
    tokenizer = GPT2TokenizerFast(tokenizer_object=backend, bos_token=special, eos_token=special, unk_token=special)
    tokenizer.save_pretrained(folder)
    return folder


def save_mdlm_checkpoint(path: Path, tokenizer: Any) -> Path:
    """The MDLM-small stand-in: a 2-block DiT with MDLM-small's 12 heads (4 wide; the recipe states the heads, shapes
    cannot), over the tokenizer's ids plus the mask id, as a Lightning checkpoint (`write_lightning_checkpoint`)."""
    dit = build_tiny_dit(vocab_size=len(tokenizer) + 1, seed=9, hidden_size=48, num_heads=12, cond_dim=16)
    return write_lightning_checkpoint(path, dit, tokenizer)


EMA_OFFSET = 0.01  # the EMA weights of a written checkpoint are the raw ones + this


def write_lightning_checkpoint(path: Path, dit: DiT, tokenizer: Any) -> Path:
    """An MDLM Lightning `.ckpt`: backbone.* tensors, EMA shadow params, an OmegaConf config, a pickled tokenizer.

    The layout of kuleshov-group/mdlm's `Diffusion` checkpoints: `state_dict` with `backbone.`-prefixed DiT
    weights, `ema` = {decay, num_updates, shadow_params (backbone parameter order)}, Lightning's bookkeeping, and
    `hyper_parameters` = {"config": DictConfig, "tokenizer": the tokenizer object} (`save_hyperparameters()`).
    """
    from omegaconf import OmegaConf

    sizes = dit.config
    model = {"hidden_size": sizes.hidden_size, "n_blocks": sizes.num_blocks, "n_heads": sizes.num_heads}
    config = OmegaConf.create({"model": {**model, "cond_dim": sizes.cond_dim}, "noise": {"type": "loglinear"}})
    checkpoint = {
        "epoch": 0,
        "global_step": 1,
        "pytorch-lightning_version": "2.2.1",
        "state_dict": {PREFIX + k: v for k, v in dit.state_dict().items()},
        "ema": {
            "decay": 0.9999,
            "num_updates": 1,
            "shadow_params": [p.detach() + EMA_OFFSET for p in dit.parameters()],
            "collected_params": [],
        },
        "hyper_parameters": {"config": config, "tokenizer": tokenizer},
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 0}}}},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path
