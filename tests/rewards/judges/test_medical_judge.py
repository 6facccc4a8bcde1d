"""MedicalCaptionJudge (spec docs/methods/medgrpo.md §5, M5): rubric parsing, re-asks with back-off, counted failures,
an endpoint that is down (loopback socket with nothing listening) and a loopback server that answers."""

from __future__ import annotations

import json
import math
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewards.judges.client import FakeJudgeClient, JudgeClient, OpenAIChatClient
from rewards.judges.medical import (
    ASPECTS,
    REASK_PROMPT,
    MedicalCaptionJudge,
    aggregate_rubrics,
    build_messages,
    parse_rubric,
    rubric_score,
)
from rewards.video.rl import CaptionReward

RUBRIC = "R2: 4\nR3: 3\nR8: 5\nR5: 4\nR4: 5"


def test_m5_judge_score() -> None:
    ratings = parse_rubric(RUBRIC)
    assert ratings == {"R2": 4, "R3": 3, "R8": 5, "R5": 4, "R4": 5}
    assert rubric_score(ratings) == pytest.approx(4.2, abs=1e-5)
    judge = MedicalCaptionJudge(FakeJudgeClient(lambda m: RUBRIC), backoff_s=0.0)
    out = judge(["q"], ["a prediction"], answer=["a reference"])
    assert out.scores.tolist() == pytest.approx([4.2], abs=1e-5)


@pytest.mark.parametrize(
    "text",
    [
        "R2: 4\nR3 = 3\nR8 5\n**R5**: 4\n**R4:** 5",
        "Here are my ratings:\nR2: 4\nR3: 3\nR8: 5\nR5: 4\nR4: 5\nThanks",
        "R4: 5\nR5: 4\nR8: 5\nR3: 3\nR2: 4",
    ],
)
def test_rubric_accepted_spellings(text: str) -> None:
    assert parse_rubric(text) == {"R2": 4, "R3": 3, "R8": 5, "R5": 4, "R4": 5}


GARBAGE = [
    None,
    "",
    "R2: 4\nR3: 3\nR8: 5\nR5: 4",
    "R2: 4 R3: 3 R8: 5 R5: 4 R4: 5",
    "R2: 0\nR3: 3\nR8: 5\nR5: 4\nR4: 5",
    "R2: 6\nR3: 3\nR8: 5\nR5: 4\nR4: 5",
    "R2: four\nR3: 3\nR8: 5\nR5: 4\nR4: 5",
]


@pytest.mark.parametrize("text", GARBAGE)
def test_rubric_rejects_garbage(text: str | None) -> None:
    assert parse_rubric(text) is None


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=120))
def test_rubric_parser_never_raises(text: str) -> None:
    parsed = parse_rubric(text)
    assert parsed is None or (list(parsed) == list(ASPECTS) and all(1 <= v <= 5 for v in parsed.values()))


def test_messages_show_reference_and_prediction() -> None:
    system, user = build_messages("pred text", "ref text")
    assert "expert medical evaluator" in system["content"] and all(a in system["content"] for a in ASPECTS)
    assert user["content"].index("ref text") < user["content"].index("pred text")


def test_garbage_then_valid_is_reasked_with_feedback() -> None:
    replies = iter(["I think it is good.", RUBRIC])
    client = FakeJudgeClient(lambda m: next(replies))
    result = MedicalCaptionJudge(client, backoff_s=0.0).judge(["p"], ["r"])
    assert result.scores.tolist() == pytest.approx([4.2]) and result.metrics["judge/reasks"] == 1.0
    assert client.conversations[1][-1] == {"role": "user", "content": REASK_PROMPT}
    assert client.conversations[1][-2]["content"] == "I think it is good."


def test_persistent_garbage_fails_after_max_attempts_and_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr("rewards.judges.medical.time.sleep", sleeps.append)
    client = FakeJudgeClient(lambda m: RUBRIC if "good" in m[1]["content"] else "garbage")
    judge = MedicalCaptionJudge(client, max_attempts=4, backoff_s=0.5, max_backoff_s=1.5)
    result = judge.judge(["good", "bad"], ["r", "r"])
    assert result.scores[0] == pytest.approx(4.2) and math.isnan(result.scores[1])
    assert result.ratings[1] is None and result.replies[1] == "garbage"
    assert result.metrics["judge/failures"] == 1.0 and result.metrics["judge/failure_rate"] == 0.5
    assert result.metrics["judge/reasks"] == 3.0 and len(client.conversations) == 2 + 3
    assert sleeps == [0.5, 1.0, 1.5]  # exponential back-off, capped


def test_caption_reward_with_failing_judge_excludes_the_row() -> None:
    reward = CaptionReward(
        similarity="hashing",
        judge=MedicalCaptionJudge(FakeJudgeClient(lambda m: None), max_attempts=2, backoff_s=0.0),
    )
    out = reward(["q", "q"], ["a b", "a b"], task=["rc", "tal"], answer=["a b", "1-2 seconds"])
    assert math.isnan(out.scores[0]) and math.isnan(out.scores[1])
    assert out.metrics["judge/failures"] == 1.0


def test_aggregate_rubrics_excludes_failures() -> None:
    rows = [parse_rubric(RUBRIC), None, {"R2": 2, "R3": 3, "R8": 1, "R5": 4, "R4": 5}]
    assert aggregate_rubrics(rows) == pytest.approx((4.2 + 3.0) / 2)
    assert math.isnan(aggregate_rubrics([None]))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        MedicalCaptionJudge(FakeJudgeClient(lambda m: RUBRIC), max_attempts=0)
    with pytest.raises(ValueError, match="base_url"):
        MedicalCaptionJudge.from_config({"client": {"url": "x"}})
    judge = MedicalCaptionJudge.from_config({"client": {"base_url": "http://127.0.0.1:9/v1", "model": "gpt-4.1"}})
    assert isinstance(judge.client, OpenAIChatClient)


def test_endpoint_down_counts_failures() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = OpenAIChatClient(f"http://127.0.0.1:{port}/v1", "judge", max_retries=1, backoff_s=0.0, use_env_proxy=False)
    judge = MedicalCaptionJudge(client, max_attempts=2, backoff_s=0.0)
    result = judge.judge(["a", "b"], ["r", "r"])
    assert all(math.isnan(v) for v in result.scores.tolist())
    assert result.metrics["judge/failures"] == 2.0 and client.stats.failures == 4  # 2 rows x 2 asks


@pytest.fixture
def judge_server() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server naming)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text = RUBRIC if "PREDICTION" in body["messages"][-1]["content"] else "?"
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_loopback_endpoint_round_trip(judge_server: str) -> None:
    client: JudgeClient = OpenAIChatClient(judge_server, "gpt-4.1", backoff_s=0.0, use_env_proxy=False)
    out = MedicalCaptionJudge(client, backoff_s=0.0)(["q", "q"], ["p1", "p2"], answer=["r1", "r2"])
    assert out.scores.tolist() == pytest.approx([4.2, 4.2]) and out.metrics["judge/failures"] == 0.0
