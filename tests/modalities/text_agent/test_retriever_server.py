"""The `/retrieve` HTTP server and client over loopback: round trips, schema, errors, retries, the CLI, and
abuse (malformed Content-Length, oversized and over-cap requests, deep JSON, idle connections, floods)
answered with a 4xx JSON and no lasting thread or connection.
"""

from __future__ import annotations

import json
import logging
import re
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
from modalities.text_agent.tools.retriever_server import (
    SEARCH_CHUNK,
    FairLock,
    RetrieverServer,
    ServerLimits,
    parse_request,
    serving,
)
from toolkit.cli import main

CORPUS = Path(__file__).resolve().parents[3] / "data" / "text_agent" / "corpus.jsonl"
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
    assert all(flag in out for flag in ("--max-queries", "--max-top-k", "--timeout-s", "--max-connections"))


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
    argv = ["serve-retriever", str(CORPUS), "--port", "0", "--top-k", "2", "--max-queries", "8", "--max-top-k", "5"]
    thread = threading.Thread(target=main, args=(argv,))
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
        status, body = post(created[0].url, json.dumps({"queries": ["Zorvania"] * 9}).encode())
        assert status == 413 and "max_queries=8" in body["error"]
        status, body = post(created[0].url, json.dumps({"queries": ["Zorvania"], "topk": 6}).encode())
        assert status == 400 and "max_top_k=5" in body["error"]
    finally:
        if created:
            created[0].shutdown()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert f"serving 60 documents (bm25) at {created[0].url}" in capsys.readouterr().out


# --- abuse: each answered with a 4xx JSON, no traceback, and no connection or thread left behind ---

LOGGER = "modalities.text_agent.tools.retriever_server"


def exchange(server: RetrieverServer, data: bytes, timeout: float = 5.0) -> tuple[int, Any, bool]:
    """Send raw bytes; read until the server closes (or `timeout`): (status, JSON body, closed by the server)."""
    chunks: list[bytes] = []
    closed = False
    with socket.create_connection(address(server), timeout=timeout) as sock:
        sock.sendall(data)
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            closed = True
        except ConnectionResetError:  # closed with our unread body still in its buffer: also a close
            closed = True
        except TimeoutError:
            pass
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body), closed


def address(server: RetrieverServer) -> tuple[str, int]:
    host, port = server.server_address[:2]
    return str(host), int(port)


