"""PickScore: a CLIP-H model fine-tuned on Pick-a-Pic preferences (arXiv:2305.01569).

score = exp(logit_scale) · cosine(image, caption) with the transformers CLIPModel
`yuvalkirstain/PickScore_v1` and the tokenizer of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`. Flow-GRPO divides
the score by 26 to bring it near [0, 1] (`divisor`). Image preprocessing is done in torch (resize, crop,
CLIP normalisation), so the same code serves PIL images and tensors.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from rewards.base import RewardOutput
from rewards.image.clip import (
    CLIP_MEAN,
    CLIP_STD,
    caption_text,
    clip_pixels,
    cosine_scores,
    resolve_device,
)

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def _features(output: Any) -> Tensor:
    """Projected features from get_*_features (a tensor, or a ModelOutput whose pooler_output holds them)."""
    return output if isinstance(output, Tensor) else output.pooler_output


class PickScore:
    """exp(logit_scale) · cosine(image, caption) / divisor under a transformers CLIPModel.

    Args:
        model: a hub id / local path of a transformers CLIPModel, or a built one.
        tokenizer: a callable texts -> LongTensor [N, L], a transformers tokenizer, or its id/path; None loads
            `PICKSCORE_PROCESSOR`'s tokenizer.
        divisor: the score is divided by it (1.0 = the raw PickScore; Flow-GRPO uses 26).
        batch_size, device: as ClipScore.
    """

    def __init__(
        self,
        model: str | nn.Module = PICKSCORE_MODEL,
        tokenizer: Any = None,
        divisor: float = 1.0,
        batch_size: int = 32,
        device: str | None = None,
        name: str = "pickscore",
    ) -> None:
        from transformers import AutoTokenizer, CLIPModel

        if not divisor > 0:
            raise ValueError(f"divisor must be > 0, got {divisor}")
        module: Any = model
        if isinstance(model, str):
            module = CLIPModel.from_pretrained(model)
            module = module.to(resolve_device(device))
        elif device is not None:
            module = model.to(device)
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer or PICKSCORE_PROCESSOR)
        self.model: Any = module.eval()
        self.tokenize: Callable[[list[str]], Tensor] = _as_token_fn(tokenizer, module.config.text_config)
        self.image_size = int(module.config.vision_config.image_size)
        self.divisor, self.batch_size, self.name = divisor, batch_size, name

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Any], samples: Sequence[Any], **metadata: Any) -> RewardOutput:
        if len(prompts) != len(samples):
            raise ValueError(f"{len(prompts)} prompts but {len(samples)} samples")
        if len(samples) == 0:
            return RewardOutput(scores=torch.zeros(0), components={self.name: torch.zeros(0)})
        began = time.perf_counter()
        device = next(self.model.parameters()).device
        captions = [caption_text(p) for p in prompts]
        dtype = next(self.model.parameters()).dtype
        scores = []
        for start in range(0, len(captions), self.batch_size):
            pixels = clip_pixels(samples[start : start + self.batch_size], self.image_size, CLIP_MEAN, CLIP_STD)
            tokens = self.tokenize(captions[start : start + self.batch_size]).to(device)
            image_embeds = _features(self.model.get_image_features(pixel_values=pixels.to(device, dtype)))
            text_embeds = _features(self.model.get_text_features(input_ids=tokens))
            scores.append(cosine_scores(image_embeds, text_embeds).cpu())
        result = torch.cat(scores) * float(self.model.logit_scale.exp()) / self.divisor
        metrics = {f"{self.name}/mean": float(result.mean()), f"{self.name}/latency_s": time.perf_counter() - began}
        return RewardOutput(scores=result, components={self.name: result.clone()}, metrics=metrics)


def _as_token_fn(tokenizer: Any, text_config: Any) -> Callable[[list[str]], Tensor]:
    """A texts -> input_ids function from a plain callable or a transformers tokenizer (padded to max length)."""
    if not hasattr(tokenizer, "pad_token_id"):
        return tokenizer  # type: ignore[no-any-return]
    length = int(text_config.max_position_embeddings)

    def tokenize(texts: list[str]) -> Tensor:
        encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        return encoded["input_ids"]  # type: ignore[no-any-return]

    return tokenize


def build_tiny_clip_model(seed: int = 0, image_size: int = 32, context_length: int = 16) -> nn.Module:
    """A tiny random transformers CLIPModel whose text vocabulary is CLIP's BPE (open_clip's tokenizer fits)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = {
        "vocab_size": 49408,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": context_length,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 0,
    }
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    vision.update(image_size=image_size, patch_size=8)
    model: nn.Module = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
    return model.eval()


def tiny(seed: int = 0, divisor: float = 1.0, name: str = "pickscore") -> PickScore:
    """PickScore over a tiny random CLIPModel and open_clip's offline BPE tokenizer (tests, tiny recipes)."""
    import open_clip

    return PickScore(
        build_tiny_clip_model(seed), open_clip.get_tokenizer("ViT-B-32", context_length=16), divisor, name=name
    )
