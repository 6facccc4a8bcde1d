"""MedVidBench results table (the MedGRPO project page layout, spec docs/methods/medgrpo.md §8) from predictions or a
policy.

Columns: CVS acc, NAP acc, SA acc, STG mIoU, TAG mIoU@0.3/@0.5, DVC F1, DVC llm, VS llm, RC llm. By default scored
and pooled as the MedVidBench leaderboard does (`parsing="official"`, `aggregation="official"`, see
`rewards.video.leaderboard`); `parsing="lenient"` / `aggregation="bucket"` give the tolerant parsers and the
(dataset, fps) macro average. Without a judge the llm columns fall back to MiniLM cosine similarity (0–1 scale, the
leaderboard's no-API-key fallback) and say so. `MedVidEvaluator` is the `eval.evaluator` hook: it samples greedy
answers from the policy and scores them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rewards.judges.medical import MedicalCaptionJudge
from rewards.video import leaderboard as L
from rewards.video.leaderboard import COLUMNS, EXTRA_COLUMNS, Aggregation, Parsing
from rewards.video.rl import build_judge, build_similarity
from rewards.video.similarity import SentenceSimilarity
from toolkit.io.atomic import write_json_atomic

__all__ = ["COLUMNS", "EXTRA_COLUMNS", "MedVidEvaluator", "MedVidResults", "evaluate_predictions"]


@dataclass
class MedVidResults:
    """The results table: `columns`, their per-group values `buckets` (groups of the aggregation: "all", datasets or
    "dataset@fps"), scored-record `counts`, caption `scorer`, the modes, and `extras` (EXTRA_COLUMNS, official only)."""

    columns: dict[str, float]
    buckets: dict[str, dict[str, float]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    scorer: str = "llm"
    parsing: str = "official"
    aggregation: str = "official"
    extras: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        def clean(values: Mapping[str, float]) -> dict[str, float | None]:
            return {k: (v if math.isfinite(v) else None) for k, v in values.items()}

        return {"columns": clean(self.columns), "buckets": self.buckets, "counts": self.counts,
                "caption_scorer": self.scorer, "parsing": self.parsing, "aggregation": self.aggregation,
                "extras": clean(self.extras)}  # fmt: skip

    def table(self) -> str:
        from rich.console import Console
        from rich.table import Table

        title = f"MedVidBench results (parsing {self.parsing}, aggregation {self.aggregation})"
        title += "" if self.scorer == "llm" else " (llm columns: similarity fallback)"
        table = Table(title=title)
        for column in COLUMNS:
            table.add_column(column, justify="right")
        table.add_row(*(_cell(self.columns.get(c, math.nan)) for c in COLUMNS))
        table.add_row(*(f"n={self.counts.get(c, 0)}" for c in COLUMNS))
        console = Console(record=True, width=200)
        with console.capture() as capture:
            console.print(table)
            if self.extras:
                console.print("  ".join(f"{k}: {_cell(v)} (n={self.counts.get(k, 0)})" for k, v in self.extras.items()))
        return capture.get()


def _cell(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def evaluate_predictions(
    records: Sequence[Mapping[str, Any]],
    similarity: SentenceSimilarity | str = "minilm",
    judge: MedicalCaptionJudge | Mapping[str, Any] | None = None,
    parsing: Parsing = "official",
    aggregation: Aggregation = "official",
) -> MedVidResults:
    """Score normalized prediction records (see `percentiles.load_predictions`) into the results table.

    Args:
        parsing: "official" (the leaderboard evaluator's parsers and failure handling) or "lenient" (ours).
        aggregation: "official" (pooled as the leaderboard publishes each column) or "bucket" (unweighted mean over
            (dataset, fps) buckets).
    """
    L.check_modes(parsing, aggregation)
    judge_model = build_judge(judge)
    needs_sim = any(r["task"] == "nap" for r in records) or judge_model is None
    sim = build_similarity(similarity) if needs_sim else None
    scored = L.score_records(records, parsing, sim, judge_model)
    values, buckets, counts = {}, {}, {}
    for column, (rows, reduce) in scored.items():
        rule = L.OFFICIAL_POOLING[column] if aggregation == "official" else L.BUCKET_POOLING
        values[column], buckets[column] = L.pool(rows, reduce, rule)
        counts[column] = sum(L.is_scored(item) for _, _, item in rows)
    columns = {c: values[c] for c in COLUMNS}
    extras = {c: values[c] for c in EXTRA_COLUMNS if c in values}
    scorer = "llm" if judge_model is not None else "similarity"
    return MedVidResults(columns, buckets, counts, scorer, parsing, aggregation, extras)


class MedVidEvaluator:
    """`eval.evaluator` hook: greedy answers for `num_prompts` rows of the eval data, then the results table.

    Args:
        num_prompts: rows to answer (None = one pass of `batch_size` batches until the data's length).
        batch_size: prompts per sampler call.
        seed: generator seed for the data order and sampling.
        similarity: "minilm", "hashing" or a SentenceSimilarity.
        judge: MedicalCaptionJudge or its config mapping; None = similarity fallback for the llm columns.
        parsing / aggregation: as in `evaluate_predictions` (default: the leaderboard's "official" for both).
    """

    def __init__(
        self,
        num_prompts: int | None = None,
        batch_size: int = 8,
        seed: int = 1234,
        similarity: SentenceSimilarity | str = "minilm",
        judge: MedicalCaptionJudge | Mapping[str, Any] | None = None,
        parsing: Parsing = "official",
        aggregation: Aggregation = "official",
    ) -> None:
        L.check_modes(parsing, aggregation)
        if batch_size < 1 or (num_prompts is not None and num_prompts < 1):
            raise ValueError(f"batch_size and num_prompts must be >= 1, got {batch_size}, {num_prompts}")
        self.num_prompts, self.batch_size, self.seed = num_prompts, batch_size, seed
        self.similarity, self.judge = similarity, judge
        self.parsing, self.aggregation = parsing, aggregation

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
        results = evaluate_predictions(records, self.similarity, self.judge, self.parsing, self.aggregation)
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
