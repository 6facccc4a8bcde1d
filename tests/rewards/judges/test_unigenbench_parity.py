"""Parity of the UniGenBench reply reading with the released evaluation script.

Official code: CodeGoat24/UniGenBench at 49d0bcebb0b9418d975d3957c2fee10f34811d14, eval/src/eval_common.py
(`parse_evaluation_response`, the retry loop of `call_evaluation_vllm`, the JSON result record and
`calculate_scores`). Each case is ours; its expected outcome was derived by reading that code: "reask" = the
script does not accept the reply and asks again, "skip" = it accepts the reply but its scoring leaves the image
out, a list = the per-testpoint 0/1 the scoring counts. The last column is what our lenient reading gives.
"""

from __future__ import annotations

from typing import Any

import pytest
from PIL import Image

from rewards.judges.client import FakeJudgeClient
from rewards.judges.unigenbench import (
    AcceptedReply,
    TestpointItem,
    TestpointJudge,
    parse_official_scores,
    parse_testpoint_scores,
)

REASK, SKIP = "reask", "skip"
A2 = "<analysis>['a', 'b']</analysis>"

# (reply, number of testpoints, official outcome, lenient outcome; None = invalid)
CASES: list[tuple[str | None, int, Any, list[int] | None]] = [
    (A2 + "<score>[1, 0]</score>", 2, [1, 0], [1, 0]),
    ("<score>[0, 1]</score>" + A2, 2, [0, 1], [0, 1]),  # tag order does not matter
    (A2 + "<score>[1, 0]</score> on reflection <score>[0, 0]</score>", 2, [1, 0], [0, 0]),  # first vs last block
    ("<score>[1, 0]</score>", 2, REASK, [1, 0]),  # no <analysis>
    ("<analysis>['a']</analysis><score>[1, 0]</score>", 2, REASK, [1, 0]),  # analysis list too short
    ("<analysis>'ab'</analysis><score>[1, 1]</score>", 2, [1, 1], [1, 1]),  # a 2-character string has length 2
    (A2 + "<score>[True, 0]</score>", 2, SKIP, None),  # JSON `true` does not read back as a literal
    (A2 + "<score>[1, False]</score>", 2, SKIP, None),
    (A2 + "<score>[1.0, 0.0]</score>", 2, [1, 0], [1, 0]),
    (A2 + "<score>[2, 1]</score>", 2, [0, 1], None),  # out of range: only == 1 passes
    (A2 + "<score>[-1, 0]</score>", 2, [0, 0], None),
    (A2 + "<score>[0.5, 1]</score>", 2, [0, 1], None),
    (A2 + "<score>['1', 0]</score>", 2, [0, 0], None),  # the string "1" is not 1
    (A2 + "<score>[[1], 1]</score>", 2, [0, 1], None),
    (A2 + "<score>1, 0</score>", 2, [1, 0], [1, 0]),  # a bare tuple: a list after the JSON round trip
    (A2 + "<score>'10'</score>", 2, SKIP, None),  # a string of length 2 is accepted, then not a list
    (A2 + "<score>{'x': 1, 'y': 0}</score>", 2, SKIP, None),  # a mapping: accepted, then not a list
    ("<analysis>[None, 'b']</analysis><score>[1, 1]</score>", 2, SKIP, [1, 1]),  # JSON `null` in the analysis
    ("<analysis>[True, 'b']</analysis><score>[1, 1]</score>", 2, SKIP, [1, 1]),
    (A2 + "<score>[1e999, 1]</score>", 2, SKIP, None),  # inf is stored as `Infinity`
    (A2 + "<score>[1, 0, 1]</score>", 2, REASK, None),  # score list too long
    (A2 + "<score>[1, 0</score>", 2, REASK, None),  # not a literal
    ("<analysis>[a, b]</analysis><score>[1, 0]</score>", 2, REASK, [1, 0]),  # names are not literals
    ("<Analysis>['a', 'b']</Analysis><SCORE>[1, 0]</SCORE>", 2, REASK, None),  # tags are case-sensitive
    ("<analysis>\n  ['x']\n</analysis>\n<score>\n  [1]\n</score>", 1, [1], [1]),  # surrounding whitespace
    ("", 1, REASK, None),
    (None, 1, REASK, None),
    ("<analysis>bad</analysis><analysis>['a']</analysis><score>[1]</score>", 1, REASK, [1]),  # first analysis
    (A2 + "<score>Scores: [1, 0]</score>", 2, REASK, None),  # text around the list
    (A2 + "<score>[01, 0]</score>", 2, REASK, None),  # a leading zero is a syntax error
    ("<analysis>['he said \"hi\"\\nthen', 'b']</analysis><score>[0, 1]</score>", 2, [0, 1], [0, 1]),  # escapes
    ("<analysis>['红色', '猫']</analysis><score>[1, 1]</score>", 2, [1, 1], [1, 1]),  # non-ASCII analysis
    ("<analysis>['a', 'b', 'c']</analysis><score>[1.0, 1, 0]</score>", 3, [1, 1, 0], [1, 1, 0]),
    ("<analysis>[]</analysis><score>[]</score>", 0, [], []),  # no testpoints: accepted, nothing counted
    (
        "<description>\n  <prompt>a red cat</prompt>\n  <checkpoint>['Attribute - Color', 'Style']</checkpoint>\n"
        "  <analysis>['the cat is red', 'oil painting']</analysis>\n  <score>[1, 0]</score>\n</description>",
        2,
        [1, 0],
        [1, 0],
    ),  # the full output format the released prompt asks for
]

