"""Write the shipped synthetic arithmetic task (single-digit sums and differences) for the tiny recipes.

The problems come from `modalities.text_agent.reasoning_tiny.arithmetic_problems`. Two layouts are
written on purpose, so the benchmark loaders are exercised: `arithmetic_train.jsonl` and `eval_add.jsonl`
use problem/answer (MATH-500 style); `eval_sub.jsonl` uses question/solution with the answer in
`\\boxed{}` (Minerva style). Run from the repository root: `python data/text_reasoning/make_arithmetic.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

from modalities.text_agent.reasoning_tiny import arithmetic_problems

HERE = Path(__file__).resolve().parent


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    rows = arithmetic_problems()
    write_jsonl(HERE / "arithmetic_train.jsonl", rows)
    write_jsonl(HERE / "eval_add.jsonl", [r for r in rows if r["dataset"] == "add"])
    sub = [
        {"id": r["id"], "question": r["problem"], "solution": f"{r['problem']}\\boxed{{{r['answer']}}}"}
        for r in rows
        if r["dataset"] == "sub"
    ]
    write_jsonl(HERE / "eval_sub.jsonl", sub)


if __name__ == "__main__":
    main()
