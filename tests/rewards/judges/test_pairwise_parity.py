"""Parity of the Pref-GRPO judge-reply reading with the released reward function.

Official code: CodeGoat24/Pref-GRPO at 3e787f6dd5a3051b40d61f07e9578468ac26130a,
fastvideo/rewards/unifiedreward_think.py (`_extract_answer`, `_pairwise_win_rate` with "Image 1 is better" /
"Image 2 is better"); the v1 trainer (17df13101eba3bbfc417f494a6ea59eea0459df7, fastvideo/train_flux_pref_grpo.py
`extract_answer` / `cal_win_rate`) reads replies the same way. Each case is ours; its expected verdict was derived by
reading that code: 1.0 = Image 1 wins, 0.0 = Image 2 wins, None = a tie (0.5 each). The last column is our lenient
reading with its default `require_answer_tag=False`.
"""

from __future__ import annotations

import pytest
import torch

from rewards.judges.client import FakeJudgeClient
from rewards.judges.pairwise import PairwisePreferenceJudge, parse_official_preference, parse_preference

THINK = "<think>Image 1: 8+7+9=24. Image 2: 6+7+5=18.</think>\n"

# (reply, official verdict, lenient verdict)
CASES: list[tuple[str | None, float | None, float | None]] = [
    (THINK + "<answer>Image 1 is better</answer>", 1.0, 1.0),
    (THINK + "<answer>Image 2 is better</answer>", 0.0, 0.0),
    ("<think>Image 1 is better because the cat is red and", None, 1.0),  # truncated: no <answer>
    ("Image 2 is better", None, 0.0),  # a bare verdict
    ("<answer>image 1 is better</answer>", None, 1.0),  # verdicts are case-sensitive
    ("<answer>Image 1 is Better</answer>", None, 1.0),
    ("<ANSWER>Image 1 is better</ANSWER>", None, 1.0),  # so are the tags
    ("<answer>Image 2 is better</answer> no wait <answer>Image 1 is better</answer>", 0.0, 1.0),  # first vs last
    ("<answer>Image 1 is better than before; Image 2 is better lit</answer>", 1.0, None),  # both: Image 1 first
    ("<answer>Image 2 is better, Image 1 is better</answer>", 1.0, None),
    ("<answer></answer>", None, None),
    ("<answer>   \n </answer>", None, None),
    ("<answer>\n Image 1 is better \n</answer>", 1.0, 1.0),
    ("<answer>Final: Image 2 is better.</answer>", 0.0, 0.0),
    ("<think>at first Image 2 is better, but</think><answer>Image 1 is better</answer>", 1.0, 1.0),
    ("<think>format: <answer>Image 2 is better</answer></think><answer>Image 1 is better</answer>", 0.0, 1.0),
    ("<answer>Tie</answer>", None, None),
    ("<answer>Image 1</answer>", None, None),
    ("<answer>Image  1 is better</answer>", None, None),
    ("<answer>Image 1 is better", None, 1.0),  # unclosed block: lenient falls back to the whole reply
    ("Image 1 is better</answer>", None, 1.0),
    ("<answer><answer>Image 2 is better</answer></answer>", 0.0, 0.0),
    (None, None, None),  # a failed call (the matrix records NaN; the win rate then counts 0.5)
    ("", None, None),
    ("<answer>\nImage 2 is better\n</answer>", 0.0, 0.0),
    ("Image 1 is better <answer>Image 2 is better</answer>", 0.0, 0.0),
    ("<answer>Image 12 is better</answer>", None, None),
    ("<answer>Video 1 is better</answer>", None, None),
    ("<answer>Image 1 is better</answer >", None, 1.0),  # a malformed closing tag is no block
    ("<answer >Image 1 is better</answer>", None, 1.0),
    ("<answer>Edited image 1 is better</answer>", None, 1.0),
    ("<answer>Image 1 is better!!!</answer>", 1.0, 1.0),
    (THINK + "<answer>Image 2 is better</answer><|im_end|>", 0.0, 0.0),
    ("<answer>结论：Image 1 is better</answer>", 1.0, 1.0),
    ("<think>Image 2 is better overall.</think>", None, 0.0),
]


@pytest.mark.parametrize(("text", "official", "lenient"), CASES)
def test_official_reading_matches_the_released_reward(
    text: str | None, official: float | None, lenient: float | None
) -> None:
    assert parse_official_preference(text) == official
    assert parse_preference(text, parsing="official") == official
    assert parse_preference(text) == lenient


def test_table_covers_the_disagreements() -> None:
    assert len(CASES) >= 30
    assert sum(official != lenient for _, official, lenient in CASES) >= 15
    assert {1.0, 0.0, None} <= {official for _, official, _ in CASES}


def test_official_judge_turns_a_truncated_verdict_into_a_tie() -> None:
    """The issue's case: with the default lenient reading a truncated "Image 1 is better" wins; officially it ties."""
    truncated = "<think>Image 1 is better because"
    images = [torch.zeros(3, 4, 4), torch.ones(3, 4, 4)]
    lenient = PairwisePreferenceJudge(FakeJudgeClient(lambda m: truncated)).judge_group("a cat", images)
    official = PairwisePreferenceJudge(FakeJudgeClient(lambda m: truncated), parsing="official")
    matrix = official.judge_group("a cat", images)
    assert lenient[0, 1] == 1.0 and matrix[0, 1] == 0.5 and official.last_metrics["judge/ties"] == 1.0
    with pytest.raises(ValueError, match="parsing"):
        PairwisePreferenceJudge(FakeJudgeClient(lambda m: truncated), parsing="strict")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="parsing"):
        parse_preference(truncated, parsing="strict")  # type: ignore[arg-type]
