"""MedVidBench leaderboard metrics (spec docs/methods/medgrpo.md §2), kept separate from the RL rewards in `rl.py`.

Per-sample functions (TAL mIoU@θ/recall with greedy matching, STG box IoU with carry-forward, DVC temporal F1,
SA level and CVS bucket accuracy, NAP nearest-class accuracy) and `macro_average` over (dataset, fps) buckets.
The idiosyncrasies of the evaluator (matched-only mIoU, "> θ" in DVC F1, union = min(hull, sum)) are kept.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from rewards.video.parsers import (
    Box,
    Segment,
    cvs_bucket,
    format_time_key,
    normalize_label,
    parse_cvs,
    parse_skill_level,
)

DEFAULT_TAL_THRESHOLDS = (0.3, 0.5, 0.7)
DEFAULT_DVC_THRESHOLDS = (0.3, 0.5, 0.7)


def temporal_iou(a: Segment, b: Segment) -> float:
    """Standard 1-D IoU of two spans [start, end]; 0 when the union is empty."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = (a[1] - a[0]) + (b[1] - b[0]) - inter
    return inter / union if union > 0 else 0.0


def greedy_match(pred: Sequence[Segment], gt: Sequence[Segment], threshold: float) -> list[float]:
    """Greedy TAL matching: for each GT span in order, the unmatched prediction with the highest IoU.

    A GT span is matched when that IoU >= threshold (the prediction is then used up).

    Returns:
        The IoUs of the matched GT spans (one entry per matched GT).
    """
    used: set[int] = set()
    matched = []
    for g in gt:
        best, best_iou = -1, -1.0
        for j, p in enumerate(pred):
            if j not in used:
                iou = temporal_iou(p, g)
                if iou > best_iou:
                    best, best_iou = j, iou
        if best >= 0 and best_iou >= threshold:
            used.add(best)
            matched.append(best_iou)
    return matched


def tal_scores(
    pred: Sequence[Segment] | None, gt: Sequence[Segment], thresholds: Sequence[float] = DEFAULT_TAL_THRESHOLDS
) -> dict[str, float]:
    """Per-sample leaderboard TAL metrics: `miou@θ` (mean IoU over matched GT, 0 if none) and `recall@θ`.

    An unparsable prediction (None) scores 0 everywhere. Requires at least one GT span.
    """
    if not gt:
        raise ValueError("tal_scores needs at least one ground-truth span")
    out = {}
    for theta in thresholds:
        matched = greedy_match(pred or [], gt, theta)
        out[f"miou@{theta:g}"] = sum(matched) / len(matched) if matched else 0.0
        out[f"recall@{theta:g}"] = len(matched) / len(gt)
    return out


def mean_best_iou(pred: Sequence[Segment] | None, gt: Sequence[Segment]) -> float:
    """RL localisation IoU [Our decision]: mean over GT spans of the greedy-match IoU with no threshold."""
    if not gt:
        raise ValueError("mean_best_iou needs at least one ground-truth span")
    return sum(greedy_match(pred or [], gt, 0.0)) / len(gt)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two [x1, y1, x2, y2] boxes in continuous coordinates (no +1); 0 when the union is empty."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def valid_box(box: Sequence[float]) -> bool:
    """[Our decision] stand-in for the evaluator's unreleased check: four finite numbers, x2 > x1, y2 > y1."""
    return len(box) == 4 and all(math.isfinite(v) for v in box) and box[2] > box[0] and box[3] > box[1]


def stg_mean_iou(pred: Mapping[str, Box] | Sequence[Box] | None, gt: Mapping[Any, Box]) -> float | None:
    """Per-sample STG mean box IoU with the evaluator's carry-forward.

    For each GT timestamp (in the GT's order) the predicted box at `f"{t:.1f}"` is used; a missing (or
    all-zero) box takes the previous timestamp's box (the first one gets [0, 0, 0, 0]). Pairs where either
    box is invalid are dropped. A list prediction is assigned to the GT timestamps in order.

    Returns:
        The mean IoU over the remaining pairs; None when none remain (the evaluator skips the sample).
    """
    keys = list(gt)
    if isinstance(pred, Sequence):
        pred = {format_time_key(k): box for k, box in zip(keys, pred, strict=False)}
    pred = pred or {}
    ious, previous = [], [0.0, 0.0, 0.0, 0.0]
    for i, key in enumerate(keys):
        box = [float(v) for v in pred.get(format_time_key(key), [0.0, 0.0, 0.0, 0.0])]
        if i > 0 and box == [0.0, 0.0, 0.0, 0.0]:
            box = previous
        previous = box
        gt_box = [float(v) for v in gt[key]]
        if valid_box(box) and valid_box(gt_box):
            ious.append(box_iou(box, gt_box))
    return sum(ious) / len(ious) if ious else None


