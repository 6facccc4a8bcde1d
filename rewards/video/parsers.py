"""Tolerant answer parsers for the eight MedVidBench tasks (spec docs/methods/medgrpo.md §2); each returns None on
garbage.

Formats are those of the released one-shot examples; the fallbacks follow the leaderboard evaluator
("from a to b", "hh:mm:ss to hh:mm:ss", lenient STG bracket repair). Parsers never raise on model output.
"""

from __future__ import annotations

import math
import re
from typing import Literal

Segment = tuple[float, float]
Box = list[float]
SkillLevel = Literal["novice", "intermediate", "expert"]
CVSBucket = Literal["poor", "fair", "good", "excellent"]

_NUM = r"\d+(?:\.\d+)?"
_CLOCK = r"\d{1,2}(?::\d{1,2}){1,2}(?:\.\d+)?"
_SPAN = re.compile(rf"(?<![\d.:])({_NUM})\s*(?:s|sec|secs|seconds?)?\s*(?:-|–|—|~|\bto\b)\s*({_NUM})(?![\d.:])")
_FROM_TO = re.compile(rf"from\s+({_NUM})\s*(?:s|sec|seconds?)?\s+to\s+({_NUM})", re.IGNORECASE)
_CLOCK_SPAN = re.compile(rf"({_CLOCK})\s*(?:-|–|—|\bto\b)\s*({_CLOCK})", re.IGNORECASE)
_STG_ENTRY = re.compile(
    rf"({_NUM})\s*(?:s|sec|secs|seconds?)?\s*:\s*[\[(]?\s*(-?{_NUM})\s*,\s*(-?{_NUM})\s*,\s*(-?{_NUM})\s*,\s*(-?{_NUM})"
    r"\s*[\])]?",
    re.IGNORECASE,
)
_BARE_BOX = re.compile(rf"[\[(]\s*(-?{_NUM})\s*,\s*(-?{_NUM})\s*,\s*(-?{_NUM})\s*,\s*(-?{_NUM})\s*[\])]")
_DVC_LINE = re.compile(rf"^\s*[-*•]?\s*({_NUM})\s*(?:s|seconds?)?\s*-\s*({_NUM})\s*(?:s|seconds?)?\s*:\s*(.+?)\s*$")
_SA_SCORE = re.compile(r"(?<!\d)(\d)\s*/\s*5(?!\d)")
_CVS_PARTS = (
    re.compile(r"two\s+structures?\D{0,20}?([0-2])(?!\d)", re.IGNORECASE),
    re.compile(r"cystic\s+plate\D{0,20}?([0-2])(?!\d)", re.IGNORECASE),
    re.compile(r"hepatocystic\s+triangle\D{0,20}?([0-2])(?!\d)", re.IGNORECASE),
)
_SKILL_WORDS: dict[str, SkillLevel] = {
    "novice": "novice",
    "beginner": "novice",
    "intermediate": "intermediate",
    "expert": "expert",
    "advanced": "expert",
    "n": "novice",
    "i": "intermediate",
    "e": "expert",
}


def _clock_seconds(text: str) -> float:
    value = 0.0
    for part in text.split(":"):
        value = value * 60.0 + float(part)
    return value


def _valid(segments: list[Segment]) -> list[Segment] | None:
    # [Our decision] a span with end < start or a non-finite bound is dropped; none left -> None.
    kept = [(a, b) for a, b in segments if math.isfinite(a) and math.isfinite(b) and b >= a]
    return kept or None


def parse_segments(text: str | None) -> list[Segment] | None:
    """Temporal spans (seconds) of a TAL answer such as "1.1-3.0 seconds, 5.0-7.5 seconds."; None if none.

    Tries `a-b` pairs first, then "from a to b", then "hh:mm:ss to hh:mm:ss" (leaderboard fallbacks).
    """
    if not isinstance(text, str) or not text.strip():
        return None
    clock = [(_clock_seconds(a), _clock_seconds(b)) for a, b in _CLOCK_SPAN.findall(text)]
    if clock:
        return _valid(clock)
    spans = [(float(a), float(b)) for a, b in _SPAN.findall(text)]
    if not spans:
        spans = [(float(a), float(b)) for a, b in _FROM_TO.findall(text)]
    return _valid(spans)


