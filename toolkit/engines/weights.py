"""The policy weights an engine must serve, and their wire format: safetensors bytes (no pickle, so a weights
payload can never run code), with the weights version and kind in the safetensors metadata.

"full" weights are the whole state dict; "lora" the adapters alone (served unmerged, on the server's own copy
of the frozen base model). Both are what the policy checkpoints (`TrainableStatePolicy.trainable_state_dict`).
Sharded weights are read whole: FSDP2 DTensors are all-gathered (a collective), and inside the trainer's
`gathered_weights` the already unsharded parameters are read as they are, without any communication.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from toolkit.distributed import unwrap
from toolkit.interfaces import Policy, TrainableStatePolicy

WeightsKind = Literal["full", "lora"]
TransferDtype = Literal["policy", "bfloat16", "float16", "float32"]
VERSION_FIELD = "renorm_weights_version"  # the safetensors metadata key, and the completions field naming a version
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def weights_kind(policy: Policy) -> WeightsKind:
    """The kind of weights the policy trains: "lora" (its adapters only) or "full"."""
    return "lora" if getattr(policy, "is_lora", False) else "full"


def policy_weights(
    policy: Policy, dtype: TransferDtype = "policy", keep: bool = True
) -> tuple[dict[str, Tensor], WeightsKind]:
    """(name -> CPU tensor, kind) of what the policy trains, floating tensors cast to `dtype` ("policy": kept).

    Collective for sharded weights: each FSDP2 DTensor is gathered whole with `full_tensor()`, so every rank must
    call this at the same point, and the ranks that only take part pass `keep=False` (they copy nothing and get an
    empty dict). Inside `toolkit.train.sharding.gathered_weights` the parameters are already whole and nothing is
    communicated. A DTensor is gathered once even when tied weights name it twice.

    Raises:
        ValueError: a bad `dtype`, or DeepSpeed ZeRO-3 parameters read outside gathered weights (they are empty
            placeholders there: a silently wrong payload otherwise).
    """
    if dtype not in get_args(TransferDtype):
        raise ValueError(f"transfer dtype {dtype!r} is not one of {list(get_args(TransferDtype))}")
    module = unwrap(policy.module)
    _check_not_partitioned(module)
    kind = weights_kind(policy)
    out: dict[str, Tensor] = {}
    gathered: dict[int, Tensor] = {}
    for name, tensor in _trained_tensors(policy, module, kind).items():
        value = tensor.detach()
        if is_sharded(value):
            if id(tensor) not in gathered:
                gathered[id(tensor)] = value.full_tensor()  # type: ignore[attr-defined]  # a DTensor
            value = gathered[id(tensor)]
        if not keep:
            continue
        if dtype != "policy" and value.is_floating_point():
            value = value.to(_DTYPES[dtype])
        # A copy per tensor: tied weights would otherwise share storage, which safetensors refuses.
        out[name] = value.to("cpu", copy=True).contiguous()
    return out, kind


def has_sharded_weights(policy: Policy) -> bool:
    """True when some trained weight is a shard (an FSDP2 DTensor): reading it whole needs every rank."""
    return any(is_sharded(p) for p in unwrap(policy.module).parameters())


def versioned_parameters(module: nn.Module) -> list[Tensor]:
    """The parameters whose in-place version counters grow with every update: under FSDP2 the sharded DTensors the
    optimizer steps, else the module's own. FSDP2 swaps the module's parameters for unsharded copies while gathered
    (`toolkit.train.sharding.gathered_weights`), re-created by each all-gather: their counters track gathers, not
    updates (and never move in one process)."""
    from torch.distributed.fsdp import FSDPModule

    sharded: list[Tensor] = []
    for unit in unwrap(module).modules():
        if isinstance(unit, FSDPModule):
            state: Any = unit._get_fsdp_state()  # FSDPModule's state: no public view of its parameters
            sharded += [param.sharded_param for group in state._fsdp_param_groups for param in group.fsdp_params]
    return sharded or list(module.parameters())


def is_sharded(tensor: Tensor) -> bool:
    """True for a DTensor (a sharded or replicated distributed tensor)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _trained_tensors(policy: Policy, module: nn.Module, kind: WeightsKind) -> dict[str, Tensor]:
    """The trained tensors by name, as they are now (sharded or whole)."""
    if not _has_fsdp_units(module):
        if isinstance(policy, TrainableStatePolicy):
            return policy.trainable_state_dict()
        return module.state_dict()
    # Not `state_dict()`: FSDP2's pre-save hook would reshard what `gathered_weights` holds unsharded (freeing it, so
    # the next forward all-gathers again), and on one rank alone it would turn whole weights into shards.
    state = current_state(module)
    if kind == "lora":
        trained = {name for name, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
        state = {name: tensor for name, tensor in state.items() if name in trained}
    return state


def current_state(module: nn.Module) -> dict[str, Tensor]:
    """`module.state_dict()`'s names and tensors (parameters, persistent buffers) read without its hooks."""
    state: dict[str, Tensor] = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for name, param in sub.named_parameters(recurse=False, remove_duplicate=False):
            state[dot + name] = param
        for name, buffer in sub.named_buffers(recurse=False, remove_duplicate=False):
            if name not in sub._non_persistent_buffers_set:
                state[dot + name] = buffer
    return state


def _has_fsdp_units(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def _check_not_partitioned(module: nn.Module) -> None:
    for name, param in module.named_parameters():
        full = getattr(param, "ds_numel", None)  # DeepSpeed ZeRO-3 keeps the whole size here, the data elsewhere
        if full is not None and full != param.numel():
            raise ValueError(
                f"weight {name!r} is partitioned by DeepSpeed ZeRO-3 ({param.numel()} of {full} values here): read "
                "the weights inside toolkit.train.sharding.gathered_weights, as the trainer samples"
            )


def encode_weights(weights: Mapping[str, Tensor], version: str, kind: WeightsKind) -> bytes:
    """The safetensors bytes of `weights`, tagged with their version and kind."""
    from safetensors.torch import save

    return save(dict(weights), metadata={VERSION_FIELD: version, "renorm_weights_kind": kind})


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
    version = metadata.get(VERSION_FIELD, "")
    kind = metadata.get("renorm_weights_kind", "")
    if not version:
        raise ValueError(f"the weights payload has no {VERSION_FIELD} metadata")
    if kind not in get_args(WeightsKind):
        raise ValueError(f"renorm_weights_kind={kind!r} is not one of {list(get_args(WeightsKind))}")
    return weights, version, kind  # type: ignore[return-value]  # checked against WeightsKind above


def _metadata(payload: bytes) -> dict[str, str]:
    """The safetensors header's __metadata__ (the format: an 8-byte little-endian length, then that much JSON)."""
    size = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + size])
    metadata = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()}
