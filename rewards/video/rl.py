"""MedGRPO RL rewards (arXiv:2512.06581, spec docs/methods/medgrpo.md §2 "RL rewards"), separate from the leaderboard
metrics.

Each returns the RAW task metric x in [0, 1]; the cross-dataset logistic normalization (toolkit LogisticDatasetNorm)
runs afterwards as a reward transform. Localisation: x = 1[answer parses] × IoU [Our decision on the exact form].
Captions: x = 0.5 · clip01(cosine(MiniLM)) + 0.5 · (judge − 1) / 4 [Our decision on the normalization].
`MedVidReward` dispatches per row on the task; x is NaN where not applicable (the core gives such rows advantage 0).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from rewards.base import RewardOutput
from rewards.judges.medical import MedicalCaptionJudge
from rewards.video import metrics as M
from rewards.video import parsers as P
from rewards.video.similarity import HashingSimilarity, MiniLMSimilarity, SentenceSimilarity
from rewards.video.tasks import TASKS, normalize_task

JudgeFailure = Literal["exclude", "group_mean", "similarity_only"]
_JUDGE_FAILURES = ("exclude", "group_mean", "similarity_only")


def caption_reward(similarity: float, judge: float, similarity_weight: float = 0.5, judge_weight: float = 0.5) -> float:
    """Hybrid caption reward x = w_s · clip(similarity, 0, 1) + w_j · (judge − 1) / 4 (M5: 0.82, 2.0 -> 0.535)."""
    return similarity_weight * min(1.0, max(0.0, similarity)) + judge_weight * (judge - 1.0) / 4.0


def build_similarity(similarity: SentenceSimilarity | str) -> SentenceSimilarity:
    """A SentenceSimilarity from an object or a name: "minilm" (MiniLMSimilarity) or "hashing" (HashingSimilarity)."""
    if isinstance(similarity, str):
        if similarity == "minilm":
            return MiniLMSimilarity()
        if similarity == "hashing":
            return HashingSimilarity()
        raise ValueError(f"similarity={similarity!r} is not supported; allowed: 'minilm', 'hashing' or an object")
    if not callable(getattr(similarity, "pairwise", None)):
        raise ValueError(f"similarity {type(similarity).__name__} has no pairwise(a, b) method")
    return similarity


def build_judge(judge: MedicalCaptionJudge | Mapping[str, Any] | None) -> MedicalCaptionJudge | None:
    """None, a MedicalCaptionJudge, or its keyword arguments (a mapping `client` is built by from_config)."""
    if judge is None or isinstance(judge, MedicalCaptionJudge):
        return judge
    if isinstance(judge, Mapping):
        return MedicalCaptionJudge.from_config(judge)
    raise ValueError(f"judge must be a MedicalCaptionJudge, its config mapping or None, got {type(judge).__name__}")


def gt_segments(answer: Any, struc_info: Any = None) -> list[P.Segment] | None:
    """Ground-truth TAL spans: struc_info spans ({"spans": [{start, end}]} or a list of such) else the answer text."""
    items = struc_info if isinstance(struc_info, list) else [struc_info]
    spans = [
        (float(s["start"]), float(s["end"]))
        for item in items
        if isinstance(item, Mapping)
        for s in item.get("spans", [])
        if isinstance(s, Mapping) and "start" in s and "end" in s
    ]
    return spans or P.parse_segments(answer if isinstance(answer, str) else None)


def gt_boxes(answer: Any, struc_info: Any = None) -> dict[str, P.Box] | None:
    """Ground-truth STG boxes {timestamp: box}: struc_info (bbox_dict or a plain dict) else the answer text."""
    item = struc_info[0] if isinstance(struc_info, list) and struc_info else struc_info
    if isinstance(item, Mapping):
        boxes = item.get("bbox_dict", item)
        if boxes and all(isinstance(v, (list, tuple)) and len(v) == 4 for v in boxes.values()):
            return {P.format_time_key(k): [float(c) for c in v] for k, v in boxes.items()}
    parsed = P.parse_stg(answer if isinstance(answer, str) else None)
    return parsed if isinstance(parsed, dict) else None


def localization_metric(task: str, prediction: str, answer: Any, struc_info: Any = None) -> tuple[float, float, float]:
    """(x, format_ok, iou) for a TAL/TAG or STG row; x is NaN when the ground truth does not parse."""
    if task == "tal":
        gt = gt_segments(answer, struc_info)
        pred = P.parse_segments(prediction)
        if gt is None:
            return math.nan, float(pred is not None), math.nan
        iou = M.mean_best_iou(pred, gt) if pred is not None else 0.0
    elif task == "stg":
        gt_box = gt_boxes(answer, struc_info)
        pred_box = P.parse_stg(prediction)
        if gt_box is None:
            return math.nan, float(pred_box is not None), math.nan
        iou = (M.stg_mean_iou(pred_box, gt_box) or 0.0) if pred_box is not None else 0.0
        pred = pred_box  # type: ignore[assignment]
    else:
        raise ValueError(f"localization_metric handles tasks 'tal' and 'stg', got {task!r}")
    ok = float(pred is not None)
    return ok * iou, ok, iou


def classification_metric(task: str, prediction: str, answer: Any, struc_info: Any = None) -> tuple[float, float]:
    """(x = 1 correct / 0 wrong, format_ok) for NAP (normalized exact match), SA (level) and CVS (bucket)."""
    if task == "nap":
        label = P.normalize_label(prediction)
        return float(bool(label) and label == P.normalize_label(answer)), float(bool(label))
    if task == "sa":
        info = struc_info[0] if isinstance(struc_info, list) and struc_info else struc_info
        level = info.get("skill_level") if isinstance(info, Mapping) else None
        correct = M.sa_correct(prediction, answer if isinstance(answer, str) else None, level)
        return (math.nan if correct is None else float(correct)), float(P.parse_skill_level(prediction) is not None)
    if task == "cvs":
        correct = M.cvs_correct(prediction, answer if isinstance(answer, str) else None)
        return (math.nan if correct is None else float(correct)), float(P.parse_cvs(prediction) is not None)
    raise ValueError(f"classification_metric handles 'nap', 'sa', 'cvs', got {task!r}")


def dvc_metric(prediction: str, answer: Any) -> tuple[float, float]:
    """(x = temporal F1 of the flattened events [Our decision for RL], format_ok) for a DVC row."""
    gt = P.parse_dvc(answer if isinstance(answer, str) else None)
    pred = P.parse_dvc(prediction)
    if gt is None:
        return math.nan, float(pred is not None)
    if pred is None:
        return 0.0, 0.0
    spans = [(s, e) for s, e, _ in M.flatten_events(pred)]
    return M.dvc_f1(spans, [(s, e) for s, e, _ in gt])["f1"], 1.0


class _Rows:
    """Per-row outputs of MedVidReward, filled task by task."""

    def __init__(self, n: int) -> None:
        self.x = [math.nan] * n
        self.format = [math.nan] * n
        self.iou = [math.nan] * n
        self.similarity = [math.nan] * n
        self.judge = [math.nan] * n


class MedVidReward:
    """MedGRPO raw task metric x per row, dispatched on metadata `task` (any qa_type spelling).

    Scores are x (NaN = not applicable: task not in `tasks`, unknown, or ground truth unparsable). Components
    (when `emit_components`): metric, format, iou, similarity, judge (raw 1–5). Leave `emit_components` False
    when the normalizer reads `rollout.scores` (the reward stage sums multi-component outputs into the
    scores); with it True, point LogisticDatasetNorm's `source` at "<reward name>/metric".

    Args:
        tasks: tasks scored (canonical names or qa_types); None = all eight.
        similarity: SentenceSimilarity object, "minilm" (all-MiniLM-L6-v2, offline package) or "hashing" (stub).
        judge: MedicalCaptionJudge (or its config mapping); None = captions use similarity only (the
            "VS+RC without judge" ablation).
        similarity_weight / judge_weight: the 0.5 / 0.5 hybrid weights.
        judge_failure: a row whose judge failed: "exclude" (x = NaN, so advantage 0 and out of the group's
            statistics; default), "group_mean" (x := mean x of the group's judged rows, group = metadata
            `group_key`, else same prompt and answer; NaN if none), "similarity_only" (x = clipped similarity).
        answer_key / task_key / struc_key / group_key: metadata names.
    """

    def __init__(
        self,
        tasks: Sequence[str] | None = None,
        similarity: SentenceSimilarity | str = "minilm",
        judge: MedicalCaptionJudge | Mapping[str, Any] | None = None,
        similarity_weight: float = 0.5,
        judge_weight: float = 0.5,
        judge_failure: JudgeFailure = "exclude",
        emit_components: bool = False,
        answer_key: str = "answer",
        task_key: str = "task",
        struc_key: str = "struc_info",
        group_key: str = "id",
    ) -> None:
        if judge_failure not in _JUDGE_FAILURES:
            raise ValueError(f"judge_failure={judge_failure!r} is not supported; allowed: {list(_JUDGE_FAILURES)}")
        if similarity_weight < 0 or judge_weight < 0:
            raise ValueError(f"weights must be >= 0, got {similarity_weight}, {judge_weight}")
        self.tasks = frozenset(normalize_task(t) for t in tasks) if tasks is not None else frozenset(TASKS)
        self._similarity_spec = similarity
        self._similarity: SentenceSimilarity | None = None
        self.judge = build_judge(judge)
        self.similarity_weight, self.judge_weight = similarity_weight, judge_weight
        self.judge_failure: JudgeFailure = judge_failure
        self.emit_components = emit_components
        self.answer_key, self.task_key, self.struc_key, self.group_key = answer_key, task_key, struc_key, group_key

    @property
    def similarity(self) -> SentenceSimilarity:
        """The similarity scorer, built on first use (MiniLM loads only when a caption row needs it)."""
        if self._similarity is None:
            self._similarity = build_similarity(self._similarity_spec)
        return self._similarity

    def __call__(self, prompts: Sequence[Any], samples: Sequence[Any], **metadata: Any) -> RewardOutput:
        n = len(samples)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts but {n} samples")
        if self.task_key not in metadata or self.answer_key not in metadata:
            raise ValueError(f"MedVidReward needs metadata {self.task_key!r} and {self.answer_key!r}")
        tasks = [self._task(t) for t in metadata[self.task_key]]
        answers = metadata[self.answer_key]
        struc = metadata.get(self.struc_key) or [None] * n
        rows, metrics = _Rows(n), {}
        captions = []
        for i, task in enumerate(tasks):
            text = str(samples[i] or "")
            if task in ("tal", "stg"):
                rows.x[i], rows.format[i], rows.iou[i] = localization_metric(task, text, answers[i], struc[i])
            elif task in ("nap", "sa", "cvs"):
                rows.x[i], rows.format[i] = classification_metric(task, text, answers[i], struc[i])
            elif task == "dvc":
                rows.x[i], rows.format[i] = dvc_metric(text, answers[i])
            elif task in ("vs", "rc"):
                captions.append(i)
        if captions:
            metrics.update(self._captions(captions, prompts, samples, answers, metadata, rows))
        metrics.update(_task_metrics(tasks, metadata.get("dataset"), rows))
        scores = torch.tensor(rows.x, dtype=torch.float32)
        components = {}
        if self.emit_components:
            names = ("metric", "format", "iou", "similarity", "judge")
            values = (rows.x, rows.format, rows.iou, rows.similarity, rows.judge)
            components = {k: torch.tensor(v, dtype=torch.float32) for k, v in zip(names, values, strict=True)}
        return RewardOutput(scores=scores, components=components, metrics=metrics)

    def _task(self, value: Any) -> str | None:
        try:
            task = normalize_task(str(value))
        except ValueError:
            return None
        return task if task in self.tasks else None

    def _captions(
        self,
        idx: list[int],
        prompts: Sequence[Any],
        samples: Sequence[Any],
        answers: Sequence[Any],
        metadata: Mapping[str, Any],
        rows: _Rows,
    ) -> dict[str, float]:
        preds = [str(samples[i] or "") for i in idx]
        refs = [str(answers[i] or "") for i in idx]
        sims = self.similarity.pairwise(preds, refs)
        metrics: dict[str, float] = {}
        judged = [math.nan] * len(idx)
        if self.judge is not None:
            result = self.judge.judge(preds, refs)
            judged = [float(v) for v in result.scores]
            metrics.update(result.metrics)
        for k, i in enumerate(idx):
            rows.format[i] = float(bool(preds[k].strip()))
            rows.similarity[i], rows.judge[i] = sims[k], judged[k]
            if self.judge is None:
                rows.x[i] = min(1.0, max(0.0, sims[k]))
            elif not math.isnan(judged[k]):
                rows.x[i] = caption_reward(sims[k], judged[k], self.similarity_weight, self.judge_weight)
            elif self.judge_failure == "similarity_only":
                rows.x[i] = min(1.0, max(0.0, sims[k]))
        if self.judge is not None and self.judge_failure == "group_mean":
            _fill_group_means(idx, [math.isnan(v) for v in judged], self._group_keys(prompts, answers, metadata), rows)
        return metrics

    def _group_keys(self, prompts: Sequence[Any], answers: Sequence[Any], metadata: Mapping[str, Any]) -> list[str]:
        ids = metadata.get(self.group_key)
        if ids is not None and all(v is not None for v in ids):
            return [str(v) for v in ids]
        return [f"{p!r}\x00{a!r}" for p, a in zip(prompts, answers, strict=True)]


def _fill_group_means(idx: list[int], failed: list[bool], keys: list[str], rows: _Rows) -> None:
    """Failed caption rows take the mean x of the judged caption rows with the same group key (NaN if none)."""
    valid: dict[str, list[float]] = defaultdict(list)
    for k, i in enumerate(idx):
        if not failed[k] and not math.isnan(rows.x[i]):
            valid[keys[i]].append(rows.x[i])
    for k, i in enumerate(idx):
        if failed[k]:
            values = valid.get(keys[i])
            rows.x[i] = sum(values) / len(values) if values else math.nan


def _task_metrics(tasks: Sequence[str | None], datasets: Sequence[Any] | None, rows: _Rows) -> dict[str, float]:
    """Per (dataset, task): mean raw metric and format-failure rate; rows not applicable counted."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, task in enumerate(tasks):
        if task is not None:
            dataset = datasets[i] if datasets is not None else "all"
            groups[f"{dataset}:{task}"].append(i)
    out = {"not_applicable": float(sum(math.isnan(v) for v in rows.x))}
    for key, members in groups.items():
        raw = [rows.x[i] for i in members if not math.isnan(rows.x[i])]
        fmt = [rows.format[i] for i in members if not math.isnan(rows.format[i])]
        out[f"{key}/raw"] = sum(raw) / len(raw) if raw else math.nan
        out[f"{key}/format_fail_rate"] = 1.0 - sum(fmt) / len(fmt) if fmt else math.nan
    return out


