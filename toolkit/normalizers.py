"""Reward → advantage normalizers: group z-score, leave-one-out, batch std/whitening, per-prompt history, GDPO.

Pure math lives in module-level functions; the classes are thin config wrappers implementing the
`Normalizer` protocol. Shared conventions (NaN = not applicable → advantage 0, excluded from every
statistic and counted; ±inf → ValueError; empty batch → ValueError; statistics in float64 from any
input dtype (bf16 included), advantages returned as float32;
constant groups → exact zeros, counted) are documented once here and used by `toolkit.beta` (BNPO)
and `toolkit.gae` (GAE with a critic) too. Batch-wide statistics go through `gather_rows`.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from toolkit.advantage_stats import (
    Baseline,
    EpsPlacement,
    NormalizerConfig,
    SingletonPolicy,
    StdMode,
    StdSource,
    Weighting,
    batch_moments,
    checked_scores,
    finish_advantages,
    group_index,
    group_metrics,
    group_moments,
    inverse_scale,
    rollout_scores,
    singleton_rows,
    whiten,
)
from toolkit.distributed import gather_rows
from toolkit.interfaces import Advantages
from toolkit.rollout import Rollout


def group_normalized_advantages(
    scores: Tensor,
    group_ids: Tensor,
    *,
    scale_by_std: bool = True,
    std: StdMode = "unbiased",
    eps: float = 1e-6,
    eps_placement: EpsPlacement = "std_plus_eps",
    std_floor: float = 0.0,
    singleton_groups: SingletonPolicy = "zero",
) -> tuple[Tensor, dict[str, float]]:
    """GRPO group z-score A = (r − mean_g)/(std_g + eps) (arXiv:2402.03300 §4.1.2); Dr. GRPO mean-only.

    Args:
        scores: [N] rewards, NaN = not applicable (advantage 0, excluded from statistics).
        group_ids: [N] prompt ids.
        scale_by_std: False gives Dr. GRPO's A = r − mean_g (arXiv:2503.20783).
        std, eps, eps_placement, std_floor: the group std convention (verl: unbiased, 1e-6, std + eps).
        singleton_groups: one applicable response: "zero" (A = 0), "raw" (mean 0, std 1 as verl: A = r), "error".

    Returns:
        [N] float32 advantages (constant groups exactly 0) and metrics.
    """
    x, valid = checked_scores(scores)
    index, num_groups = group_index(group_ids)
    moments = group_moments(x, valid, index, num_groups, std)
    out = x - moments.mean[index]
    if scale_by_std:
        out = out * inverse_scale(moments.var, eps, eps_placement, std_floor)[index]
    single = singleton_rows(moments, index, group_ids, singleton_groups)
    out = torch.where(moments.constant[index], torch.zeros_like(out), out)
    out = torch.where(single, x if singleton_groups == "raw" else torch.zeros_like(x), out)
    return torch.where(valid, out, torch.zeros_like(out)).float(), group_metrics(moments, valid)


def leave_one_out_advantages(
    scores: Tensor, group_ids: Tensor, *, singleton_groups: SingletonPolicy = "zero"
) -> tuple[Tensor, dict[str, float]]:
    """RLOO: A_i = r_i − mean_{j≠i, j∈g} r_j = n/(n−1)·(r_i − mean_g) (arXiv:2402.14740 Eq. 5).

    Args:
        scores: [N] rewards, NaN = not applicable (excluded; n counts applicable rows).
        group_ids: [N] prompt ids.
        singleton_groups: "zero", "raw" (baseline 0: A = r) or "error".
    """
    x, valid = checked_scores(scores)
    index, num_groups = group_index(group_ids)
    moments = group_moments(x, valid, index, num_groups, "population")
    n = moments.size[index]
    others = (moments.mean[index] * n - x) / (n - 1).clamp_min(1)
    out = torch.where(moments.constant[index], torch.zeros_like(x), x - others)
    single = singleton_rows(moments, index, group_ids, singleton_groups)
    out = torch.where(single, x if singleton_groups == "raw" else torch.zeros_like(x), out)
    return torch.where(valid, out, torch.zeros_like(out)).float(), group_metrics(moments, valid)


def batch_normalized_advantages(
    scores: Tensor,
    group_ids: Tensor,
    token_counts: Tensor | None = None,
    *,
    baseline: Baseline = "group_mean",
    weighting: Weighting = "sequence",
    std: StdMode = "unbiased",
    eps: float = 1e-8,
    eps_placement: EpsPlacement = "std_plus_eps",
    subtract_batch_mean: bool = True,
    std_source: StdSource = "advantages",
    singleton_groups: SingletonPolicy = "raw",
    zero_constant_groups: bool = True,
) -> tuple[Tensor, dict[str, float]]:
    """Group-mean baseline (optional) then batch-wide mean/std: DLER Eq. 3 (arXiv:2510.15110), REINFORCE++.

    A_i = r_i − mean_g(r) (baseline "group_mean"; a singleton gets baseline 0 under "raw", as verl),
    then (A − mean_batch)·scale with the batch statistics over all ranks, each response weighted
    once ("sequence", paper) or by its token count ("token", verl `masked_whiten`).
    REINFORCE++ (arXiv:2501.03262) is baseline "none"; TRL/Lite-PPO "batch" scaling
    (arXiv:2508.08221) is std_source "scores" with subtract_batch_mean False.

    Args:
        scores: [N] rewards, NaN = not applicable (advantage 0, excluded everywhere).
        group_ids: [N] prompt ids.
        token_counts: [N] trained-token counts (required for weighting "token").
        zero_constant_groups: constant groups get exact 0 after whitening (False: −mean_batch·scale, official).

    Returns:
        [N] float32 advantages and metrics incl. `normalizer/batch_mean` and `normalizer/batch_std`.
    """
    x, valid = checked_scores(scores)
    index, num_groups = group_index(group_ids)
    moments = group_moments(x, valid, index, num_groups, "population")
    metrics = group_metrics(moments, valid)
    adv, keep, constant = x, valid, torch.zeros_like(valid)
    if baseline == "group_mean":
        single = singleton_rows(moments, index, group_ids, singleton_groups)
        constant = moments.constant[index] & ~single
        adv = torch.where(constant, torch.zeros_like(x), x - moments.mean[index])
        adv = torch.where(single, x if singleton_groups == "raw" else torch.zeros_like(x), adv)
        keep = valid & ~single if singleton_groups == "zero" else valid
    if weighting == "token":
        if token_counts is None:
            raise ValueError("weighting='token' needs per-row token counts (rollout.mask)")
        weights = token_counts.to(x.device, x.dtype) * keep
    else:
        weights = keep.to(x.dtype)
    std_values = x if std_source == "scores" else None
    out, mean, scale_std = whiten(
        adv, weights, std=std, eps=eps, eps_placement=eps_placement, center=subtract_batch_mean, std_values=std_values
    )
    if zero_constant_groups:
        out = torch.where(constant, torch.zeros_like(out), out)
    metrics["normalizer/batch_mean"] = mean
    metrics["normalizer/batch_std"] = scale_std
    return torch.where(valid, out, torch.zeros_like(out)).float(), metrics


def multi_reward_advantages(
    rewards: Mapping[str, Tensor],
    group_ids: Tensor,
    weights: Mapping[str, float],
    *,
    scale_by_std: bool = True,
    std: StdMode = "unbiased",
    eps: float = 1e-8,
    eps_placement: EpsPlacement = "std_plus_eps",
    singleton_groups: SingletonPolicy = "zero",
    restandardize: bool = False,
    restandardize_std: StdMode = "unbiased",
    restandardize_eps: float = 1e-8,
) -> tuple[Tensor, dict[str, float]]:
    """Normalize-then-sum: A = Σ_k w_k · z_g(r_k), optionally re-standardised over the batch.

    GDPO (arXiv:2601.05242; TRL `normalize_then_sum`) and the Pref-GRPO advantage mixture
    (arXiv:2508.20751: 0.7·A_pref + 1.4·A_clip, HEAD `--apply_gdpo` re-standardisation).
    A component that is NaN for a row contributes 0 to that row; rows NaN in every component
    get 0 and are excluded from the re-standardisation.

    Args:
        rewards: named [N] reward components.
        group_ids: [N] prompt ids.
        weights: component name → weight (summed in the mapping's order).
        scale_by_std, std, eps, eps_placement, singleton_groups: per-component group z-score options.
        restandardize: finally (A − mean_batch)/(std_batch + restandardize_eps) over all ranks.
    """
    missing = [k for k in weights if k not in rewards]
    if missing or not weights:
        raise ValueError(f"reward components {missing or '(none)'} not found; available: {sorted(rewards)}")
    total: Tensor | None = None
    applicable: Tensor | None = None
    metrics: dict[str, float] = {}
    for name, weight in weights.items():
        _, valid = checked_scores(rewards[name], f"rewards[{name!r}]")
        adv, sub = group_normalized_advantages(
            rewards[name],
            group_ids,
            scale_by_std=scale_by_std,
            std=std,
            eps=eps,
            eps_placement=eps_placement,
            singleton_groups=singleton_groups,
        )
        total = weight * adv if total is None else total + weight * adv
        applicable = valid if applicable is None else applicable | valid
        metrics[f"normalizer/zero_variance_groups/{name}"] = sub["normalizer/zero_variance_groups"]
    assert total is not None and applicable is not None
    metrics["normalizer/nan_rewards"] = float((~applicable).sum())
    if restandardize:
        total, mean, scale_std = whiten(
            total, applicable.float(), std=restandardize_std, eps=restandardize_eps, eps_placement="std_plus_eps"
        )
        metrics["normalizer/batch_mean"] = mean
        metrics["normalizer/batch_std"] = scale_std
    return total.float(), metrics


# ------------------------------------------------------------------------------ per-prompt history


def prompt_key_hash(key: str) -> int:
    """Stable signed 64-bit hash of a prompt key (same on every rank and run, unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little", signed=True)


def history_normalized_advantages(
    scores: Tensor,
    keys: list[int],
    history: Mapping[int, Any],
    *,
    std: StdMode = "population",
    eps: float = 1e-4,
    eps_placement: EpsPlacement = "std_plus_eps",
    global_var: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Flow-GRPO per-prompt tracker advantage (arXiv:2505.05470; `PerPromptStatTracker`).

    A_i = (r_i − mean(H_k))/(std(H_k) + eps), H_k = the recorded rewards of row i's prompt
    (including this batch). With `global_var` the std is that of the whole current batch instead.

    Args:
        scores: [N] rewards, NaN = not applicable (advantage 0).
        keys: N prompt-key hashes; every applicable row's key must be in `history`.
        history: key → sequence of recorded rewards. Statistics are float64, as Flow-GRPO's numpy.
    """
    x, valid = checked_scores(scores)
    out = torch.zeros_like(x)
    key_tensor = torch.tensor(keys, dtype=torch.int64, device=x.device)
    unique = sorted({k for k, v in zip(keys, valid.tolist(), strict=True) if v})
    constant = 0
    for key in unique:
        h = torch.tensor(list(history[key]), dtype=torch.float64)
        rows = (key_tensor == key) & valid
        if bool(h.max() == h.min()):
            constant += 1
            continue
        var = h.var(unbiased=std == "unbiased") if h.numel() > 1 else h.new_tensor(0.0)
        var = h.new_tensor(global_var) if global_var is not None else var
        scale = float(inverse_scale(var, eps, eps_placement))
        out[rows] = (x[rows] - float(h.mean())) * scale
    metrics = {
        "normalizer/nan_rewards": float((~valid).sum()),
        "normalizer/zero_variance_groups": constant / max(len(unique), 1),
        "normalizer/zero_variance_groups_count": float(constant),
    }
    return out.float(), metrics


# -------------------------------------------------------------------------------------------- classes


@dataclass(kw_only=True)
class GroupNormalizer(NormalizerConfig):
    """GRPO group z-score, or Dr. GRPO mean-only with `scale_by_std=False`. Reads `rollout.scores`.

    Presets: verl GRPO (unbiased, 1e-6, std + eps), TRL (unbiased, 1e-4), DanceGRPO/Pref-GRPO
    (unbiased, 1e-8, clip 5), DiDi-Instruct (unbiased, 1e-8, clip 3), MedGRPO (unbiased, 1e-6).
    """

    needs_groups: ClassVar[bool] = True  # trainer.group_size >= 2 (toolkit.trainer_config.check_group_size)
    scale_by_std: bool = True
    std: StdMode = "unbiased"
    eps: float = 1e-6
    eps_placement: EpsPlacement = "std_plus_eps"
    std_floor: float = 0.0
    singleton_groups: SingletonPolicy = "zero"
    clip: float | None = None

    def __post_init__(self) -> None:
        self._validate()

    def __call__(self, rollout: Rollout) -> Advantages:
        values, metrics = group_normalized_advantages(rollout_scores(rollout), rollout.group_ids, **self._options())
        return finish_advantages(values, metrics, self.clip)


@dataclass(kw_only=True)
class LeaveOneOutNormalizer(NormalizerConfig):
    """RLOO leave-one-out baseline (arXiv:2402.14740). Reads `rollout.scores`."""

    needs_groups: ClassVar[bool] = True
    singleton_groups: SingletonPolicy = "zero"
    clip: float | None = None

    def __post_init__(self) -> None:
        self._validate()

    def __call__(self, rollout: Rollout) -> Advantages:
        values, metrics = leave_one_out_advantages(rollout_scores(rollout), rollout.group_ids, **self._options())
        return finish_advantages(values, metrics, self.clip)


@dataclass(kw_only=True)
class BatchWhitenNormalizer(NormalizerConfig):
    """Batch whitening of scores (REINFORCE++, arXiv:2501.03262), optionally after a group-mean baseline.

    Reads `rollout.scores` (and `rollout.mask` for token weighting). Defaults follow verl/OpenRLHF:
    token-weighted, unbiased, rsqrt(var + 1e-8). For per-token rewards use `toolkit.gae.GAENormalizer`
    without values (γ = λ = 1 returns, then the same whitening).
    """

    baseline: Baseline = "none"
    weighting: Weighting = "token"
    std: StdMode = "unbiased"
    eps: float = 1e-8
    eps_placement: EpsPlacement = "rsqrt_var_eps"
    subtract_batch_mean: bool = True
    std_source: StdSource = "advantages"
    singleton_groups: SingletonPolicy = "raw"
    zero_constant_groups: bool = True
    clip: float | None = None

    @classmethod
    def needs_groups(cls, kwargs: Mapping[str, Any]) -> bool:
        """A group-mean baseline needs trainer.group_size >= 2 (with one response it is the reward itself)."""
        return bool(kwargs.get("baseline", cls.baseline) == "group_mean")

    def __post_init__(self) -> None:
        self._validate()

    def __call__(self, rollout: Rollout) -> Advantages:
        values, metrics = batch_normalized_advantages(
            rollout_scores(rollout), rollout.group_ids, rollout.mask.sum(dim=1), **self._options()
        )
        return finish_advantages(values, metrics, self.clip)


@dataclass(kw_only=True)
class GroupMeanBatchStdNormalizer(BatchWhitenNormalizer):
    """Group-mean baseline + batch mean/std (DLER Eq. 3, arXiv:2510.15110; Lite-PPO arXiv:2508.08221).

    Paper default: sequence-weighted, unbiased [Our decision], eps 1e-8 added to the std. DLER's
    official code (verl `masked_whiten`): `weighting="token", eps_placement="rsqrt_var_eps",
    zero_constant_groups=False` (a constant group then gets −mean_batch·scale, not 0).
    TRL `scale_rewards="batch"`: `std_source="scores", subtract_batch_mean=False, eps=1e-4`.
    """

    baseline: Baseline = field(default="group_mean", init=False)
    weighting: Weighting = "sequence"
    eps_placement: EpsPlacement = "std_plus_eps"


@dataclass(kw_only=True)
class MultiRewardNormalizer(NormalizerConfig):
    """Per-component group z-score, weighted sum, optional batch re-standardisation (GDPO, Pref-GRPO mix).

    Reads `rollout.rewards` (not `rollout.scores`). `weights=None` weighs every component 1.
    Pref-GRPO v1: `weights={"pref": 0.7, "clip": 1.4}, eps=1e-8, clip=5.0`; HEAD: 0.4/0.6 with
    `restandardize=True`. TRL GDPO: `eps=1e-4, restandardize=True, restandardize_eps=1e-4`.
    """

    needs_groups: ClassVar[bool] = True
    weights: dict[str, float] | None = None
    scale_by_std: bool = True
    std: StdMode = "unbiased"
    eps: float = 1e-8
    eps_placement: EpsPlacement = "std_plus_eps"
    singleton_groups: SingletonPolicy = "zero"
    restandardize: bool = False
    restandardize_std: StdMode = "unbiased"
    restandardize_eps: float = 1e-8
    clip: float | None = None

    def __post_init__(self) -> None:
        self._validate()
        for name, weight in (self.weights or {}).items():
            if not math.isfinite(weight):
                raise ValueError(f"weights[{name!r}]={weight!r} must be a finite number")

    def __call__(self, rollout: Rollout) -> Advantages:
        weights = self.weights if self.weights is not None else dict.fromkeys(rollout.rewards, 1.0)
        values, metrics = multi_reward_advantages(
            rollout.rewards, rollout.group_ids, weights, **self._options("weights")
        )
        return finish_advantages(values, metrics, self.clip)


@dataclass(kw_only=True)
class PromptHistoryNormalizer(NormalizerConfig):
    """Flow-GRPO per-prompt stat tracker: stateful, keyed by `rollout.prompt_keys` (arXiv:2505.05470).

    Each call records every rank's applicable rewards under their prompt key, then normalizes by
    the prompt's recorded mean and population std + 1e-4 (or the batch std with `global_std`,
    the Flow-GRPO config default). The history is cleared at the start of every `reset_every`-th
    call (1 = Flow-GRPO's per-epoch `clear()`; None = never) and keeps the last `max_history`
    rewards per prompt (None = all).
    """

    global_std: bool = False
    std: StdMode = "population"
    eps: float = 1e-4
    eps_placement: EpsPlacement = "std_plus_eps"
    max_history: int | None = None
    reset_every: int | None = 1
    clip: float | None = None
    _history: dict[int, deque[float]] = field(default_factory=dict, init=False, repr=False)
    _num_calls: int = field(default=0, init=False, repr=False)

    @classmethod
    def needs_groups(cls, kwargs: Mapping[str, Any]) -> bool:
        """History cleared every call (reset_every=1) holds one reward per prompt unless group_size >= 2."""
        return bool(kwargs.get("reset_every", cls.reset_every) == 1)

    def __post_init__(self) -> None:
        self._validate()
        for name, value in (("max_history", self.max_history), ("reset_every", self.reset_every)):
            if value is not None and value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int or None")

    def __call__(self, rollout: Rollout) -> Advantages:
        if rollout.prompt_keys is None:
            raise ValueError("PromptHistoryNormalizer needs rollout.prompt_keys (stable per-prompt ids)")
        x, valid = checked_scores(rollout_scores(rollout))
        keys = [prompt_key_hash(str(k)) for k in rollout.prompt_keys]
        if self.reset_every is not None and self._num_calls % self.reset_every == 0:
            self._history.clear()
        self._num_calls += 1
        marked = torch.where(valid, x, torch.nan)  # NaN travels as "not applicable"
        self._record(gather_rows(torch.tensor(keys, dtype=torch.int64, device=x.device)), gather_rows(marked))
        global_var = batch_moments(x, valid.float(), self.std).var if self.global_std else None
        values, metrics = history_normalized_advantages(
            rollout_scores(rollout),
            keys,
            self._history,
            global_var=global_var,
            **self._options("global_std", "max_history", "reset_every"),
        )
        metrics["normalizer/tracked_prompts"] = float(len(self._history))
        metrics["normalizer/history_mean_size"] = sum(map(len, self._history.values())) / max(len(self._history), 1)
        if global_var is not None:
            metrics["normalizer/batch_std"] = global_var**0.5
        return finish_advantages(values, metrics, self.clip)

    def _record(self, keys: Tensor, scores: Tensor) -> None:
        for key, score in zip(keys.tolist(), scores.tolist(), strict=True):
            if not math.isnan(score):
                self._history.setdefault(key, deque(maxlen=self.max_history)).append(score)

    def reset(self) -> None:
        """Forget every prompt's history (Flow-GRPO `clear()`)."""
        self._history.clear()

    def state_dict(self) -> dict[str, Any]:
        """Plain Python (picklable): {"history": {key hash: [rewards]}, "num_calls": int}."""
        return {"history": {k: list(v) for k, v in self._history.items()}, "num_calls": self._num_calls}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._history = {int(k): deque(map(float, v), maxlen=self.max_history) for k, v in state["history"].items()}
        self._num_calls = int(state["num_calls"])
