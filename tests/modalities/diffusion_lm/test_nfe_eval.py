"""`renorm eval` on a DiDi config prints the NFE table: teacher, student and the checkpoint's EMA student."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toolkit.config import load_config
from toolkit.evaluation import evaluate
from toolkit.train.runner import build_trainer, fit

CONFIG = Path(__file__).resolve().parents[3] / "configs" / "diffusion_lm" / "tiny.yaml"
SMALL = [
    "eval.evaluator.steps=[2,4]",
    "eval.evaluator.num_samples=4",
    "eval.evaluator.batch_size=4",
    "eval.evaluator.evaluator_steps=2",
]


def test_eval_prints_the_nfe_table_with_the_ema_student(tmp_path: Path) -> None:
    config = load_config(
        CONFIG, [f"trainer.run_dir={tmp_path}", "trainer.num_steps=1", "trainer.prompts_per_step=2", *SMALL]
    )
    checkpoint = fit(build_trainer(config))
    assert checkpoint is not None
    out = tmp_path / "nfe.json"
    report = evaluate(config, checkpoint=str(checkpoint), output=str(out))
    text = report.table()
    assert "NFE table" in text and "student_ema" in text
    rows = json.loads(out.read_text())["rows"]
    assert {(r["model"], r["steps"]) for r in rows} == {
        (m, n) for m in ("teacher", "student", "student_ema") for n in (2, 4)
    }
    assert all(r["gen_ppl"] > 1.0 and r["seconds"] > 0 for r in rows)
    assert {r["temperature"] for r in rows} == {1.0}  # the spec's sampler unless asked
    cooled = load_config(CONFIG, [f"trainer.run_dir={tmp_path}", *SMALL, "eval.evaluator.teacher_temperature=0.5"])
    rows = evaluate(cooled, checkpoint=str(checkpoint), output=str(out)).rows
    assert {(r["model"], r["temperature"]) for r in rows} == {("teacher", 0.5), ("student", 1.0), ("student_ema", 1.0)}


def test_bad_step_list_is_rejected() -> None:
    from modalities.diffusion_lm.nfe_table import NFETableEvaluator

    with pytest.raises(ValueError, match="steps"):
        NFETableEvaluator(steps=[])
    with pytest.raises(ValueError, match="teacher_temperature must be a finite number > 0"):
        NFETableEvaluator(teacher_temperature=0.0)
