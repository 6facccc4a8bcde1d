"""Per-prompt history normalizer (Flow-GRPO, arXiv:2505.05470): each prompt's rewards are normalized by
the statistics of that prompt's recent rewards, kept in a bounded per-prompt history that is checkpointed.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from toolkit.advantages.stats import (
    EpsPlacement,
    NormalizerConfig,
    StdMode,
    batch_moments,
    checked_scores,
    finish_advantages,
    inverse_scale,
    rollout_scores,
)
from toolkit.distributed import gather_rows
from toolkit.interfaces import Advantages
from toolkit.rollout import Rollout


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
