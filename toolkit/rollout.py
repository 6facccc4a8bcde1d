"""Rollout: one flat batch of N = B·G trajectories and everything the update needs.

T is whatever the modality trains on: response tokens (text, video), denoising transitions
(images) or unmasking steps (diffusion LMs). Per-row fields have first dimension N.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

# Fields holding tensors whose first dimension is N (indexed by `select`).
_ROW_TENSORS = (
    "group_ids",
    "old_logprobs",
    "mask",
    "scores",
    "advantages",
    "ref_logprobs",
    "token_rewards",
    "values",
    "lengths",
    "truncated",
    "turn_ends",
)
# Fields holding Python lists of length N.
_ROW_LISTS = ("prompts", "completions", "dataset_ids", "task_ids", "prompt_keys")


@dataclass
class Rollout:
    """A batch of trajectories, grouped by prompt.

    Attributes:
        group_ids: [N] int64, equal for the G samples of one prompt.
        old_logprobs: [N, T] float32, log-probs of the sampled steps under the sampling policy.
        mask: [N, T] bool, True = trained on. Prompts, padding and tool observations are False.
        rewards: named reward components, each [N] float32; NaN = not applicable.
        scores: [N] float32, the scalar reward the normalizer sees (set by transforms).
        advantages: [N] or [N, T] float32, set by the normalizer.
        ref_logprobs: [N, T] float32 under the reference policy (only when a KL term is on).
        token_rewards: [N, T] float32, per-step rewards (process rewards placed at turn ends).
        values: [N, T] float32, critic values (PPO/GAE path).
        lengths: [N] int64, response length in trained steps.
        truncated: [N] bool, True when generation hit the length limit.
        turn_ends: [N, T] bool, True at the last step of each turn (process rewards).
        prompts, completions: per-row Python objects (text, image tensors, ...), for rewards and logs.
        dataset_ids, task_ids: per-row strings (cross-dataset normalization, per-task metrics).
        prompt_keys: per-row stable prompt identifiers (per-prompt trackers across steps).
        data: modality tensors needed to re-score (input_ids, attention_mask, latents, ...).
            A tensor whose first dimension is N is indexed by `select`; anything else is shared.
        metrics: scalars recorded by the stages that processed this rollout.
    """

    group_ids: Tensor
    old_logprobs: Tensor
    mask: Tensor
    rewards: dict[str, Tensor] = field(default_factory=dict)
    scores: Tensor | None = None
    advantages: Tensor | None = None
    ref_logprobs: Tensor | None = None
    token_rewards: Tensor | None = None
    values: Tensor | None = None
    lengths: Tensor | None = None
    truncated: Tensor | None = None
    turn_ends: Tensor | None = None
    prompts: list[Any] | None = None
    completions: list[Any] | None = None
    dataset_ids: list[str] | None = None
    task_ids: list[str] | None = None
    prompt_keys: list[str] | None = None
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.group_ids.shape[0]
        if self.group_ids.dim() != 1:
            raise ValueError(f"group_ids must be [N], got shape {tuple(self.group_ids.shape)}")
        if self.old_logprobs.dim() != 2 or self.old_logprobs.shape[0] != n:
            raise ValueError(f"old_logprobs must be [N={n}, T], got shape {tuple(self.old_logprobs.shape)}")
        if self.mask.shape != self.old_logprobs.shape:
            raise ValueError(
                f"mask shape {tuple(self.mask.shape)} must equal old_logprobs shape {tuple(self.old_logprobs.shape)}"
            )
        if self.mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool, got {self.mask.dtype}")
        for name in _ROW_TENSORS:
            value = getattr(self, name)
            if value is not None and value.shape[0] != n:
                raise ValueError(f"{name} has {value.shape[0]} rows, expected N={n}")
        for name, value in self.rewards.items():
            if value.shape != (n,):
                raise ValueError(f"reward component {name!r} must be [N={n}], got {tuple(value.shape)}")
        for name in _ROW_LISTS:
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} rows, expected N={n}")

    def __len__(self) -> int:
        return int(self.group_ids.shape[0])

    @property
    def num_steps(self) -> int:
        """T, the number of trained steps per row."""
        return int(self.old_logprobs.shape[1])

    @property
    def device(self) -> torch.device:
        return self.old_logprobs.device

    def group_sizes(self) -> Tensor:
        """[num_groups] number of rows of each distinct group id, in sorted-id order."""
        counts: Tensor = torch.unique(self.group_ids, return_counts=True)[1]
        return counts

    def select(self, index: Tensor | Sequence[int]) -> Rollout:
        """Rows `index` (int64 indices or a bool mask [N]) as a new Rollout; shared data is kept."""
        idx = torch.as_tensor(index, device=self.group_ids.device)
        if idx.dtype == torch.bool:
            idx = idx.nonzero(as_tuple=True)[0]
        idx = idx.long()
        n = len(self)
        changes: dict[str, Any] = {}
        for name in _ROW_TENSORS:
            value = getattr(self, name)
            if value is not None:
                changes[name] = value[idx.to(value.device)]
        for name in _ROW_LISTS:
            value = getattr(self, name)
            if value is not None:
                changes[name] = [value[i] for i in idx.tolist()]
        changes["rewards"] = {k: v[idx.to(v.device)] for k, v in self.rewards.items()}
        changes["data"] = {k: _select_row_value(v, idx, n) for k, v in self.data.items()}
        changes["metrics"] = dict(self.metrics)
        return dataclasses.replace(self, **changes)

    def minibatches(
        self,
        num_minibatches: int,
        generator: torch.Generator | None = None,
        shuffle: bool = True,
        keep_groups: bool = False,
    ) -> Iterator[Rollout]:
        """Split into `num_minibatches` near-equal parts (shuffled with `generator` when `shuffle`).

        With `keep_groups`, whole groups are assigned to minibatches (needed when a loss uses
        group statistics); otherwise rows are split individually, as TRL and verl do.
        """
        n = len(self)
        if num_minibatches < 1 or num_minibatches > n:
            raise ValueError(f"num_minibatches must be in [1, N={n}], got {num_minibatches}")
        if keep_groups:
            unique = torch.unique(self.group_ids.cpu())
            if num_minibatches > unique.numel():
                raise ValueError(f"num_minibatches={num_minibatches} exceeds the {unique.numel()} groups")
            order = torch.randperm(unique.numel(), generator=generator) if shuffle else torch.arange(unique.numel())
            for chunk in torch.tensor_split(unique[order], num_minibatches):
                rows = torch.isin(self.group_ids.cpu(), chunk).nonzero(as_tuple=True)[0]
                yield self.select(rows)
            return
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for chunk in torch.tensor_split(order, num_minibatches):
            yield self.select(chunk)

    def to(self, device: torch.device | str) -> Rollout:
        """Copy with every tensor moved to `device`."""

        def move(value: Any) -> Any:
            return value.to(device) if isinstance(value, Tensor) else value

        changes: dict[str, Any] = {name: move(getattr(self, name)) for name in _ROW_TENSORS}
        changes["old_logprobs"] = self.old_logprobs.to(device)
        changes["mask"] = self.mask.to(device)
        changes["rewards"] = {k: v.to(device) for k, v in self.rewards.items()}
        changes["data"] = {k: move(v) for k, v in self.data.items()}
        return dataclasses.replace(self, **changes)

    def reward_matrix(self, names: Sequence[str] | None = None) -> Tensor:
        """[N, K] float32 stack of reward components `names` (all, in insertion order, by default)."""
        names = list(self.rewards) if names is None else list(names)
        if not names:
            raise ValueError("rollout has no reward components")
        missing = [k for k in names if k not in self.rewards]
        if missing:
            raise ValueError(f"unknown reward components {missing}; available: {sorted(self.rewards)}")
        return torch.stack([self.rewards[k].float() for k in names], dim=1)


def _select_row_value(value: Any, idx: Tensor, n: int) -> Any:
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n:
        return value[idx.to(value.device)]
    if isinstance(value, list) and len(value) == n:
        return [value[i] for i in idx.tolist()]
    return value


def concat_rollouts(rollouts: Sequence[Rollout]) -> Rollout:
    """Concatenate rollouts along N (dynamic-sampling refill). T is right-padded with mask False."""
    if not rollouts:
        raise ValueError("concat_rollouts needs at least one rollout")
    if len(rollouts) == 1:
        return rollouts[0]
    width = max(r.num_steps for r in rollouts)
    parts = [_pad_steps(r, width) for r in rollouts]
    first = parts[0]
    changes: dict[str, Any] = {}
    for name in _ROW_TENSORS:
        values = [getattr(r, name) for r in parts]
        if all(v is None for v in values):
            changes[name] = None
        elif any(v is None for v in values):
            raise ValueError(f"cannot concatenate rollouts where only some have {name!r}")
        else:
            changes[name] = torch.cat(values, dim=0)
    for name in _ROW_LISTS:
        lists = [getattr(r, name) for r in parts]
        changes[name] = None if any(v is None for v in lists) else [x for v in lists for x in v]
    keys = set(first.rewards)
    if any(set(r.rewards) != keys for r in parts):
        raise ValueError("cannot concatenate rollouts with different reward components")
    changes["rewards"] = {k: torch.cat([r.rewards[k] for r in parts]) for k in first.rewards}
    changes["data"] = _concat_data([r.data for r in parts], [len(r) for r in parts])
    changes["metrics"] = {}
    return dataclasses.replace(first, **changes)


def _pad_steps(rollout: Rollout, width: int) -> Rollout:
    pad = width - rollout.num_steps
    if pad == 0:
        return rollout
    changes: dict[str, Any] = {}
    for name in ("old_logprobs", "mask", "ref_logprobs", "token_rewards", "values", "turn_ends"):
        value = getattr(rollout, name)
        if value is not None:
            changes[name] = torch.nn.functional.pad(value, (0, pad), value=0)
    if rollout.advantages is not None and rollout.advantages.dim() == 2:
        changes["advantages"] = torch.nn.functional.pad(rollout.advantages, (0, pad), value=0)
    return dataclasses.replace(rollout, **changes)


def _concat_data(datas: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in datas[0].items():
        values = [d.get(key) for d in datas]
        per_row = all(
            (isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == s) or (isinstance(v, list) and len(v) == s)
            for v, s in zip(values, sizes, strict=True)
        )
        if not per_row:
            out[key] = value
        elif isinstance(value, list):
            out[key] = [x for v in values if v is not None for x in v]
        else:
            out[key] = _cat_padded(values)
    return out


def _cat_padded(values: list[Any]) -> Tensor:
    """Concatenate along dim 0, right-padding dim 1 with zeros when widths differ."""
    tensors: list[Tensor] = values
    if tensors[0].dim() >= 2:
        width = max(t.shape[1] for t in tensors)
        tensors = [torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, width - t.shape[1])) for t in tensors]
    return torch.cat(tensors, dim=0)
