"""Pairwise preference judge (Pref-GRPO, spec docs/methods/pref_grpo.md §2, P1): bookkeeping, ties, orders, failures."""

from __future__ import annotations

import base64
import io
import socket
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from rewards.judges.client import FakeJudgeClient, OpenAIChatClient, image_data_url, image_part, openai_message
from rewards.judges.pairwise import (
    PairwisePreferenceJudge,
    PairwiseWinRateReward,
    build_pair_messages,
    local_win_rates,
    pair_jobs,
    parse_preference,
)
from tests.rewards.judges.test_judge_client import FakeServer, chat_reply, make_client, server  # noqa: F401
from toolkit.advantages.group import group_normalized_advantages
from toolkit.reward_transforms.pref_grpo import PairwiseWinRate, win_rates
from toolkit.rollout import Rollout

# P1: winner of each pair (i, j), i < j; None = tie.
P1_WINNERS: dict[tuple[int, int], int | None] = {(0, 1): 0, (0, 2): 2, (0, 3): 0, (1, 2): 2, (1, 3): None, (2, 3): 2}


def solid(index: int, size: int = 8) -> Image.Image:
    """An image whose red channel encodes its index in the group (read back by the fake judge)."""
    return Image.new("RGB", (size, size), (20 * index + 10, 0, 0))


def shown_indices(messages: list[dict[str, Any]]) -> tuple[int, int]:
    images = [p["image"] for p in messages[-1]["content"] if p.get("type") == "image"]
    assert len(images) == 2
    return tuple((im.getpixel((0, 0))[0] - 10) // 20 for im in images)  # type: ignore[return-value]


def p1_judge(messages: list[dict[str, Any]]) -> str:
    first, second = shown_indices(messages)
    winner = P1_WINNERS[(min(first, second), max(first, second))]
    if winner is None:
        return "<think>both are equally good</think><answer>They are equally good</answer>"
    return f"<think>...</think><answer>Image {1 if winner == first else 2} is better</answer>"


def test_p1_bookkeeping_through_judge_and_toolkit_win_rates() -> None:
    client = FakeJudgeClient(p1_judge)
    judge = PairwisePreferenceJudge(client)
    matrix = judge.judge_group("a red cube", [solid(k) for k in range(4)])
    assert len(client.conversations) == 6  # all unordered pairs, one order
    assert [shown_indices(c) for c in client.conversations] == pair_jobs(4, "one")
    assert judge.last_metrics["judge/ties"] == 1.0 and judge.last_metrics["judge/failures"] == 0.0
    rollout = Rollout(
        group_ids=torch.zeros(4, dtype=torch.long),
        old_logprobs=torch.zeros(4, 1),
        mask=torch.ones(4, 1, dtype=torch.bool),
    )
    rollout.data["pairwise"] = matrix  # [N, G] layout: row n = image n's matrix row
    out = PairwiseWinRate(order="one", decimals=3)(rollout)
    assert out.rewards["win_rate"].tolist() == pytest.approx([0.667, 0.167, 1.0, 0.167], abs=1e-6)
    assert out.metrics["pairwise/tie_frac"] == pytest.approx(1 / 6)
    advantages, _ = group_normalized_advantages(
        out.rewards["win_rate"], rollout.group_ids, std="unbiased", eps=1e-8, eps_placement="std_plus_eps"
    )
    assert advantages.tolist() == pytest.approx([0.408589, -0.816565, 1.224541, -0.816565], abs=1e-5)
    standalone = PairwiseWinRateReward(PairwisePreferenceJudge(FakeJudgeClient(p1_judge)), group_size=4)
    assert standalone(["a red cube"] * 4, [solid(k) for k in range(4)]).scores.tolist() == pytest.approx(
        [0.667, 0.167, 1.0, 0.167], abs=1e-6
    )


def test_garbage_and_failed_calls_are_counted_ties() -> None:
    replies = iter(["Image 1 is better", "no idea", None, "<answer>Image 2 is better</answer>", "", None])
    judge = PairwisePreferenceJudge(FakeJudgeClient(lambda m: next(replies)))
    matrix = judge.judge_group("x", [solid(k) for k in range(4)])
    assert judge.last_metrics["judge/ties"] == 2.0 and judge.last_metrics["judge/failures"] == 2.0
    assert judge.last_metrics["judge/tie_rate"] == pytest.approx(4 / 6)
    assert matrix[0, 1] == 1.0 and matrix[0, 2] == 0.5 and torch.isnan(matrix[0, 3]) and matrix[1, 2] == 0.0
    assert torch.isnan(matrix[1, 0])  # lower triangle not judged in order "one"
    rates = local_win_rates(matrix)
    assert torch.allclose(rates, win_rates(matrix))
    assert float(rates.sum()) == pytest.approx(2.0, abs=2e-3)  # mean 0.5 up to rounding


def test_reasks_fix_garbage_when_enabled() -> None:
    calls = {"n": 0}

    def flaky(messages: list[dict[str, Any]]) -> str:
        calls["n"] += 1
        return "hmm" if calls["n"] == 1 else "Image 1 is better"

    judge = PairwisePreferenceJudge(FakeJudgeClient(flaky), max_retries_invalid=1)
    matrix = judge.judge_group("x", [solid(0), solid(1)])
    assert matrix[0, 1] == 1.0 and judge.last_metrics["judge/reasks"] == 1.0 and judge.last_metrics["judge/ties"] == 0


def test_symmetric_order_judges_both_orders() -> None:
    # A position-biased judge: always prefers the first image shown.
    client = FakeJudgeClient(lambda m: "<answer>Image 1 is better</answer>")
    judge = PairwisePreferenceJudge(client, order="symmetric")
    matrix = judge.judge_group("x", [solid(k) for k in range(3)])
    assert len(client.conversations) == 6
    assert sorted(shown_indices(c) for c in client.conversations) == sorted(pair_jobs(3, "symmetric"))
    off = ~torch.eye(3, dtype=torch.bool)
    assert bool((matrix[off] == 1.0).all())
    assert local_win_rates(matrix, "symmetric").tolist() == pytest.approx([0.5] * 3)  # bias cancels out
    assert local_win_rates(matrix, "one").tolist() == pytest.approx([1.0, 0.5, 0.0])


def test_endpoint_down_gives_counted_ties_without_crash() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = OpenAIChatClient(f"http://127.0.0.1:{port}/v1", "judge", max_retries=1, backoff_s=0.0, use_env_proxy=False)
    judge = PairwisePreferenceJudge(client)
    reward = PairwiseWinRateReward(judge)
    out = reward(["x"] * 6, [solid(k) for k in range(6)], group_ids=[0, 0, 0, 1, 1, 1])
    assert out.scores.tolist() == [0.5] * 6
    assert out.metrics["judge/failures"] == 6.0 and out.metrics["judge/tie_rate"] == 1.0
    assert client.stats.retries == 6


def test_image_is_sent_as_png_data_url(server: FakeServer) -> None:  # noqa: F811
    server.behaviour = lambda i, body: (200, chat_reply("<answer>Image 2 is better</answer>"), 0.0)
    judge = PairwisePreferenceJudge(make_client(server.url))
    assert judge.judge_group("a caption", [solid(1), solid(2)])[0, 1] == 0.0
    parts = server.bodies[0]["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
    url = parts[0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.getpixel((0, 0)) == solid(1).getpixel((0, 0))
    assert "a caption" in parts[2]["text"] and "<answer>" in parts[2]["text"]


def test_openai_message_keeps_other_content_unchanged() -> None:
    assert openai_message({"role": "user", "content": "plain"}) == {"role": "user", "content": "plain"}
    ready = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}
    converted = openai_message({"role": "user", "content": [ready, image_part(solid(0))]})
    assert converted["content"][0] is ready and converted["content"][1]["image_url"]["url"] == image_data_url(solid(0))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>Image 2 is better at first</think><answer>Image 1 is better</answer>", 1.0),
        ("image 2 IS BETTER", 0.0),
        ("<answer>Image 1 is better and Image 2 is better</answer>", None),
        ("<answer>tie</answer>", None),
        (None, None),
    ],
)
def test_parse_preference(text: str | None, expected: float | None) -> None:
    assert parse_preference(text) == expected
    assert parse_preference("Image 1 is better", require_answer_tag=True) is None


