"""Small helpers shared by the reward-level transforms, filters and merging: option validation and
per-group reductions over `group_ids` (groups never span ranks, so none of these gather)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def check_choice(name: str, value: object, allowed: Sequence[object]) -> None:
    """Raise a ValueError naming `value` and the allowed ones when `value` is not in `allowed`."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {list(allowed)}")


def group_inverse(group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted distinct ids [num_groups] and each row's group position [N] (int64)."""
    if group_ids.dim() != 1:
        raise ValueError(f"group_ids must be [N], got shape {tuple(group_ids.shape)}")
    unique, inverse = torch.unique(group_ids, sorted=True, return_inverse=True)
    return unique, inverse.long()


def group_sum(values: Tensor, inverse: Tensor, num_groups: int) -> Tensor:
    """[num_groups] sum of `values` [N] per group (float32 or the values' float dtype)."""
    out = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    return out.index_add_(0, inverse, values)


def group_range(values: Tensor, inverse: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Per-group (max, min) [num_groups] of the finite entries of `values` [N]; NaN where a group has none."""
    finite = torch.isfinite(values)
    v = values.float()
    high = torch.full((num_groups,), -math.inf, device=values.device)
    low = torch.full((num_groups,), math.inf, device=values.device)
    high = high.scatter_reduce(0, inverse[finite], v[finite], reduce="amax")
    low = low.scatter_reduce(0, inverse[finite], v[finite], reduce="amin")
    count = group_sum(finite.float(), inverse, num_groups)
    nan = torch.full_like(high, math.nan)
    return torch.where(count > 0, high, nan), torch.where(count > 0, low, nan)


def safe_mean(values: Tensor) -> float:
    """Mean of the finite entries of `values` as a float; 0.0 when there are none (metrics are never NaN)."""
    finite = values[torch.isfinite(values)]
    return float(finite.float().mean()) if finite.numel() else 0.0


def reject_inf(name: str, values: Tensor) -> None:
    """NaN means "not applicable"; +-inf is always a bug upstream, so fail loudly on it."""
    if torch.isinf(values).any():
        rows = torch.isinf(values).nonzero(as_tuple=True)[0][:5].tolist()
        raise ValueError(f"{name} contains +-inf at rows {rows} (NaN means not applicable; inf is not allowed)")
