"""The `/retrieve` HTTP server and client over loopback: round trips, schema, errors, retries, and the CLI."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modalities.text_agent.tools import BM25Search, RetrieverClient, SearchHit, ToolError, make_server, retriever_server
from modalities.text_agent.tools.retriever_server import RetrieverServer
from toolkit.cli import main

CORPUS = Path(__file__).resolve().parents[1] / "data" / "text_agent" / "corpus.jsonl"
QUESTIONS = [json.loads(line)["question"] for line in (CORPUS.parent / "synthetic_qa.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def bm25() -> BM25Search:
    retriever = BM25Search(str(CORPUS))
    retriever.build()
    return retriever


def serve(retriever: Any) -> RetrieverServer:
    server = make_server(retriever, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def server(bm25: BM25Search) -> Iterator[RetrieverServer]:
    running = serve(bm25)
    yield running
    running.shutdown()
    running.server_close()


def post(url: str, body: bytes) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_client_round_trip_equals_in_process_retriever(server: RetrieverServer, bm25: BM25Search) -> None:
    client = RetrieverClient(server.url, top_k=3, timeout_s=5)
    assert client.retrieve(QUESTIONS) == bm25.retrieve(QUESTIONS)
    assert client(QUESTIONS[:5]) == bm25(QUESTIONS[:5])
    assert [len(r) for r in client.retrieve(QUESTIONS[:2], top_k=5)] == [5, 5]
    assert client.num_requests == 3 and client.num_retries == 0 and client.num_failures == 0


def test_response_schema_is_search_r1s(server: RetrieverServer, bm25: BM25Search) -> None:
    query = "Who founded Kestoria?"
    status, body = post(server.url, json.dumps({"queries": [query], "topk": 2, "return_scores": True}).encode())
    assert status == 200 and len(body["result"]) == 1 and len(body["result"][0]) == 2
    first = body["result"][0][0]
    expected = bm25.retrieve([query])[0][0]
    assert first == {
        "document": {"id": expected.document.id, "contents": expected.document.contents},
        "score": expected.score,
    }
    status, body = post(server.url, json.dumps({"queries": [query, "Ostavia"]}).encode())
    assert status == 200 and [len(r) for r in body["result"]] == [3, 3]  # server default top_k
    assert set(body["result"][0][0]) == {"id", "contents"}  # return_scores defaults to false: plain documents


def test_health(server: RetrieverServer) -> None:
    with urllib.request.urlopen(server.url.replace("/retrieve", "/health"), timeout=5) as response:
        assert response.status == 200
        assert json.loads(response.read()) == {"status": "ok", "num_documents": 60, "top_k": 3}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"topk": 3}', "'queries' must be a list of strings"),
        (b'{"queries": "a question"}', "'queries' must be a list of strings"),
        (b'{"queries": ["a", 3]}', "'queries' must be a list of strings"),
        (b'{"queries": ["a"], "topk": 0}', "'topk' must be a positive integer"),
        (b'{"queries": ["a"], "topk": true}', "'topk' must be a positive integer"),
        (b'{"queries": ["a"], "return_scores": "yes"}', "'return_scores' must be true or false"),
    ],
)
def test_malformed_requests_get_400_with_a_json_error(server: RetrieverServer, body: bytes, message: str) -> None:
    status, payload = post(server.url, body)
    assert status == 400 and message in payload["error"]


def test_unknown_path_is_404_and_not_retried(server: RetrieverServer) -> None:
    assert post(server.url.replace("/retrieve", "/search"), b"{}")[0] == 404
    client = RetrieverClient(server.url.replace("/retrieve", "/nope"), max_retries=3, backoff_s=0.0)
    with pytest.raises(ToolError, match="HTTP 404"):
        client.retrieve(["x"])
    assert client.num_requests == 1 and client.num_failures == 1


class FailingRetriever:
    top_k = 3

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls = 0

    def retrieve(self, queries: list[str], top_k: int | None = None) -> list[list[SearchHit]]:
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
            return [[] for _ in queries]
        raise RuntimeError("index exploded")


def test_server_errors_are_500_and_retried_then_tool_error() -> None:
    failing = FailingRetriever()
    running = serve(failing)
    try:
        client = RetrieverClient(running.url, max_retries=2, backoff_s=0.01)
        with pytest.raises(ToolError, match=r"failed after 3 attempt\(s\): HTTP 500.*index exploded"):
            client(["q"])
        assert failing.calls == 3 and client.num_requests == 3 and client.num_retries == 2
    finally:
        running.shutdown()
        running.server_close()


class ShortRetriever:
    top_k = 3

    def retrieve(self, queries: list[str], top_k: int | None = None) -> list[list[SearchHit]]:
        return []  # one row short per query: a broken server


def test_malformed_response_is_a_tool_error_without_retries() -> None:
    running = serve(ShortRetriever())
    try:
        client = RetrieverClient(running.url, max_retries=3, backoff_s=0.0)
        with pytest.raises(ToolError, match=r"sent no 'result' list with 2 entries"):
            client(["a", "b"])
        assert client.num_requests == 1 and client.num_failures == 1
    finally:
        running.shutdown()
        running.server_close()


def test_server_down_retries_then_tool_error_in_time() -> None:
    url = f"http://127.0.0.1:{free_port()}/retrieve"
    client = RetrieverClient(url, timeout_s=1.0, max_retries=2, backoff_s=0.05)
    start = time.perf_counter()
    with pytest.raises(ToolError, match=f"retriever at {url} failed after 3 attempt"):
        client(["What is the capital of Zorvania?"])
    assert time.perf_counter() - start < 2.0
    assert client.num_requests == 3 and client.num_retries == 2 and client.num_failures == 1


def test_slow_server_times_out_then_tool_error() -> None:
    slow = FailingRetriever(delay_s=0.6)
    running = serve(slow)
    try:
        client = RetrieverClient(running.url, timeout_s=0.2, max_retries=1, backoff_s=0.0)
        start = time.perf_counter()
        with pytest.raises(ToolError, match="timed out|Timeout"):
            client(["q"])
        assert time.perf_counter() - start < 1.5 and client.num_requests == 2
    finally:
        running.shutdown()
        running.server_close()


def test_client_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="http"):
        RetrieverClient("localhost:8000/retrieve")
    with pytest.raises(ValueError, match="timeout_s"):
        RetrieverClient(timeout_s=0)
    assert RetrieverClient().retrieve([]) == []


def test_serve_retriever_help_through_renorm_cli(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve-retriever", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--backend {bm25,dense}" in out and "/retrieve" in out


def test_serve_retriever_missing_corpus_is_a_clear_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["serve-retriever", str(tmp_path / "wiki-18.jsonl")]) == 2
    assert "retrieval corpus not found" in capsys.readouterr().err


def test_serve_retriever_command_serves_over_loopback(
    bm25: BM25Search, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    created: list[RetrieverServer] = []

    def recording_make_server(*args: Any, **kwargs: Any) -> RetrieverServer:
        created.append(make_server(*args, **kwargs))
        return created[-1]

    monkeypatch.setattr(retriever_server, "make_server", recording_make_server)
    thread = threading.Thread(target=main, args=(["serve-retriever", str(CORPUS), "--port", "0", "--top-k", "2"],))
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not created and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert created, "the command did not start a server"
        client = RetrieverClient(created[0].url, timeout_s=10)
        assert client.retrieve(QUESTIONS[:4]) == bm25.retrieve(QUESTIONS[:4], top_k=3)
        status, body = post(created[0].url, json.dumps({"queries": ["Zorvania"]}).encode())
        assert status == 200 and len(body["result"][0]) == 2  # --top-k is the server default
    finally:
        if created:
            created[0].shutdown()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert f"serving 60 documents (bm25) at {created[0].url}" in capsys.readouterr().out
