"""QA rewards: SQuAD normalization, EM/F1 oracles, last-answer extraction, the >= 2 rule, format, `renorm score`."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rewards.base import RewardModel
from rewards.text.qa import (
    ExactMatchReward,
    F1Reward,
    FormatReward,
    exact_match,
    extract_answer,
    f1_score,
    normalize_answer,
    search_format_error,
    substring_match,
)
from toolkit.evaluation import score_file

# One example answer, like the templates of modalities/text_agent/qa_data.py.
PROMPT = "Search with <search> query </search>; answer like <answer> Paris </answer>. Question: Capital of Zorvania?\n"
# Search-R1's template structure: TWO regex matches (`<answer> and </answer>` and the example).
SEARCH_R1_LIKE = "Give the answer inside <answer> and </answer>, for example <answer> Beijing </answer>. Question: q?\n"
TRAJECTORY = (
    "<think>I do not know.</think><search> capital of Zorvania </search>\n\n"
    '<information>Doc 1(Title: "Zorvania") The capital of Zorvania is Quellport.\n</information>\n\n'
    "<think>It is Quellport.</think><answer> Quellport </answer>"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The  Cat!", "cat"),
        ("an apple, a pear", "apple pear"),
        ("A.B.C.", "abc"),
        ("  Hello\tWorld \n", "hello world"),
        ("the theater", "theater"),
        ("Anne's THE end", "annes end"),
        ("", ""),
    ],
)
def test_squad_normalization(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_exact_substring_and_f1_oracles() -> None:
    assert exact_match("The Beatles", ["beatles"]) == 1.0
    assert exact_match("Beatles band", ["Beatles"]) == 0.0
    assert exact_match("Paris", "paris.") == 1.0
    assert exact_match("x", []) == 0.0
    assert substring_match("the Beatles band", ["Beatles"]) == 1.0
    assert substring_match("Beatle", ["Beatles"]) == 0.0
    # pred tokens [cat, sat, on, mat], gold [cat, on, mat]: P = 3/4, R = 1, F1 = 6/7
    assert f1_score("the cat sat on the mat", ["a cat on a mat"]) == pytest.approx(6 / 7, abs=1e-12)
    assert f1_score("red blue", ["green", "blue"]) == pytest.approx(2 / 3, abs=1e-12)
    assert f1_score("a", ["the"]) == 0.0 and f1_score("cat", ["dog"]) == 0.0


@given(st.text(max_size=30))
def test_normalization_is_idempotent_and_exact_match_reflexive(text: str) -> None:
    assert normalize_answer(normalize_answer(text)) == normalize_answer(text)
    if normalize_answer(text):
        assert exact_match(text, [text]) == 1.0 and f1_score(text, [text]) == 1.0


def test_extract_last_answer_and_minimum_count() -> None:
    text = "<answer>first</answer> ... <answer>\n second line \n</answer>"
    assert extract_answer(text) == "second line"
    assert extract_answer(text, min_answer_tags=2) == "second line"
    assert extract_answer(text, min_answer_tags=3) is None
    assert extract_answer("no tags here") is None
    assert extract_answer("<answer>unclosed") is None


def test_exact_match_reward_default_is_official_two_match_rule() -> None:
    reward = ExactMatchReward()
    assert isinstance(reward, RewardModel)
    samples = [
        TRAJECTORY,
        "<answer> Ambrel </answer>",
        "<search> x </search> no answer",
        "<answer>a</answer><answer>the Quellport.</answer>",
    ]
    out = reward([PROMPT] * 4, samples, golden_answers=[["Quellport"]] * 4)
    assert out.scores.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert out.metrics == {"answer_rate": 0.75, "prompts_without_example": 0.0}


def test_two_match_rule_needs_the_example_in_the_prompt(caplog: pytest.LogCaptureFixture) -> None:
    official = ExactMatchReward()
    with caplog.at_level(logging.WARNING, logger="rewards.text.qa"):
        out = official(["Capital of Zorvania?"], ["<answer> Quellport </answer>"], golden_answers=[["Quellport"]])
    assert out.scores.tolist() == [0.0] and out.metrics["prompts_without_example"] == 1.0
    assert "include_prompt=False, min_answer_tags=1" in caplog.text
    completion_only = ExactMatchReward(include_prompt=False, min_answer_tags=1)
    out = completion_only(["Capital of Zorvania?"], ["<answer> Quellport </answer>"], golden_answers=[["Quellport"]])
    assert out.scores.tolist() == [1.0]
    # With Search-R1's own template the prompt alone holds two matches: an answer-less response is scored
    # as the prompt's example (the official quirk, reproduced).
    out = official([SEARCH_R1_LIKE] * 2, ["no answer", "no answer"], golden_answers=[["Beijing"], ["Paris"]])
    assert out.scores.tolist() == [1.0, 0.0]


def test_chat_message_prompts_and_answer_keys() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    reward = ExactMatchReward()
    assert reward([messages], [TRAJECTORY], answer=["quellport"]).scores.tolist() == [1.0]
    assert reward([PROMPT], [TRAJECTORY], golden_answers=["Quellport"]).scores.tolist() == [1.0]  # str per row
    custom = ExactMatchReward(answers_key="target")
    assert custom([PROMPT], [TRAJECTORY], target=[["Quellport", "QP"]]).scores.tolist() == [1.0]
    with pytest.raises(ValueError, match="golden answers per row"):
        reward([PROMPT], [TRAJECTORY], dataset=["nq"])
    with pytest.raises(ValueError, match="one entry per row"):
        reward([PROMPT, PROMPT], [TRAJECTORY, TRAJECTORY], golden_answers=[["x"]])


def test_rows_without_golden_answers_are_not_applicable() -> None:
    out = ExactMatchReward()([PROMPT] * 3, [TRAJECTORY] * 3, golden_answers=[["Quellport"], [], None])
    assert out.scores[0] == 1.0 and math.isnan(out.scores[1]) and math.isnan(out.scores[2])


def test_match_modes_format_score_and_f1_reward() -> None:
    sample = "<answer> the city of Quellport </answer>"
    golden = [["Quellport"]]
    assert ExactMatchReward()([PROMPT], [sample], golden_answers=golden).scores.tolist() == [0.0]
    assert ExactMatchReward(match="substring")([PROMPT], [sample], golden_answers=golden).scores.tolist() == [1.0]
    assert ExactMatchReward(format_score=0.25)([PROMPT], [sample], golden_answers=golden).scores.tolist() == [0.25]
    assert ExactMatchReward(format_score=0.25)([PROMPT], ["none"], golden_answers=golden).scores.tolist() == [0.0]
    # tokens [city, of, quellport] vs [quellport]: P = 1/3, R = 1, F1 = 0.5
    assert F1Reward()([PROMPT], [sample], golden_answers=golden).scores.tolist() == pytest.approx([0.5])
    with pytest.raises(ValueError, match="match='fuzzy' is not one of"):
        ExactMatchReward(match="fuzzy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_answer_tags must be >= 1"):
        F1Reward(min_answer_tags=0)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (TRAJECTORY, None),
        ("<answer>x</answer>", None),
        ("plain words <think>a</think> more words <answer> x </answer>\n", None),
        (TRAJECTORY.replace("<think>I do not know.</think>", ""), None),
        ("no answer at all", "no <answer>"),
        ("<answer>  </answer>", "empty <answer>"),
        ("<answer>x</answer> trailing", "text after the answer"),
        ("<answer>x</answer><search>y</search>", "tags after the answer"),
        ("<search>q</search><answer>x</answer>", "a search is not directly followed by an <information> block"),
        ("<search>q</search> chatter <information>d</information><answer>x</answer>", "not directly followed"),
        ("<search>q</search>", "a search is not followed by an <information> block"),
        ("<information>d</information><answer>x</answer>", "an <information> block without a search"),
        ("<think>a<answer>x</answer></think>", "<answer> inside <think>"),
        ("</think><answer>x</answer>", "</think> without <think>"),
        ("<think>never closed <answer>x</answer>", "<answer> inside <think>"),
        ("<answer>x", "<answer> is never closed"),
    ],
)
def test_search_format_oracles(text: str, error: str | None) -> None:
    found = search_format_error(text)
    assert found == error if error is None else (found is not None and error in found)


def test_format_reward_options() -> None:
    no_think = TRAJECTORY.replace("<think>I do not know.</think>", "")
    assert search_format_error(no_think, require_think=True) == "<search> without a <think> block before it"
    assert search_format_error(TRAJECTORY, require_think=True) is None
    # the think of the first turn does not count for the second turn
    second_turn_bare = TRAJECTORY.replace("<think>It is Quellport.</think>", "")
    assert search_format_error(second_turn_bare, require_think=True) == "<answer> without a <think> block before it"
    assert search_format_error("<answer>x</answer>", require_search=True) == "no <search>"
    # documents inside <information> may contain anything
    assert search_format_error("<search>q</search><information><answer>x</information><answer>y</answer>") is None
    out = FormatReward(valid_score=1.0, invalid_score=-1.0)(["p", "p"], [TRAJECTORY, "junk"])
    assert out.scores.tolist() == [1.0, -1.0] and out.metrics == {"valid_rate": 0.5}


def test_usable_through_renorm_score(tmp_path: Path) -> None:
    rows = [
        {"prompt": PROMPT, "completion": TRAJECTORY, "golden_answers": ["Quellport"], "dataset": "synthetic"},
        {"prompt": PROMPT, "completion": "<answer>Oskrin</answer>", "golden_answers": ["Quellport"]},
    ]
    source, scored = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert score_file("rewards.text.qa.ExactMatchReward", source, scored) == 2
    assert [json.loads(line)["score"] for line in scored.read_text().splitlines()] == [1.0, 0.0]
    config = tmp_path / "em.yaml"
    config.write_text("_component_: rewards.text.qa.ExactMatchReward\ninclude_prompt: false\nmin_answer_tags: 1\n")
    rows[1].pop("prompt")
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert score_file(str(config), source, scored) == 2
    assert [json.loads(line)["score"] for line in scored.read_text().splitlines()] == [1.0, 0.0]
