"""MedVidBench leaderboard parity: the released evaluator's answer parsers and per-sample scores, rebuilt.

Behaviour read from the leaderboard Space's evaluation scripts (copy in ChaoSFu/MedVid_understanding @6a68818,
`MedVidBench-Leaderboard/evaluation/eval_{tal,stg,dvc,cvs_assessment,skill_assessment}.py`); the code is ours.
Strict where `parsers.py` is lenient: `1.0s-3.0s`, en dashes in TAL and level words in SA are not read, a failed
STG answer scores IoU 0 instead of being skipped, overlapping DVC events are split at every boundary and times are
truncated to frames (`int(t * fps)`). `leaderboard.py` aggregates these into the results table.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from rewards.video.metrics import dvc_f1 as dvc_f1_spans
from rewards.video.parsers import Box, Segment

Event = tuple[float, float, str]
CVS_COMPONENTS = (("two structures", "two_structures"), ("cystic plate", "cystic_plate"),
                  ("hepatocystic triangle", "hepatocystic_triangle"))  # fmt: skip
CVS_KEYS = tuple(key for _, key in CVS_COMPONENTS)

_NUM = r"\d+(?:\.\d+)?"
_TAL_DASH = re.compile(rf"({_NUM})\s*-\s*({_NUM})")
# "[from] 12.1[s| seconds] to 117.0": the optional words around the numbers change no captured span.
_TAL_TO = re.compile(rf"({_NUM})(?:s| seconds?)?\s*to\s*({_NUM})", re.IGNORECASE)
_TAL_CLOCK = re.compile(r"(\d+):(\d+):(\d+)\s+to\s+(\d+):(\d+):(\d+)", re.IGNORECASE)
_STG_ENTRY = re.compile(rf"({_NUM})\s+seconds:\s*\[([^\]]+)\]")
_STG_DOUBLE_BRACKET = re.compile(r"\[\[([\d\s,]+)\]\]")
_DVC_EVENT = re.compile(
    rf"({_NUM})-({_NUM})\s+seconds?:\s+(.*?)(?=\n{_NUM}-{_NUM}\s+seconds?:|\Z)",
    re.DOTALL,
)
_DVC_LOOSE = re.compile(  # the evaluator's zero-shot fallback, applied line by line
    r"(?:\*\*Start Time:\*\*|Start\s*\(?Time\)?|Time\s*Range:|Time\s*Interval:|^|\n)\s*(\d+\.?\d*)\s*[-–]\s*"
    r"(\d+\.?\d*)\s*seconds?.*?(?:\*\*Description:\*\*|-)\s*(.+?)(?=\n\d|$)",
    re.DOTALL,
)
_SA_RATING = re.compile(r"(\d+)/5")
_SA_ASPECT = re.compile(r"([^:]+?):\s*(\d+)/5")
_SKILL_CODES = {"novice": "novice", "beginner": "novice", "intermediate": "intermediate", "expert": "expert",
                "advanced": "expert", "n": "novice", "i": "intermediate", "e": "expert", "1": "novice",
                "2": "intermediate", "3": "expert", "low": "novice", "medium": "intermediate", "high": "expert",
                "poor": "novice", "good": "intermediate", "excellent": "expert"}  # fmt: skip


def parse_tal(text: str | None) -> list[Segment]:
    """TAL spans in seconds; [] when nothing parses (the sample then scores 0).

    `a-b` pairs (ASCII hyphen, bare numbers) first; only if there are none, every "a[s| seconds] to b" (rounded to
    2 decimals) followed by every "hh:mm:ss to hh:mm:ss". Spans are kept as written, even reversed ones.
    """
    if not isinstance(text, str):
        return []
    spans = [(float(a), float(b)) for a, b in _TAL_DASH.findall(text)]
    if spans:
        return spans
    spans = [(round(float(a), 2), round(float(b), 2)) for a, b in _TAL_TO.findall(text)]
    for h1, m1, s1, h2, m2, s2 in _TAL_CLOCK.findall(text):
        spans.append((float(int(h1) * 3600 + int(m1) * 60 + int(s1)), float(int(h2) * 3600 + int(m2) * 60 + int(s2))))
    return spans


def hull_iou(a: Segment, b: Segment) -> float:
    """The TAL evaluator's IoU: intersection / (max end − min start); 0 when that is not positive."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0


