"""Math correctness (lenient mode) and think-format rewards: extraction rules, gold answers and alternatives, NaN
for missing gold, math-verify's signal timeouts off the main thread, and use through `renorm score`.

The official modes (deepscaler, bnpo, verl_math_verify) are pinned against the released functions in
test_math_parity.py."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rewards.text.math.grader as grader_module
from rewards.text.format import ThinkFormatReward, think_format_ok
from rewards.text.math import (
    MathAccuracyReward,
    MathGrader,
    answer_region,
    gold_answer,
    gold_answers,
    last_boxed,
    normalize_answer_string,
)
from toolkit.cli import main as renorm


def scores(reward: Any, samples: list[str], **metadata: Any) -> list[float]:
    return reward([""] * len(samples), samples, **metadata).scores.tolist()


# ------------------------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{7}.", "7"),
        ("\\boxed{\\frac{1}{2}} then \\boxed{3}", "3"),
        ("\\boxed{\\frac{a}{\\sqrt{2}}}", "\\frac{a}{\\sqrt{2}}"),
        ("answer: \\fbox{12}", "12"),
        ("$\\boxed 5$", "5"),
        ("cut off \\boxed{\\frac{1}{2", None),
        ("no box here", None),
        ("\\boxed", None),
    ],
)
def test_last_boxed(text: str, expected: str | None) -> None:
    assert last_boxed(text) == expected


def test_answer_region_modes() -> None:
    text = "think 1</think> answer 2</think> final 3"
    assert answer_region(text, "ignore") == text
    assert answer_region(text, "strip") == " final 3"
    assert answer_region(text, "require") == " final 3"
    assert answer_region("no close tag 4", "strip") == "no close tag 4"
    assert answer_region("no close tag 4", "require") is None
    assert answer_region("abcdef", "ignore", last_n_chars=2) == "ef"


def test_gold_answer_sources() -> None:
    assert gold_answer({"answer": "7", "solution": "\\boxed{8}"}) == "7"
    assert gold_answer({"answer": None, "solution": "so \\boxed{\\frac{1}{2}}."}) == "\\frac{1}{2}"
    assert gold_answer({"solution": "no box, 42"}) == "no box, 42"
    assert gold_answer({"answer": 204.0}) == "204"
    assert gold_answer({"answer": "$3$"}) == "3"
    assert gold_answer({"final_answer": ["$3$"]}, ["final_answer"]) == "3"
    assert gold_answer({"final_answer": ["$3$", "$4$"]}, ["final_answer"]) == ["3", "4"]  # alternatives
    assert gold_answers({"answer": ["5", "", None, "so \\boxed{five}"]}) == ["5", "five"]
    assert gold_answers({"answer": [], "solution": "\\boxed{2}"}) == ["2"]
    assert gold_answer({"answer": ""}) is None
    assert gold_answer({}) is None


def test_normalize_answer_string() -> None:
    assert normalize_answer_string("\\text{ Tuesday }.") == "Tuesday"
    assert normalize_answer_string("\\left( 1, 2 \\right)") == "(1,2)"
    assert normalize_answer_string("\\dfrac{1}{2}") == normalize_answer_string("\\frac{1}{2}")
    assert normalize_answer_string("90^\\circ") == "90"


# ------------------------------------------------------------------------------------------- grading modes


def test_math_verify_equivalences_and_missing_gold() -> None:
    reward = MathAccuracyReward()
    samples = ["\\boxed{\\frac12}", "the answer is 0.5", "\\boxed{\\frac{2}{4}}", "\\boxed{0.6}", "\\boxed{1}"]
    out = reward([""] * 5, samples, answer=["1/2", "\\frac{1}{2}", "0.5", "0.5", None])
    assert out.scores[:4].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert math.isnan(float(out.scores[4]))
    assert out.metrics["missing_gold"] == 1.0


def test_dler_mode_requires_think_close_then_a_boxed_answer() -> None:
    reward = MathAccuracyReward(think_mode="require", require_boxed=True)
    samples = [
        "reasoning</think> so \\boxed{7}",  # correct
        "reasoning \\boxed{7}",  # never closed its thinking
        "reasoning</think> 7",  # no box after </think>
        "\\boxed{7} in the thinking</think> but \\boxed{8} after",  # only the part after </think> counts
        "a</think>b</think>\\boxed{7}",  # the last </think> counts
    ]
    out = reward([""] * 5, samples, solution=["so \\boxed{7}"] * 5)
    assert out.scores.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert out.metrics["no_think"] == 1.0 and out.metrics["no_answer"] == 1.0


def test_list_gold_answers_are_alternatives() -> None:
    reward = MathAccuracyReward(think_mode="require", require_boxed=True)
    samples = ["</think>\\boxed{5}", "</think>\\boxed{five}", "</think>\\boxed{6}", "</think>\\boxed{5, five}"]
    assert scores(reward, samples, answer=[["5", "five"]] * 4) == [1.0, 1.0, 0.0, 0.0]


def test_last_500_characters_rule() -> None:
    early = "\\boxed{7}" + " filler" * 100  # the answer is more than 500 characters before the end
    late = "x" * 600 + " so \\boxed{7}"
    bnpo = MathAccuracyReward(think_mode="ignore", last_n_chars=500)
    whole = MathAccuracyReward(think_mode="ignore")
    assert scores(bnpo, [early, late], answer=["7", "7"]) == [0.0, 1.0]
    assert scores(whole, [early, late], answer=["7", "7"]) == [1.0, 1.0]


def test_string_fallback_for_answers_sympy_cannot_compare() -> None:
    samples = ["\\boxed{\\text{Tuesday}}", "\\boxed{Wednesday}"]
    assert scores(MathAccuracyReward(), samples, answer=["Tuesday"] * 2) == [1.0, 0.0]


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="think_mode='sometimes'"):
        MathAccuracyReward(think_mode="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="last_n_chars"):
        MathAccuracyReward(last_n_chars=0)
    with pytest.raises(ValueError, match="timeout_mode"):
        MathGrader(timeout_mode="never")  # type: ignore[arg-type]


@settings(max_examples=25, deadline=None)
@given(st.integers(-50, 50), st.integers(-50, 50))
def test_boxed_integer_is_correct_iff_equal(predicted: int, gold: int) -> None:
    reward = MathAccuracyReward(think_mode="require", require_boxed=True)
    assert scores(reward, [f"</think>\\boxed{{{predicted}}}"], answer=[str(gold)]) == [float(predicted == gold)]


# ------------------------------------------------------------------------------------------- timeouts


def test_auto_timeout_mode_works_off_the_main_thread() -> None:
    results: dict[str, Any] = {}

    def run(mode: str) -> None:
        try:
            results[mode] = MathAccuracyReward(timeout_mode=mode)([""], ["\\boxed{7}"], answer=["7"])  # type: ignore[arg-type]
        except Exception as err:  # noqa: BLE001 - the test inspects what the thread raised
            results[mode] = err

    for mode in ("auto", "signal"):
        thread = threading.Thread(target=run, args=(mode,))
        thread.start()
        thread.join()
    assert results["auto"].scores.tolist() == [1.0]
    assert results["auto"].metrics["no_timeout_calls"] > 0
    assert isinstance(results["signal"], ValueError) and "thread" in str(results["signal"])


def test_a_call_that_uses_its_whole_timeout_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(0, 10_000, 10))  # every perf_counter() call is 10 s later: each call "times out"
    monkeypatch.setattr(grader_module.time, "perf_counter", lambda: float(next(clock)))
    out = MathAccuracyReward(timeout_seconds=5)([""], ["\\boxed{7}"], answer=["7"])
    assert out.metrics["timeouts"] >= 2  # gold parse, prediction parse and verify each counted


# ------------------------------------------------------------------------------------------- format reward


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("<think>a</think><answer>1</answer>", True),
        ("<think>a</think>\n<answer>1</answer>\n", True),
        ("<think>a</think><answer>1</answer><answer>2</answer>", False),
        ("<think>a</think><think>b</think><answer>1</answer>", False),
        ("x<think>a</think><answer>1</answer>", False),
        ("<answer>1</answer><think>a</think>", False),
        ("<think>a</think>", False),
    ],
)
def test_think_format(text: str, ok: bool) -> None:
    assert think_format_ok(text) is ok
    assert ThinkFormatReward()([""], [text]).scores.tolist() == [float(ok)]


def test_think_format_strict_whitespace_and_free_answer() -> None:
    assert not think_format_ok("<think>a</think>\n<answer>1</answer>", allow_whitespace=False)
    assert think_format_ok("<think>a</think> the answer is 3", answer_tags=False)
    assert not think_format_ok("<think>a</think>   ", answer_tags=False)
    with pytest.raises(ValueError, match="distinct"):
        ThinkFormatReward(answer_open="<think>")


# ------------------------------------------------------------------------------------------- renorm score


def test_rewards_run_under_renorm_score(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [
        {"prompt": "1+1=", "completion": "</think>\\boxed{2}", "answer": "2"},
        {"prompt": "1+2=", "completion": "</think>\\boxed{4}", "solution": "so \\boxed{3}"},
        {"prompt": "?", "completion": "<think>a</think><answer>b</answer>"},
    ]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert renorm(["score", "rewards.text.math.MathAccuracyReward", "--input", str(data), "--output", str(out)]) == 0
    assert [json.loads(line)["score"] for line in out.read_text().splitlines()] == [1.0, 0.0, None]
    assert renorm(["score", "rewards.text.format.ThinkFormatReward", "--input", str(data), "--output", str(out)]) == 0
    assert [json.loads(line)["score"] for line in out.read_text().splitlines()] == [0.0, 0.0, 1.0]
    capsys.readouterr()


def test_scores_are_float32_one_dimensional() -> None:
    out = MathAccuracyReward()(["", ""], ["\\boxed{1}", "\\boxed{2}"], answer=["1", "1"])
    assert out.scores.dtype == torch.float32 and out.scores.shape == (2,)
