"""The reward stage: run every reward model on a rollout, with retries, and stop loudly when one keeps failing.

A reward model that keeps raising after its retries fails for every sample of the batch. Past
`max_failure_frac` of a step's samples (default 0: any such failure) that stops the run with a
`RewardFailure` naming the model, the exception's type and message and the first failing input; with a
higher tolerance its components become not applicable (NaN) for the step and the failure is counted.
NaN/inf scores are counted and stored as NaN, never passed on as numbers. The default scalar score is the
NaN-aware sum of the components; reward transforms (e.g. `WeightedSum`) may replace it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from rewards.base import RewardModel, RewardOutput
from toolkit.rollout import Rollout

log = logging.getLogger(__name__)

# Prompt-dict keys that are passed to reward models as per-row metadata.
_RESERVED = ("prompt",)


def reward_inputs(rollout: Rollout) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """(prompts, samples, metadata) for reward models, from the rollout's prompt dicts.

    Each prompt dict's extra keys (answer, dataset, task, ...) become per-row metadata lists,
    plus `lengths` and `truncated` when the sampler recorded them.
    """
    n = len(rollout)
    rows = rollout.prompts if rollout.prompts is not None else [None] * n
    samples = rollout.completions if rollout.completions is not None else [None] * n
    prompts = [r.get("prompt") if isinstance(r, Mapping) else r for r in rows]
    keys = sorted({k for r in rows if isinstance(r, Mapping) for k in r if k not in _RESERVED})
    metadata: dict[str, Any] = {k: [r.get(k) if isinstance(r, Mapping) else None for r in rows] for k in keys}
    if rollout.lengths is not None:
        metadata["lengths"] = rollout.lengths.tolist()
    if rollout.truncated is not None:
        metadata["truncated"] = rollout.truncated.tolist()
    return prompts, samples, metadata


class RewardFailure(RuntimeError):
    """A reward model failed on more of a step's samples than the run tolerates; training would be meaningless."""


def call_with_retries(
    name: str,
    model: RewardModel,
    prompts: Sequence[Any],
    samples: Sequence[Any],
    metadata: dict[str, Any],
    retries: int,
) -> RewardOutput | Exception:
    """Call `model`; retry `retries` times on an exception; the last exception after the last failure (logged)."""
    error: Exception = RuntimeError("no attempt made")
    for attempt in range(retries + 1):
        try:
            return model(prompts, samples, **metadata)
        except Exception as err:  # a reward model may fail in any way; the policy is: retry, then decide
            error = err
            log.warning(
                "reward %r failed (attempt %d/%d): %s: %s", name, attempt + 1, retries + 1, type(err).__name__, err
            )
    return error


def failure_message(name: str, error: Exception, attempts: int, prompt: Any, sample: Any, tolerance: float) -> str:
    """What a `RewardFailure` says: the model, the exception's type and message, and the first failing input."""
    return (
        f"reward {name!r} failed on every sample of this step after {attempts} attempt(s): "
        f"{type(error).__name__}: {error}; first failing input: prompt={_short(prompt)}, sample={_short(sample)}. "
        f"The run stops because more than trainer.max_reward_failure_frac={tolerance:g} of the step's samples "
        "failed (raise it to train on with this reward's components as not applicable)"
    )


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def score_rollout(
    rollout: Rollout, reward_models: Mapping[str, RewardModel], retries: int = 2, max_failure_frac: float = 0.0
) -> Rollout:
    """Fill `rollout.rewards` (named components) and `rollout.scores`; record metrics.

    Metrics: `reward/<component>` (mean over applicable rows), `reward/mean`,
    `reward_stats/failed_models` (models that failed after retries), `reward_stats/nonfinite` (rows with
    NaN/inf from a model, stored as NaN), `time/reward_s`.

    Raises:
        RewardFailure: a model failed after its retries on more than `max_failure_frac` of the samples.
    """
    start = time.perf_counter()
    prompts, samples, metadata = reward_inputs(rollout)
    n = len(rollout)
    failed = 0
    nonfinite = 0
    for name, model in reward_models.items():
        out = call_with_retries(name, model, prompts, samples, metadata, retries)
        if isinstance(out, Exception):
            if n and max_failure_frac < 1.0:
                message = failure_message(name, out, retries + 1, prompts[0], samples[0], max_failure_frac)
                raise RewardFailure(message) from out
            failed += 1
            rollout.rewards[name] = torch.full((n,), math.nan)
            continue
        if out.scores.shape != (n,):
            raise ValueError(f"reward {name!r} returned {tuple(out.scores.shape)} scores for {n} samples")
        parts = out.components if len(out.components) > 1 else {name: out.scores}
        for key, value in parts.items():
            full = key if key == name else f"{name}/{key}"
            bad = ~torch.isfinite(value) & ~torch.isnan(value)
            nonfinite += int(bad.sum()) + int(torch.isnan(value).sum())
            rollout.rewards[full] = torch.where(torch.isfinite(value), value, torch.nan).float()
        rollout.metrics.update({f"reward/{name}/{k}": v for k, v in out.metrics.items()})
    if rollout.rewards:
        rollout.scores = nansum_rows(torch.stack(list(rollout.rewards.values()), dim=1))
    else:  # no reward models: a transform (e.g. pairwise win rates) computes the scores
        rollout.scores = torch.full((n,), math.nan)
    for key, value in rollout.rewards.items():
        rollout.metrics[f"reward/{key}"] = nanmean(value)
    if reward_models:
        rollout.metrics["reward/mean"] = nanmean(rollout.scores)
    rollout.metrics["reward_stats/failed_models"] = float(failed)
    rollout.metrics["reward_stats/nonfinite"] = float(nonfinite)
    rollout.metrics["time/reward_s"] = time.perf_counter() - start
    return rollout


JUDGE_FAILURE_RATE = "judge/failure_rate"


def check_judge_failures(metrics: Mapping[str, float], max_failure_frac: float) -> None:
    """Stop when a judge (a reward model's or a transform's `.../judge/failure_rate`) failed too often this step.

    A judge whose calls fail after their retries falls back (a tie, a neutral score): past `max_failure_frac`
    of its calls in a step the rewards are mostly fallbacks and training on them is meaningless.

    Raises:
        RewardFailure: naming the metric and the rate.
    """
    for key, rate in metrics.items():
        if key.endswith(JUDGE_FAILURE_RATE) and rate > max_failure_frac:
            raise RewardFailure(
                f"{key} = {rate:.0%} this step: the judge's calls failed after their retries and their rewards are "
                f"fallbacks (ties, neutral scores). The run stops because more than "
                f"trainer.max_reward_failure_frac={max_failure_frac:g} failed; check the judge's endpoint"
            )


def nansum_rows(matrix: Tensor) -> Tensor:
    """[N, K] -> [N] sum over the finite entries of each row; NaN when a row has none."""
    finite = torch.isfinite(matrix)
    total = torch.where(finite, matrix, torch.zeros_like(matrix)).sum(dim=1)
    return torch.where(finite.any(dim=1), total, torch.full_like(total, math.nan))


def nanmean(values: Tensor) -> float:
    """Mean over finite entries as a float; NaN when there are none."""
    finite = values[torch.isfinite(values)]
    return float(finite.float().mean()) if finite.numel() else math.nan
