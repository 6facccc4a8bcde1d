"""Caption → (token embeddings [B, L, D], pooled embedding [B, P]), computed once per caption and cached.

The text encoders are frozen, so a caption's embeddings never change during RL: an LRU cache keyed by
the caption saves re-encoding the same prompt for every group and step. `PipelineTextEncoder` wraps the
encoders of a diffusers SD3 (CLIP-L + CLIP-G + T5) or FLUX (CLIP-L pooled + T5) pipeline through the
pipeline's own `encode_prompt`; `TinyTextEncoder` is a random-init CLIP text tower with a byte tokenizer
for CPU tests and demos (no download).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

Arch = Literal["sd3", "flux"]


class CachedTextEncoder:
    """Base class: `encode(captions, device)` with an LRU cache; subclasses implement `_encode`.

    Args:
        max_cache_entries: captions kept (least recently used evicted); 0 disables caching.
    """

    def __init__(self, max_cache_entries: int = 4096) -> None:
        if max_cache_entries < 0:
            raise ValueError(f"max_cache_entries must be >= 0, got {max_cache_entries}")
        self.max_cache_entries = max_cache_entries
        self._cache: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def _encode(self, captions: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, captions: Sequence[str], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """([B, L, D] embeddings, [B, P] pooled) on `device`; each distinct new caption is encoded once."""
        device = torch.device(device)
        captions = [str(c) for c in captions]
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        self.hits += len(captions) - len(missing)
        self.misses += len(missing)
        fresh: dict[str, tuple[Tensor, Tensor]] = {}
        if missing:
            embeds, pooled = self._encode(missing, device)
            fresh = {c: (embeds[i].detach(), pooled[i].detach()) for i, c in enumerate(missing)}
        rows = [fresh[c] if c in fresh else self._lookup(c) for c in captions]
        for caption, value in fresh.items():
            self._store(caption, value)
        embeds = torch.stack([r[0].to(device) for r in rows])
        pooled = torch.stack([r[1].to(device) for r in rows])
        return embeds, pooled

    def _lookup(self, caption: str) -> tuple[Tensor, Tensor]:
        self._cache.move_to_end(caption)
        return self._cache[caption]

    def _store(self, caption: str, value: tuple[Tensor, Tensor]) -> None:
        if self.max_cache_entries == 0:
            return
        self._cache[caption] = value
        while len(self._cache) > self.max_cache_entries:
            self._cache.popitem(last=False)


class ByteTokenizer:
    """Deterministic byte-level tokenizer: <pad>=0, <bos>=1, UTF-8 byte b → b + 2, <eos>=258; fixed length."""

    pad_id, bos_id, eos_id, vocab_size = 0, 1, 258, 259

    def __init__(self, max_length: int = 16) -> None:
        if max_length < 3:
            raise ValueError(f"max_length must be >= 3 (bos, a byte, eos), got {max_length}")
        self.max_length = max_length

    def __call__(self, captions: Sequence[str]) -> Tensor:
        """[B, max_length] int64 ids (truncated bytes, then <eos>, then padding)."""
        rows = []
        for caption in captions:
            body = [b + 2 for b in caption.encode("utf-8")][: self.max_length - 2]
            ids = [self.bos_id, *body, self.eos_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


class TinyTextEncoder(CachedTextEncoder):
    """A random-init 1-layer CLIP text tower with a byte tokenizer: embeddings [B, L, D], pooled [B, D].

    Args:
        hidden_size: D (the tiny transformer's joint_attention_dim and pooled_projection_dim).
        max_length: L tokens per caption.
        num_layers: CLIP text layers.
        seed: weights depend only on the arguments (forked RNG).
        max_cache_entries: see `CachedTextEncoder`.
    """

    def __init__(
        self,
        hidden_size: int = 32,
        max_length: int = 16,
        num_layers: int = 1,
        seed: int = 0,
        max_cache_entries: int = 4096,
    ) -> None:
        from transformers import CLIPTextConfig, CLIPTextModel

        super().__init__(max_cache_entries)
        self.tokenizer = ByteTokenizer(max_length)
        config = CLIPTextConfig(
            vocab_size=ByteTokenizer.vocab_size,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=2,
            max_position_embeddings=max_length,
            pad_token_id=ByteTokenizer.pad_id,
            bos_token_id=ByteTokenizer.bos_id,
            eos_token_id=ByteTokenizer.eos_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model: Any = CLIPTextModel(config)
        self.model: nn.Module = model.eval().requires_grad_(False)

    def _encode(self, captions: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
        self.model.to(device)
        out = self.model(input_ids=self.tokenizer(captions).to(device))
        return out.last_hidden_state.float(), out.pooler_output.float()


class PipelineTextEncoder(CachedTextEncoder):
    """The text encoders of a diffusers SD3 / FLUX pipeline, through the pipeline's `encode_prompt`.

    SD3: CLIP-L and CLIP-G penultimate states (concatenated, zero-padded to T5's width) followed by T5
    tokens; pooled = [CLIP-L pooled, CLIP-G pooled]. FLUX: T5 tokens; pooled = CLIP-L pooled.

    Args:
        pipeline: a `StableDiffusion3Pipeline` or `FluxPipeline` (transformer and VAE may be None).
        arch: "sd3" or "flux".
        max_sequence_length: T5 tokens (diffusers defaults: 256 for SD3, 512 for FLUX).
        max_cache_entries: see `CachedTextEncoder`.
    """

    def __init__(
        self, pipeline: Any, arch: Arch = "sd3", max_sequence_length: int | None = None, max_cache_entries: int = 4096
    ) -> None:
        if arch not in ("sd3", "flux"):
            raise ValueError(f"arch={arch!r} is not one of ('sd3', 'flux')")
        super().__init__(max_cache_entries)
        self.pipeline, self.arch = pipeline, arch
        self.max_sequence_length = max_sequence_length or (256 if arch == "sd3" else 512)

    @classmethod
    def from_pretrained(
        cls, path: str, arch: Arch = "sd3", dtype: str = "bfloat16", max_sequence_length: int | None = None
    ) -> PipelineTextEncoder:
        """Load only the tokenizers and text encoders of the pipeline at `path` (hub id or directory)."""
        from diffusers import FluxPipeline, StableDiffusion3Pipeline

        pipeline_cls: Any = StableDiffusion3Pipeline if arch == "sd3" else FluxPipeline
        torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        pipeline = pipeline_cls.from_pretrained(path, transformer=None, vae=None, torch_dtype=torch_dtype)
        return cls(pipeline, arch, max_sequence_length)

    def _encode(self, captions: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
        self.pipeline.to(device)
        if self.arch == "sd3":
            embeds, _, pooled, _ = self.pipeline.encode_prompt(
                prompt=captions,
                prompt_2=None,
                prompt_3=None,
                device=device,
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
            )
        else:
            embeds, pooled, _ = self.pipeline.encode_prompt(
                prompt=captions, prompt_2=None, device=device, max_sequence_length=self.max_sequence_length
            )
        return embeds, pooled
