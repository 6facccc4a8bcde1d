"""CLIP score: cosine similarity between an image and its caption under an OpenCLIP model.

Pref-GRPO mixes this reward into its pairwise advantage (spec docs/methods/pref_grpo.md §2: DFN5B-CLIP-ViT-H-14-378,
cosine(image, caption)). Also holds the image helpers the other image rewards share: conversion of PIL
images or tensors to one float batch, and CLIP preprocessing (resize, center crop, normalise) in torch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from rewards.base import RewardOutput

# OpenAI CLIP preprocessing statistics (open_clip.OPENAI_DATASET_MEAN / STD); DFN5B uses them too.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
Precision = Literal["fp32", "bf16", "fp16"]


def to_image_tensor(samples: Sequence[Any] | Tensor) -> Tensor:
    """Images as one float32 batch [N, 3, H, W] in [0, 1].

    Args:
        samples: a tensor [N, 3, H, W] (float in [0, 1]) or a sequence of PIL images, image file paths or
            [3, H, W] tensors, all of one size. PIL images are converted to RGB.
    """
    if isinstance(samples, Tensor):
        batch = samples.float()
    else:
        if len(samples) == 0:
            return torch.zeros(0, 3, 1, 1)
        batch = torch.stack([_one_image(s) for s in samples])
    if batch.dim() != 4 or batch.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got shape {tuple(batch.shape)}")
    if not bool(torch.isfinite(batch).all()):
        raise ValueError("images contain NaN or inf")
    return batch


def _one_image(sample: Any) -> Tensor:
    if isinstance(sample, (str, os.PathLike)):  # an image file (e.g. `renorm score` JSONL completions)
        sample = _open_rgb(sample)
    if isinstance(sample, Image.Image):
        array = np.asarray(sample.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1)
    if isinstance(sample, Tensor) and sample.dim() == 3:
        return sample.float()
    raise ValueError(f"an image must be a PIL image, a file path or a [3, H, W] tensor, got {type(sample).__name__}")


def to_pil_images(samples: Sequence[Any] | Tensor) -> list[Image.Image]:
    """Images as RGB PIL images (tensors in [0, 1] are clamped and rounded to uint8)."""
    if not isinstance(samples, Tensor) and all(isinstance(s, (Image.Image, str, os.PathLike)) for s in samples):
        return [s.convert("RGB") if isinstance(s, Image.Image) else _open_rgb(s) for s in samples]
    batch = (to_image_tensor(samples).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(x.permute(1, 2, 0).cpu().numpy()) for x in batch]


def _open_rgb(path: str | os.PathLike[str]) -> Image.Image:
    with Image.open(path) as opened:
        return opened.convert("RGB")


def clip_preprocess(
    images: Tensor, image_size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> Tensor:
    """CLIP input [N, 3, S, S]: bicubic resize of the short side to S, center crop, normalise.

    Args:
        images: [N, 3, H, W] float in [0, 1].
        image_size: S, the vision tower's input size.
    """
    _, _, h, w = images.shape
    scale = image_size / min(h, w)
    size = (max(image_size, round(h * scale)), max(image_size, round(w * scale)))
    if size != (h, w):
        images = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
    top, left = (size[0] - image_size) // 2, (size[1] - image_size) // 2
    images = images[:, :, top : top + image_size, left : left + image_size].clamp(0, 1)
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


def clip_pixels(
    samples: Sequence[Any] | Tensor, image_size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> Tensor:
    """CLIP inputs [N, 3, S, S] of images that may differ in size (each is resized and cropped on its own)."""
    if isinstance(samples, Tensor):
        return clip_preprocess(to_image_tensor(samples), image_size, mean, std)
    return torch.cat([clip_preprocess(_one_image(s)[None], image_size, mean, std) for s in samples])


def cosine_scores(image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """Row-wise cosine similarity [N] of image embeddings [N, D] and text embeddings [N, D] (fp32)."""
    return F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)


def resolve_device(device: str | None) -> torch.device:
    """`device`, or CUDA when available, else CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


