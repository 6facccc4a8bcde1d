"""Checkpoints of FSDP2 runs: torch.distributed.checkpoint shards beside the usual files, loaded without running code.

`save_checkpoint` writes a `CheckpointManager` checkpoint from every rank: each writes its shard of the module and
optimizer tensors into `sharded/` (`save_sharded`), then rank 0 its usual files, with the whole trained weights
gathered into `model.safetensors` (`full_weights`: what `renorm export` and evaluation read), and the manifest over
all of them. A resumed run reads the shards back resharded to its own layout (`load_sharded`), also with another
world size. A policy's own sharded state (`ShardedStatePolicy`: DiDi's EMA) is written beside the module's shards and
read back through the loader `attach_policy_shards` puts into its checkpointed state. torch's reader unpickles the
`.metadata` file and non-tensor entries with plain pickle; here the metadata goes through an allowlist of its own
classes and non-tensor entries are refused, as `torch.load(weights_only=True)` does for `objects.pt`. Imported only
when needed: torch.distributed.checkpoint takes seconds to import.
"""

from __future__ import annotations

import functools
import pickle
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from toolkit import distributed
from toolkit.interfaces import TrainableStatePolicy
from toolkit.io.checkpoint import SHARDED_DIR, CheckpointError, CheckpointManager, CheckpointState
from toolkit.train.sharded_copy import LOAD_SHARDS, POLICY_SHARDS, ShardedStatePolicy


def save_checkpoint(manager: CheckpointManager, state: CheckpointState | None, policy: Any, optimizer: Any) -> Path:
    """`manager.save` for an FSDP run; every rank calls it, `state` is rank 0's (None elsewhere).

    Rank 0 makes the temp directory, every rank writes its shards into it, then rank 0 writes its files and the
    manifest over all of them and renames the directory into place. A failure on any rank raises on every rank
    (none is left waiting); the earlier checkpoints are untouched.
    """
    main = distributed.rank() == 0
    temp: Path | None = None
    error: BaseException | None = None
    if main:
        try:
            assert state is not None, "rank 0 must pass the checkpoint state"
            temp = manager.make_temp(state.step)
        except CheckpointError as raised:
            error = raised
    shared = distributed.broadcast_object(None if temp is None else str(temp))
    if shared is None:
        raise error or CheckpointError(f"the main process could not start a checkpoint in {manager.directory}")
    path: Path | None = None
    try:
        save_sharded(Path(shared) / SHARDED_DIR, policy.module, optimizer, policy_shards(policy))
        distributed.barrier()
        if main:
            assert state is not None and temp is not None
            path = manager.publish(state, temp)
    except Exception as raised:  # reported to every rank below, so none waits for a checkpoint that never comes
        error = raised
    finally:
        if temp is not None and temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    published = distributed.broadcast_object(None if path is None else str(path))
    if error is not None:
        raise error
    if published is None:
        raise CheckpointError(f"the main process could not write a checkpoint in {manager.directory}")
    return Path(published)


def full_weights(policy: Any) -> dict[str, Tensor]:
    """The trained weights, gathered whole on rank 0 (CPU) from an FSDP2 module; `{}` on the other ranks.

    Collective: every rank calls it. Names are the unwrapped module's; a `TrainableStatePolicy` (LoRA) keeps
    only its trainable names, as `Trainer.state` does without sharding.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights: dict[str, Any] = get_model_state_dict(policy.module, options=options)
    if isinstance(policy, TrainableStatePolicy) and weights:
        names = set(policy.trainable_state_dict())
        weights = {name: tensor for name, tensor in weights.items() if name in names}
    return weights


def policy_shards(policy: Any) -> dict[str, Any]:
    """The policy's own sharded state (`ShardedStatePolicy.sharded_state_dict`); {} for any other policy."""
    return policy.sharded_state_dict() if isinstance(policy, ShardedStatePolicy) else {}


def save_sharded(
    directory: Path, module: nn.Module, optimizer: Any, policy_state: Mapping[str, Any] | None = None
) -> None:
    """Write the module's and optimizer's tensors as shards with torch.distributed.checkpoint (collective).

    The optimizer's param groups (lr, betas, parameter names) are not tensors: `param_groups` gives them for the
    rank-0 `objects.pt`. `policy_state`: the policy's own shards (`policy_shards`), written under `POLICY_SHARDS`.
    """
    model_state, optim_state = get_state_dict(module, [_bare(optimizer)])
    tensors: dict[str, Any] = {"model": model_state, "optimizer": optim_state["state"]}
    if policy_state:
        tensors[POLICY_SHARDS] = dict(policy_state)
    _check_tensors_only(tensors)
    dcp_save(tensors, checkpoint_id=str(directory))


