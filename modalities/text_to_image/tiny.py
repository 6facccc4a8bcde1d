"""Tiny random-init SD3 / FLUX transformers, VAE, text encoder and policy, built in code (no download).

Sizes follow /shared/TINY_MODELS.md: an 8×8×4 latent decodes to a 32×32 RGB image; text embeddings are
[B, 16, 32] with a pooled [B, 32]. Every factory seeds a forked RNG, so weights depend only on the
arguments. Used by tests, the tiny recipe, the example and the bench.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from modalities.text_to_image.policy import FlowMatchingPolicy
from modalities.text_to_image.text_encoding import TinyTextEncoder

TEXT_DIM = 32
LATENT_CHANNELS = 4


def _seeded(seed: int, build: Callable[..., Any], **kwargs: Any) -> nn.Module:
    """`build(**kwargs)` under a forked RNG seeded with `seed` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module: nn.Module = build(**kwargs)
    return module


def build_tiny_sd3(seed: int = 0, num_layers: int = 2, sample_size: int = 8) -> nn.Module:
    """`SD3Transformer2DModel`: latents [B, 4, 8, 8], text [B, L, 32], pooled [B, 32]."""
    from diffusers import SD3Transformer2DModel

    return _seeded(
        seed,
        SD3Transformer2DModel,
        sample_size=sample_size,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        caption_projection_dim=16,
        pooled_projection_dim=TEXT_DIM,
        out_channels=LATENT_CHANNELS,
    )


def build_tiny_flux(seed: int = 0, guidance_embeds: bool = True) -> nn.Module:
    """`FluxTransformer2DModel` on packed latents [B, 16 tokens, 16] (4 channels × 2×2), guidance embedding."""
    from diffusers import FluxTransformer2DModel

    return _seeded(
        seed,
        FluxTransformer2DModel,
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    )


def build_tiny_vae(seed: int = 0) -> nn.Module:
    """`AutoencoderKL` with 3 blocks (factor 4): latents [B, 4, 8, 8] → images [B, 3, 32, 32]."""
    from diffusers import AutoencoderKL

    return _seeded(
        seed,
        AutoencoderKL,
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[8, 16, 16],
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
    )


def build_tiny_text_encoder(seed: int = 0, max_length: int = 16) -> TinyTextEncoder:
    """A 1-layer CLIP text tower (width 32) with a byte tokenizer."""
    return TinyTextEncoder(hidden_size=TEXT_DIM, max_length=max_length, seed=seed)


def build_tiny_policy(
    arch: Literal["sd3", "flux"] = "sd3",
    seed: int = 0,
    lora: Mapping[str, Any] | None = None,
    with_vae: bool = True,
    **kwargs: Any,
) -> FlowMatchingPolicy:
    """A complete tiny `FlowMatchingPolicy` (transformer + VAE + text encoder); kwargs go to the policy."""
    transformer = build_tiny_sd3(seed) if arch == "sd3" else build_tiny_flux(seed)
    vae = build_tiny_vae(seed) if with_vae else None
    return FlowMatchingPolicy(
        transformer,
        arch=arch,
        vae=vae,
        text_encoder=build_tiny_text_encoder(seed),
        lora=lora,
        vae_scale_factor=None if with_vae else 4,
        **kwargs,
    )