class LocalizationReward(MedVidReward):
    """x = 1[answer parses] × IoU for TAL/TAG and STG rows only (other tasks NaN)."""

    def __init__(self, emit_components: bool = False, answer_key: str = "answer", task_key: str = "task") -> None:
        super().__init__(tasks=("tal", "stg"), similarity="hashing", emit_components=emit_components,
                         answer_key=answer_key, task_key=task_key)  # fmt: skip


class CaptionReward(MedVidReward):
    """Hybrid x = 0.5 · similarity + 0.5 · (judge − 1)/4 for VS and RC rows only (other tasks NaN)."""

    def __init__(
        self,
        similarity: SentenceSimilarity | str = "minilm",
        judge: MedicalCaptionJudge | Mapping[str, Any] | None = None,
        similarity_weight: float = 0.5,
        judge_weight: float = 0.5,
        judge_failure: JudgeFailure = "exclude",
        emit_components: bool = False,
        answer_key: str = "answer",
        task_key: str = "task",
    ) -> None:
        super().__init__(
            tasks=("vs", "rc"),
            similarity=similarity,
            judge=judge,
            similarity_weight=similarity_weight,
            judge_weight=judge_weight,
            judge_failure=judge_failure,
            emit_components=emit_components,
            answer_key=answer_key,
            task_key=task_key,
        )
