"""The only place that builds the accelerator and talks to torch.distributed.

Whole groups stay on one rank; batch-wide statistics (batch std, whitening, Beta fits) gather
rows from every rank through `gather_rows`, which is the identity in a single process. FSDP2 and
DeepSpeed specifics the trainer needs live in `toolkit.train.sharding`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from accelerate import Accelerator


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def gather_rows(x: Tensor) -> Tensor:
    """Concatenate `x` along dim 0 across ranks (rank order); ranks may hold different row counts."""
    if not is_distributed():
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(int(s.item()) for s in sizes))
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    out = [torch.zeros_like(padded) for _ in range(world_size())]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes, strict=True)], dim=0)


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of `x` over ranks (a new tensor; the input is not modified)."""
    if not is_distributed():
        return x
    y = x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (picklable objects; the identity in a single process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` in rank order, on every rank (`[obj]` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def make_accelerator(mixed_precision: str = "auto", project_dir: str | None = None) -> Accelerator:
    """Build the `accelerate.Accelerator` for a run (the launcher decides DDP/FSDP/DeepSpeed).

    `mixed_precision="auto"` picks bf16 when CUDA with bf16 support is present, else full precision;
    `project_dir` is where file-writing trackers (TensorBoard) put their logs. Without CUDA, an FSDP or DeepSpeed
    launch config still gets its engine over gloo (`_cpu_engine_accelerator`): how the 2-process tests run them.
    """
    from accelerate import Accelerator

    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision must be one of 'auto', 'no', 'bf16', 'fp16'; got {mixed_precision!r}")
    if not torch.cuda.is_available() and _launched_with("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        return _cpu_engine_accelerator(mixed_precision, project_dir)
    # cpu=True without CUDA lets a torchrun-style launch on CPUs form a gloo process group.
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(), project_dir=project_dir)


def _launched_with(*flags: str) -> bool:
    return any(os.environ.get(flag, "false").lower() == "true" for flag in flags)


def _cpu_engine_accelerator(mixed_precision: str, project_dir: str | None) -> Accelerator:
    """An FSDP2 or DeepSpeed accelerator on CPU processes (gloo), for tests and CPU-only machines.

    accelerate 1.x turns FSDP on only for accelerator devices (a CPU launch falls back to plain MULTI_CPU, which
    would wrap the model in DDP) and DeepSpeed only when `cpu=False`. FSDP: the gloo accelerator is built, then its
    state is switched to FSDP with the launch config's plugin, so `prepare`, `backward` and `clip_grad_norm_` take
    the same FSDP2 code path as on GPUs. DeepSpeed: `cpu=False` with a gloo process group (DeepSpeed itself needs
    `DS_ACCELERATOR=cpu`).
    """
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs

    if _launched_with("ACCELERATE_USE_DEEPSPEED"):
        gloo = InitProcessGroupKwargs(backend="gloo")
        return Accelerator(mixed_precision=mixed_precision, project_dir=project_dir, kwargs_handlers=[gloo])
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=True, project_dir=project_dir)
    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables of the launch config
        if mixed_precision != "no":
            plugin.set_mixed_precision(mixed_precision)
        accelerator.state.fsdp_plugin = plugin
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return accelerator


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside a DDP/FSDP/DeepSpeed wrapper (for `generate` and state dicts)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(module)  # type: ignore[no-any-return]
