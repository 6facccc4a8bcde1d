"""Where the answer is: `\\boxed{}` contents, the graded region of a completion, and the gold answers of a row.

These are the lenient mode's rules (and the data loader's gold normalization); the official modes read the raw
metadata value with `raw_gold_values` and apply their own extraction (`deepscaler.py`, `modes.py`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

ThinkMode = Literal["ignore", "strip", "require"]
BOXED_COMMANDS = ("\\boxed", "\\fbox")
DEFAULT_ANSWER_KEYS = ("answer", "solution")


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
    """The part of a completion that the lenient mode grades.

    Args:
        text: the completion.
        think_mode: "ignore" grades the whole text; "strip" grades what follows the last `think_close`
            when present (the whole text otherwise); "require" grades what follows it and returns None
            when it is absent (a response that never closes its thinking scores 0).
        think_close: the tag that ends the thinking.
        last_n_chars: keep only the last N characters of the region; None keeps all.
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


def _is_missing(value: Any) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, (list, tuple)) and all(_is_missing(v) for v in value)


def raw_gold_values(row: Mapping[str, Any], keys: Sequence[str] = DEFAULT_ANSWER_KEYS) -> list[Any] | None:
    """The gold alternatives of a row as stored: the first non-empty of `keys`, a list kept as its items.

    Returns None when every key is missing or empty (the reward scores such a row NaN).
    """
    for key in keys:
        value = row.get(key)
        if not _is_missing(value):
            items = list(value) if isinstance(value, (list, tuple)) else [value]
            return [item for item in items if not _is_missing(item)]
    return None


def gold_answers(row: Mapping[str, Any], keys: Sequence[str] = DEFAULT_ANSWER_KEYS) -> list[str]:
    """The normalized gold alternatives of a row (empty when it has none): any one of them is correct.

    From the first non-empty of `keys` (e.g. answer, then solution). A list (e.g. OlympiadBench
    `final_answer`, or ["5", "five"]) gives one alternative per item. Each item: a text holding
    `\\boxed{}` (a worked solution) contributes its last boxed content, `$...$` is unwrapped, and a
    whole-number float its integer form ("204").
    """
    values = raw_gold_values(row, keys)
    answers = [_gold_text(value) for value in values or []]
    return [answer for answer in answers if answer]


def gold_answer(row: Mapping[str, Any], keys: Sequence[str] = DEFAULT_ANSWER_KEYS) -> str | list[str] | None:
    """The gold answer of a row for a data record: one string, a list of alternatives, or None.

    See `gold_answers`; a single alternative is returned as a plain string.
    """
    answers = gold_answers(row, keys)
    if not answers:
        return None
    return answers[0] if len(answers) == 1 else answers


def _gold_text(value: Any) -> str | None:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    if len(text) >= 2 and text.startswith("$") and text.endswith("$"):
        text = text.strip("$").strip()
    boxed = last_boxed(text)
    return (boxed if boxed is not None else text) or None


_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_DROPPED = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "$", "^{\\circ}", "^\\circ", "\\%", "%")


def normalize_answer_string(text: str) -> str:
    """The lenient mode's light string normalization for its fallback comparison.

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
