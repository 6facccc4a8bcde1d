"""Correct-sample advantage boost: add a constant to the normalized advantage of fully correct samples.

An official-code-only knob of DLER (arXiv:2510.15110; NVlabs/DLER `dp_actor.boost_high_score_advantages`,
`correct_sample_advantage_boost_value`): after normalization, samples whose RAW score is at least
`threshold` (1 − 1e-5) get `A += value` before the PPO update. The paper does not describe it; 0 in the
root training script, 0.1 in the variant script. Off by default (value 0). `CorrectSampleBoost` wraps any
normalizer, so it composes with the batch-std normalizer without changing it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from toolkit.interfaces import Advantages, Normalizer, Stateful
from toolkit.rollout import Rollout


def boost_correct_advantages(
    advantages: Tensor, raw_scores: Tensor, value: float, threshold: float = 1.0 - 1e-5
) -> tuple[Tensor, Tensor]:
    """A + value for rows whose raw score >= threshold (NaN scores are never boosted).

    Args:
        advantages: [N] or [N, T] normalized advantages (for [N, T] every step of a row is boosted;
            masked steps carry no loss, so only the trained tokens matter).
        raw_scores: [N] raw scores (DLER: correctness before the truncation penalty).
        value: the constant added (official 0.1 in the variant script).
        threshold: the raw score that counts as correct (official 1.0 − 1e-5).

    Returns:
        (boosted advantages with the input's shape and dtype, [N] bool mask of the boosted rows).
    """
    if raw_scores.shape != advantages.shape[:1]:
        raise ValueError(f"raw_scores {tuple(raw_scores.shape)} must be [N] for advantages {tuple(advantages.shape)}")
    correct = torch.nan_to_num(raw_scores.float(), nan=-math.inf) >= threshold
    shift = correct.to(advantages.dtype) * value
    if advantages.dim() == 2:
        shift = shift[:, None]
    return advantages + shift, correct


class CorrectSampleBoost:
    """A Normalizer wrapper: `inner`'s advantages, plus `value` for correct samples (off at value 0).

    Args:
        inner: the wrapped normalizer (e.g. `toolkit.advantages.GroupMeanBatchStdNormalizer`).
        value: the constant added to correct samples' advantages (0 = off, the default).
        threshold: raw score counted as correct (official 1.0 − 1e-5).
        source: the reward component holding the raw score ("raw_score", written by
            `TruncationPenalty`), or "scores" for `rollout.scores`.

    Metrics: `advantage/boosted_frac`, `normalizer/boost_value`, plus the inner normalizer's.
    """

    def __init__(
        self, inner: Normalizer, value: float = 0.0, threshold: float = 1.0 - 1e-5, source: str = "raw_score"
    ) -> None:
        if not math.isfinite(value) or not math.isfinite(threshold):
            raise ValueError(f"value and threshold must be finite, got {value}, {threshold}")
        if not callable(inner):
            raise ValueError(f"inner must be a normalizer (callable on a rollout), got {type(inner).__name__}")
        self.inner, self.value, self.threshold, self.source = inner, value, threshold, source

    def _raw_scores(self, rollout: Rollout) -> Tensor:
        if self.source == "scores":
            if rollout.scores is None:
                raise ValueError("CorrectSampleBoost(source='scores'): rollout.scores is not set")
            return rollout.scores
        if self.source not in rollout.rewards:
            raise ValueError(
                f"CorrectSampleBoost: unknown reward component {self.source!r}; use 'scores' or one of "
                f"{sorted(rollout.rewards)}"
            )
        return rollout.rewards[self.source]

    def __call__(self, rollout: Rollout) -> Advantages:
        out = self.inner(rollout)
        metrics = dict(out.metrics)
        metrics["normalizer/boost_value"] = float(self.value)
        if self.value == 0.0:
            metrics["advantage/boosted_frac"] = 0.0
            return Advantages(values=out.values, metrics=metrics, returns=out.returns)
        values, correct = boost_correct_advantages(out.values, self._raw_scores(rollout), self.value, self.threshold)
        metrics["advantage/boosted_frac"] = float(correct.float().mean()) if correct.numel() else 0.0
        return Advantages(values=values, metrics=metrics, returns=out.returns)

    def state_dict(self) -> dict[str, Any]:
        """The inner normalizer's state (empty when it is stateless)."""
        return {"inner": self.inner.state_dict()} if isinstance(self.inner, Stateful) else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "inner" in state and isinstance(self.inner, Stateful):
            self.inner.load_state_dict(state["inner"])