def test_prompt_styles_and_bad_options() -> None:
    messages = build_pair_messages("cap", solid(0), solid(1), "answer_only")
    assert "<think>" not in messages[0]["content"][2]["text"]
    with pytest.raises(ValueError, match="prompt_style"):
        PairwisePreferenceJudge(FakeJudgeClient(lambda m: ""), prompt_style="cot")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="order"):
        PairwisePreferenceJudge(FakeJudgeClient(lambda m: ""), order="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="group_size"):
        PairwisePreferenceJudge(FakeJudgeClient(lambda m: "")).judge_group("x", [solid(0)])
    with pytest.raises(ValueError, match="group_ids"):
        PairwiseWinRateReward(PairwisePreferenceJudge(FakeJudgeClient(lambda m: "")))(["x"] * 3, [solid(0)] * 3)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(2, 6).flatmap(
        lambda g: st.tuples(
            st.just(g), st.lists(st.sampled_from([0.0, 0.5, 1.0, float("nan")]), min_size=g * g, max_size=g * g)
        )
    ),
    st.sampled_from(["one", "symmetric"]),
)
def test_local_win_rates_match_toolkit(case: tuple[int, list[float]], order: str) -> None:
    g, values = case
    matrix = torch.tensor(values).reshape(g, g)
    assert torch.equal(local_win_rates(matrix, order), win_rates(matrix, order))  # type: ignore[arg-type]
