"""A local vision-language judge through transformers (Qwen2.5-VL and other image-text-to-text models).

`HFVisionChatClient.complete(conversations) -> texts` takes the same messages as the HTTP client: content
parts `{"type": "image", "image": PIL.Image}` (rewards.judges.client.image_part), `image_url` parts with
base64 data URLs (decoded locally; remote URLs are refused, no network), and text parts. Batched,
left-padded generation; a CUDA out-of-memory error yields None for that batch (counted).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image
from torch import nn

from rewards.judges.client import ClientStats, Conversation
from rewards.judges.hf_generation import (
    complete_in_batches,
    generate_new_text,
    left_padding,
    load_model_and_preprocessor,
)


def decode_data_url(url: str) -> Image.Image:
    """A `data:image/...;base64,...` URL as an RGB PIL image (ValueError for any other URL)."""
    if not url.startswith("data:image/") or ";base64," not in url:
        raise ValueError(f"a local VLM judge only reads base64 image data URLs, got {url[:60]!r}")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def split_images(conversation: Conversation) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """(messages with image placeholders `{"type": "image"}`, the images in order of appearance)."""
    messages: list[dict[str, Any]] = []
    images: list[Image.Image] = []
    for message in conversation:
        content = message.get("content", "")
        if isinstance(content, str):
            messages.append({"role": str(message["role"]), "content": content})
            continue
        parts: list[dict[str, Any]] = []
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "image":
                image = part["image"]
                images.append(decode_data_url(image) if isinstance(image, str) else image.convert("RGB"))
                parts.append({"type": "image"})
            elif kind == "image_url":
                images.append(decode_data_url(str(part["image_url"]["url"])))
                parts.append({"type": "image"})
            elif kind == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            else:
                raise ValueError(f"unsupported content part {str(part)[:80]!r}; use text, image or image_url parts")
        messages.append({"role": str(message["role"]), "content": parts})
    return messages, images


class HFVisionChatClient:
    """A local transformers VLM as judge (e.g. UnifiedReward-Think-qwen-7b, UniGenBench-EvalModel-qwen-72b-v1).

    Greedy when `temperature == 0`, else sampling. Args mirror rewards.judges.client.HFChatClient.

    Args:
        model: a hub id / local path (AutoModelForImageTextToText) or a loaded module.
        processor: an AutoProcessor (chat template + tokenizer + image processor) or its id/path; None loads
            it from `model` when that is a string.
        batch_size: conversations per `generate` call.
        device: where a loaded model is moved; None keeps a module where it is and puts a model loaded from a
            string on CUDA when available.
        dtype: dtype for loading from a string ("auto" by default).
    """

    def __init__(
        self,
        model: str | nn.Module,
        processor: Any = None,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        batch_size: int = 4,
        device: str | None = None,
        dtype: str | None = None,
    ) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if max_new_tokens < 1 or batch_size < 1 or not top_p > 0 or temperature < 0:
            raise ValueError(
                f"need max_new_tokens >= 1, batch_size >= 1, top_p > 0, temperature >= 0; got {max_new_tokens}, "
                f"{batch_size}, {top_p}, {temperature}"
            )
        model, processor = load_model_and_preprocessor(
            model,
            processor,
            AutoModelForImageTextToText,
            AutoProcessor,
            device,
            dtype,
            "HFVisionChatClient",
            "processor",
        )
        self.model: Any = model
        self.processor: Any = processor
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.batch_size = batch_size
        self.stats = ClientStats()

    def complete(self, batch: Sequence[Conversation]) -> list[str | None]:
        return complete_in_batches(batch, self.batch_size, self._generate, self.stats, "VLM judge")

    def _generate(self, conversations: list[Conversation]) -> list[str | None]:
        chunk = [split_images(c) for c in conversations]
        texts = [self.processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m, _ in chunk]
        images = [image for _, row in chunk for image in row]
        with left_padding(self.processor.tokenizer):
            inputs = self.processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        return generate_new_text(
            self.model, self.processor.tokenizer, inputs, self.max_new_tokens, self.temperature, self.top_p
        )
