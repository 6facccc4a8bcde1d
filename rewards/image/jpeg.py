"""JPEG compressibility reward (Flow-GRPO / DDPO style): minus the image's JPEG size in kB.

A reward a tiny random policy can climb (smooth, low-detail images compress better), used by the CPU demo.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any, Literal

import torch

from rewards.base import RewardOutput
from rewards.image.clip import to_pil_images

JpegSign = Literal["compressibility", "incompressibility"]


def jpeg_size_kb(image: Any, quality: int = 95) -> float:
    """Size in kB (1 kB = 1000 bytes) of the RGB image saved as JPEG at `quality`."""
    buffer = io.BytesIO()
    to_pil_images([image])[0].save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


class JpegCompressibility:
    """score = −size_kB (compressibility, default) or +size_kB (incompressibility) at JPEG `quality`.

    Args:
        quality: JPEG quality 1..95 (Flow-GRPO: 95).
        mode: "compressibility" (−size) or "incompressibility" (+size).
        name: the component name.
    """

    def __init__(self, quality: int = 95, mode: JpegSign = "compressibility", name: str = "jpeg") -> None:
        if mode not in ("compressibility", "incompressibility"):
            raise ValueError(f"mode={mode!r} is not supported; allowed: ['compressibility', 'incompressibility']")
        if not 1 <= quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {quality}")
        self.quality, self.mode, self.name = quality, mode, name

    def __call__(self, prompts: Sequence[Any], samples: Sequence[Any], **metadata: Any) -> RewardOutput:
        if len(prompts) != len(samples):
            raise ValueError(f"{len(prompts)} prompts but {len(samples)} samples")
        sign = -1.0 if self.mode == "compressibility" else 1.0
        images = to_pil_images(samples) if len(samples) else []
        scores = torch.tensor([sign * jpeg_size_kb(im, self.quality) for im in images], dtype=torch.float32)
        metrics = {f"{self.name}/size_kb": float(scores.abs().mean()) if len(scores) else 0.0}
        return RewardOutput(scores=scores, components={self.name: scores.clone()}, metrics=metrics)
