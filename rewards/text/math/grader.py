"""math-verify `parse`/`verify` behind one timeout policy, with counters for the reward's metrics.

math-verify bounds parse/verify with `signal.alarm`, which only works on the main thread of the main
interpreter. `timeout_mode="auto"` (default) uses it there and runs without a timeout elsewhere (counted as
`no_timeout_calls`); "signal" always asks for it (math-verify then raises off the main thread), "off" never
does. A call that uses up its timeout is counted in `timeouts` (math-verify returns []/False then).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar, get_args

from rewards.text.math.extraction import BOXED_COMMANDS

TimeoutMode = Literal["auto", "signal", "off"]
FallbackMode = Literal["no_fallback", "first_match"]
ExtractionMode = Literal["first_match", "any_match"]
T = TypeVar("T")


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

    def parse(
        self,
        text: str,
        extraction_config: Sequence[Any] | None = None,
        fallback_mode: FallbackMode = "first_match",
        extraction_mode: ExtractionMode = "any_match",
    ) -> list[Any]:
        """math-verify `parse`; `extraction_config` None is its default (LaTeX, boxed first, then expressions)."""
        from math_verify import parse

        options: dict[str, Any] = {"fallback_mode": fallback_mode, "extraction_mode": extraction_mode}
        if extraction_config is not None:
            options["extraction_config"] = extraction_config
        timeout = self._timeout()
        return list(self._timed(parse, timeout, text, parsing_timeout=timeout, **options))

    def parse_gold(self, gold: str) -> list[Any]:
        """Parse a bare gold answer: as LaTeX math (`$...$`) first, then as plain text (the lenient mode)."""
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