def dvc_iou(a: Segment, b: Segment) -> float:
    """The DVC evaluator's IoU: intersection / min(hull length, sum of lengths)."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = min(max(a[1], b[1]) - min(a[0], b[0]), (a[1] - a[0]) + (b[1] - b[0]))
    return inter / union if union > 0 else 0.0


def flatten_events(events: Sequence[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Remove duplicate spans and merge overlapping ones into their hull, keeping the longest caption.

    [Our decision] reading of the evaluator's (unreleased) "flatten overlapping, caption_strategy=longest".
    """
    merged: list[tuple[float, float, str]] = []
    for start, end, text in sorted(events, key=lambda e: (e[0], e[1])):
        if merged and (start < merged[-1][1] or (start, end) == merged[-1][:2]):
            s, e, t = merged[-1]
            merged[-1] = (s, max(e, end), t if len(t) >= len(text) else text)
        else:
            merged.append((start, end, text))
    return merged


def dvc_f1(
    pred: Sequence[Segment] | None,
    gt: Sequence[Segment],
    thresholds: Sequence[float] = DEFAULT_DVC_THRESHOLDS,
    iou: Callable[[Segment, Segment], float] = dvc_iou,
) -> dict[str, float]:
    """DVC temporal precision, recall and F1: a pred-GT pair with `iou` > θ covers both.

    P̄, R̄ = mean over θ of #covered preds / #preds and #covered GT / #GT; F1 = 2 P̄ R̄ / (P̄ + R̄);
    everything 0 when either side is empty.
    """
    pred = list(pred or [])
    if not pred or not gt:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    precisions, recalls = [], []
    for theta in thresholds:
        covered = [[iou(p, g) > theta for g in gt] for p in pred]
        precisions.append(sum(any(row) for row in covered) / len(pred))
        recalls.append(sum(any(row[j] for row in covered) for j in range(len(gt))) / len(gt))
    p, r = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r > 0 else 0.0}


def dvc_caption_pairs(
    pred: Sequence[tuple[float, float, str]], gt: Sequence[tuple[float, float, str]], threshold: float
) -> list[tuple[str, str]]:
    """(pred caption, GT caption) pairs to judge at θ: each prediction's best GT with IoU >= θ."""
    pairs = []
    for p in pred:
        scored = [(dvc_iou(p[:2], g[:2]), g[2]) for g in gt]
        if scored:
            best_iou, caption = max(scored, key=lambda s: s[0])
            if best_iou >= threshold:
                pairs.append((p[2], caption))
    return pairs


def sa_correct(prediction: str | None, gt_text: str | None, gt_level: str | None = None) -> bool | None:
    """Whether the predicted skill level matches the GT level (struc_info N/I/E, else the GT text).

    None when the GT level is unknown (sample skipped); an unparsable prediction is wrong.
    """
    truth = parse_skill_level(gt_level) if gt_level else None
    truth = truth or parse_skill_level(gt_text)
    if truth is None:
        return None
    return parse_skill_level(prediction) == truth


def cvs_correct(prediction: str | None, gt_text: str | None) -> bool | None:
    """Whether the CVS bucket of the prediction's total matches the GT's; None when the GT does not parse."""
    truth = parse_cvs(gt_text)
    if truth is None:
        return None
    pred = parse_cvs(prediction)
    return pred is not None and cvs_bucket(sum(pred)) == cvs_bucket(sum(truth))


def nearest_class(
    prediction: str | None, classes: Sequence[str], similarity: Callable[[list[str], list[str]], list[list[float]]]
) -> str | None:
    """NAP: the class the prediction names exactly (after `normalize_label`), else the most similar class.

    Args:
        similarity: (queries [Q], keys [K]) -> [Q][K] cosine similarities (e.g. a SentenceSimilarity.matrix).
    """
    if not classes or not isinstance(prediction, str) or not prediction.strip():
        return None
    norm = {normalize_label(c): c for c in classes}
    key = normalize_label(prediction)
    if key in norm:
        return norm[key]
    row = similarity([prediction], list(classes))[0]
    return classes[max(range(len(classes)), key=lambda j: row[j])]


def macro_average(rows: Iterable[tuple[str, float, float]]) -> tuple[float, dict[str, float]]:
    """Unweighted mean over (dataset, fps) buckets of the per-bucket mean value; NaN values are skipped.

    Args:
        rows: (dataset, fps, value) per sample.

    Returns:
        (macro average, {"dataset@fps": bucket mean}); NaN when no bucket has a value.
    """
    buckets: dict[str, list[float]] = defaultdict(list)
    for dataset, fps, value in rows:
        if not math.isnan(value):
            buckets[f"{dataset}@{float(fps):g}"].append(value)
    means = {key: sum(v) / len(v) for key, v in sorted(buckets.items())}
    macro = sum(means.values()) / len(means) if means else math.nan
    return macro, means
