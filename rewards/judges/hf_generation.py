"""Local transformers judges' shared machinery: loading model + tokenizer/processor, batched left-padded generation.

Used by rewards.judges.client.HFChatClient (text) and rewards.judges.vlm_client.HFVisionChatClient (images).
A CUDA out-of-memory error in a batch yields None for that batch (counted in the client's stats).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:  # client.py imports this module
    from rewards.judges.client import ClientStats

log = logging.getLogger(__name__)

Item = TypeVar("Item")


def load_model_and_preprocessor(
    model: Any,
    preprocessor: Any,
    model_class: Any,
    preprocessor_class: Any,
    device: str | None,
    dtype: str | None,
    owner: str,
    kind: str,
) -> tuple[Any, Any]:
    """(model on `device`, tokenizer/processor with a chat template), loading either from a hub id / path.

    A model given as a string is loaded with `model_class` (dtype "auto" unless given) and goes to CUDA when
    available unless `device` says otherwise; its preprocessor defaults to the same id. A module keeps its
    device unless `device` is given, and needs an explicit preprocessor. `owner` and `kind` ("tokenizer",
    "processor") name things in the errors.
    """
    if isinstance(model, str):
        preprocessor = preprocessor if preprocessor is not None else model
        model = model_class.from_pretrained(model, dtype=dtype or "auto")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    elif preprocessor is None:
        raise ValueError(f"{owner} needs a {kind} when model is a module")
    if isinstance(preprocessor, str):
        preprocessor = preprocessor_class.from_pretrained(preprocessor)
    if getattr(preprocessor, "chat_template", None) is None:
        raise ValueError(f"{owner} needs a {kind} with a chat_template")
    if device is not None:
        model = model.to(device)
    return model, preprocessor


def complete_in_batches(
    items: Sequence[Item],
    batch_size: int,
    generate: Callable[[list[Item]], list[str | None]],
    stats: ClientStats,
    what: str,
) -> list[str | None]:
    """`generate` over consecutive chunks of `batch_size` items; a chunk that runs out of CUDA memory is None.

    Updates `stats`: one request and one attempt per item, failures for out-of-memory chunks, latency per chunk.
    """
    out: list[str | None] = []
    for start in range(0, len(items), batch_size):
        chunk = list(items[start : start + batch_size])
        began = time.perf_counter()
        try:
            out.extend(generate(chunk))
        except torch.OutOfMemoryError as err:
            log.warning("%s ran out of memory for %d conversations: %s", what, len(chunk), err)
            out.extend([None] * len(chunk))
            stats.failures += len(chunk)
        stats.latency_s += time.perf_counter() - began
    stats.requests += len(items)
    stats.attempts += len(items)
    return out


@contextmanager
def left_padding(tokenizer: Any) -> Iterator[None]:
    """Pads on the left inside the block (batched generation continues every row at its end)."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side


@torch.no_grad()
def generate_new_text(
    model: Any,
    tokenizer: Any,
    inputs: Mapping[str, Any],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
) -> list[str | None]:
    """The decoded continuation of every left-padded row of `inputs`, in eval mode (training mode restored).

    Greedy when `temperature == 0`, else sampling with `temperature` and `top_p` (top-k off).
    """
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    sampling = temperature > 0
    config = GenerationConfig(  # type: ignore[no-untyped-call]
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    was_training = model.training
    model.eval()
    try:
        output = model.generate(**moved, generation_config=config)
    finally:
        model.train(was_training)
    new_tokens = output[:, moved["input_ids"].shape[1] :]
    return list(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
