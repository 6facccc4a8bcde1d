"""MedVidBench results-table columns from prediction records, scored the leaderboard's way (default) or ours.

parsing="official": the released evaluator's parsers and failure handling (`official.py`); "lenient": the tolerant
`parsers.py` with `metrics.py` (what the RL rewards use). aggregation="official": each column pooled as the
leaderboard publishes it (its `evaluate_predictions.py --grouping overall`, as its app.py runs it, see
`OFFICIAL_POOLING`); "bucket": the unweighted mean over (dataset, fps) buckets.
Records carry dataset, task, answer (ground truth), prediction, struc_info, fps (`percentiles.normalize_record`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rewards.judges.medical import MedicalCaptionJudge, aggregate_rubrics
from rewards.video import metrics as M
from rewards.video import official as O
from rewards.video import parsers as P
from rewards.video.rl import gt_boxes, gt_segments
from rewards.video.similarity import SentenceSimilarity

Parsing = Literal["official", "lenient"]
Aggregation = Literal["official", "bucket"]
PARSING_MODES: tuple[Parsing, ...] = ("official", "lenient")
AGGREGATION_MODES: tuple[Aggregation, ...] = ("official", "bucket")
COLUMNS = ("CVS acc", "NAP acc", "SA acc", "STG mIoU", "TAG mIoU@0.3", "TAG mIoU@0.5", "DVC F1", "DVC llm",
           "VS llm", "RC llm")  # fmt: skip
# Reported beside the table with parsing="official": the evaluator's own accuracies, not on the leaderboard.
EXTRA_COLUMNS = ("CVS bucket acc", "SA level acc")
THRESHOLDS = (0.3, 0.5, 0.7)

Row = tuple[str, float, Any]  # (dataset, fps, item); item None = a record without a score (still counted)
Reducer = Callable[[list[Any]], float | None]


@dataclass(frozen=True)
class Pooling:
    """How a column's per-record items become one number.

    Attributes:
        by: group records by "all" (one pool), "dataset" or "bucket" (dataset, fps).
        weight: combine group values by an unweighted mean ("groups") or weighted by the group's record count.
        empty: value of a group with no scored record; None leaves the group out.
    """

    by: Literal["all", "dataset", "bucket"]
    weight: Literal["groups", "records"] = "groups"
    empty: float | None = None


# The leaderboard pools TAL, STG, NAP and captions over all records (its per-(dataset, fps) TAL means are re-weighted
# by their counts), weights per-dataset DVC means by each dataset's DVC record count (records without an F1 included),
# and averages the per-dataset CVS component / SA aspect balanced accuracies.
OFFICIAL_POOLING: dict[str, Pooling] = {
    **{c: Pooling("all") for c in ("NAP acc", "STG mIoU", "TAG mIoU@0.3", "TAG mIoU@0.5", "VS llm", "RC llm")},
    **{c: Pooling("all") for c in EXTRA_COLUMNS},  # pooled, as MedGRPO-Code@f098b64 evaluate_all_final.py does
    "DVC F1": Pooling("dataset", "records", 0.0),
    "DVC llm": Pooling("dataset", "records", 0.0),
    "CVS acc": Pooling("dataset", empty=0.0),
    "SA acc": Pooling("dataset", empty=0.0),
}
BUCKET_POOLING = Pooling("bucket")


def check_modes(parsing: str, aggregation: str) -> None:
    """ValueError naming a bad `parsing` / `aggregation` and the allowed values."""
    if parsing not in PARSING_MODES:
        raise ValueError(f"parsing={parsing!r} is not supported; allowed: {list(PARSING_MODES)}")
    if aggregation not in AGGREGATION_MODES:
        raise ValueError(f"aggregation={aggregation!r} is not supported; allowed: {list(AGGREGATION_MODES)}")


def is_scored(item: Any) -> bool:
    """Whether a row's item holds a score: a finite number, a non-empty list of pairs, or a pairs mapping."""
    if isinstance(item, (list, Mapping)):
        return bool(item)
    return item is not None and math.isfinite(item)


