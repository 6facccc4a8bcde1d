"""RewardModel protocol and RewardOutput: the one interface every reward, verifier and judge follows.

This module is the leaf of the package graph: it imports only torch, so reward models can be
used with no trainer (`renorm score`, notebooks, evaluation scripts).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass
class RewardOutput:
    """Scores of N samples.

    Attributes:
        scores: [N] float32; NaN = not applicable to that sample.
        components: named parts of the score, each [N] float32 (e.g. {"accuracy": ..., "format": ...}).
        metrics: aggregate statistics (validity rate, failures, latency) for logging.
    """

    scores: Tensor
    components: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scores = torch.as_tensor(self.scores, dtype=torch.float32)
        if self.scores.dim() != 1:
            raise ValueError(f"scores must be [N], got shape {tuple(self.scores.shape)}")
        n = self.scores.shape[0]
        for name, value in list(self.components.items()):
            value = torch.as_tensor(value, dtype=torch.float32)
            if value.shape != (n,):
                raise ValueError(f"component {name!r} must be [N={n}], got {tuple(value.shape)}")
            self.components[name] = value


@runtime_checkable
class RewardModel(Protocol):
    """`__call__(prompts, samples, **metadata) -> RewardOutput`; NaN where not applicable."""

    def __call__(self, prompts: Sequence[Any], samples: Sequence[Any], **metadata: Any) -> RewardOutput: ...


class FunctionReward:
    """Wrap a plain callable `fn(prompt, sample, **row_metadata) -> float | None` as a RewardModel.

    `None` means not applicable (NaN). Per-row metadata values (lists of length N) are passed
    row by row; anything else is passed as is.
    """

    def __init__(self, fn: Callable[..., float | None], name: str | None = None) -> None:
        self.fn = fn
        self.name: str = name or str(getattr(fn, "__name__", "reward"))

    def __call__(self, prompts: Sequence[Any], samples: Sequence[Any], **metadata: Any) -> RewardOutput:
        if len(prompts) != len(samples):
            raise ValueError(f"{len(prompts)} prompts but {len(samples)} samples")
        n = len(samples)
        scores = []
        for i in range(n):
            row = {k: (v[i] if _is_per_row(v, n) else v) for k, v in metadata.items()}
            value = self.fn(prompts[i], samples[i], **row)
            scores.append(math.nan if value is None else float(value))
        scores_t = torch.tensor(scores, dtype=torch.float32)
        return RewardOutput(scores=scores_t, components={self.name: scores_t.clone()})


def _is_per_row(value: Any, n: int) -> bool:
    return isinstance(value, (list, tuple, Tensor)) and len(value) == n


def combine_outputs(outputs: Mapping[str, RewardOutput]) -> RewardOutput:
    """Merge several reward models' outputs into one (components prefixed by the model's name)."""
    if not outputs:
        raise ValueError("combine_outputs needs at least one output")
    components: dict[str, Tensor] = {}
    metrics: dict[str, float] = {}
    for name, out in outputs.items():
        if len(out.components) <= 1:
            components[name] = out.scores
        else:
            components.update({f"{name}/{k}": v for k, v in out.components.items()})
        metrics.update({f"{name}/{k}": v for k, v in out.metrics.items()})
    stacked = torch.stack(list(components.values()), dim=1)
    scores = torch.where(stacked.isnan(), torch.zeros_like(stacked), stacked).sum(dim=1)
    scores[stacked.isnan().all(dim=1)] = math.nan
    return RewardOutput(scores=scores, components=components, metrics=metrics)
