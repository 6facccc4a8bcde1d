"""Loss aggregation over masked [N, T] steps, the shared output type, and the PPO critic loss.

Aggregation is its own named choice (token_mean, seq_mean_token_mean, seq_mean_token_sum,
seq_mean_token_sum_norm); every denominator respects the mask, and global denominators passed by
the caller make gradient accumulation and DDP exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor

Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)


@dataclass
class ObjectiveOutput:
    """A scalar loss to backpropagate and float metrics (`loss/*` are the terms that sum to `loss`)."""

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def _denominator(value: float | Tensor | None, default: Tensor, name: str) -> Tensor:
    """A positive denominator; an empty one (0) becomes 1 so an all-masked batch gives an exact 0."""
    if value is None:
        d = default
    else:
        if not isinstance(value, Tensor) and (not math.isfinite(value) or value < 0):
            raise ValueError(f"{name}={value!r} must be a finite number >= 0")
        d = torch.as_tensor(value, dtype=torch.float32, device=default.device)
    return torch.where(d > 0, d, torch.ones_like(d))


def aggregate_loss(
    values: Tensor,
    mask: Tensor,
    aggregation: Aggregation,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
    norm_length: float | None = None,
    count_empty_rows: bool = False,
) -> Tensor:
    """Reduce per-step values [N, T] to a scalar, respecting the mask (verl `agg_loss` modes).

    * `token_mean` (DAPO): Σ masked / num_tokens.
    * `seq_mean_token_mean` (GRPO): Σ_i (Σ_t masked / |y_i|) / num_seqs.
    * `seq_mean_token_sum` (BNPO recipe): Σ_i Σ_t masked / num_seqs.
    * `seq_mean_token_sum_norm` (Dr. GRPO, arXiv:2503.20783): Σ masked / (num_seqs · norm_length).

    `num_tokens` / `num_seqs` default to this micro-batch's own counts (tokens in the mask, rows with
    a non-empty mask, or all rows with `count_empty_rows`); pass the global counts of the whole
    minibatch (all accumulation steps and ranks) so that summing the micro-batch losses gives the
    minibatch mean. Empty rows contribute 0 to the sum; an all-False mask gives exactly 0 (graph kept,
    zero gradients).

    Args:
        values: [N, T] per-step losses.
        mask: [N, T] bool.
        aggregation: one of `AGGREGATIONS`.
        num_tokens: global token count for `token_mean`.
        num_seqs: global row count for the `seq_mean_*` modes: rows with a non-empty mask, or all rows
            with `count_empty_rows`.
        norm_length: constant length (max response length) for `seq_mean_token_sum_norm`.
        count_empty_rows: True = a row whose mask is all False (e.g. a truncated completion masked out,
            TRL `mask_truncated_completions`) still counts in the `seq_mean_*` denominator, as TRL's
            `grpo`/`dr_grpo` losses divide by every row; False = only non-empty rows count (verl).

    Returns:
        Scalar float32 tensor.
    """
    masked = torch.where(mask, values.float(), 0.0)
    if aggregation == "token_mean":
        return masked.sum() / _denominator(num_tokens, mask.sum().float(), "num_tokens")
    row_tokens = mask.sum(dim=-1)
    row_sums = masked.sum(dim=-1)
    if aggregation == "seq_mean_token_mean":
        rows = row_sums / row_tokens.clamp_min(1)
    elif aggregation == "seq_mean_token_sum":
        rows = row_sums
    elif aggregation == "seq_mean_token_sum_norm":
        if norm_length is None or not norm_length > 0:
            raise ValueError(f"norm_length={norm_length!r} must be > 0 for aggregation='seq_mean_token_sum_norm'")
        rows = row_sums / norm_length
    else:
        raise ValueError(f"aggregation={aggregation!r} is not one of {AGGREGATIONS}")
    own_rows = torch.tensor(float(mask.shape[0]), device=mask.device) if count_empty_rows else (row_tokens > 0).sum()
    return rows.sum() / _denominator(num_seqs, own_rows.float(), "num_seqs")


def loss_denominators(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(token count, non-empty row count) of a micro-batch, as float32 scalars.

    Sum them over the micro-batches of a minibatch and `all_reduce_sum` them across ranks to get
    the `num_tokens` / `num_seqs` that `aggregate_loss` and `PolicyObjective` expect.
    """
    return mask.sum().float(), mask.any(dim=-1).sum().float()


def masked_token_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of values [N, T] over the mask (0 for an empty mask); a logging statistic."""
    return torch.where(mask, values.float(), 0.0).sum() / mask.sum().clamp_min(1)


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    value_clip: float | None = 0.5,
    aggregation: Aggregation = "token_mean",
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
    norm_length: float | None = None,
) -> ObjectiveOutput:
    """Clipped critic loss (verl `compute_value_loss`; PPR uses value_clip 0.5, docs/methods/ppr.md §6).

    l = ½ · agg(max((V − R)², (V_old + clip(V − V_old, −c, c) − R)²)); without a clip, ½·agg((V − R)²).

    Args:
        values: [N, T] current value predictions (differentiable).
        old_values: [N, T] values recorded at rollout time.
        returns: [N, T] GAE returns.
        mask: [N, T] bool (the response mask).
        value_clip: c > 0, or None for no clipping.
        aggregation, num_tokens, num_seqs, norm_length: as in `aggregate_loss`.

    Returns:
        Loss and metrics `loss/value`, `value/clip_frac`, `value/mean`.
    """
    _check_shapes(values, mask, {"old_values": old_values, "returns": returns})
    if value_clip is not None and not value_clip > 0:
        raise ValueError(f"value_clip={value_clip!r} must be > 0 or None")
    v, v_old, ret = (torch.where(mask, t.float(), 0.0) for t in (values, old_values, returns))
    err = (v - ret).square()
    clip_active = torch.zeros_like(mask)
    if value_clip is not None:
        clipped_err = (v_old + (v - v_old).clamp(-value_clip, value_clip) - ret).square()
        clip_active = clipped_err > err
        err = torch.maximum(err, clipped_err)
    loss = 0.5 * aggregate_loss(err, mask, aggregation, num_tokens, num_seqs, norm_length)
    stats = torch.stack([loss.detach(), masked_token_mean(clip_active.float(), mask), masked_token_mean(v, mask)])
    names = ("loss/value", "value/clip_frac", "value/mean")
    return ObjectiveOutput(loss, dict(zip(names, stats.tolist(), strict=True)))


def _check_shapes(reference: Tensor, mask: Tensor, others: dict[str, Tensor | None]) -> None:
    """Raise ValueError unless `reference` is [N, T] float, `mask` is [N, T] bool and `others` match."""
    if reference.dim() != 2 or not reference.is_floating_point():
        raise ValueError(f"expected a floating [N, T] tensor, got shape {tuple(reference.shape)} {reference.dtype}")
    if mask.shape != reference.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool with shape {tuple(reference.shape)}, got {tuple(mask.shape)} {mask.dtype}")
    for name, t in others.items():
        if t is not None and t.shape != reference.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(reference.shape)}")
