"""`renorm score` says why a row is null: the field the reward reads that the row lacks, or not applicable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from toolkit.evaluation.score import score_file


def gold_match(prompt: Any, sample: Any, gold: str | None = None, **_: Any) -> float | None:
    """1.0 when the sample equals the row's gold answer; not applicable without one."""
    return None if gold is None else float(sample == gold)


def test_a_null_row_says_which_field_it_lacks(tmp_path: Path) -> None:
    reward = tmp_path / "reward.yaml"
    reward.write_text(
        "reward:\n  _component_: rewards.base.FunctionReward\n  fn:\n"
        "    _component_: tests.toolkit.evaluation.test_score.gold_match\n    _partial_: true\n"
    )
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"prompt": "1+1", "completion": "2", "gold": "2"})
        + "\n"
        + json.dumps({"prompt": "2+2", "completion": "4", "answer": "4"})
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    assert score_file(str(reward), rows, out) == 2
    first, second = (json.loads(line) for line in out.read_text().splitlines())
    assert first["score"] == 1.0 and "null_reason" not in first
    assert second["score"] is None
    assert "no 'gold' field" in second["null_reason"] and "['answer']" in second["null_reason"]