class ClipScore:
    """cosine(image, caption) · `scale` under an OpenCLIP model, as a RewardModel.

    Args:
        model: an open_clip model name (loaded with `pretrained`) or a built open_clip CLIP module.
        pretrained: open_clip pretrained tag or checkpoint path when `model` is a name.
        tokenizer: a callable texts -> LongTensor [N, L]; None uses `open_clip.get_tokenizer(model)`
            (name) or the ViT-B-32 BPE tokenizer cut to the model's context length (module).
        image_size: the vision input size; None reads it from the model.
        mean, std: normalisation; None reads the model's preprocess config, else the OpenAI statistics.
        scale: multiplies the cosine (1.0 = raw cosine, as Pref-GRPO).
        batch_size: images per forward pass.
        device: None puts a model loaded by name on CUDA when available; a module stays where it is.
        precision: open_clip precision of a model loaded by name ("fp32", "bf16", "fp16"); the cosine is fp32.
        name: the component name in the RewardOutput.
    """

    def __init__(
        self,
        model: str | nn.Module = "ViT-H-14-378-quickgelu",
        pretrained: str | None = "dfn5b",
        tokenizer: Callable[[list[str]], Tensor] | None = None,
        image_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        scale: float = 1.0,
        batch_size: int = 32,
        device: str | None = None,
        precision: Precision = "fp32",
        name: str = "clip",
    ) -> None:
        import open_clip

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision={precision!r} is not supported; allowed: ['fp32', 'bf16', 'fp16']")
        module: Any = model
        if isinstance(model, str):
            module = open_clip.create_model(
                model, pretrained=pretrained, device=resolve_device(device), precision=precision
            )
            tokenizer = tokenizer or open_clip.get_tokenizer(model)
        elif device is not None:
            module = model.to(device)
        if tokenizer is None:
            tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=int(getattr(module, "context_length", 77)))
        cfg = getattr(module.visual, "preprocess_cfg", None) or {}
        size = image_size or cfg.get("size") or module.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = tuple(mean or cfg.get("mean") or CLIP_MEAN)
        self.std = tuple(std or cfg.get("std") or CLIP_STD)
        self.model: Any = module.eval()
        self.tokenizer = tokenizer
        self.scale, self.batch_size, self.name = scale, batch_size, name

    @classmethod
    def from_model(
        cls, model: nn.Module, tokenizer: Callable[[list[str]], Tensor] | None = None, **kwargs: Any
    ) -> ClipScore:
        """Wrap an already built open_clip model (tests: a tiny random one)."""
        return cls(model=model, pretrained=None, tokenizer=tokenizer, **kwargs)

    @property
    def device(self) -> torch.device:
        return torch.device(next(self.model.parameters()).device)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype  # type: ignore[no-any-return]

    @torch.no_grad()
    def embed_images(self, samples: Sequence[Any] | Tensor) -> Tensor:
        """Image embeddings [N, D], unnormalised, fp32, on CPU (images may differ in size)."""
        out = []
        for start in range(0, len(samples), self.batch_size):
            pixels = clip_pixels(samples[start : start + self.batch_size], self.image_size, self.mean, self.std)
            out.append(self.model.encode_image(pixels.to(self.device, self.dtype)).float())
        return torch.cat(out).cpu() if out else torch.zeros(0, 0)

    @torch.no_grad()
    def embed_texts(self, captions: Sequence[str]) -> Tensor:
        """Text embeddings [N, D], unnormalised, fp32, on CPU."""
        out = []
        for start in range(0, len(captions), self.batch_size):
            tokens = self.tokenizer([str(c) for c in captions[start : start + self.batch_size]]).to(self.device)
            out.append(self.model.encode_text(tokens).float())
        return torch.cat(out).cpu() if out else torch.zeros(0, 0)

    def __call__(self, prompts: Sequence[Any], samples: Sequence[Any], **metadata: Any) -> RewardOutput:
        if len(prompts) != len(samples):
            raise ValueError(f"{len(prompts)} prompts but {len(samples)} samples")
        if len(prompts) == 0:
            return RewardOutput(scores=torch.zeros(0), components={self.name: torch.zeros(0)})
        began = time.perf_counter()
        image_embeds = self.embed_images(samples)
        text_embeds = self.embed_texts([caption_text(p) for p in prompts])
        scores = cosine_scores(image_embeds, text_embeds) * self.scale
        metrics = {f"{self.name}/mean": float(scores.mean()), f"{self.name}/latency_s": time.perf_counter() - began}
        return RewardOutput(scores=scores, components={self.name: scores.clone()}, metrics=metrics)


def caption_text(prompt: Any) -> str:
    """The caption of a prompt: the string itself or a row dict's "prompt" (or "caption") field."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict):
        for key in ("prompt", "caption"):
            if isinstance(prompt.get(key), str):
                return str(prompt[key])
    raise ValueError(f"cannot find a caption in prompt {str(prompt)[:200]!r}")


def build_tiny_open_clip(
    seed: int = 0, embed_dim: int = 32, image_size: int = 32, context_length: int = 16, width: int = 32
) -> nn.Module:
    """A tiny random-init open_clip CLIP (2-layer towers; TINY_MODELS.md recipe); no download."""
    import open_clip

    torch.manual_seed(seed)
    vision = {"image_size": image_size, "layers": 2, "width": width, "patch_size": 8, "head_width": 16}
    text = {"context_length": context_length, "vocab_size": 49408, "width": width, "heads": 2, "layers": 2}
    model: nn.Module = open_clip.CLIP(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text)
    return model.eval()


def tiny(seed: int = 0, scale: float = 1.0, name: str = "clip", device: str | None = None) -> ClipScore:
    """ClipScore over a tiny random open_clip model, for tiny YAML recipes and tests.

    YAML: `_component_: rewards.image.clip.tiny`.
    """
    return ClipScore.from_model(build_tiny_open_clip(seed=seed), scale=scale, name=name, device=device)
