"""Multimodal model inputs that can leave the process: one mapping name -> tensor per prompt, plus how each key
batches, so that an engine in another process (`renorm serve-policy`) or library (vLLM) rebuilds what the `hf`
engine gets from the sampler's `GenerationRequest.model_inputs` callable.

Why the sampler states a per-prompt form next to its callable, rather than the engine calling the callable on
one-row slices: a callable's output does not say how it batches (a [1, L] token-type row and a [1, 3] video grid
look alike; cached vision embeddings are not even tensor kwargs), and one-row calls would send a prompt's video G
times. Each key's rule is one of two: "concat" (the rows' tensors concatenated along dim 0, in row order: patches,
grids, seconds per grid step) or "left_pad" (a [L] tensor aligned with the prompt's tokens, left-padded with 0 to
the batch's prompt width, as the prompt ids are: token types). On the wire each distinct tensor travels once, as
safetensors bytes (base64 in the completions body's `renorm_multimodal` field), never pickle.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

Batching = Literal["concat", "left_pad"]
WIRE_FIELD = "renorm_multimodal"
WIRE_FORMAT = 1
# What may travel: the dtypes of patches, embeddings, grids and token types (no complex, no quantized types).
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
# Qwen-VL style (patches, grid) pairs: a grid's t·h·w rows must add up to the patch count (checked before any model
# runs, so a forged grid cannot make the vision tower plan an enormous attention).
VISION_GRIDS = {"pixel_values_videos": "video_grid_thw", "pixel_values": "image_grid_thw"}


class MultimodalTooLarge(ValueError):
    """A multimodal payload over its byte cap (answered 413)."""


@dataclass(frozen=True)
class MultimodalInputs:
    """The extra model inputs of a request's prompts, in a form that batches anywhere and serialises.

    Args:
        prompts: one mapping key -> tensor per prompt (P, the request's prompts in order); all share the same keys.
            A tensor shared by several prompts (the same video) is sent once.
        batching: each key's rule, "concat" (dim 0, row order; the tensor has >= 1 dims) or "left_pad" (a [L]
            tensor, L = the prompt's token count, left-padded with 0 to the batch's prompt width).

    Raises:
        ValueError: a prompt whose keys differ from `batching`'s, an unknown rule, a dtype outside `DTYPES`, or
            a key whose dtype or trailing shape changes across prompts (naming the prompt and key).
    """

    prompts: tuple[Mapping[str, Tensor], ...]
    batching: Mapping[str, Batching]

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "batching", dict(self.batching))
        if not self.prompts or not self.batching:
            raise ValueError("multimodal inputs need at least one prompt and one key")
        bad = {k: v for k, v in self.batching.items() if v not in get_args(Batching)}
        if bad:
            raise ValueError(f"batching {bad} is not one of {list(get_args(Batching))}")
        for index, mapping in enumerate(self.prompts):
            if not isinstance(mapping, Mapping) or set(mapping) != set(self.batching):
                keys = sorted(mapping) if isinstance(mapping, Mapping) else type(mapping).__name__
                raise ValueError(f"prompts[{index}] has keys {keys}, expected {sorted(self.batching)}")
            for key, tensor in mapping.items():
                self._check_tensor(index, key, tensor)

    def _check_tensor(self, index: int, key: str, tensor: Any) -> None:
        where = f"prompts[{index}].{key}"
        if not isinstance(tensor, Tensor):
            raise ValueError(f"{where} must be a tensor, got {type(tensor).__name__}")
        if tensor.dtype not in DTYPES.values():
            raise ValueError(f"{where} has dtype {tensor.dtype}, not one of {sorted(DTYPES)}")
        if self.batching[key] == "left_pad" and tensor.dim() != 1:
            raise ValueError(f"{where} is left_pad, so it must be 1-D [L], got shape {tuple(tensor.shape)}")
        if self.batching[key] == "concat" and tensor.dim() < 1:
            raise ValueError(f"{where} is concat, so it needs a dim 0, got a scalar")
        first = self.prompts[0][key]
        if tensor.dtype != first.dtype or (self.batching[key] == "concat" and tensor.shape[1:] != first.shape[1:]):
            raise ValueError(
                f"{where} is {tensor.dtype} {tuple(tensor.shape)}, but prompts[0].{key} is {first.dtype} "
                f"{tuple(first.shape)}: a key's dtype and trailing shape are the same for every prompt"
            )

    def check_prompts(self, lengths: Sequence[int]) -> None:
        """Raise ValueError unless there is one mapping per prompt and each left_pad tensor has its prompt's length."""
        if len(lengths) != len(self.prompts):
            raise ValueError(f"multimodal inputs for {len(self.prompts)} prompts, but the request has {len(lengths)}")
        for index, (mapping, length) in enumerate(zip(self.prompts, lengths, strict=True)):
            for key, rule in self.batching.items():
                if rule == "left_pad" and mapping[key].shape[0] != length:
                    raise ValueError(
                        f"prompts[{index}].{key} has {mapping[key].shape[0]} entries for a prompt of {length} tokens"
                    )

    def check_vision_grids(self) -> None:
        """Raise ValueError unless each prompt's (patches, grid) pairs agree: sum of t·h·w over grid rows = patches."""
        for index, mapping in enumerate(self.prompts):
            for patches, grid in VISION_GRIDS.items():
                if patches not in mapping:
                    continue
                if grid not in mapping:
                    raise ValueError(f"prompts[{index}] has {patches} but no {grid}")
                thw, found = mapping[grid], mapping[patches].shape[0]
                integers = thw.dtype in (torch.int64, torch.int32)
                if thw.dim() != 2 or thw.shape[1] != 3 or not integers or bool((thw <= 0).any()):
                    raise ValueError(f"prompts[{index}].{grid} must be positive integers [n, 3], got {thw!r:.80}")
                count = int(thw.double().prod(dim=1).sum().item())
                if count != found:
                    raise ValueError(f"prompts[{index}].{grid} describes {count} patches but {patches} has {found}")

    def check_placeholders(self, prompts: Sequence[Sequence[int]], token_ids: Mapping[str, int], merge: int) -> None:
        """Raise ValueError unless each prompt holds as many placeholder tokens as its grids make (Qwen-VL: t·h·w /
        merge² per grid row), for each grid key of `token_ids` (grid key -> placeholder id) the inputs have."""
        for index, (mapping, ids) in enumerate(zip(self.prompts, prompts, strict=True)):
            for grid, token in token_ids.items():
                if grid not in mapping:
                    continue
                wanted = int(mapping[grid].double().prod(dim=1).sum().item()) // merge**2
                found = sum(1 for t in ids if t == token)
                if found != wanted:
                    raise ValueError(
                        f"prompts[{index}].{grid} makes {wanted} placeholder tokens (id {token}), but the prompt has "
                        f"{found}"
                    )

    @property
    def num_bytes(self) -> int:
        """Bytes of the distinct tensors (what `encode_multimodal` sends)."""
        return sum(t.numel() * t.element_size() for t in _distinct(self.prompts).values())

    def batch(self, prompt_rows: Sequence[int], width: int, device: torch.device) -> dict[str, Tensor]:
        """The model kwargs of rows whose prompts are `prompt_rows` (one prompt index per row), prompts padded to
        `width` tokens."""
        out: dict[str, Tensor] = {}
        for key, rule in self.batching.items():
            parts = [self.prompts[p][key] for p in prompt_rows]
            if rule == "concat":
                out[key] = torch.cat(parts).to(device)
                continue
            padded = torch.zeros(len(parts), width, dtype=parts[0].dtype)
            for row, values in enumerate(parts):
                if values.shape[0] > width:
                    raise ValueError(f"{key} has {values.shape[0]} entries for prompts padded to {width} tokens")
                padded[row, width - values.shape[0] :] = values
            out[key] = padded.to(device)
        return out

    def model_inputs(self, num_samples: int) -> Callable[[slice, Tensor], dict[str, Any]]:
        """The `GenerationRequest.model_inputs` callable of a request with `num_samples` rows per prompt."""
        num_rows = len(self.prompts) * num_samples

        def inputs(rows: slice, prompt_ids: Tensor) -> dict[str, Any]:
            prompts = [row // num_samples for row in range(num_rows)[rows]]
            return self.batch(prompts, prompt_ids.shape[1], prompt_ids.device)

        return inputs

    def select(self, prompts: range) -> MultimodalInputs:
        """The inputs of a consecutive range of prompts."""
        return MultimodalInputs(self.prompts[prompts.start : prompts.stop], self.batching)


def _distinct(prompts: Sequence[Mapping[str, Tensor]]) -> dict[int, Tensor]:
    """The prompts' tensors, each object once (keyed by id: prompts on one video share its tensors)."""
    return {id(t): t for mapping in prompts for t in mapping.values()}


def prompt_chunks(inputs: MultimodalInputs, max_bytes: int) -> list[range]:
    """Consecutive prompt ranges whose distinct tensors stay within `max_bytes` (a prompt over it: alone)."""
    chunks: list[range] = []
    start, size = 0, 0
    seen: set[int] = set()
    for index, mapping in enumerate(inputs.prompts):
        new = {id(t): t for t in mapping.values() if id(t) not in seen}
        extra = sum(t.numel() * t.element_size() for t in new.values())
        if index > start and size + extra > max_bytes:
            chunks.append(range(start, index))
            start, size, seen = index, 0, set()
            new = {id(t): t for t in mapping.values()}
            extra = sum(t.numel() * t.element_size() for t in new.values())
        size += extra
        seen |= set(new)
    chunks.append(range(start, len(inputs.prompts)))
    return chunks


def encode_multimodal(inputs: MultimodalInputs) -> dict[str, Any]:
    """The JSON-ready wire form: the distinct tensors as base64 safetensors, each prompt naming its tensors."""
    from safetensors.torch import save

    names: dict[int, str] = {}
    tensors: dict[str, Tensor] = {}
    prompts: list[dict[str, str]] = []
    for mapping in inputs.prompts:
        entry: dict[str, str] = {}
        for key, tensor in mapping.items():
            if id(tensor) not in names:
                names[id(tensor)] = f"t{len(names)}"
                # A copy each: views of one buffer would share storage, which safetensors refuses.
                tensors[names[id(tensor)]] = tensor.detach().to("cpu", copy=True).contiguous()
            entry[key] = names[id(tensor)]
        prompts.append(entry)
    blob = base64.b64encode(save(tensors)).decode("ascii")
    return {"format": WIRE_FORMAT, "batching": dict(inputs.batching), "prompts": prompts, "tensors": blob}


def encoded_size(num_bytes: int) -> int:
    """Characters of the base64 form of `num_bytes` bytes."""
    return 4 * math.ceil(num_bytes / 3)


def decode_multimodal(payload: Any, max_bytes: int) -> MultimodalInputs:
    """The `MultimodalInputs` of an `encode_multimodal` object, every field checked.

    Raises:
        MultimodalTooLarge: the safetensors bytes (tensors and their header) are over `max_bytes`.
        ValueError: anything malformed, naming the field (`renorm_multimodal.prompts[1].video_grid_thw`, ...).
    """
    if not isinstance(payload, dict):
        raise ValueError(f"{WIRE_FIELD} must be an object, got {type(payload).__name__}")
    if payload.get("format") != WIRE_FORMAT:
        raise ValueError(f"{WIRE_FIELD}.format must be {WIRE_FORMAT}, got {payload.get('format')!r:.40}")
    tensors = _decode_tensors(payload.get("tensors"), max_bytes)
    batching, prompts = payload.get("batching"), payload.get("prompts")
    if not isinstance(batching, dict) or not all(isinstance(k, str) for k in batching):
        raise ValueError(f"{WIRE_FIELD}.batching must map each key to one of {list(get_args(Batching))}")
    if not isinstance(prompts, list) or not prompts:
        raise ValueError(f"{WIRE_FIELD}.prompts must be a non-empty list, one object per prompt")
    mappings: list[dict[str, Tensor]] = []
    used: set[str] = set()
    for index, entry in enumerate(prompts):
        if not isinstance(entry, dict) or not all(isinstance(v, str) and v in tensors for v in entry.values()):
            raise ValueError(f"{WIRE_FIELD}.prompts[{index}] must map keys to names in {WIRE_FIELD}.tensors")
        mappings.append({str(key): tensors[name] for key, name in entry.items()})
        used |= set(entry.values())
    if set(tensors) - used:
        raise ValueError(f"{WIRE_FIELD}.tensors has tensors no prompt names: {sorted(set(tensors) - used)[:5]}")
    try:
        inputs = MultimodalInputs(tuple(mappings), batching)
        inputs.check_vision_grids()
    except ValueError as error:
        path = "." if str(error).startswith(("prompts[", "batching")) else ": "
        raise ValueError(f"{WIRE_FIELD}{path}{error}") from error
    return inputs


def _decode_tensors(blob: Any, max_bytes: int) -> dict[str, Tensor]:
    from safetensors.torch import load

    if not isinstance(blob, str):
        raise ValueError(f"{WIRE_FIELD}.tensors must be a base64 string of safetensors bytes")
    if len(blob) > encoded_size(max_bytes):
        raise MultimodalTooLarge(
            f"{WIRE_FIELD}.tensors holds about {len(blob) * 3 // 4} bytes; over max_multimodal_bytes={max_bytes}"
        )
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"{WIRE_FIELD}.tensors is not base64: {error}") from error
    try:
        tensors = load(raw)
    except Exception as error:  # safetensors raises its own SafetensorError for malformed headers
        raise ValueError(f"{WIRE_FIELD}.tensors is not safetensors: {error}"[:500]) from error
    if not tensors:
        raise ValueError(f"{WIRE_FIELD}.tensors holds no tensor")
    for name, tensor in tensors.items():
        if tensor.dtype not in DTYPES.values():
            raise ValueError(f"{WIRE_FIELD}.tensors[{name!r}] has dtype {tensor.dtype}, not one of {sorted(DTYPES)}")
    return tensors