def tal_scores(
    pred: Sequence[Segment], gt: Sequence[Segment], fps: float, thresholds: Sequence[float]
) -> dict[str, float]:
    """Per-sample `miou@θ` (mean IoU of the matched GT spans, 0 if none) and `recall@θ`, times scaled by fps.

    Greedy: each GT span in order takes the unused prediction of strictly highest IoU (> 0) if that IoU >= θ.
    A sample without GT spans scores 0.
    """
    pred = [(s * fps, e * fps) for s, e in pred]
    gt = [(s * fps, e * fps) for s, e in gt]
    out = {}
    for theta in thresholds:
        used, matched = set(), []
        for g in gt:
            best_iou, best = 0.0, -1
            for j, p in enumerate(pred):
                iou = hull_iou(p, g) if j not in used else 0.0
                if iou > best_iou:
                    best_iou, best = iou, j
            if best >= 0 and best_iou >= theta:
                used.add(best)
                matched.append(best_iou)
        out[f"miou@{theta:g}"] = sum(matched) / len(matched) if matched else 0.0
        out[f"recall@{theta:g}"] = len(matched) / len(gt) if gt else 0.0
    return out


def _box(values: str) -> list[float] | None:
    try:
        box = [float(v.strip().lstrip("[").rstrip("]")) for v in values.split(",")]
    except ValueError:
        return None
    return box if len(box) == 4 else None


def parse_stg(text: str | None) -> dict[str, Box] | list[Box]:
    """STG answer -> {str(float(t)): box} from "<t> seconds: [x1, y1, x2, y2]" (exactly "seconds:", square brackets).

    A bad box copies the last good one (dropped if none); a repeated time keeps the last. Without any such entry,
    `[[x1, y1, x2, y2]]` integer boxes come back as a list (assigned to the GT times in order); [] if none.
    """
    if not isinstance(text, str):
        return []
    entries = _STG_ENTRY.findall(text)
    if not entries:
        boxes = []
        for match in _STG_DOUBLE_BRACKET.findall(text):
            try:
                box = [float(int(v.strip())) for v in match.split(",")]
            except ValueError:
                continue
            if len(box) == 4:
                boxes.append(box)
        return boxes
    out: dict[str, Box] = {}
    last: Box | None = None
    for t, values in entries:
        parsed = _box(values) or last
        if parsed is not None:
            out[str(float(t))] = last = parsed
    return out


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """The STG evaluator's box IoU: union floored at 1e-6; degenerate boxes (x2 <= x1 or y2 <= y1) score 0."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / max(union, 1e-6)


def _is_box(box: Any) -> bool:
    return isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)


def stg_iou(pred: Mapping[str, Box] | Sequence[Box], gt: Mapping[str, Any]) -> float | None:
    """Per-sample STG mean IoU; None (sample skipped) only when no GT box is a list of four numbers.

    For each GT time in order the predicted box at f"{float(t):.1f}" is used, else [0, 0, 0, 0]; an all-zero box
    after the first time takes the previous time's box. A list prediction is keyed by the raw GT keys, so it only
    lands on GT keys already written as "x.y".
    """
    keys = list(gt)
    if not isinstance(pred, Mapping):
        pred = dict(zip(keys, pred, strict=False))
    chosen: list[Any] = []
    for i, key in enumerate(keys):
        box = pred.get(f"{float(key):.1f}", [0, 0, 0, 0])
        chosen.append(chosen[i - 1] if box == [0, 0, 0, 0] and i > 0 else box)
    ious = [box_iou(p, gt[k]) for p, k in zip(chosen, keys, strict=True) if _is_box(p) and _is_box(gt[k])]
    return sum(ious) / len(ious) if ious else None


def parse_dvc(text: str | None) -> list[Event]:
    """DVC events from "a-b seconds: caption" blocks (a caption runs until the next such line), duplicates of a
    (start, end) dropped; else the evaluator's per-line zero-shot fallback ("a – b seconds - caption" and kin)."""
    if not isinstance(text, str):
        return []
    events: list[Event] = []
    seen: set[tuple[float, float]] = set()
    for a, b, caption in _DVC_EVENT.findall(text):
        if (float(a), float(b)) not in seen:
            seen.add((float(a), float(b)))
            events.append((float(a), float(b), caption.strip().replace("\n", " ")))
    if events:
        return events
    for line in text.strip().split("\n"):
        events.extend((float(a), float(b), c.strip().rstrip(".")) for a, b, c in _DVC_LOOSE.findall(line))
    return events


def split_overlaps(events: Sequence[Event]) -> list[Event]:
    """If any two events overlap, cut the timeline at every start and end and give each piece covered by some event
    the caption of the longest covering event; otherwise the events unchanged."""
    ordered = sorted(events, key=lambda e: (e[0], e[1]))
    if not any(b[0] < a[1] for a, b in zip(ordered, ordered[1:], strict=False)):
        return list(events)
    points = sorted({t for e in events for t in e[:2]})
    pieces = []
    for start, end in zip(points, points[1:], strict=False):
        covering = [e for e in events if e[0] < end and e[1] > start]
        if covering:
            pieces.append((start, end, max(covering, key=lambda e: e[1] - e[0])[2]))
    return pieces


