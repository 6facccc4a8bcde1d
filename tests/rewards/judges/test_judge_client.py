"""Judge clients: the OpenAI-compatible client against a loopback fake server, the local HF client, the fake."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import torch

from modalities.text_agent.tiny import build_char_tokenizer, build_tiny_qwen2
from rewards.judges.client import ClientStats, FakeJudgeClient, HFChatClient, JudgeClient, OpenAIChatClient

# (status, reply body, seconds to sleep before answering) for the n-th request (0-based) and its JSON body.
Behaviour = Callable[[int, dict[str, Any]], tuple[int, Any, float]]


def chat_reply(text: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


def echo(_: int, body: dict[str, Any]) -> tuple[int, Any, float]:
    return 200, chat_reply("echo: " + body["messages"][-1]["content"]), 0.0


@dataclass
class FakeServer:
    """State shared with the handler threads: the behaviour, requests seen, in-flight counts."""

    behaviour: Behaviour = echo
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
        with self.lock:
            index = len(self.bodies)
            self.bodies.append(body)
            self.headers.append(dict(handler.headers))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            status, reply, delay = self.behaviour(index, body)
            time.sleep(delay)
            data = reply.encode() if isinstance(reply, str) else json.dumps(reply).encode()
        finally:
            # Counted out before the reply leaves: once the client has it, its worker may send the next request
            # before this handler thread runs again (a count after the write saw one request too many in flight).
            with self.lock:
                self.in_flight -= 1
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass


@pytest.fixture
def server() -> Iterator[FakeServer]:
    state = FakeServer()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server naming)
            if self.path != "/v1/chat/completions":
                self.send_error(404)
                return
            state.handle(self)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield state
    httpd.shutdown()
    httpd.server_close()


def make_client(url: str, **kwargs: Any) -> OpenAIChatClient:
    options: dict[str, Any] = {"timeout_s": 5.0, "max_retries": 2, "backoff_s": 0.0, "use_env_proxy": False}
    options.update(kwargs)
    return OpenAIChatClient(url, "judge-model", **options)


def ask(text: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "be strict"}, {"role": "user", "content": text}]


def test_round_trip_sends_openai_chat_requests(server: FakeServer) -> None:
    client = make_client(server.url, api_key="k-123", temperature=0.0, max_tokens=64, extra_body={"top_p": 1.0})
    assert isinstance(client, JudgeClient)
    assert client.complete([ask("a"), ask("b")]) == ["echo: a", "echo: b"]
    assert sorted(b["messages"][-1]["content"] for b in server.bodies) == ["a", "b"]
    body = server.bodies[0]
    assert body["model"] == "judge-model" and body["max_tokens"] == 64 and body["temperature"] == 0.0
    assert body["top_p"] == 1.0 and body["messages"][0] == {"role": "system", "content": "be strict"}
    assert server.headers[0]["Authorization"] == "Bearer k-123"
    assert (client.stats.requests, client.stats.failures, client.stats.retries) == (2, 0, 0)
    assert client.stats.mean_latency_s > 0
    assert client.complete([]) == []


def test_content_parts_pass_through_unchanged(server: FakeServer) -> None:
    parts = [
        {"type": "text", "text": "compare"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
    ]
    server.behaviour = lambda i, body: (200, chat_reply(json.dumps(body["messages"][0]["content"])), 0.0)
    client = make_client(server.url)
    assert json.loads(client.complete([[{"role": "user", "content": parts}]])[0] or "") == parts


def test_server_error_is_retried_then_succeeds(server: FakeServer) -> None:
    server.behaviour = lambda i, body: (500, {"error": "busy"}, 0.0) if i == 0 else echo(i, body)
    client = make_client(server.url, max_retries=2)
    assert client.complete([ask("x")]) == ["echo: x"]
    assert len(server.bodies) == 2
    assert (client.stats.requests, client.stats.attempts, client.stats.retries, client.stats.failures) == (1, 2, 1, 0)


def test_rate_limit_429_is_retried(server: FakeServer) -> None:
    server.behaviour = lambda i, body: (429, {"error": "slow down"}, 0.0) if i < 2 else echo(i, body)
    client = make_client(server.url, max_retries=3)
    assert client.complete([ask("y")]) == ["echo: y"]
    assert client.stats.retries == 2


def test_client_error_is_not_retried(server: FakeServer) -> None:
    server.behaviour = lambda i, body: (400, {"error": "bad request"}, 0.0)
    client = make_client(server.url, max_retries=3)
    assert client.complete([ask("z")]) == [None]
    assert len(server.bodies) == 1
    assert (client.stats.failures, client.stats.retries) == (1, 0)


def test_timeout_gives_none_after_retries(server: FakeServer) -> None:
    server.behaviour = lambda i, body: (200, chat_reply("late"), 0.6)
    client = make_client(server.url, timeout_s=0.15, max_retries=1)
    start = time.perf_counter()
    assert client.complete([ask("slow")]) == [None]
    assert time.perf_counter() - start < 0.55  # two attempts of 0.15 s, never the server's 0.6 s each
    assert (client.stats.failures, client.stats.retries, len(server.bodies)) == (1, 1, 2)


def test_malformed_reply_is_retried_and_counted(server: FakeServer) -> None:
    server.behaviour = lambda i, body: (200, "not json" if i % 2 == 0 else {"choices": []}, 0.0)
    client = make_client(server.url, max_retries=2)
    assert client.complete([ask("m")]) == [None]
    assert (client.stats.attempts, client.stats.failures) == (3, 1)


def test_connection_refused_counts_as_failure() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = make_client(f"http://127.0.0.1:{port}/v1", max_retries=1)
    assert client.complete([ask("a"), ask("b")]) == [None, None]
    assert (client.stats.requests, client.stats.failures, client.stats.retries) == (2, 2, 2)


def test_concurrency_is_bounded(server: FakeServer) -> None:
    server.behaviour = lambda i, body: (200, chat_reply(str(i)), 0.05)
    client = make_client(server.url, max_concurrency=3)
    replies = client.complete([ask(str(k)) for k in range(12)])
    assert len(replies) == 12 and all(r is not None for r in replies)
    assert 2 <= server.max_in_flight <= 3


def test_stats_since_and_metrics() -> None:
    before = ClientStats(requests=2, attempts=3, failures=1, latency_s=1.0)
    after = ClientStats(requests=5, attempts=7, failures=1, latency_s=2.5)
    delta = after.since(before)
    assert (delta.requests, delta.retries, delta.failures) == (3, 1, 0)
    assert delta.as_metrics()["judge/latency_s"] == pytest.approx(0.5)


def test_api_key_from_environment(monkeypatch: pytest.MonkeyPatch, server: FakeServer) -> None:
    monkeypatch.setenv("JUDGE_TEST_KEY", "from-env")
    client = make_client(server.url, api_key_env="JUDGE_TEST_KEY")
    client.complete([ask("k")])
    assert server.headers[0]["Authorization"] == "Bearer from-env"
    monkeypatch.delenv("JUDGE_TEST_KEY")
    with pytest.raises(ValueError, match="JUDGE_TEST_KEY"):
        make_client(server.url, api_key_env="JUDGE_TEST_KEY")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"timeout_s": 0}, "timeout_s"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"max_retries": -1}, "max_retries"),
        ({"api_key": "a", "api_key_env": "B"}, "not both"),
    ],
)
def test_bad_options_are_rejected(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_client("http://127.0.0.1:1/v1", **kwargs)
    with pytest.raises(ValueError, match="http"):
        OpenAIChatClient("127.0.0.1:8000", "m")


def test_fake_client_counts_none_as_failure() -> None:
    client = FakeJudgeClient(lambda messages: None if "bad" in messages[-1]["content"] else "ok")
    assert client.complete([ask("good"), ask("bad")]) == ["ok", None]
    assert (client.stats.requests, client.stats.failures) == (2, 1)
    assert client.conversations[1][-1]["content"] == "bad"


@pytest.fixture(scope="module")
def tiny_hf_client() -> HFChatClient:
    model = build_tiny_qwen2(max_position_embeddings=4096, seed=0)
    return HFChatClient(model, build_char_tokenizer(), max_new_tokens=12, batch_size=2)


def test_hf_client_generates_deterministic_text(tiny_hf_client: HFChatClient) -> None:
    batch = [ask("short"), ask("a much longer question for left padding"), ask("third")]
    first = tiny_hf_client.complete(batch)
    assert len(first) == 3 and all(isinstance(t, str) for t in first)
    assert tiny_hf_client.complete(batch) == first
    assert tiny_hf_client.stats.requests == 6 and tiny_hf_client.stats.failures == 0


def test_hf_client_greedy_batch_matches_single(tiny_hf_client: HFChatClient) -> None:
    batch = [ask("hi"), ask("a longer prompt that forces left padding")]
    together = tiny_hf_client.complete(batch)
    alone = [tiny_hf_client.complete([c])[0] for c in batch]
    assert together == alone


def test_hf_client_joins_text_parts_and_rejects_images(tiny_hf_client: HFChatClient) -> None:
    joined = [{"role": "user", "content": [{"type": "text", "text": "ab"}, {"type": "text", "text": "c"}]}]
    assert tiny_hf_client.complete([joined]) == tiny_hf_client.complete([[{"role": "user", "content": "abc"}]])
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(ValueError, match="VLM"):
        tiny_hf_client.complete([image])


def test_hf_client_needs_a_tokenizer_with_template() -> None:
    model = build_tiny_qwen2()
    with pytest.raises(ValueError, match="tokenizer"):
        HFChatClient(model)
    with pytest.raises(ValueError, match="chat_template"):
        HFChatClient(model, build_char_tokenizer(chat_template=None))
    assert torch.is_grad_enabled()
