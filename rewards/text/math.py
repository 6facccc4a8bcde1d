"""Math answer correctness with `math-verify`: boxed answers, `</think>` handling, the last-N-characters rule.

Recipes: BNPO (arXiv:2506.02864, official code) grades the last 500 characters of the output with
math-verify's default extraction; DLER (arXiv:2510.15110, DeepScaleR reward) requires `</think>` and then
a `\\boxed{}` answer. Scores are 1/0, NaN only when a row has no gold answer (counted).

Timeouts: math-verify bounds parse/verify with `signal.alarm`, which only works on the main thread of the
main interpreter. `timeout_mode="auto"` (default) uses it there and runs without a timeout elsewhere
(counted as `no_timeout_calls`); "signal" always asks for it (math-verify then raises off the main
thread), "off" never does. A call that hits its timeout scores 0 and is counted in `timeouts`.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar, get_args

import torch

from rewards.base import RewardOutput

ThinkMode = Literal["ignore", "strip", "require"]
TimeoutMode = Literal["auto", "signal", "off"]
BOXED_COMMANDS = ("\\boxed", "\\fbox")
DEFAULT_ANSWER_KEYS = ("answer", "solution")
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------- extraction


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced; `\\boxed 5` too.

    Returns None when there is none, or when the last one is unbalanced (a response cut mid-answer).
    """
    start = max(text.rfind(command) for command in BOXED_COMMANDS)
    if start < 0:
        return None
    command = next(c for c in BOXED_COMMANDS if text.startswith(c, start))
    pos = start + len(command)
    if pos < len(text) and text[pos] == " ":
        match = re.match(r" +([^\s$]+)", text[pos:])
        return match.group(1) if match else None
    if pos >= len(text) or text[pos] != "{":
        return None
    depth = 0
    for index in range(pos, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[pos + 1 : index]
    return None


def answer_region(
    text: str, think_mode: ThinkMode = "strip", think_close: str = "</think>", last_n_chars: int | None = None
) -> str | None:
    """The part of a completion that is graded.

    Args:
        text: the completion.
        think_mode: "ignore" grades the whole text; "strip" grades what follows the last `think_close`
            when present (the whole text otherwise); "require" grades what follows it and returns None
            when it is absent (DLER: a response that never closes its thinking scores 0).
        think_close: the tag that ends the thinking.
        last_n_chars: keep only the last N characters of the region (BNPO official: 500).
    """
    if think_mode != "ignore":
        cut = text.rfind(think_close)
        if cut >= 0:
            text = text[cut + len(think_close) :]
        elif think_mode == "require":
            return None
    if last_n_chars is not None:
        text = text[-last_n_chars:] if last_n_chars > 0 else ""
    return text


def gold_answer(row: Mapping[str, Any], keys: Sequence[str] = DEFAULT_ANSWER_KEYS) -> str | None:
    """The gold answer of a metadata row: the first non-empty of `keys` (e.g. answer, then solution).

    A value holding `\\boxed{}` (a worked solution) contributes its last boxed content; a list (e.g.
    OlympiadBench `final_answer`) its single item, or its items joined by ", "; a number its decimal form.
    """
    for key in keys:
        text = _gold_text(row.get(key))
        if text:
            boxed = last_boxed(text)
            return boxed if boxed is not None else text
    return None


def _gold_text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (list, tuple)):
        items = [t for t in (_gold_text(v) for v in value) if t]
        return ", ".join(items) if items else None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    if len(text) >= 2 and text.startswith("$") and text.endswith("$"):
        text = text.strip("$").strip()
    return text or None


_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_DROPPED = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "$", "^{\\circ}", "^\\circ", "\\%", "%")


def normalize_answer_string(text: str) -> str:
    """A light string normalization for the fallback comparison (spacing, sizing commands, units).

    Removes whitespace, `\\left`/`\\right`, thin spaces, `$`, degree and percent signs, unwraps
    `\\text{}`-like commands, maps `\\dfrac`/`\\tfrac` to `\\frac`, drops a trailing period and braces
    around a whole answer.
    """
    out = _TEXT_WRAPPERS.sub(r"\1", text)
    for token in _DROPPED:
        out = out.replace(token, "")
    out = out.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    out = "".join(out.split()).rstrip(".")
    while len(out) >= 2 and out[0] == "{" and out[-1] == "}" and last_boxed("\\boxed" + out) == out[1:-1]:
        out = out[1:-1]
    return out


# ---------------------------------------------------------------------------------------------- grading


