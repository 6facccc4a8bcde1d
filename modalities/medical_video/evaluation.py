"""MedVidBench results table (the MedGRPO project page layout, spec docs/methods/medgrpo.md §8) from predictions or a
policy.

Columns: CVS acc, NAP acc, SA acc, STG mIoU, TAG mIoU@0.3/@0.5, DVC F1, DVC llm, VS llm, RC llm; each the macro
average over (dataset, fps) buckets of the leaderboard metric (`rewards.video.metrics`). Without a judge the
llm columns fall back to MiniLM cosine similarity (0–1 scale, the leaderboard's no-API-key fallback) and say so.
`MedVidEvaluator` is the `eval.evaluator` hook: it samples greedy answers from the policy and scores them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rewards.judges.medical import MedicalCaptionJudge, aggregate_rubrics
from rewards.video import metrics as M
from rewards.video import parsers as P
from rewards.video.rl import build_judge, build_similarity, gt_boxes, gt_segments
from rewards.video.similarity import SentenceSimilarity
from toolkit.io.atomic import write_json_atomic

COLUMNS = ("CVS acc", "NAP acc", "SA acc", "STG mIoU", "TAG mIoU@0.3", "TAG mIoU@0.5", "DVC F1", "DVC llm",
           "VS llm", "RC llm")  # fmt: skip
Row = tuple[str, float, float]  # (dataset, fps, value)


@dataclass
class MedVidResults:
    """The results table: `columns` (macro averages), `buckets` per column, sample `counts`, caption `scorer`."""

    columns: dict[str, float]
    buckets: dict[str, dict[str, float]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    scorer: str = "llm"

    def to_json(self) -> dict[str, Any]:
        clean = {k: (v if math.isfinite(v) else None) for k, v in self.columns.items()}
        return {"columns": clean, "buckets": self.buckets, "counts": self.counts, "caption_scorer": self.scorer}

    def table(self) -> str:
        from rich.console import Console
        from rich.table import Table

        title = "MedVidBench results" + ("" if self.scorer == "llm" else " (llm columns: similarity fallback)")
        table = Table(title=title)
        for column in COLUMNS:
            table.add_column(column, justify="right")
        table.add_row(*(_cell(self.columns.get(c, math.nan), c) for c in COLUMNS))
        table.add_row(*(f"n={self.counts.get(c, 0)}" for c in COLUMNS))
        console = Console(record=True, width=200)
        with console.capture() as capture:
            console.print(table)
        return capture.get()


def _cell(value: float, column: str) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.3f}"


def evaluate_predictions(
    records: Sequence[Mapping[str, Any]],
    similarity: SentenceSimilarity | str = "minilm",
    judge: MedicalCaptionJudge | Mapping[str, Any] | None = None,
) -> MedVidResults:
    """Score normalized prediction records (see `percentiles.load_predictions`) into the results table."""
    per_column: dict[str, list[Row]] = defaultdict(list)
    by_task: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for record in records:
        by_task[record["task"]].append(record)
    sim = build_similarity(similarity) if by_task.get("nap") or judge is None else None
    _classification(by_task, per_column, sim)
    _localization(by_task, per_column)
    _captions(by_task, per_column, sim, build_judge(judge))
    columns, buckets, counts = {}, {}, {}
    for column in COLUMNS:
        rows = per_column.get(column, [])
        columns[column], buckets[column] = M.macro_average(rows)
        counts[column] = sum(not math.isnan(v) for _, _, v in rows)
    return MedVidResults(columns, buckets, counts, scorer="llm" if judge is not None else "similarity")


def _bucket(record: Mapping[str, Any]) -> tuple[str, float]:
    return str(record["dataset"]), float(record.get("fps", math.nan))


def _classification(
    by_task: Mapping[str, list[Mapping[str, Any]]], out: dict[str, list[Row]], sim: SentenceSimilarity | None
) -> None:
    for r in by_task.get("cvs", []):
        correct = M.cvs_correct(r["prediction"], r.get("answer"))
        if correct is not None:
            out["CVS acc"].append((*_bucket(r), float(correct)))
    for r in by_task.get("sa", []):
        info = r.get("struc_info")
        info = info[0] if isinstance(info, list) and info else info
        level = info.get("skill_level") if isinstance(info, Mapping) else None
        correct = M.sa_correct(r["prediction"], r.get("answer"), level)
        if correct is not None:
            out["SA acc"].append((*_bucket(r), float(correct)))
    classes: dict[str, list[str]] = defaultdict(list)
    for r in by_task.get("nap", []):  # the known classes of a dataset: its ground-truth labels
        if isinstance(r.get("answer"), str) and r["answer"] not in classes[r["dataset"]]:
            classes[r["dataset"]].append(r["answer"])
    for r in by_task.get("nap", []):
        if sim is not None and isinstance(r.get("answer"), str):
            label = M.nearest_class(r["prediction"], classes[r["dataset"]], sim.matrix)
            out["NAP acc"].append((*_bucket(r), float(label == r["answer"])))


def _localization(by_task: Mapping[str, list[Mapping[str, Any]]], out: dict[str, list[Row]]) -> None:
    for r in by_task.get("tal", []):
        gt = gt_segments(r.get("answer"), r.get("struc_info"))
        if gt is not None:
            scores = M.tal_scores(P.parse_segments(r["prediction"]), gt, thresholds=(0.3, 0.5))
            out["TAG mIoU@0.3"].append((*_bucket(r), scores["miou@0.3"]))
            out["TAG mIoU@0.5"].append((*_bucket(r), scores["miou@0.5"]))
    for r in by_task.get("stg", []):
        boxes = gt_boxes(r.get("answer"), r.get("struc_info"))
        iou = M.stg_mean_iou(P.parse_stg(r["prediction"]), boxes) if boxes else None
        if iou is not None:  # the evaluator skips samples with no valid box pair
            out["STG mIoU"].append((*_bucket(r), iou))
    for r in by_task.get("dvc", []):
        gt_events = P.parse_dvc(r.get("answer"))
        if gt_events:
            pred = [(s, e) for s, e, _ in M.flatten_events(P.parse_dvc(r["prediction"]) or [])]
            out["DVC F1"].append((*_bucket(r), M.dvc_f1(pred, [(s, e) for s, e, _ in gt_events])["f1"]))


def _captions(
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
        out[column].extend((*_bucket(r), v) for r, v in zip(records, values, strict=True))
    _dvc_captions(by_task.get("dvc", []), out, sim, judge)


def _dvc_captions(
    records: Sequence[Mapping[str, Any]],
    out: dict[str, list[Row]],
    sim: SentenceSimilarity | None,
    judge: MedicalCaptionJudge | None,
) -> None:
    """DVC llm per (dataset, fps) bucket: per θ, judge each prediction's best GT with IoU >= θ; aggregate the
    five aspect means (aspects at 0 ignored); the bucket's score is the mean over θ with a nonzero score."""
    pairs: dict[tuple[str, float], dict[float, list[tuple[str, str]]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        gt, pred = P.parse_dvc(r.get("answer")), P.parse_dvc(r["prediction"])
        if gt and pred:
            for theta in M.DEFAULT_DVC_THRESHOLDS:
                pairs[_bucket(r)][theta].extend(M.dvc_caption_pairs(M.flatten_events(pred), gt, theta))
    for bucket, per_theta in pairs.items():
        scores = []
        for theta_pairs in per_theta.values():
            if not theta_pairs:
                continue
            preds, refs = [p for p, _ in theta_pairs], [g for _, g in theta_pairs]
            if judge is not None:
                score = aggregate_rubrics(judge.judge(preds, refs).ratings)
            else:
                assert sim is not None
                score = sum(min(1.0, max(0.0, v)) for v in sim.pairwise(preds, refs)) / len(preds)
            if not math.isnan(score) and score != 0:
                scores.append(score)
        if scores:
            out["DVC llm"].append((*bucket, sum(scores) / len(scores)))


class MedVidEvaluator:
    """`eval.evaluator` hook: greedy answers for `num_prompts` rows of the eval data, then the results table.

    Args:
        num_prompts: rows to answer (None = one pass of `batch_size` batches until the data's length).
        batch_size: prompts per sampler call.
        seed: generator seed for the data order and sampling.
        similarity: "minilm", "hashing" or a SentenceSimilarity.
        judge: MedicalCaptionJudge or its config mapping; None = similarity fallback for the llm columns.
    """

    def __init__(
        self,
        num_prompts: int | None = None,
        batch_size: int = 8,
        seed: int = 1234,
        similarity: SentenceSimilarity | str = "minilm",
        judge: MedicalCaptionJudge | Mapping[str, Any] | None = None,
    ) -> None:
        if batch_size < 1 or (num_prompts is not None and num_prompts < 1):
            raise ValueError(f"batch_size and num_prompts must be >= 1, got {batch_size}, {num_prompts}")
        self.num_prompts, self.batch_size, self.seed = num_prompts, batch_size, seed
        self.similarity, self.judge = similarity, judge

    def __call__(
        self,
        policy: Any,
        sampler: Any,
        rewards: Any = None,
        data: Any = None,
        checkpoint: Any = None,
        output: Any = None,
    ) -> MedVidResults:
        records = self.predict(policy, sampler, data)
        results = evaluate_predictions(records, self.similarity, self.judge)
        if output:
            write_json_atomic(output, {**results.to_json(), "predictions": records})
        return results

    def predict(self, policy: Any, sampler: Any, data: Any) -> list[dict[str, Any]]:
        """Prediction records (dataset, task, answer, prediction, struc_info, fps, id) from the policy.

        Decoding follows the sampler's settings (the leaderboard decodes greedily: give the eval sampler
        temperature 0 or its greedy option).
        """
        from rich.progress import Progress

        total = self.num_prompts or len(data)
        generator = torch.Generator().manual_seed(self.seed)
        batches = data.batches(self.batch_size, generator)
        records: list[dict[str, Any]] = []
        module = getattr(policy, "module", None)
        if module is not None:
            module.eval()
        with Progress(transient=True) as bar, torch.no_grad():
            task = bar.add_task("answering", total=total)
            seen = 0  # prompts consumed; a sampler may skip rows whose video fails to load
            while seen < total:
                prompts = next(batches)[: total - seen]
                seen += len(prompts)
                rollout = sampler.sample(policy, prompts, 1, generator)
                completions = rollout.completions or [""] * len(rollout)
                for row, text in zip(rollout.prompts or prompts, completions, strict=True):
                    records.append(_record(row, text))
                bar.advance(task, len(prompts))
        return records


def _record(row: Mapping[str, Any], prediction: str) -> dict[str, Any]:
    fps = row.get("fps")
    return {
        "dataset": str(row.get("dataset", "unknown")),
        "task": str(row.get("task")),
        "answer": row.get("answer"),
        "prediction": str(prediction or ""),
        "struc_info": row.get("struc_info"),
        "fps": float(fps) if fps is not None else math.nan,
        "id": str(row.get("id", "")),
        "prompt": row.get("prompt", ""),
    }
