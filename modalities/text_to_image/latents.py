"""Latent layouts of the SD3 and FLUX transformers: one latent's shape, FLUX 2×2 packing and its position ids."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Arch = Literal["sd3", "flux"]


def latent_shape(arch: Arch, in_channels: int, height: int, width: int, scale: int) -> tuple[int, ...]:
    """One latent's shape: [C, H/f, W/f] for SD3, packed [(H/2f)·(W/2f), C_in] tokens for FLUX (C_in = 4C)."""
    if height % scale or width % scale:
        raise ValueError(f"height {height} and width {width} must be multiples of the VAE factor {scale}")
    h, w = height // scale, width // scale
    if arch == "sd3":
        return (in_channels, h, w)
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs 2x2 latent cells: height and width must be multiples of {2 * scale}")
    return ((h // 2) * (w // 2), in_channels)


def pack(latents: Tensor) -> Tensor:
    """FLUX packing [N, C, h, w] → [N, (h/2)(w/2), 4C] (2×2 patches as tokens, diffusers' layout)."""
    n, c, h, w = latents.shape
    patches = latents.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of `pack`: [N, (h/2)(w/2), 4C] → [N, C, h, w]."""
    n, _, d = tokens.shape
    patches = tokens.reshape(n, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(n, d // 4, h, w)


def image_ids(h2: int, w2: int, device: torch.device) -> Tensor:
    """[h2·w2, 3] FLUX image position ids (0, row, column) of the packed token grid."""
    ids = torch.zeros(h2, w2, 3, device=device)
    ids[..., 1] = torch.arange(h2, device=device)[:, None]
    ids[..., 2] = torch.arange(w2, device=device)[None, :]
    return ids.reshape(h2 * w2, 3)
