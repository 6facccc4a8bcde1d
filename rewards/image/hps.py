"""HPSv2-style human preference score: cosine(image, caption) under an OpenCLIP ViT-H-14 fine-tuned on HPD.

HPS v2 / v2.1 (arXiv:2306.09341) scores an image by the cosine of its CLIP embedding with the caption's
(the diagonal of image_features @ text_features.T with both normalised; no logit scale). The checkpoint
(`HPS_v2.1_compressed.pt`, a state dict, optionally under "state_dict") is loaded over the ViT-H-14 LAION
backbone. Users download it themselves; tests use a tiny random backbone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from rewards.image.clip import ClipScore, Precision, build_tiny_open_clip


class HPSv2Score(ClipScore):
    """HPSv2 score = cosine(image, caption) with HPS weights loaded into an OpenCLIP model.

    Args:
        checkpoint: path of the HPS state dict; None keeps the backbone's own weights.
        model, pretrained: the OpenCLIP backbone ("ViT-H-14", "laion2B-s32B-b79K" for HPS v2.x) or a module.
        Other arguments as ClipScore.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        model: str | nn.Module = "ViT-H-14",
        pretrained: str | None = "laion2b_s32b_b79k",
        tokenizer: Callable[[list[str]], Tensor] | None = None,
        scale: float = 1.0,
        batch_size: int = 32,
        device: str | None = None,
        precision: Precision = "fp32",
        name: str = "hps",
    ) -> None:
        super().__init__(
            model=model,
            pretrained=pretrained if isinstance(model, str) else None,
            tokenizer=tokenizer,
            scale=scale,
            batch_size=batch_size,
            device=device,
            precision=precision,
            name=name,
        )
        if checkpoint is not None:
            state: Any = torch.load(checkpoint, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state.get("state_dict", state))


def tiny(seed: int = 0, name: str = "hps") -> HPSv2Score:
    """HPSv2Score over a tiny random open_clip model (tests, tiny recipes)."""
    return HPSv2Score(model=build_tiny_open_clip(seed=seed), name=name)
