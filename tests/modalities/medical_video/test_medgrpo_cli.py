"""`renorm medgrpo fit-percentiles` / `eval`: the table LogisticDatasetNorm loads (M7), the results-table layout,
prediction-file formats and the eval.evaluator hook with a stand-in policy."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from modalities.medical_video.evaluation import COLUMNS, MedVidEvaluator, evaluate_predictions
from modalities.medical_video.percentiles import load_predictions, normalize_record
from rewards.judges.client import FakeJudgeClient
from rewards.judges.medical import MedicalCaptionJudge
from toolkit.cli import main
from toolkit.reward_transforms.medgrpo import LogisticDatasetNorm, PercentileTable
from toolkit.rollout import Rollout

TOL = 1e-5
RUBRIC = "R2: 4\nR3: 3\nR8: 5\nR5: 4\nR4: 5"
CVS_ANSWER = "Two structures: 2, Cystic plate: 2, Hepatocystic triangle: 1"


def tal(dataset: str, prediction: str, fps: float = 1.0) -> dict[str, Any]:
    return {"dataset": dataset, "task": "tal", "answer": "10.0-20.0 seconds.", "prediction": prediction, "fps": fps}


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_fit_percentiles_writes_a_table_logistic_norm_loads(tmp_path: Path) -> None:
    # TAL IoUs vs GT 10-20: 1.0, 0.5, 1/3, 0 (unparsable), 0.8 -> p25 = 1/3, p50 = 0.5, p75 = 0.8 (linear).
    preds = ["10-20 seconds", "10-15 seconds", "15-25 seconds", "no idea", "12-20 seconds"]
    records = [tal("CoPESD", p) for p in preds]
    records.append({"data_source": "EgoSurgery", "qa_type": "stg", "answer": "1.0 seconds: [0, 0, 10, 10]",
                    "prediction": "1.0 seconds: [5, 5, 15, 15]"})  # fmt: skip
    out = tmp_path / "nested" / "table.json"
    argv = ["medgrpo", "fit-percentiles", str(write_jsonl(tmp_path / "p.jsonl", records)), "--out", str(out)]
    assert main([*argv, "--similarity", "hashing"]) == 0
    table = PercentileTable.load(out)
    stats = table.pairs[("CoPESD", "tal")]
    assert (stats.p25, stats.p50, stats.p75, stats.count) == pytest.approx((1 / 3, 0.5, 0.8, 5), abs=TOL)
    assert table.pairs[("EgoSurgery", "stg")].p50 == pytest.approx(1 / 7, abs=TOL)
    assert set(table.tasks) == {"tal", "stg"}
    norm = LogisticDatasetNorm(str(out), k=3.0, iqr_floor=1e-3, degenerate_iqr="floor", fallback="task")
    rollout = Rollout(
        group_ids=torch.zeros(3, dtype=torch.long),
        old_logprobs=torch.zeros(3, 2),
        mask=torch.ones(3, 2, dtype=torch.bool),
        scores=torch.tensor([0.5, 0.8, 0.5]),
        dataset_ids=["CoPESD", "CoPESD", "NewSet"],
        task_ids=["tal", "tal", "tal"],
    )
    r = norm(rollout).scores
    expected = 1 / (1 + math.exp(-3.0 * (0.8 - 0.5) / (0.8 - 1 / 3)))
    assert r[0] == pytest.approx(0.5, abs=TOL) and r[1] == pytest.approx(expected, abs=TOL)
    assert rollout.metrics["dataset_norm/fallback_rows"] == 1.0  # NewSet uses the pooled tal entry


def test_fit_percentiles_bad_record_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [tal("A", "1-2 seconds"), {"task": "tal", "prediction": "x"}])
    assert main(["medgrpo", "fit-percentiles", str(path), "--out", str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err
    assert "p.jsonl:2" in err and "dataset" in err and not (tmp_path / "t.json").exists()


def test_official_evaluator_layout_is_detected() -> None:
    official = {"qa_type": "tal", "data_source": "AVOS", "answer": "1-2 seconds", "gnd": "1-3 seconds",
                "metadata": {"fps": "0.5", "video_id": "v1"}}  # fmt: skip
    rec = normalize_record(official, "x")
    assert (rec["prediction"], rec["answer"], rec["fps"], rec["id"]) == ("1-2 seconds", "1-3 seconds", 0.5, "v1")


def results_records() -> list[dict[str, Any]]:
    cvs_gt = "Two structures: 2, Cystic plate: 1, Hepatocystic triangle: 0"
    return [
        {"dataset": "C80", "task": "cvs", "answer": cvs_gt, "prediction": "2, 1, 1", "fps": 1.0},  # fair vs good
        {"dataset": "C80", "task": "cvs", "answer": cvs_gt, "prediction": "1, 1, 1", "fps": 1.0},  # fair = fair
        tal("A", "10-20 seconds", fps=0.5),
        tal("A", "10-20 seconds", fps=0.5),
        tal("B", "nothing", fps=1.0),  # macro over buckets: (1 + 0) / 2, not the sample mean 2/3
        {"dataset": "J", "task": "sa", "answer": "", "prediction": "a: 5/5", "struc_info": [{"skill_level": "E"}]},
        {"dataset": "N", "task": "nap", "answer": "Clip the duct", "prediction": "clip the duct", "fps": 1.0},
        {"dataset": "N", "task": "nap", "answer": "Cut the artery", "prediction": "clip the duct", "fps": 1.0},
        {"dataset": "E", "task": "stg", "answer": "1.0 seconds: [0, 0, 10, 10]",
         "prediction": "1.0 seconds: [5, 5, 15, 15]"},
        {"dataset": "Ch", "task": "vs", "answer": "the grasper holds the gallbladder",
         "prediction": "the grasper holds"},
        {"dataset": "Ch", "task": "dvc", "answer": "0-10 seconds: a: x\n30-45 seconds: b: y",
         "prediction": "0-12 seconds: a: x\n40-50 seconds: b: z"},
    ]  # fmt: skip


def test_results_table_lenient_bucket_mode() -> None:
    records = [normalize_record(r, f"r{i}") for i, r in enumerate(results_records())]
    judge = MedicalCaptionJudge(FakeJudgeClient(lambda m: RUBRIC), backoff_s=0.0)
    res = evaluate_predictions(records, similarity="hashing", judge=judge, parsing="lenient", aggregation="bucket")
    assert tuple(res.columns) == COLUMNS and res.extras == {}
    c = res.columns
    assert c["CVS acc"] == pytest.approx(0.5) and c["SA acc"] == 1.0 and c["NAP acc"] == pytest.approx(0.5)
    assert c["TAG mIoU@0.3"] == pytest.approx(0.5) and res.buckets["TAG mIoU@0.3"] == {"A@0.5": 1.0, "B@1": 0.0}
    assert c["STG mIoU"] == pytest.approx(1 / 7, abs=TOL)
    assert c["DVC F1"] == pytest.approx(0.5, abs=TOL)  # IoUs 0.833 (> all θ) and 0.25: P = R = 1/2
    assert c["VS llm"] == pytest.approx(4.2) and c["DVC llm"] == pytest.approx(4.2) and math.isnan(c["RC llm"])
    text = res.table()
    assert all(column in text for column in ("CVS acc", "TAG mIoU@0.3", "RC llm")) and res.scorer == "llm"
    assert res.to_json()["columns"]["RC llm"] is None and "parsing lenient" in text


def test_results_table_defaults_to_the_leaderboard_scoring() -> None:
    records = [normalize_record(r, f"r{i}") for i, r in enumerate(results_records())]
    judge = MedicalCaptionJudge(FakeJudgeClient(lambda m: RUBRIC), backoff_s=0.0)
    res = evaluate_predictions(records, similarity="hashing", judge=judge)
    c = res.columns
    assert (res.parsing, res.aggregation) == ("official", "official")
    # "2, 1, 1" names no component: nothing counted, so C80's component-balanced accuracy is 0 (and, in the
    # evaluator's bucket accuracy, total 0 = "poor" vs "fair"); the SA answer "a: 5/5" shares no aspect with the
    # (empty) reference, but its level (expert) matches struc_info "E".
    assert c["CVS acc"] == 0.0 and res.extras == {"CVS bucket acc": 0.0, "SA level acc": 1.0}
    assert c["SA acc"] == 0.0 and res.counts["SA acc"] == 0 and res.counts["SA level acc"] == 1
    # TAL pools all samples ((1 + 1 + 0) / 3), not the (dataset, fps) buckets.
    assert c["TAG mIoU@0.3"] == pytest.approx(2 / 3) and res.buckets["TAG mIoU@0.3"] == {"all": pytest.approx(2 / 3)}
    assert c["STG mIoU"] == pytest.approx(1 / 7, abs=TOL) and c["NAP acc"] == pytest.approx(0.5)
    assert c["DVC F1"] == pytest.approx(0.5, abs=TOL) and c["DVC llm"] == pytest.approx(4.2)
    assert res.to_json()["aggregation"] == "official" and "CVS bucket acc" in res.table()
    with pytest.raises(ValueError, match="parsing='strict'.*allowed"):
        evaluate_predictions(records, similarity="hashing", parsing="strict")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="aggregation='macro'.*allowed"):
        MedVidEvaluator(aggregation="macro")  # type: ignore[arg-type]


def test_eval_command_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "preds.json"
    path.write_text(json.dumps(results_records()))  # a JSON list works as well as JSONL
    out = tmp_path / "results.json"
    assert main(["medgrpo", "eval", str(path), "--similarity", "hashing", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert list(data["columns"]) == list(COLUMNS) and data["caption_scorer"] == "similarity"
    assert (data["parsing"], data["aggregation"]) == ("official", "official")  # the CLI default
    assert data["columns"]["CVS acc"] == 0.0 and data["columns"]["TAG mIoU@0.3"] == pytest.approx(2 / 3)
    assert 0.0 <= data["columns"]["VS llm"] <= 1.0  # similarity fallback scale
    assert "similarity fallback" in capsys.readouterr().out
    flags = ["--parsing", "lenient", "--aggregation", "bucket"]
    assert main(["medgrpo", "eval", str(path), "--similarity", "hashing", "--output", str(out), *flags]) == 0
    data = json.loads(out.read_text())
    assert data["parsing"] == "lenient" and data["columns"]["CVS acc"] == pytest.approx(0.5)
    assert data["columns"]["TAG mIoU@0.3"] == pytest.approx(0.5)
    with pytest.raises(SystemExit):  # argparse names the allowed choices
        main(["medgrpo", "eval", str(path), "--parsing", "strict"])
    assert "invalid choice: 'strict'" in capsys.readouterr().err
    assert main(["medgrpo", "eval"]) == 2


class FakeData:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[list[dict[str, Any]]]:
        while True:
            for start in range(0, len(self.rows), batch_size):
                yield self.rows[start : start + batch_size]


class EchoSampler:
    """Answers each row with its ground truth, except rows whose id says 'skip' (like a broken video)."""

    def sample(self, policy: Any, prompts: list[dict[str, Any]], n: int, generator: Any) -> Any:
        kept = [p for p in prompts if p["id"] != "skip"]
        return SimpleNamespace(prompts=kept, completions=[p["answer"] for p in kept])


def test_evaluator_hook_samples_and_scores(tmp_path: Path) -> None:
    rows = [
        {"prompt": "q", "task": "tal", "dataset": "A", "answer": "1-2 seconds", "fps": 1.0, "id": "a"},
        {"prompt": "q", "task": "cvs", "dataset": "C", "answer": CVS_ANSWER, "fps": 1.0, "id": "skip"},
        {"prompt": "q", "task": "cvs", "dataset": "C", "answer": CVS_ANSWER, "fps": 1.0, "id": "c"},
    ]
    evaluator = MedVidEvaluator(batch_size=2, similarity="hashing")
    out = tmp_path / "eval.json"
    res = evaluator(policy=SimpleNamespace(), sampler=EchoSampler(), data=FakeData(rows), output=str(out))
    assert res.columns["TAG mIoU@0.3"] == 1.0 and res.columns["CVS acc"] == 1.0 and res.counts["CVS acc"] == 1
    assert (res.parsing, res.aggregation) == ("official", "official")  # the hook scores as the leaderboard does
    assert len(json.loads(out.read_text())["predictions"]) == 2


def test_load_predictions_rejects_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        load_predictions(path)
