"""The policy weights an engine must serve, and their wire format: safetensors bytes (no pickle, so a weights
payload can never run code), with the weights version and kind in the safetensors metadata.

"full" weights are the whole state dict; "lora" the adapters alone (served unmerged, on the server's own copy
of the frozen base model). Both are what the policy checkpoints (`TrainableStatePolicy.trainable_state_dict`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Literal, get_args

import torch
from torch import Tensor

from toolkit.distributed import unwrap
from toolkit.interfaces import Policy, TrainableStatePolicy

WeightsKind = Literal["full", "lora"]
TransferDtype = Literal["policy", "bfloat16", "float16", "float32"]
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def policy_weights(policy: Policy, dtype: TransferDtype = "policy") -> tuple[dict[str, Tensor], WeightsKind]:
    """(name -> CPU tensor, kind) of what the policy trains, floating tensors cast to `dtype` ("policy": kept).

    Raises:
        ValueError: a sharded (FSDP2 DTensor) parameter; gather the weights first.
    """
    if dtype not in get_args(TransferDtype):
        raise ValueError(f"transfer dtype {dtype!r} is not one of {list(get_args(TransferDtype))}")
    if isinstance(policy, TrainableStatePolicy):
        state = policy.trainable_state_dict()
    else:
        state = unwrap(policy.module).state_dict()
    kind: WeightsKind = "lora" if getattr(policy, "is_lora", False) else "full"
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if type(tensor) is not Tensor and type(tensor).__name__ == "DTensor":
            raise ValueError(f"weight {name!r} is sharded (FSDP); the server engine needs the gathered weights")
        value = tensor.detach()
        if dtype != "policy" and value.is_floating_point():
            value = value.to(_DTYPES[dtype])
        # A copy per tensor: tied weights would otherwise share storage, which safetensors refuses.
        out[name] = value.to("cpu", copy=True).contiguous()
    return out, kind


def encode_weights(weights: Mapping[str, Tensor], version: str, kind: WeightsKind) -> bytes:
    """The safetensors bytes of `weights`, tagged with their version and kind."""
    from safetensors.torch import save

    return save(dict(weights), metadata={"renorm_weights_version": version, "renorm_weights_kind": kind})


def decode_weights(payload: bytes) -> tuple[dict[str, Tensor], str, WeightsKind]:
    """(weights, version, kind) of `encode_weights` bytes.

    Raises:
        ValueError: not safetensors, or missing/invalid version or kind metadata.
    """
    from safetensors.torch import load

    try:
        weights = load(payload)
    except Exception as error:  # safetensors raises its own SafetensorError for malformed headers
        raise ValueError(f"the weights payload is not safetensors: {error}") from error
    metadata = _metadata(payload)
    version = metadata.get("renorm_weights_version", "")
    kind = metadata.get("renorm_weights_kind", "")
    if not version:
        raise ValueError("the weights payload has no renorm_weights_version metadata")
    if kind not in get_args(WeightsKind):
        raise ValueError(f"renorm_weights_kind={kind!r} is not one of {list(get_args(WeightsKind))}")
    return weights, version, kind  # type: ignore[return-value]  # checked against WeightsKind above


def _metadata(payload: bytes) -> dict[str, str]:
    """The safetensors header's __metadata__ (the format: an 8-byte little-endian length, then that much JSON)."""
    size = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + size])
    metadata = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()}