def param_groups(module: nn.Module, optimizer: Any) -> list[dict[str, Any]]:
    """The optimizer's param groups with parameters named (what `load_sharded` needs besides the shards)."""
    groups: Any = get_state_dict(module, [_bare(optimizer)])[1]["param_groups"]
    return list(groups)


def load_sharded(directory: Path, module: nn.Module, optimizer: Any, param_groups: list[dict[str, Any]]) -> None:
    """Load what `save_sharded` wrote into `module` and `optimizer`, resharded to this run's layout (collective).

    The metadata file is unpickled with an allowlist of checkpoint-metadata classes and non-tensor entries are
    refused, so a crafted checkpoint cannot run code (`SafeFileSystemReader`, `_TensorsOnlyPlanner`).
    """
    bare = _bare(optimizer)
    model_state, optim_state = get_state_dict(module, [bare])  # the shapes to fill (optimizer state initialised)
    tensors = {"model": model_state, "optimizer": optim_state["state"]}
    _load(directory, tensors)
    optim: Any = {"state": tensors["optimizer"], "param_groups": param_groups}
    set_state_dict(module, [bare], model_state_dict=model_state, optim_state_dict=optim)


def attach_policy_shards(directory: Path, objects: dict[str, Any], name: str) -> None:
    """When the shards in `directory` hold a policy's own state, put its loader into `objects[name]` (the policy's
    checkpointed state) under `LOAD_SHARDS`: `loader(tensors)` reads them into `tensors` in place (collective)."""
    state = objects.get(name)
    prefix = POLICY_SHARDS + "."
    keys = SafeFileSystemReader(str(directory)).read_metadata().state_dict_metadata
    if isinstance(state, dict) and any(key.startswith(prefix) for key in keys):
        state[LOAD_SHARDS] = functools.partial(load_policy_shards, directory)


def load_policy_shards(directory: Path, tensors: Mapping[str, Any]) -> None:
    """Read the policy's own shards that `save_sharded` wrote into `tensors` (its `sharded_state_dict()`), in place."""
    _load(directory, {POLICY_SHARDS: dict(tensors)})


def _load(directory: Path, tensors: dict[str, Any]) -> None:
    try:
        dcp_load(tensors, storage_reader=SafeFileSystemReader(str(directory)), planner=_TensorsOnlyPlanner())
    except CheckpointException as e:  # every rank's failure, wrapped by torch.distributed.checkpoint
        refused = [line.strip() for line in str(e).splitlines() if "refusing" in line]
        reason = refused[0] if refused else str(e).strip().splitlines()[-1]
        raise CheckpointError(f"could not load the shards in {directory}: {reason}") from e


def _bare(optimizer: Any) -> torch.optim.Optimizer:
    inner: torch.optim.Optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    return inner


def _check_tensors_only(tree: Mapping[str, Any], where: str = "") -> None:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            _check_tensors_only(value, f"{where}{key}.")
        elif not isinstance(value, Tensor):
            raise TypeError(f"sharded checkpoint entry {where}{key} is a {type(value).__name__}, not a tensor")


_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles torch.distributed.checkpoint's `.metadata` and nothing else (no imports beyond its classes)."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()) or (module == "torch" and _is_dtype(name)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name} in a sharded checkpoint's metadata")


def _is_dtype(name: str) -> bool:
    return isinstance(getattr(torch, name, None), torch.dtype)


class SafeFileSystemReader(FileSystemReader):
    """torch.distributed.checkpoint's file reader with the metadata read by `_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as stream:
            try:
                metadata = _MetadataUnpickler(stream).load()
            except pickle.UnpicklingError as e:
                raise pickle.UnpicklingError(f"{path}: {e}") from e
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _TensorsOnlyPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that refuses pickled (non-tensor) entries instead of unpickling them."""

    def load_bytes(self, read_item: Any, value: Any) -> None:
        raise pickle.UnpicklingError(
            f"refusing the non-tensor entry {read_item.dest_index.fqn} of a sharded checkpoint"
        )