class MathGrader:
    """math-verify `parse`/`verify` with the timeout policy of this module and counters for metrics."""

    def __init__(
        self,
        timeout_mode: TimeoutMode = "auto",
        timeout_seconds: int = 5,
        float_rounding: int = 6,
        strict: bool = True,
    ) -> None:
        if timeout_mode not in get_args(TimeoutMode):
            raise ValueError(f"timeout_mode={timeout_mode!r} is not one of {list(get_args(TimeoutMode))}")
        if timeout_seconds < 1:
            raise ValueError(
                f"timeout_seconds must be >= 1 (math-verify uses whole-second alarms), got {timeout_seconds}"
            )
        self.timeout_mode: TimeoutMode = timeout_mode
        self.timeout_seconds = timeout_seconds
        self.float_rounding = float_rounding
        self.strict = strict
        self.timeouts = 0
        self.no_timeout_calls = 0

    def _timeout(self) -> int | None:
        if self.timeout_mode == "off":
            return None
        if self.timeout_mode == "auto" and threading.current_thread() is not threading.main_thread():
            self.no_timeout_calls += 1
            return None
        return self.timeout_seconds

    def _timed(self, fn: Callable[..., T], timeout: int | None, *args: Any, **kwargs: Any) -> T:
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        if timeout is not None and time.perf_counter() - start >= timeout - 0.05:
            self.timeouts += 1  # math-verify swallowed a TimeoutException and returned []/False
        return result

    def parse(self, text: str) -> list[Any]:
        """math-verify `parse` with its default extraction (LaTeX, boxed first, then plain expressions)."""
        from math_verify import parse

        timeout = self._timeout()
        return list(self._timed(parse, timeout, text, parsing_timeout=timeout))

    def parse_gold(self, gold: str) -> list[Any]:
        """Parse a bare gold answer: as LaTeX math (`$...$`) first, then as plain text."""
        if any(c in gold for c in BOXED_COMMANDS) or "$" in gold:
            return self.parse(gold)
        return self.parse(f"${gold}$") or self.parse(gold)

    def verify(self, gold: list[Any], prediction: list[Any]) -> bool:
        """math-verify `verify(gold, prediction)` (False when either side parsed to nothing)."""
        from math_verify import verify

        if not gold or not prediction:
            return False
        timeout = self._timeout()
        return bool(
            self._timed(
                verify,
                timeout,
                gold,
                prediction,
                float_rounding=self.float_rounding,
                strict=self.strict,
                timeout_seconds=timeout,
            )
        )


# ---------------------------------------------------------------------------------------------- reward


class MathAccuracyReward:
    """1 if the completion's final answer equals the gold answer under math-verify, else 0.

    The gold answer comes from row metadata (`answer_keys`, default `answer` then `solution`, whose
    last `\\boxed{}` is used); a row without one scores NaN (not applicable, counted in `missing_gold`).

    Args:
        answer_keys: metadata keys tried in order for the gold answer.
        think_mode: "ignore" | "strip" | "require" (see `answer_region`); DLER: "require".
        think_close: the tag that ends the thinking (`</think>`).
        require_boxed: grade only the last `\\boxed{}` of the region; none there scores 0 (DLER).
            False: math-verify's default extraction over the region (boxed preferred, then plain
            expressions such as a bare "7").
        last_n_chars: grade only the last N characters of the region (BNPO official: 500); None = all.
        string_fallback: when math-verify says no, also accept a boxed answer whose normalized string
            equals the normalized gold (covers answers sympy cannot parse, e.g. text answers).
        timeout_mode, timeout_seconds: see the module docstring.
        float_rounding, strict: passed to math-verify `verify`.
    """

    def __init__(
        self,
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
        if think_mode not in get_args(ThinkMode):
            raise ValueError(f"think_mode={think_mode!r} is not one of {list(get_args(ThinkMode))}")
        if last_n_chars is not None and last_n_chars < 1:
            raise ValueError(f"last_n_chars must be >= 1 or None, got {last_n_chars}")
        if not answer_keys:
            raise ValueError("answer_keys must name at least one metadata key")
        self.answer_keys = list(answer_keys)
        self.think_mode: ThinkMode = think_mode
        self.think_close = think_close
        self.require_boxed = require_boxed
        self.last_n_chars = last_n_chars
        self.string_fallback = string_fallback
        self.grader = MathGrader(timeout_mode, timeout_seconds, float_rounding, strict)

    def grade(self, completion: str, gold: str, gold_parsed: list[Any] | None = None) -> tuple[float, str]:
        """(1.0 or 0.0, outcome) for one completion; outcome is "correct", "wrong", "no_think" or "no_answer"."""
        region = answer_region(str(completion), self.think_mode, self.think_close, self.last_n_chars)
        if region is None:
            return 0.0, "no_think"
        boxed = last_boxed(region)
        if self.require_boxed and boxed is None:
            return 0.0, "no_answer"
        prediction = self.grader.parse("\\boxed{" + boxed + "}" if self.require_boxed and boxed else region)
        gold_parsed = self.grader.parse_gold(gold) if gold_parsed is None else gold_parsed
        if self.grader.verify(gold_parsed, prediction):
            return 1.0, "correct"
        if (
            self.string_fallback
            and boxed is not None
            and normalize_answer_string(boxed) == normalize_answer_string(gold)
        ):
            return 1.0, "string_fallback"
        return 0.0, "wrong" if prediction or boxed is not None else "no_answer"

    def __call__(self, prompts: Sequence[Any], samples: Sequence[Any], **metadata: Any) -> RewardOutput:
        n = len(samples)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts but {n} samples")
        rows = [{k: v[i] for k, v in metadata.items() if _per_row(v, n)} for i in range(n)]
        timeouts, no_timeout = self.grader.timeouts, self.grader.no_timeout_calls
        gold_cache: dict[str, list[Any]] = {}
        counts = dict.fromkeys(("missing_gold", "no_think", "no_answer", "string_fallback"), 0)
        scores = []
        for sample, row in zip(samples, rows, strict=True):
            gold = gold_answer(row, self.answer_keys)
            if gold is None:
                counts["missing_gold"] += 1
                scores.append(math.nan)
                continue
            if gold not in gold_cache:
                gold_cache[gold] = self.grader.parse_gold(gold)
            score, outcome = self.grade("" if sample is None else str(sample), gold, gold_cache[gold])
            if outcome in counts:
                counts[outcome] += 1
            scores.append(score)
        metrics = {key: float(value) for key, value in counts.items()}
        metrics["timeouts"] = float(self.grader.timeouts - timeouts)
        metrics["no_timeout_calls"] = float(self.grader.no_timeout_calls - no_timeout)
        return RewardOutput(scores=torch.tensor(scores, dtype=torch.float32), metrics=metrics)


def _per_row(value: Any, n: int) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == n