def wait_for(condition: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(condition())


def raw_post(headers: str, body: bytes = b"") -> bytes:
    return f"POST /retrieve HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode() + body


@pytest.mark.parametrize(
    ("request_bytes", "status", "message"),
    [
        (raw_post("Content-Length: -1\r\n", b'{"queries": ["a"]}'), 400, "one non-negative integer"),
        (raw_post("Content-Length: abc\r\n", b'{"queries": ["a"]}'), 400, "one non-negative integer"),
        (raw_post("Content-Length: 1.5\r\n"), 400, "one non-negative integer"),
        (raw_post("Content-Length: 18\r\nContent-Length: 3\r\n", b'{"queries": ["a"]}'), 400, "one non-negative"),
        (raw_post("", b'{"queries": ["a"]}'), 411, "Content-Length is required"),
        (raw_post("Transfer-Encoding: chunked\r\n", b"12\r\n" + b'{"queries": ["a"]}'), 411, "chunked"),
        (raw_post("Content-Length: 200000000\r\n"), 413, "over max_body_bytes=16777216"),
        (raw_post("Content-Length: 99999999999999999999999\r\n"), 400, "one non-negative integer"),
        (raw_post("Content-Length: 50\r\n", b'{"queries": '), 400, "body ended after 12 of 50 bytes"),
        (b"GARBAGE\r\n\r\n", 400, "Bad request"),
        (b"PUT /retrieve HTTP/1.1\r\nHost: x\r\n\r\n", 501, "Unsupported method"),
    ],
)
def test_malformed_framing_gets_a_json_4xx_and_the_connection_closed(
    server: RetrieverServer, request_bytes: bytes, status: int, message: str, capfd: pytest.CaptureFixture[str]
) -> None:
    # "body ended": the client half-closes after a short body.
    if b"Content-Length: 50" in request_bytes:
        with socket.create_connection(address(server), timeout=5) as sock:
            sock.sendall(request_bytes)
            sock.shutdown(socket.SHUT_WR)
            answer = b"".join(iter(lambda: sock.recv(65536), b""))
        head, _, body = answer.partition(b"\r\n\r\n")
        got, payload, closed = int(head.split()[1]), json.loads(body), True
    else:
        start = time.perf_counter()
        got, payload, closed = exchange(server, request_bytes)
        assert time.perf_counter() - start < 2.0  # answered at once: nothing buffered, nothing waited for
    assert got == status and message in payload["error"] and closed
    assert "Traceback" not in capfd.readouterr().err
    assert wait_for(lambda: server.num_connections == 0)


def test_request_caps_name_the_limit(server: RetrieverServer) -> None:
    status, body = post(server.url, json.dumps({"queries": ["Zorvania"] * 513}).encode())
    assert status == 413 and "513 queries is over max_queries=512" in body["error"]
    status, body = post(server.url, json.dumps({"queries": ["Zorvania"] * 512, "topk": 100}).encode())
    assert status == 200 and len(body["result"]) == 512 and len(body["result"][0]) == 60  # the whole tiny corpus
    status, body = post(server.url, json.dumps({"queries": ["Zorvania"], "topk": 101}).encode())
    assert status == 400 and "'topk' 101 is over max_top_k=100" in body["error"]
    client = RetrieverClient(server.url, top_k=101, max_retries=3, backoff_s=0.0)
    with pytest.raises(ToolError, match="HTTP 400.*max_top_k=100"):
        client(["Zorvania"])
    assert client.num_requests == 1  # a refusal is not retried


def test_caps_are_configurable(bm25: BM25Search) -> None:
    with serving(make_server(bm25, "127.0.0.1", 0, max_queries=2, max_top_k=4, max_body_bytes=64)) as small:
        assert post(small.url, json.dumps({"queries": ["a", "b"], "topk": 4}).encode())[0] == 200
        status, body = post(small.url, json.dumps({"queries": ["a", "b", "c"]}).encode())
        assert status == 413 and "max_queries=2" in body["error"]
        assert "max_top_k=4" in post(small.url, json.dumps({"queries": ["a"], "topk": 5}).encode())[1]["error"]
        status, body = post(small.url, json.dumps({"queries": ["x" * 100]}).encode())
        assert status == 413 and "max_body_bytes=64" in body["error"]
    with pytest.raises(ValueError, match="max_queries must be a positive number, got 0"):
        make_server(bm25, "127.0.0.1", 0, max_queries=0)
    with pytest.raises(ValueError, match="top_k=3 is over max_top_k=2"):
        make_server(bm25, "127.0.0.1", 0, max_top_k=2)
    assert make_server(FailingRetriever(), "127.0.0.1", 0).request_queue_size == 1024  # not the stdlib's 5


def nested(depth: int) -> bytes:
    """A request body whose deepest value is `depth` containers down (the object itself is level 1)."""
    return b'{"queries": ["a"], "x": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def test_json_depth_limit_without_recursion_errors(server: RetrieverServer, capfd: pytest.CaptureFixture[str]) -> None:
    assert post(server.url, nested(32))[0] == 200
    for body in (nested(33), nested(100_000), b"[" * 1_000_000):
        status, payload = post(server.url, body)
        assert status == 400 and ("max_json_depth=32" in payload["error"] or "JSON object" in payload["error"])
    status, payload = post(server.url, b'{"queries": ["a"], "topk": 1' + b"0" * 5000 + b"}")
    assert status == 400 and "not valid JSON" in payload["error"]  # an integer too long to convert
    assert "Traceback" not in capfd.readouterr().err
    with pytest.raises(retriever_server.BadRequest, match="max_json_depth=3"):
        parse_request(nested(4), 3, ServerLimits(max_json_depth=3))


def test_idle_and_slow_connections_are_closed_after_the_timeout(bm25: BM25Search) -> None:
    with serving(make_server(bm25, "127.0.0.1", 0, timeout_s=0.5)) as quick:
        idle = [socket.create_connection(address(quick), timeout=5) for _ in range(20)]
        try:
            assert wait_for(lambda: quick.num_connections == 20)
            start = time.perf_counter()
            assert all(sock.recv(1) == b"" for sock in idle)  # closed by the server: EOF
            assert time.perf_counter() - start < 3.0
        finally:
            for sock in idle:
                sock.close()
        assert wait_for(lambda: quick.num_connections == 0)
        start = time.perf_counter()  # a body that never arrives in full: 408, not a thread held forever
        status, payload, closed = exchange(quick, raw_post("Content-Length: 100\r\n", b'{"queries": '))
        assert status == 408 and "timeout_s=0.5" in payload["error"] and closed
        assert time.perf_counter() - start < 3.0
        assert wait_for(lambda: quick.num_connections == 0)


def test_keep_alive_connection_serves_several_requests(server: RetrieverServer) -> None:
    import http.client

    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(str(host), port, timeout=5)
    try:
        for query in ("Zorvania", "Kestoria"):
            connection.request("POST", "/retrieve", json.dumps({"queries": [query]}), {"Content-Type": "x"})
            response = connection.getresponse()
            assert response.status == 200 and len(json.loads(response.read())["result"]) == 1
    finally:
        connection.close()


def test_connections_over_the_cap_get_503_until_one_closes(bm25: BM25Search) -> None:
    with serving(make_server(bm25, "127.0.0.1", 0, timeout_s=0.5, max_connections=2)) as capped:
        idle = [socket.create_connection(address(capped), timeout=5) for _ in range(2)]
        try:
            assert wait_for(lambda: capped.num_connections == 2)
            status, payload, closed = exchange(capped, raw_post("Content-Length: 2\r\n", b"{}"))
            assert status == 503 and "max_connections=2" in payload["error"] and closed
        finally:
            for sock in idle:
                sock.close()
        assert wait_for(lambda: capped.num_connections == 0)
        assert post(capped.url, json.dumps({"queries": ["Zorvania"]}).encode())[0] == 200


def test_one_access_log_line_per_request(server: RetrieverServer, caplog: pytest.LogCaptureFixture) -> None:
    line = re.compile(r"127\.0\.0\.1 POST /retrieve (\d+) queries=(\S+) \d+\.\dms")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        post(server.url, json.dumps({"queries": ["a", "b", "c"]}).encode())
        post(server.url, b"not json")

        def access_lines() -> list[tuple[str, ...]]:
            return [m.groups() for r in caplog.records if r.name == LOGGER and (m := line.fullmatch(r.getMessage()))]

        assert wait_for(lambda: len(access_lines()) == 2, timeout=30.0)
    # Each handler thread logs after answering, so the two lines may arrive in either order.
    assert sorted(access_lines()) == [("200", "3"), ("400", "-")]
    assert all(r.levelno == logging.INFO and r.exc_info is None for r in caplog.records if r.name == LOGGER)


class SlowRetriever:
    """Sleeps `delay_s` per call and records call sizes and the most calls ever running at once."""

    top_k = 3
    concurrent_retrieve = False

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.sizes: list[int] = []
        self.active = self.max_active = 0
        self._lock = threading.Lock()

    def retrieve(self, queries: list[str], top_k: int | None = None) -> list[list[SearchHit]]:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        time.sleep(self.delay_s)
        with self._lock:
            self.active -= 1
            self.sizes.append(len(queries))
        return [[] for _ in queries]


def test_locked_retriever_is_searched_in_fair_chunks() -> None:
    slow = SlowRetriever(delay_s=0.05)
    finished: dict[str, float] = {}

    def ask(name: str, num_queries: int, url: str) -> None:
        assert post(url, json.dumps({"queries": ["q"] * num_queries}).encode())[0] == 200
        finished[name] = time.perf_counter()

    with serving(make_server(slow, "127.0.0.1", 0)) as running:
        big = threading.Thread(target=ask, args=("big", 512, running.url))
        big.start()
        assert wait_for(lambda: slow.active == 1)
        ask("small", 1, running.url)
        big.join(timeout=10)
    assert finished["small"] < finished["big"]  # not queued behind all 8 chunks of the big request
    assert slow.max_active == 1 and max(slow.sizes) == SEARCH_CHUNK and sum(slow.sizes) == 513


def test_concurrent_retriever_is_searched_without_the_lock() -> None:
    slow = SlowRetriever(delay_s=0.3)
    slow.concurrent_retrieve = True
    with serving(make_server(slow, "127.0.0.1", 0)) as running:
        threads = [threading.Thread(target=post, args=(running.url, b'{"queries": ["q"]}')) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
    assert slow.max_active == 2 and BM25Search.concurrent_retrieve is True


def test_fair_lock_grants_in_arrival_order() -> None:
    lock, order = FairLock(), []

    def take(index: int) -> None:
        with lock:
            order.append(index)

    threads = []
    with lock:
        for index in range(6):
            threads.append(threading.Thread(target=take, args=(index,)))
            threads[-1].start()
            assert wait_for(lambda expected=index + 1: len(lock._waiters) == expected)
    for thread in threads:
        thread.join(timeout=5)
    assert order == list(range(6))
    with lock:  # free again after the last hand-off
        pass