# Replies on which the released script raises (its run stops) rather than deciding: here they are not accepted.
CRASH_CASES: list[tuple[str, int]] = [
    ("<analysis>'a'</analysis><score>1</score>", 1),  # len() of an int
    ("<analysis>None</analysis><score>[1]</score>", 1),
    (A2 + "<score>{1, 0}</score>", 2),  # a set has a length but cannot be stored as JSON
    ("<analysis>{(1, 2): 'a', (3, 4): 'b'}</analysis><score>[1, 1]</score>", 2),  # tuple keys: not JSON
]


def official_outcome(text: str | None, count: int) -> Any:
    parsed = parse_official_scores(text, count)
    if parsed is None:
        return REASK
    return SKIP if parsed.scores is None else parsed.scores


@pytest.mark.parametrize(("text", "count", "official", "lenient"), CASES)
def test_official_reading_matches_the_released_script(
    text: str | None, count: int, official: Any, lenient: list[int] | None
) -> None:
    assert official_outcome(text, count) == official
    assert parse_testpoint_scores(text, count) == lenient


@pytest.mark.parametrize(("text", "count"), CRASH_CASES)
def test_replies_that_crash_the_released_script_are_not_accepted(text: str, count: int) -> None:
    assert parse_official_scores(text, count) is None


def test_table_covers_the_disagreements() -> None:
    assert len(CASES) >= 30
    outcomes = [official_outcome(t, c) for t, c, _, _ in CASES]
    disagree = sum(
        o != (REASK if lenient is None else lenient) for o, (_, _, _, lenient) in zip(outcomes, CASES, strict=True)
    )
    assert {REASK, SKIP} <= {o if isinstance(o, str) else "scores" for o in outcomes}
    assert disagree >= 17  # the two readings differ on about half of the table


def test_official_judge_resends_the_same_prompt_then_skips_or_scores() -> None:
    """Official mode: no format reminder, 10 re-asks by default, accepted-but-skipped images are counted apart."""
    replies = iter(["<score>[1]</score>"] * 11 + ["<analysis>['x']</analysis><score>[True]</score>"])
    client = FakeJudgeClient(lambda messages: next(replies))
    judge = TestpointJudge(client)
    item = TestpointItem("p", ["Style"], ["oil"], Image.new("RGB", (4, 4)))
    scores, _ = judge.judge([item])
    assert scores == [None] and judge.max_retries_invalid == 10 and len(client.conversations) == 11
    assert all(len(c) == 1 for c in client.conversations)  # the same one-message prompt every time
    assert judge.last_metrics["judge/invalid"] == 1.0 and judge.last_metrics["judge/excluded"] == 0.0
    scores, _ = judge.judge([item])
    assert scores == [None] and judge.last_metrics["judge/excluded"] == 1.0 and judge.last_metrics["judge/invalid"] == 0


def test_lenient_judge_keeps_the_reminder_and_bad_options_fail() -> None:
    replies = iter(["<score>[2]</score>", "<score>[1]</score>"])
    client = FakeJudgeClient(lambda messages: next(replies))
    judge = TestpointJudge(client, parsing="lenient")
    scores, _ = judge.judge([TestpointItem("p", ["Style"], ["oil"], Image.new("RGB", (4, 4)))])
    assert scores == [[1]] and judge.max_retries_invalid == 2 and len(client.conversations[1]) == 3
    assert parse_official_scores(A2 + "<score>[1, 1]</score>", 2) == AcceptedReply([1, 1])
    with pytest.raises(ValueError, match="parsing"):
        TestpointJudge(client, parsing="strict")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_retries_invalid"):
        TestpointJudge(client, max_retries_invalid=-1)