def mean_item(items: list[Any]) -> float | None:
    """Mean of the finite float items; None if there are none."""
    values = [float(v) for v in items if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def balanced_accuracy(items: list[Any]) -> float | None:
    """Mean over classes of the class accuracy, items being lists of (class, correct); None without any pair."""
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for pairs in items:
        for name, correct in pairs or ():
            totals[name][0] += int(correct)
            totals[name][1] += 1
    return sum(c / n for c, n in totals.values()) / len(totals) if totals else None


def pool(rows: Sequence[Row], reduce: Reducer, rule: Pooling) -> tuple[float, dict[str, float]]:
    """(column value, {group: value}) of rows under `rule`; NaN when no group has a value."""
    groups: dict[str, list[Any]] = defaultdict(list)
    for dataset, fps, item in rows:
        key = {"all": "all", "dataset": dataset, "bucket": f"{dataset}@{float(fps):g}"}[rule.by]
        groups[key].append(item)
    values: dict[str, float] = {}
    weights: dict[str, int] = {}
    for key, items in sorted(groups.items()):
        value = reduce(items)
        value = rule.empty if value is None or not math.isfinite(value) else value
        if value is not None:
            values[key], weights[key] = value, len(items) if rule.weight == "records" else 1
    total = sum(weights.values())
    return (sum(values[k] * weights[k] for k in values) / total if total else math.nan), values


def score_records(
    records: Sequence[Mapping[str, Any]],
    parsing: Parsing,
    similarity: SentenceSimilarity | None,
    judge: MedicalCaptionJudge | None,
) -> dict[str, tuple[list[Row], Reducer]]:
    """Per column (COLUMNS, plus EXTRA_COLUMNS when official) the per-record rows and the reducer of a group."""
    by_task: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for record in records:
        by_task[record["task"]].append(record)
    out: dict[str, list[Row]] = defaultdict(list)
    official = parsing == "official"
    (_official_rows if official else _lenient_rows)(by_task, out)
    _nap_rows(by_task.get("nap", []), out, similarity)
    _caption_rows(by_task, out, similarity, judge)
    reducers: dict[str, Reducer] = dict.fromkeys((*COLUMNS, *EXTRA_COLUMNS), mean_item)
    if official:
        reducers["CVS acc"] = reducers["SA acc"] = balanced_accuracy
    reducers["DVC llm"] = _dvc_llm_reducer(similarity, judge)
    columns = COLUMNS + (EXTRA_COLUMNS if official else ())
    return {c: (out.get(c, []), reducers[c]) for c in columns}


def _key(record: Mapping[str, Any]) -> tuple[str, float]:
    return str(record["dataset"]), float(record.get("fps", math.nan))


def _first(struc_info: Any) -> Mapping[str, Any]:
    item = struc_info[0] if isinstance(struc_info, list) and struc_info else struc_info
    return item if isinstance(item, Mapping) else {}


def _numeric(key: Any) -> bool:
    try:
        return math.isfinite(float(key))
    except (TypeError, ValueError):
        return False


def official_truth(task: str, answer: Any, struc_info: Any) -> Any:
    """Ground truth the evaluator reads from struc_info; records without it fall back to the official parse of the
    answer text [Our decision: the leaderboard's ground truth always has struc_info].

    tal: [(start, end)] from items' "spans"; stg: {time key: box} from "bbox_dict" (or the first item itself);
    dvc: [(start, end, caption)] from segment dicts (also [[...]] and [{"dc_segments": [...]}]); cvs: components
    from "cvs_scores".
    """
    text = answer if isinstance(answer, str) else None
    if task == "tal":
        items = struc_info if isinstance(struc_info, list) else []
        spans = [
            (float(s["start"]), float(s["end"])) for i in items if isinstance(i, Mapping) for s in i.get("spans", [])
        ]
        return spans or O.parse_tal(text)
    if task == "stg":
        boxes = _first(struc_info).get("bbox_dict", _first(struc_info))
        truth = {str(k): v for k, v in boxes.items() if _numeric(k)} if isinstance(boxes, Mapping) else {}
        parsed = O.parse_stg(text)
        return truth or (parsed if isinstance(parsed, dict) else {})
    if task == "dvc":
        return _dvc_events(struc_info) or O.parse_dvc(text)
    if task == "cvs":
        scores = _first(struc_info).get("cvs_scores")
        truth = {k: v for k, v in scores.items() if k in O.CVS_KEYS} if isinstance(scores, Mapping) else {}
        return truth or O.parse_cvs(text)
    raise ValueError(f"official_truth handles 'tal', 'stg', 'dvc', 'cvs', got {task!r}")


def _dvc_events(struc_info: Any) -> list[O.Event]:
    segments = struc_info
    if isinstance(struc_info, list) and struc_info and isinstance(struc_info[0], list):
        segments = struc_info[0]
    elif isinstance(_first(struc_info).get("dc_segments"), list):
        segments = _first(struc_info)["dc_segments"]
    if not isinstance(segments, list):
        return []
    keys = {"start", "end", "caption"}
    return [(float(g["start"]), float(g["end"]), str(g["caption"])) for g in segments
            if isinstance(g, Mapping) and keys <= g.keys()]  # fmt: skip


def _official_rows(by_task: Mapping[str, list[Mapping[str, Any]]], out: dict[str, list[Row]]) -> None:
    for r in by_task.get("tal", []):
        spans = official_truth("tal", r.get("answer"), r.get("struc_info"))
        s = O.tal_scores(O.parse_tal(r["prediction"]), spans, O.finite_fps(r.get("fps")), (0.3, 0.5))
        out["TAG mIoU@0.3"].append((*_key(r), s["miou@0.3"]))
        out["TAG mIoU@0.5"].append((*_key(r), s["miou@0.5"]))
    for r in by_task.get("stg", []):
        boxes = official_truth("stg", r.get("answer"), r.get("struc_info"))
        out["STG mIoU"].append((*_key(r), O.stg_iou(O.parse_stg(r["prediction"]), boxes)))
    for r in by_task.get("dvc", []):
        events = official_truth("dvc", r.get("answer"), r.get("struc_info"))
        predicted = O.parse_dvc(r["prediction"])
        f1 = O.dvc_f1(predicted, [(s, e) for s, e, _ in events], O.finite_fps(r.get("fps")), THRESHOLDS)
        out["DVC F1"].append((*_key(r), f1))
        pairs = {t: O.caption_pairs(predicted, events, t) for t in THRESHOLDS} if predicted and events else None
        out["DVC llm"].append((*_key(r), pairs))
    for r in by_task.get("cvs", []):
        components = official_truth("cvs", r.get("answer"), r.get("struc_info"))
        named = O.parse_cvs(r["prediction"])
        out["CVS acc"].append((*_key(r), O.cvs_items(named, components)))
        out["CVS bucket acc"].append((*_key(r), float(O.cvs_bucket_correct(named, components))))
    for r in by_task.get("sa", []):
        level, aspects = official_skill(r["prediction"], r.get("answer"), r.get("struc_info"))
        out["SA acc"].append((*_key(r), aspects))
        out["SA level acc"].append((*_key(r), None if level is None else float(level)))


def official_skill(prediction: str, answer: Any, struc_info: Any) -> tuple[bool | None, list[tuple[str, bool]] | None]:
    """(level correct, [(aspect, exact match)]) of an SA record; (None, None) when the evaluator skips it: the
    prediction has no `k/5` or the GT level is unknown (struc_info `skill_level`, else the answer's ratings)."""
    info = _first(struc_info)
    level = O.skill_level(prediction)
    code = info.get("skill_level")
    truth = (O.skill_code_level(str(code)) if code else None) or O.skill_level(
        answer if isinstance(answer, str) else None
    )
    if level is None or truth is None:
        return None, None
    scores = info.get("skill_scores")
    gt = (
        scores
        if isinstance(scores, Mapping) and scores
        else O.skill_aspects(answer if isinstance(answer, str) else None)
    )
    pred = O.skill_aspects(prediction)
    return level == truth, [(name, pred[name] == value) for name, value in gt.items() if name in pred]


def _lenient_rows(by_task: Mapping[str, list[Mapping[str, Any]]], out: dict[str, list[Row]]) -> None:
    for r in by_task.get("tal", []):
        gt = gt_segments(r.get("answer"), r.get("struc_info"))
        if gt is not None:
            s = M.tal_scores(P.parse_segments(r["prediction"]), gt, thresholds=(0.3, 0.5))
            out["TAG mIoU@0.3"].append((*_key(r), s["miou@0.3"]))
            out["TAG mIoU@0.5"].append((*_key(r), s["miou@0.5"]))
    for r in by_task.get("stg", []):
        boxes = gt_boxes(r.get("answer"), r.get("struc_info"))
        out["STG mIoU"].append((*_key(r), M.stg_mean_iou(P.parse_stg(r["prediction"]), boxes) if boxes else None))
    for r in by_task.get("dvc", []):
        truth, predicted = P.parse_dvc(r.get("answer")), P.parse_dvc(r["prediction"])
        if truth:
            flat = M.flatten_events(predicted or [])
            f1 = M.dvc_f1([(s, e) for s, e, _ in flat], [(s, e) for s, e, _ in truth])["f1"]
            out["DVC F1"].append((*_key(r), f1))
            pairs = {t: M.dvc_caption_pairs(flat, truth, t) for t in THRESHOLDS} if predicted else None
            out["DVC llm"].append((*_key(r), pairs))
    for r in by_task.get("cvs", []):
        correct = M.cvs_correct(r["prediction"], r.get("answer"))
        out["CVS acc"].append((*_key(r), None if correct is None else float(correct)))
    for r in by_task.get("sa", []):
        level = _first(r.get("struc_info")).get("skill_level")
        correct = M.sa_correct(r["prediction"], r.get("answer"), level)
        out["SA acc"].append((*_key(r), None if correct is None else float(correct)))


def _nap_rows(records: Sequence[Mapping[str, Any]], out: dict[str, list[Row]], sim: SentenceSimilarity | None) -> None:
    classes: dict[str, list[str]] = defaultdict(list)  # the known classes of a dataset: its ground-truth labels
    for r in records:
        if isinstance(r.get("answer"), str) and r["answer"] not in classes[r["dataset"]]:
            classes[r["dataset"]].append(r["answer"])
    for r in records:
        if sim is not None and isinstance(r.get("answer"), str):
            label = M.nearest_class(r["prediction"], classes[r["dataset"]], sim.matrix)
            out["NAP acc"].append((*_key(r), float(label == r["answer"])))


def _caption_rows(
    by_task: Mapping[str, list[Mapping[str, Any]]],
    out: dict[str, list[Row]],
    sim: SentenceSimilarity | None,
    judge: MedicalCaptionJudge | None,
) -> None:
    for task, column in (("vs", "VS llm"), ("rc", "RC llm")):
        records = [r for r in by_task.get(task, []) if isinstance(r.get("answer"), str)]
        if not records:
            continue
        preds, refs = [r["prediction"] for r in records], [r["answer"] for r in records]
        if judge is not None:
            values = [float(v) for v in judge.judge(preds, refs).scores]  # failures (NaN) are excluded
        else:
            assert sim is not None
            values = [min(1.0, max(0.0, v)) for v in sim.pairwise(preds, refs)]
        out[column].extend((*_key(r), v) for r, v in zip(records, values, strict=True))


def _dvc_llm_reducer(sim: SentenceSimilarity | None, judge: MedicalCaptionJudge | None) -> Reducer:
    """A group's DVC caption score: per θ judge the group's pooled pairs, aggregate the five aspect means (aspects
    at 0 ignored); the mean over θ with a non-zero score; None if no θ has one."""

    def reduce(items: list[Any]) -> float | None:
        per_theta: dict[float, list[tuple[str, str]]] = defaultdict(list)
        for item in items:
            for theta, pairs in (item or {}).items():
                per_theta[theta].extend(pairs)
        scores = []
        for pairs in per_theta.values():
            if not pairs:
                continue
            preds, refs = [p for p, _ in pairs], [g for _, g in pairs]
            if judge is not None:
                score = aggregate_rubrics(judge.judge(preds, refs).ratings)
            else:
                assert sim is not None
                score = sum(min(1.0, max(0.0, v)) for v in sim.pairwise(preds, refs)) / len(preds)
            if math.isfinite(score) and score != 0:
                scores.append(score)
        return sum(scores) / len(scores) if scores else None

    return reduce