def format_time_key(seconds: float | str) -> str:
    """The evaluator's STG timestamp key: f"{float(t):.1f}"."""
    return f"{float(seconds):.1f}"


def parse_stg(text: str | None) -> dict[str, Box] | list[Box] | None:
    """STG answer "1.0 seconds: [x1, y1, x2, y2] 5.0 seconds: [...]" -> {"1.0": box, "5.0": box}.

    Lenient bracket repair: "(" / ")" for brackets and a missing bracket are accepted. Boxes without
    timestamps come back as a list (the evaluator assigns them to the ground-truth timestamps in order).
    The first box of a repeated timestamp wins. None when no box parses.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    entries = _STG_ENTRY.findall(text)
    if entries:
        out: dict[str, Box] = {}
        for t, *coords in entries:
            out.setdefault(format_time_key(t), [float(c) for c in coords])
        return out
    boxes = [[float(c) for c in m] for m in _BARE_BOX.findall(text)]
    return boxes or None


def parse_dvc(text: str | None) -> list[tuple[float, float, str]] | None:
    """Dense captions, one event per line "36.0-49.0 seconds: <label>: <caption>" -> [(start, end, text)].

    Lines that do not match are ignored; spans with end < start are dropped; None if no event parses.
    """
    if not isinstance(text, str):
        return None
    events = []
    for line in text.splitlines():
        match = _DVC_LINE.match(line)
        if match:
            start, end = float(match.group(1)), float(match.group(2))
            if end >= start:
                events.append((start, end, match.group(3)))
    return events or None


def parse_skill_scores(text: str | None) -> list[int] | None:
    """All `k/5` ratings of a skill-assessment answer (k in 1..5), in order; None if none."""
    if not isinstance(text, str):
        return None
    scores = [int(k) for k in _SA_SCORE.findall(text) if 1 <= int(k) <= 5]
    return scores or None


def skill_level_from_average(average: float) -> SkillLevel:
    """Leaderboard skill level of an average rating: <= 2.0 novice, <= 3.5 intermediate, else expert."""
    if average <= 2.0:
        return "novice"
    if average <= 3.5:
        return "intermediate"
    return "expert"


def parse_skill_level(text: str | None) -> SkillLevel | None:
    """Skill level of an answer: from its `k/5` ratings, else a level word or code (N/I/E); None if neither."""
    scores = parse_skill_scores(text)
    if scores is not None:
        return skill_level_from_average(sum(scores) / len(scores))
    if not isinstance(text, str):
        return None
    key = text.strip().lower()
    if key in _SKILL_WORDS:
        return _SKILL_WORDS[key]
    for word in ("novice", "beginner", "intermediate", "expert", "advanced"):
        if word in key:
            return _SKILL_WORDS[word]
    return None


def parse_cvs(text: str | None) -> tuple[int, int, int] | None:
    """CVS components "Two structures: 2, Cystic plate: 1, Hepatocystic triangle: 0" -> (2, 1, 0).

    Each named component must carry a value 0..2; without the names, exactly three digits 0..2 in order
    are accepted. None otherwise.
    """
    if not isinstance(text, str):
        return None
    found = [pattern.search(text) for pattern in _CVS_PARTS]
    if all(found):
        a, b, c = (int(m.group(1)) for m in found if m is not None)
        return a, b, c
    digits = re.findall(r"(?<![\d.])\d+(?![\d.])", text)
    if len(digits) == 3 and all(d in ("0", "1", "2") for d in digits):
        return int(digits[0]), int(digits[1]), int(digits[2])
    return None


def cvs_bucket(total: int) -> CVSBucket:
    """Bucket of a CVS total 0..6: <= 1 poor, <= 3 fair, <= 5 good, 6 excellent."""
    if not 0 <= total <= 6:
        raise ValueError(f"a CVS total must be in 0..6, got {total}")
    if total <= 1:
        return "poor"
    if total <= 3:
        return "fair"
    if total <= 5:
        return "good"
    return "excellent"


def normalize_label(text: str | None) -> str:
    """Lower-case, punctuation-free, single-spaced text for class-name matching (NAP)."""
    if not isinstance(text, str):
        return ""
    cleaned = re.sub(r"[^\w\s/]", " ", text.lower())
    return " ".join(cleaned.split())