def frame_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """The DVC F1 IoU on (unordered) frame spans: intersection / (min(hull, sum of lengths) + 1e-8)."""
    s1, e1, s2, e2 = min(a), max(a), min(b), max(b)
    inter = max(0.0, min(e1, e2) - max(s1, s2))
    return inter / (min(max(e1, e2) - min(s1, s2), e1 - s1 + e2 - s2) + 1e-8)


def dvc_f1(pred: Sequence[Event], gt: Sequence[Segment], fps: float, thresholds: Sequence[float]) -> float | None:
    """Per-sample DVC temporal F1 on frames `int(t * fps)`, after `split_overlaps`; None (skipped) if a side is empty.

    A pair with IoU > θ covers both; P̄, R̄ are the covered fractions averaged over θ; F1 = 2 P̄ R̄ / (P̄ + R̄).
    """
    pred_frames = [(float(int(s * fps)), float(int(e * fps))) for s, e, _ in split_overlaps(pred)]
    gt_frames = [(float(int(s * fps)), float(int(e * fps))) for s, e in gt]
    if not pred_frames or not gt_frames:
        return None
    return dvc_f1_spans(pred_frames, gt_frames, thresholds, iou=frame_iou)["f1"]


def caption_pairs(pred: Sequence[Event], gt: Sequence[Event], threshold: float) -> list[tuple[str, str]]:
    """DVC caption pairs at θ (seconds, events as parsed, standard IoU): each prediction's first GT of highest IoU,
    kept when that IoU >= θ."""
    pairs = []
    for s, e, caption in pred:
        best_iou, best = 0.0, None
        for gs, ge, gt_caption in gt:
            inter = max(0.0, min(e, ge) - max(s, gs))
            union = (e - s) + (ge - gs) - inter
            iou = inter / union if union > 0 else 0.0
            if iou >= threshold and iou > best_iou:
                best_iou, best = iou, gt_caption
        if best is not None:
            pairs.append((caption, best))
    return pairs


def parse_cvs(text: str | None) -> dict[str, int]:
    """CVS components from comma-separated "name: k" parts (k any integer, first component name in a part wins)."""
    components: dict[str, int] = {}
    for part in (text or "").split(","):
        part = part.strip().lower()
        for name, key in CVS_COMPONENTS:
            if name in part:
                label = "two structures?" if key == "two_structures" else name
                match = re.search(rf"{label}:\s*(\d+)", part)
                if match:
                    components[key] = int(match.group(1))
                break
    return components


def cvs_rating(total: int) -> str:
    """Bucket of a CVS total (any integer): <= 1 poor, <= 3 fair, <= 5 good, else excellent."""
    return "poor" if total <= 1 else "fair" if total <= 3 else "good" if total <= 5 else "excellent"


def cvs_items(pred: Mapping[str, int], gt: Mapping[str, int]) -> list[tuple[str, bool]]:
    """(component, exact match) for each GT component the prediction names; the rest are not counted."""
    return [(key, pred[key] == value) for key, value in gt.items() if key in pred]


def cvs_bucket_correct(pred: Mapping[str, int], gt: Mapping[str, int]) -> bool:
    """Bucket accuracy term: an unparsable side counts as total 0 ("poor")."""
    return cvs_rating(sum(pred.values())) == cvs_rating(sum(gt.values()))


def skill_average(text: str | None) -> float | None:
    """Mean of every `k/5` in the text (k any integer); None if there is none."""
    scores = [int(k) for k in _SA_RATING.findall(text or "")]
    return sum(scores) / len(scores) if scores else None


def skill_level(text: str | None) -> str | None:
    """Level from the `k/5` average: <= 2.0 novice, <= 3.5 intermediate, else expert; level words are not read."""
    average = skill_average(text)
    if average is None:
        return None
    return "novice" if average <= 2.0 else "intermediate" if average <= 3.5 else "expert"


def skill_code_level(code: str) -> str:
    """A GT `skill_level` code (N/I/E, words, 1-3) as a level: exact match, else the first code it contains, else
    the lower-cased text itself."""
    key = code.strip().lower()
    if key in _SKILL_CODES:
        return _SKILL_CODES[key]
    return next((level for word, level in _SKILL_CODES.items() if word in key), key)


def skill_aspects(text: str | None) -> dict[str, int]:
    """{aspect name: k} from comma-separated "name: k/5" parts (names case-sensitive, the last repeat wins)."""
    aspects = {}
    for part in (text or "").split(","):
        match = _SA_ASPECT.search(part.strip())
        if match:
            aspects[match.group(1).strip()] = int(match.group(2))
    return aspects


def finite_fps(fps: Any) -> float:
    """The evaluator's fps: the record's value, 1.0 when missing."""
    value = float(fps) if fps is not None else math.nan
    return value if math.isfinite(value) else 1.0
