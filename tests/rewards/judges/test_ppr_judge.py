"""PPR's principle process judge: prompt structure, `<final_score>` parsing, re-asks and the invalid policy,
a tiny local HF judge, and ProcessRewardTransform -> ReNorm against spec docs/methods/ppr.md P1/P2."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modalities.text_agent.process_rewards import ProcessRewardTransform
from modalities.text_agent.tiny import build_char_tokenizer, build_tiny_qwen2
from rewards.judges import (
    DEFAULT_PRINCIPLES,
    FakeJudgeClient,
    HFChatClient,
    OpenAIChatClient,
    PrincipleProcessJudge,
    build_system_prompt,
    build_turn_messages,
    parse_final_score,
    split_trajectory,
)
from rewards.judges.ppr import REASK_PROMPT, question_text
from toolkit.reward_transforms.ppr import ReNorm
from toolkit.rollout import Rollout

SEARCH_1 = ("<think>need the capital</think><search>capital of France</search>", "Doc 1(Title: France) Paris.")
SEARCH_2 = ("<search>population of Paris</search>", "<information>Doc 1(Title: Paris) 2.1M</information>")
ANSWER = ("<answer>Paris</answer>", "")


def response_of(messages: list[dict[str, Any]]) -> str:
    return str(messages[1]["content"]).split("**Response**:")[1]


def constant(reply: str | None) -> FakeJudgeClient:
    return FakeJudgeClient(lambda messages: reply)


# ---------------------------------------------------------------------------------------------- prompt


def test_system_prompt_has_principles_and_output_format() -> None:
    prompt = build_system_prompt()
    assert DEFAULT_PRINCIPLES in prompt
    assert "<final_score>SCORE,MAX_SCORE</final_score>" in prompt and "<final_score>4,6</final_score>" in prompt
    assert "<think>, <search>, <information> or <answer>" in prompt and "SCORE must be 0" in prompt
    assert "Analysis:" in prompt and "Scores:" in prompt
    custom = build_system_prompt("1. Is the query short?")
    assert "1. Is the query short?" in custom and DEFAULT_PRINCIPLES not in custom
    assert "<final_score>SCORE,MAX_SCORE</final_score>" in custom


def test_turn_messages_query_holds_history_and_response_the_step() -> None:
    turns = [SEARCH_1, SEARCH_2, ANSWER]
    first = build_turn_messages("Capital of France?", turns, 0)
    assert first[0] == {"role": "system", "content": build_system_prompt()}
    assert first[1]["role"] == "user"
    assert first[1]["content"] == (
        "[Conversation Context]\n**Query**: Capital of France?\n\n"
        "**Response**: <think>need the capital</think><search>capital of France</search>\n\n"
        "<information>Doc 1(Title: France) Paris.</information>"
    )
    second = build_turn_messages("Capital of France?", turns, 1, system_prompt="SYS")[1]["content"]
    query, response = second.split("**Response**: ")
    assert "Capital of France?" in query and "<search>capital of France</search>" in query
    assert "<information>Doc 1(Title: France) Paris.</information>" in query
    assert response == "<search>population of Paris</search>\n\n<information>Doc 1(Title: Paris) 2.1M</information>"
    assert second.count("<information>") == 2  # an already wrapped observation is not wrapped again
    with pytest.raises(ValueError, match="out of range"):
        build_turn_messages("q", turns, 3)


def test_turns_accept_dicts_pairs_and_strings() -> None:
    as_dict = build_turn_messages("q", [{"action": SEARCH_1[0], "observation": SEARCH_1[1]}], 0)
    assert as_dict == build_turn_messages("q", [list(SEARCH_1)], 0)
    assert response_of(build_turn_messages("q", ["<answer>x</answer>"], 0)) == " <answer>x</answer>"
    with pytest.raises(ValueError, match="action"):
        build_turn_messages("q", [{"observation": "x"}], 0)


def test_split_trajectory_at_information_blocks() -> None:
    text = (
        "<search>a</search>\n\n<information>A</information>\n\n"
        "<search>b</search><information>B</information><answer>x</answer>"
    )
    assert split_trajectory(text) == [
        {"action": "<search>a</search>", "observation": "<information>A</information>"},
        {"action": "<search>b</search>", "observation": "<information>B</information>"},
        {"action": "<answer>x</answer>", "observation": ""},
    ]
    assert split_trajectory("<answer>x</answer>") == [{"action": "<answer>x</answer>", "observation": ""}]
    ended_on_observation = split_trajectory("<search>a</search><information>A</information>\n")
    assert ended_on_observation == [{"action": "<search>a</search>", "observation": "<information>A</information>"}]


def test_question_text_from_chatml_chat_and_dicts() -> None:
    chatml = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nWho wrote it?<|im_end|>\n<|im_start|>assistant\n"
    assert question_text(chatml) == "Who wrote it?"
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "Why?"}]}]
    assert question_text(chat) == "Why?"
    assert question_text({"prompt": "plain?"}) == "plain?"
    assert question_text({"question": "direct?", "prompt": "long prompt"}) == "direct?"


# ---------------------------------------------------------------------------------------------- parser


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Analysis: fine.\nScores: <final_score>4,6</final_score>", (4, 6)),
        ("<final_score> 3 , 5 </final_score>", (3, 5)),
        ("<final_score>0,4</final_score>", (0, 4)),
        ("<final_score>6,6</final_score>", (6, 6)),
        ("Scores: <final_score>4,6</final_score> and some trailing words", (4, 6)),
        ("<final_score>1,2</final_score> then <final_score>5,8</final_score>", (5, 8)),
        ("<final_score>7,6</final_score>", None),  # SCORE > MAX
        ("<final_score>-1,6</final_score>", None),  # SCORE < 0
        ("<final_score>0,0</final_score>", None),  # MAX = 0
        ("<final_score>2,-3</final_score>", None),  # MAX < 0
        ("<final_score>4.5,6</final_score>", None),  # not integers
        ("<final_score>4/6</final_score>", None),
        ("<final_score>4,6,8</final_score>", None),
        ("<final_score>1,2</final_score> <final_score>x,y</final_score>", None),  # the last tag decides
        ("Scores: 4,6", None),  # no tag
        ("<final_score>4,6", None),  # unclosed
        ("@#%$ garbage", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_final_score(text: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_final_score(text) == expected


@settings(max_examples=60, deadline=None)
@given(st.integers(-20, 20), st.integers(-20, 20), st.text(alphabet="ab,<>/ 9\n", max_size=12))
def test_parse_final_score_validity_property(score: int, max_score: int, prefix: str) -> None:
    parsed = parse_final_score(f"{prefix}<final_score>{score},{max_score}</final_score>")
    if max_score > 0 and 0 <= score <= max_score:
        assert parsed == (score, max_score)
    else:
        assert parsed is None


# ---------------------------------------------------------------------------------------------- judge


def test_judge_skips_the_final_turn_and_keeps_per_turn_scores() -> None:
    client = FakeJudgeClient(
        lambda m: (
            "Scores: <final_score>4,6</final_score>" if "France" in response_of(m) else "<final_score>3,5</final_score>"
        )
    )
    judge = PrincipleProcessJudge(client, max_retries_invalid=0)
    out = judge(["Q?", "Q?"], ["ignored", "ignored"], turns=[[SEARCH_1, SEARCH_2, ANSWER], [ANSWER]])
    assert len(client.conversations) == 2  # row 0: two search turns; the answer turns are not judged
    assert all("<answer>" not in response_of(c) for c in client.conversations)
    assert judge.last_process_rewards == [[pytest.approx(4 / 6), pytest.approx(3 / 5)], []]
    assert out.scores[0].item() == pytest.approx((4 / 6 + 3 / 5) / 2, abs=1e-6)
    assert math.isnan(out.scores[1].item())  # nothing judged: not applicable
    assert out.metrics["judge/turns"] == 2 and out.metrics["judge/validity_rate"] == 1.0
    judge.judge_final_turn = True
    judge(["Q?"], ["x"], turns=[[SEARCH_1, ANSWER]])
    assert "<answer>Paris</answer>" in response_of(client.conversations[-1])


def test_judge_reads_turns_from_completion_and_question_from_prompt() -> None:
    client = constant("<final_score>1,4</final_score>")
    judge = PrincipleProcessJudge(client)
    completion = (
        "<search>a</search><information>A</information><search>b</search><information>B</information><answer>x</answer>"
    )
    out = judge(["<|im_start|>user\nWhere is it?<|im_end|>\n"], [completion])
    assert len(client.conversations) == 2
    assert client.conversations[0][1]["content"].startswith("[Conversation Context]\n**Query**: Where is it?\n\n")
    assert out.scores.tolist() == [0.25]
    judge(["ignored prompt"], [completion], question=["From metadata?"])
    assert "From metadata?" in client.conversations[-1][1]["content"]


def test_reask_with_feedback_recovers_invalid_output() -> None:
    client = FakeJudgeClient(lambda m: "<final_score>2,4</final_score>" if len(m) > 2 else "I think it is fine")
    judge = PrincipleProcessJudge(client, max_retries_invalid=1)
    out = judge(["Q?"], ["x"], turns=[[SEARCH_1, SEARCH_2, ANSWER]])
    assert judge.last_process_rewards == [[0.5, 0.5]]
    assert out.metrics["judge/reasks"] == 2 and out.metrics["judge/invalid"] == 0
    assert out.metrics["judge/validity_rate"] == 1.0
    reask = client.conversations[-1]
    assert reask[-2] == {"role": "assistant", "content": "I think it is fine"}
    assert reask[-1] == {"role": "user", "content": REASK_PROMPT}


def test_reask_without_feedback_resends_the_prompt() -> None:
    client = constant("garbage")
    judge = PrincipleProcessJudge(client, max_retries_invalid=2, reask_with_feedback=False)
    judge(["Q?"], ["x"], turns=[[SEARCH_1, ANSWER]])
    assert len(client.conversations) == 3 and client.conversations[0] == client.conversations[2]


@pytest.mark.parametrize(
    ("policy", "all_invalid", "mixed"),
    [("paper", 0.0, 0.3), ("zero", 0.0, 0.3), ("neutral", 0.5, 0.55), ("skip", math.nan, 0.6)],
)
def test_invalid_policy_after_retries(policy: str, all_invalid: float, mixed: float) -> None:
    client = FakeJudgeClient(lambda m: "<final_score>3,5</final_score>" if "population" in response_of(m) else "junk")
    judge = PrincipleProcessJudge(client, max_retries_invalid=2, invalid_policy=policy)  # type: ignore[arg-type]
    out = judge(["Q?", "Q?"], ["x", "x"], turns=[[SEARCH_1, ANSWER], [SEARCH_1, SEARCH_2, ANSWER]])
    assert judge.last_process_rewards == [[None], [None, pytest.approx(0.6)]]
    assert client.stats.requests == 3 + 1 + 3  # each invalid turn asked 1 + 2 times, the valid one once
    assert out.metrics["judge/invalid"] == 2 and out.metrics["judge/reasks"] == 4
    assert out.metrics["judge/validity_rate"] == pytest.approx(1 / 3)
    assert out.metrics["judge/failures"] == 0
    got = out.scores.tolist()
    assert (math.isnan(got[0]) and math.isnan(all_invalid)) or got[0] == pytest.approx(all_invalid)
    assert got[1] == pytest.approx(mixed)


def test_failed_requests_are_counted_not_reasked() -> None:
    client = constant(None)
    judge = PrincipleProcessJudge(client, max_retries_invalid=3, invalid_policy="neutral")
    out = judge(["Q?"], ["x"], turns=[[SEARCH_1, SEARCH_2, ANSWER]])
    assert client.stats.requests == 2
    assert out.metrics["judge/failures"] == 2 and out.metrics["judge/invalid"] == 2
    assert out.metrics["judge/reasks"] == 0 and out.metrics["judge/validity_rate"] == 0.0
    assert out.scores.tolist() == [0.5]


def test_judge_options() -> None:
    assert PrincipleProcessJudge(constant("x")).invalid_policy == "neutral"
    assert PrincipleProcessJudge(constant("x"), official_compat=True).invalid_policy == "paper"
    with pytest.raises(ValueError, match=re.escape("'median'") + ".*paper"):
        PrincipleProcessJudge(constant("x"), invalid_policy="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="score_scale"):
        PrincipleProcessJudge(constant("x"), score_scale=0.0)
    scaled = PrincipleProcessJudge(constant("<final_score>1,4</final_score>"), score_scale=10.0)
    assert scaled(["Q"], ["x"], turns=[[SEARCH_1, ANSWER]]).scores.tolist() == [2.5]


def test_from_config_builds_clients() -> None:
    judge = PrincipleProcessJudge.from_config(
        {"client": {"base_url": "http://127.0.0.1:9/v1", "model": "m", "max_concurrency": 4}, "principles": "P"}
    )
    assert isinstance(judge.client, OpenAIChatClient) and judge.client.max_concurrency == 4
    assert "P" in judge.system_prompt
    with pytest.raises(ValueError, match="base_url"):
        PrincipleProcessJudge.from_config({"client": {"temperature": 0.0}})


def test_tiny_hf_judge_output_counts_as_invalid_without_crashing() -> None:
    model = build_tiny_qwen2(max_position_embeddings=4096, seed=1)
    client = HFChatClient(model, build_char_tokenizer(), max_new_tokens=8, batch_size=4)
    judge = PrincipleProcessJudge(client, max_retries_invalid=1, invalid_policy="neutral")
    out = judge(["Q?", "Q?"], ["x", "x"], turns=[[SEARCH_1, SEARCH_2, ANSWER], [SEARCH_1, ANSWER]])
    assert out.metrics["judge/turns"] == 3 and out.metrics["judge/invalid"] == 3
    assert out.metrics["judge/validity_rate"] == 0.0 and out.metrics["judge/reasks"] == 3
    assert out.scores.tolist() == [0.5, 0.5]
    assert judge.last_process_rewards == [[None, None], [None]]


# ---------------------------------------------------------------------------------------------- transform


def p1_p2_rollout() -> Rollout:
    """Four trajectories, turn ends at t = 2, 5, 7 (two judged search turns, then the answer), T = 8.

    Rows 0/1: P1 (judge scores 4/6 and 3/5; r_o = 1, 0). Rows 2/3: P2 (turn 2's output unparseable).
    """
    turn_ends = torch.zeros(4, 8, dtype=torch.bool)
    turn_ends[:, [2, 5, 7]] = True
    prompts = [{"prompt": "Answer the question.", "question": q} for q in ("P1 a", "P1 b", "P2 a", "P2 b")]
    return Rollout(
        group_ids=torch.arange(4),
        old_logprobs=torch.zeros(4, 8),
        mask=torch.ones(4, 8, dtype=torch.bool),
        scores=torch.tensor([1.0, 0.0, 1.0, 0.0]),
        turn_ends=turn_ends,
        prompts=prompts,
        data={"turn_texts": [[SEARCH_1, SEARCH_2, ANSWER] for _ in range(4)]},
    )


def p1_p2_judge(invalid_policy: str) -> PrincipleProcessJudge:
    def reply(messages: list[dict[str, Any]]) -> str:
        if "France" in response_of(messages):
            return "Analysis: good.\nScores: <final_score>4,6</final_score>"
        if "P2" in messages[1]["content"]:
            return "Analysis: cannot decide. Scores: four out of five"
        return "Analysis: ok.\nScores: <final_score>3,5</final_score>"

    return PrincipleProcessJudge(FakeJudgeClient(reply), max_retries_invalid=1, invalid_policy=invalid_policy)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("policy", "p2_right", "p2_wrong"),
    [("zero", [0.666667, 0.0, 1.0], [-0.333333, -1.0, 0.0]), ("neutral", [0.666667, 0.5, 1.0], [-0.333333, -0.5, 0.0])],
)
def test_transform_then_renorm_matches_spec_p1_p2(policy: str, p2_right: list[float], p2_wrong: list[float]) -> None:
    rollout = ProcessRewardTransform(p1_p2_judge(policy))(p1_p2_rollout())
    assert rollout.data["process_rewards"] == [
        [pytest.approx(4 / 6), pytest.approx(3 / 5)],
        [pytest.approx(4 / 6), pytest.approx(3 / 5)],
        [pytest.approx(4 / 6), None],
        [pytest.approx(4 / 6), None],
    ]
    assert rollout.metrics["judge/invalid"] == 2 and rollout.metrics["judge/validity_rate"] == 0.75
    fill = 0.0 if policy == "zero" else 0.5
    expected_process = [(4 / 6 + 0.6) / 2] * 2 + [(4 / 6 + fill) / 2] * 2
    torch.testing.assert_close(rollout.rewards["process"], torch.tensor(expected_process), rtol=0, atol=1e-6)
    assert rollout.scores is not None and rollout.scores.tolist() == [1.0, 0.0, 1.0, 0.0]  # outcome untouched
    renorm = ReNorm(beta=1.0, final_step_mode="raw", invalid_prm=policy, enabled=True)  # type: ignore[arg-type]
    rollout = renorm(rollout)
    assert rollout.token_rewards is not None
    at_boundaries = rollout.token_rewards[:, [2, 5, 7]]
    expected = torch.tensor([[0.666667, 0.6, 1.0], [-0.333333, -0.4, 0.0], p2_right, p2_wrong])
    torch.testing.assert_close(at_boundaries, expected, rtol=0, atol=1e-5)
    assert rollout.token_rewards.abs().sum() == pytest.approx(at_boundaries.abs().sum().item())


def test_transform_accepts_final_less_turns_and_completions() -> None:
    judge = PrincipleProcessJudge(constant("<final_score>1,2</final_score>"))
    rollout = p1_p2_rollout()
    rollout.data["turn_texts"] = [[SEARCH_1, SEARCH_2] for _ in range(4)]  # only the intermediate turns
    assert ProcessRewardTransform(judge)(rollout).data["process_rewards"] == [[0.5, 0.5]] * 4
    rollout = p1_p2_rollout()
    del rollout.data["turn_texts"]
    rollout.completions = [
        "<search>a</search><information>A</information><search>b</search><information>B</information><answer>x</answer>"
    ] * 4
    out = ProcessRewardTransform({"client": constant("<final_score>1,4</final_score>")}, component=None)(rollout)
    assert out.data["process_rewards"] == [[0.25, 0.25]] * 4 and "process" not in out.rewards


def test_transform_rejects_turn_count_mismatch() -> None:
    rollout = p1_p2_rollout()
    rollout.data["turn_texts"][1] = [SEARCH_1, SEARCH_2, SEARCH_2, ANSWER]
    with pytest.raises(ValueError, match="row 1 has 3 turn ends but 4 turns"):
        ProcessRewardTransform(PrincipleProcessJudge(constant("x")))(rollout)
