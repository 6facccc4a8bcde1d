"""Copies of a policy's weights that are sharded like the policy under FSDP2, with no full copy on any rank.

A frozen reference or an EMA copy starts as a skeleton (`meta_copy`: the module's structure with every tensor on the
meta device, so no storage) and is filled from the already sharded policy: `shard_like` gives the skeleton the
policy's FSDP2 units and copies each rank's local shards into it (a reference that runs forwards), `clone_into`
gives it a frozen clone of each parameter (a DTensor keeps the policy's mesh and placements: this rank's shard
only; for an EMA that is only updated and saved). `ShardedStatePolicy` is how a policy hands such state to the
sharded checkpoints (toolkit.train.sharding). Light to import: accelerate's FSDP helpers load inside the functions.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

# The key of a sharded checkpoint's per-policy shards, and of the loader toolkit.train.sharding puts into the
# policy's checkpointed state when resuming such a checkpoint (`ShardedStatePolicy.load_state_dict` calls it).
POLICY_SHARDS = "policy_state"
LOAD_SHARDS = "load_shards"


@runtime_checkable
class ShardedStatePolicy(Protocol):
    """A policy whose own state (beyond its module's weights) may be sharded, such as DiDi's EMA under FSDP2.

    Under FSDP the trainer's checkpoint writes `sharded_state_dict()` with the module's shards (every rank its own)
    and `full_state_dict()` (gathered) as the policy's state in `objects.pt`, for export and for one-process
    loads. A resumed run's `load_state_dict(state)` finds `state[LOAD_SHARDS]`: call it with the same tensors as
    `sharded_state_dict()` gives to read the shards back into them in place (collective).
    """

    def sharded_state_dict(self) -> dict[str, Any]:
        """This rank's shards of the policy's state (nested dicts of DTensors); {} when none is sharded."""
        ...

    def full_state_dict(self) -> dict[str, Any]:
        """`state_dict()` with the sharded parts gathered whole (collective; only rank 0's result is kept)."""
        ...


def fsdp_pending() -> bool:
    """True when this process's accelerate state is FSDP: the policy will be sharded with FSDP2 by `prepare`.

    Read from the state the `Accelerator` left (not built here: building one would initialise accelerate); False
    before any Accelerator exists.
    """
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    return bool(AcceleratorState._shared_state.get("distributed_type") == DistributedType.FSDP)


def is_fsdp_sharded(module: nn.Module) -> bool:
    """True when any parameter of `module` is a DTensor (FSDP2 shards)."""
    return any(isinstance(p, _dtensor_type()) for p in module.parameters())


def is_skeleton(module: nn.Module) -> bool:
    """True when `module` holds no storage: every parameter and buffer on the meta device (`meta_copy`)."""
    tensors = [*module.parameters(), *module.buffers()]
    return bool(tensors) and all(t.is_meta for t in tensors)


def meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module`'s structure with every parameter and buffer on the meta device (no storage).

    Parameters shared between submodules (tied weights) stay shared; dtypes, shapes and requires_grad are kept.
    """
    memo: dict[int, Any] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in memo:
            empty = torch.empty_like(tensor, device="meta")
            is_param = isinstance(tensor, nn.Parameter)
            memo[id(tensor)] = nn.Parameter(empty, requires_grad=tensor.requires_grad) if is_param else empty
    return copy.deepcopy(module, memo)


def frozen_skeleton(module: nn.Module) -> nn.Module:
    """`meta_copy` of the unwrapped `module`, in eval mode with requires_grad off (a reference or EMA to be filled)."""
    from toolkit.distributed import unwrap

    return meta_copy(unwrap(module)).eval().requires_grad_(False)


def named_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer of `module` by name, tied names included."""
    tensors: dict[str, Tensor] = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    return tensors


def shard_like(accelerator: Any, skeleton: nn.Module, source: nn.Module) -> nn.Module:
    """Shard a frozen copy like the FSDP2-prepared `source` (in place) and fill it with `source`'s local shards.

    The skeleton gets the same FSDP2 units as the policy (accelerate's `fsdp2_prepare_model`, the launch config's
    settings), then storage for this rank's shards only, copied from the same names of `source`. A copy that
    already holds weights (taken before the launch was known to shard) is sharded as it is.

    Raises:
        ValueError: a name or a local shard shape of the copy differs from `source`'s.
    """
    from accelerate.utils import fsdp2_prepare_model

    if not is_skeleton(skeleton):
        return fsdp2_prepare_model(accelerator, skeleton)  # type: ignore[no-any-return]
    plugin = accelerator.state.fsdp_plugin
    # Nothing to broadcast from rank 0: every rank's values come from its own shards of `source`.
    efficient, plugin.cpu_ram_efficient_loading = plugin.cpu_ram_efficient_loading, False
    try:
        fsdp2_prepare_model(accelerator, skeleton)
    finally:
        plugin.cpu_ram_efficient_loading = efficient
    skeleton.to_empty(device=_local(next(source.parameters())).device)
    sources = named_tensors(source)
    with torch.no_grad():
        for name, tensor in named_tensors(skeleton).items():
            _local(tensor).copy_(_local(_matching(name, tensor, sources)))
    return skeleton


def clone_into(skeleton: nn.Module, sources: Mapping[str, Tensor], device: torch.device | None = None) -> nn.Module:
    """Give a `meta_copy` skeleton a frozen clone of each of its tensors from `sources` (by name); returns it.

    A DTensor source is cloned as a DTensor (same mesh and placements: this rank's shard only); a plain tensor is
    copied to `device` (None: its own). Tied names share one clone.

    Raises:
        ValueError: `sources` lacks a name of the skeleton or holds another shape.
    """
    clones: dict[int, Tensor] = {}
    for name, tensor in named_tensors(skeleton).items():
        if id(tensor) not in clones:
            value = _matching(name, tensor, sources).detach()
            value = value.clone() if isinstance(value, _dtensor_type()) else value.to(device, copy=True)
            is_param = isinstance(tensor, nn.Parameter)
            clones[id(tensor)] = nn.Parameter(value, requires_grad=False) if is_param else value
        owner, _, attr = name.rpartition(".")
        module = skeleton.get_submodule(owner)
        if attr in module._parameters:
            module._parameters[attr] = clones[id(tensor)]  # type: ignore[assignment]
        else:
            module._buffers[attr] = clones[id(tensor)]
    return skeleton


def reshard(module: nn.Module) -> None:
    """Reshard every FSDP2 unit of `module` (a unit kept unsharded after a forward registers whole parameters)."""
    from torch.distributed.fsdp import FSDPModule

    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


def local_tensors(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(name, this rank's local tensor) for every parameter and buffer (a DTensor's shard; a plain tensor itself)."""
    for name, tensor in {**dict(module.named_parameters()), **dict(module.named_buffers())}.items():
        yield name, _local(tensor)


def gather_full(tensors: Mapping[str, Tensor], keep: bool) -> dict[str, Tensor]:
    """The whole tensors on CPU, DTensors all-gathered one at a time (collective: every rank calls it, same order).

    `keep`: whether this rank keeps them ({} otherwise, each gathered tensor freed at once).
    """
    full: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        whole = tensor.full_tensor() if isinstance(tensor, _dtensor_type()) else tensor  # type: ignore[attr-defined]
        if keep:
            full[name] = whole.detach().to("cpu", copy=True)
    return full


def _matching(name: str, tensor: Tensor, sources: Mapping[str, Tensor]) -> Tensor:
    source = sources.get(name)
    if source is None:
        raise ValueError(f"the source has no tensor {name!r} for the copy (its names: {sorted(sources)[:5]} ...)")
    shards_differ = not tensor.is_meta and _local(source).shape != _local(tensor).shape
    if source.shape != tensor.shape or shards_differ:
        raise ValueError(f"{name!r}: the copy holds shape {tuple(tensor.shape)}, the source {tuple(source.shape)}")
    return source


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if isinstance(tensor, _dtensor_type()) else tensor  # type: ignore[attr-defined]


def _dtensor_type() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor
