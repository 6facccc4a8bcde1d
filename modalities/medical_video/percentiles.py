"""MedGRPO percentile table from SFT-model predictions (spec docs/methods/medgrpo.md §4): records -> raw metric x ->
p25/p50/p75.

Glue between `rewards.video` (the raw RL metric per task) and the toolkit's `fit_percentile_table` /
`PercentileTable` (what `LogisticDatasetNorm` loads). Behind `renorm medgrpo fit-percentiles`.

Prediction records (JSONL, a JSON list, or the official evaluator's {index: record} JSON) carry dataset
(or data_source), task (or qa_type), answer (ground truth) and prediction, plus optional struc_info, fps, id.
In the official evaluator's layout `answer` is the model output and `gnd` the ground truth; that is detected.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rewards.video.rl import MedVidReward
from rewards.video.tasks import normalize_task
from toolkit.config.types import read_text_file
from toolkit.io.atomic import write_json_atomic
from toolkit.reward_transforms.medgrpo import PercentileTable, fit_percentile_table


def normalize_record(record: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A record with keys dataset, task, answer, prediction, struc_info, fps, id; ValueError naming `where`."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: a prediction record must be a JSON object, got {type(record).__name__}")
    rec = dict(record)
    if "prediction" not in rec and "completion" in rec:
        rec["prediction"] = rec["completion"]
    if "prediction" not in rec and "gnd" in rec:  # official evaluator layout: answer = model output, gnd = truth
        rec["prediction"], rec["answer"] = rec.get("answer"), rec["gnd"]
    meta = rec.get("metadata")
    metadata: Mapping[str, Any] = meta if isinstance(meta, Mapping) else {}
    dataset = rec.get("dataset", rec.get("data_source"))
    task = rec.get("task", rec.get("qa_type"))
    missing = [k for k, v in (("dataset", dataset), ("task", task), ("prediction", rec.get("prediction"))) if v is None]
    if rec.get("answer") is None and rec.get("struc_info") is None:
        missing.append("answer")
    if missing:
        raise ValueError(f"{where}: prediction record lacks {missing}; has keys {sorted(rec)}")
    fps = rec.get("fps", metadata.get("fps"))
    return {
        "dataset": str(dataset),
        "task": normalize_task(str(task)),
        "answer": rec.get("answer"),
        "prediction": str(rec["prediction"]),
        "struc_info": rec.get("struc_info"),
        "fps": float(fps) if fps is not None else math.nan,
        "id": str(rec.get("id", metadata.get("video_id", where))),
        "prompt": rec.get("prompt", rec.get("question", "")),
    }


def load_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Normalized prediction records of a JSONL file, a JSON list or a JSON {index: record} object."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"predictions file not found: {file}")
    text = read_text_file(file)
    raw: Iterable[tuple[str, Any]]
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((f"{file}:{number}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{file}:{number}: not valid JSON ({err.msg})") from err
        raw = rows
    else:
        if isinstance(data, Mapping):
            raw = [(f"{file}[{k}]", v) for k, v in data.items()]
        elif isinstance(data, list):
            raw = [(f"{file}[{i}]", v) for i, v in enumerate(data)]
        else:
            raw = [(f"{file}", data)]
    records = [normalize_record(rec, where) for where, rec in raw]
    if not records:
        raise ValueError(f"predictions file {file} has no records")
    return records


def raw_metrics(
    records: Sequence[Mapping[str, Any]], reward: MedVidReward, batch_size: int = 64, progress: bool = True
) -> list[float]:
    """The raw RL metric x of every record (NaN = not applicable), scored in batches with a progress bar."""
    from rich.progress import Progress

    values: list[float] = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("scoring predictions", total=len(records))
        for start in range(0, len(records), batch_size):
            batch = records[start : start + batch_size]
            meta = {k: [r.get(k) for r in batch] for k in ("task", "answer", "struc_info", "dataset", "id")}
            out = reward([r.get("prompt", "") for r in batch], [r["prediction"] for r in batch], **meta)
            values.extend(float(v) for v in out.scores)
            bar.advance(task, len(batch))
    return values


def fit_from_predictions(
    records: Sequence[Mapping[str, Any]],
    reward: MedVidReward,
    interpolation: str = "linear",
    min_count: int = 1,
    batch_size: int = 64,
    progress: bool = True,
) -> PercentileTable:
    """Percentile table of the raw metric per (dataset, task) (+ task-level pooled entries) from predictions."""
    values = raw_metrics(records, reward, batch_size, progress)
    rows = [(r["dataset"], r["task"], v) for r, v in zip(records, values, strict=True)]
    return fit_percentile_table(rows, interpolation=interpolation, min_count=min_count)  # type: ignore[arg-type]


def save_table(table: PercentileTable, path: str | Path) -> None:
    """Save a percentile table atomically (the layout `PercentileTable.load` / LogisticDatasetNorm read)."""
    write_json_atomic(path, table.to_dict(), sort_keys=True)
