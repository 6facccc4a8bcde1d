"""The only place that talks to accelerate / torch.distributed.

Whole groups stay on one rank; batch-wide statistics (batch std, whitening, Beta fits) gather
rows from every rank through `gather_rows`, which is the identity in a single process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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


def make_accelerator(mixed_precision: str = "auto", project_dir: str | None = None) -> Accelerator:
    """Build the `accelerate.Accelerator` for a run (the launcher decides DDP/FSDP/DeepSpeed).

    `mixed_precision="auto"` picks bf16 when CUDA with bf16 support is present, else full precision;
    `project_dir` is where file-writing trackers (TensorBoard) put their logs.
    """
    from accelerate import Accelerator

    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision must be one of 'auto', 'no', 'bf16', 'fp16'; got {mixed_precision!r}")
    # cpu=True without CUDA lets a torchrun-style launch on CPUs form a gloo process group.
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(), project_dir=project_dir)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside a DDP/FSDP/DeepSpeed wrapper (for `generate` and state dicts)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(module)  # type: ignore[no-any-return]
