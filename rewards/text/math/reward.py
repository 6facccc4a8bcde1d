"""`MathAccuracyReward`: 1 if a completion's final answer equals a gold answer, else 0, under a named grading mode."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import torch

from rewards.base import RewardOutput
from rewards.text.math.extraction import DEFAULT_ANSWER_KEYS, ThinkMode, raw_gold_values
from rewards.text.math.grader import MathGrader, TimeoutMode
from rewards.text.math.modes import (
    BNPOGrading,
    DeepScaleRGrading,
    LenientGrading,
    Prepared,
    VerlMathVerifyGrading,
)

MathMode = Literal["lenient", "deepscaler", "bnpo", "verl_math_verify"]
# The lenient mode's knobs and their defaults: an official mode fixes these behaviours itself.
LENIENT_DEFAULTS: dict[str, Any] = {
    "think_mode": "strip",
    "think_close": "</think>",
    "require_boxed": False,
    "last_n_chars": None,
    "string_fallback": True,
    "float_rounding": 6,
    "strict": True,
}
# Values an official mode accepts for a lenient knob because they state what it does anyway.
OFFICIAL_VALUES: dict[str, dict[str, Any]] = {"bnpo": {"last_n_chars": 500}}
OFFICIAL_GRADINGS: dict[str, type[DeepScaleRGrading | BNPOGrading | VerlMathVerifyGrading]] = {
    "deepscaler": DeepScaleRGrading,
    "bnpo": BNPOGrading,
    "verl_math_verify": VerlMathVerifyGrading,
}


class MathAccuracyReward:
    """1 if the completion's final answer equals a gold answer, else 0; NaN for a row without a gold answer.

    The gold answer comes from row metadata (`answer_keys`, default `answer` then `solution`); a list holds
    alternatives, any of which is correct. A row without one scores NaN (not applicable, `missing_gold`).

    Args:
        mode: "lenient" (default; the options below shape it), or a released reward function reproduced
            exactly: "deepscaler" (DLER / DeepScaleR: the boxed answer after the first `</think>`, math-verify,
            then mathd and sympy fallbacks), "bnpo" (BNPO: math-verify LaTeX extraction on the last 500
            characters), "verl_math_verify" (verl's math-verify reward on the whole output). The lenient
            options must stay at their defaults in those modes (bnpo also accepts `last_n_chars: 500`).
        answer_keys: metadata keys tried in order for the gold answer.
        think_mode: "ignore" | "strip" | "require" (see `answer_region`).
        think_close: the tag that ends the thinking (`</think>`).
        require_boxed: grade only the last `\\boxed{}` of the region; none there scores 0. False:
            math-verify's default extraction over the region (boxed preferred, then plain expressions).
        last_n_chars: grade only the last N characters of the region; None = all.
        string_fallback: when math-verify says no, also accept a boxed answer whose normalized string
            equals a normalized gold (covers answers sympy cannot parse, e.g. text answers).
        timeout_mode, timeout_seconds: math-verify's timeouts, in every mode (see `grader.py`).
        float_rounding, strict: passed to math-verify `verify`.
    """

    def __init__(
        self,
        mode: MathMode = "lenient",
        answer_keys: Sequence[str] = DEFAULT_ANSWER_KEYS,
        think_mode: ThinkMode = "strip",
        think_close: str = "</think>",
        require_boxed: bool = False,
        last_n_chars: int | None = None,
        string_fallback: bool = True,
        timeout_mode: TimeoutMode = "auto",
        timeout_seconds: int = 5,
        float_rounding: int = 6,
        strict: bool = True,
    ) -> None:
        if mode not in get_args(MathMode):
            raise ValueError(f"mode={mode!r} is not one of {list(get_args(MathMode))}")
        if think_mode not in get_args(ThinkMode):
            raise ValueError(f"think_mode={think_mode!r} is not one of {list(get_args(ThinkMode))}")
        if last_n_chars is not None and last_n_chars < 1:
            raise ValueError(f"last_n_chars must be >= 1 or None, got {last_n_chars}")
        if not answer_keys:
            raise ValueError("answer_keys must name at least one metadata key")
        options = {
            "think_mode": think_mode,
            "think_close": think_close,
            "require_boxed": require_boxed,
            "last_n_chars": last_n_chars,
            "string_fallback": string_fallback,
            "float_rounding": float_rounding,
            "strict": strict,
        }
        if mode != "lenient":
            _check_official_options(mode, options)
        self.mode: MathMode = mode
        self.answer_keys = list(answer_keys)
        self.grader = MathGrader(timeout_mode, timeout_seconds, float_rounding, strict)
        self.grading: LenientGrading | DeepScaleRGrading | BNPOGrading | VerlMathVerifyGrading
        if mode == "lenient":
            self.grading = LenientGrading(
                self.grader, think_mode, think_close, require_boxed, last_n_chars, string_fallback
            )
        else:
            self.grading = OFFICIAL_GRADINGS[mode](self.grader)

    def grade(self, completion: str, gold: Any) -> tuple[float, str]:
        """(1.0 or 0.0, outcome) of one completion against a gold value (a string, a number or a list of them)."""
        values = raw_gold_values({"answer": gold}, ["answer"])
        if values is None:
            raise ValueError(f"gold={gold!r} holds no answer")
        return self.grading.grade(str(completion), self.grading.prepare(values))

    def __call__(self, prompts: Sequence[Any], samples: Sequence[Any], **metadata: Any) -> RewardOutput:
        n = len(samples)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts but {n} samples")
        rows = [{k: v[i] for k, v in metadata.items() if _per_row(v, n)} for i in range(n)]
        timeouts, no_timeout = self.grader.timeouts, self.grader.no_timeout_calls
        prepared: dict[str, Prepared] = {}
        counts = dict.fromkeys(("missing_gold", *self.grading.counted), 0)
        scores = []
        for sample, row in zip(samples, rows, strict=True):
            values = raw_gold_values(row, self.answer_keys)
            if values is None:
                counts["missing_gold"] += 1
                scores.append(math.nan)
                continue
            key = repr(values)
            if key not in prepared:
                prepared[key] = self.grading.prepare(values)
            score, outcome = self.grading.grade("" if sample is None else str(sample), prepared[key])
            if outcome in counts:
                counts[outcome] += 1
            scores.append(score)
        metrics = {key: float(value) for key, value in counts.items()}
        metrics["timeouts"] = float(self.grader.timeouts - timeouts)
        metrics["no_timeout_calls"] = float(self.grader.no_timeout_calls - no_timeout)
        return RewardOutput(scores=torch.tensor(scores, dtype=torch.float32), metrics=metrics)


def _check_official_options(mode: str, options: Mapping[str, Any]) -> None:
    accepted = OFFICIAL_VALUES.get(mode, {})
    for name, value in options.items():
        if value != LENIENT_DEFAULTS[name] and value != accepted.get(name, LENIENT_DEFAULTS[name]):
            raise ValueError(
                f"{name}={value!r} only shapes mode='lenient'; mode={mode!r} reproduces its released reward "
                f"function as it is (leave {name} at {LENIENT_DEFAULTS[name]!r})"
            )


def _per_row(value: Any, n: int) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == n
