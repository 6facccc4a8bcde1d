"""A Search-R1-compatible retrieval server on the standard library's `ThreadingHTTPServer`, hardened for shared use.

POST /retrieve  {"queries": [str, ...], "topk": int (optional), "return_scores": bool (default false)}
             -> {"result": [[{"document": {"id", "contents"}, "score": float}, ...], ...]}
                (with return_scores false, each entry is the document dict alone)
GET  /health    -> {"status": "ok", "num_documents": int, "top_k": int}

Every refusal is a JSON {"error": "..."} naming the limit: 400 malformed (bad Content-Length, not JSON,
nested deeper than `max_json_depth`, wrong field types, `topk` over `max_top_k`), 411 no Content-Length,
413 body over `max_body_bytes` or more than `max_queries` queries, 408 body not sent within `timeout_s`,
503 more than `max_connections` open connections; retriever failures 500. Each socket read/write times
out after `timeout_s` (idle keep-alive connections are closed), the listen backlog is 1024, and one INFO
access-log line is written per request. Concurrency: a retriever with `concurrent_retrieve = True`
(`BM25Search`: bm25s scores a batch on its own thread pool over the same read-only index) is searched
without a lock; any other (`DenseSearch`: a fast tokenizer raises "Already borrowed" when called from two
threads) behind a FIFO lock held for at most `SEARCH_CHUNK` queries at a time, so a small request waits
behind at most one chunk of each request ahead of it, never behind a whole large one.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sized
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

from modalities.text_agent.tools.corpus import Retriever, SearchHit

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024 * 1024
REQUEST_QUEUE_SIZE = 1024
SEARCH_CHUNK = 64  # queries searched per turn of the lock
_DIGITS = re.compile(rb"[0-9]{1,20}")
# Control characters in a client's request line are escaped before they reach a log (no terminal escapes).
_CONTROL = str.maketrans({c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]})
_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
    b"Connection: close\r\nRetry-After: 1\r\n\r\n%s"
)


@dataclass(frozen=True)
class ServerLimits:
    """What one client may ask of the server; each limit, when hit, is named in the 4xx/503 answer."""

    max_body_bytes: int = MAX_BODY_BYTES
    max_queries: int = 512
    max_top_k: int = 100
    max_json_depth: int = 32
    timeout_s: float = 30.0
    max_connections: int = 1024

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")


class FairLock:
    """A lock granted in arrival order (`threading.Lock` promises none), handed from holder to next waiter."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held = False
        self._waiters: deque[threading.Lock] = deque()

    def __enter__(self) -> None:
        with self._mutex:
            if not self._held:
                self._held = True
                return
            waiter = threading.Lock()
            waiter.acquire()
            self._waiters.append(waiter)
        waiter.acquire()  # released by `__exit__` of the holder before us: the lock is ours now

    def __exit__(self, *exc: object) -> None:
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().release()
            else:
                self._held = False


class RetrieverServer(ThreadingHTTPServer):
    """The HTTP server; `retriever`, `limits` and `url` are read by the request handler.

    Args:
        retriever: what `/retrieve` searches; built here (`build()`) when it has that method.
        address: (host, port); port 0 picks a free one.
        limits: per-request and per-connection caps.
        request_queue_size: the listen backlog (the standard library's default, 5, resets clients in bursts).
    """

    daemon_threads = True

    def __init__(
        self,
        retriever: Retriever,
        address: tuple[str, int],
        limits: ServerLimits | None = None,
        request_queue_size: int = REQUEST_QUEUE_SIZE,
    ) -> None:
        self.limits = limits if limits is not None else ServerLimits()
        if request_queue_size < 1:
            raise ValueError(f"request_queue_size must be >= 1, got {request_queue_size}")
        if not 1 <= retriever.top_k <= self.limits.max_top_k:
            raise ValueError(f"the retriever's top_k={retriever.top_k} is over max_top_k={self.limits.max_top_k}")
        build = getattr(retriever, "build", None)
        if callable(build):
            build()  # lazy builds are not thread-safe: build before the first request
        self.request_queue_size = request_queue_size  # read by `server_activate` (listen) in super().__init__
        super().__init__(address, RetrieveHandler)
        self.retriever = retriever
        concurrent = getattr(retriever, "concurrent_retrieve", False) is True
        self.search_lock: AbstractContextManager[Any] = nullcontext() if concurrent else FairLock()
        self._slots = threading.BoundedSemaphore(self.limits.max_connections)
        self._count_lock = threading.Lock()
        self.num_connections = 0

    @property
    def url(self) -> str:
        """The `/retrieve` endpoint, with the port actually bound (port 0 picks a free one)."""
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}/retrieve"

    def search(self, queries: list[str], top_k: int) -> list[list[SearchHit]]:
        """The retriever's hits, searched `SEARCH_CHUNK` queries per turn of the search lock."""
        hits: list[list[SearchHit]] = []
        for start in range(0, len(queries), SEARCH_CHUNK):
            with self.search_lock:
                hits.extend(self.retriever.retrieve(queries[start : start + SEARCH_CHUNK], top_k))
        return hits

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start a handler thread, or answer 503 and close when `max_connections` are already open."""
        if not self._slots.acquire(blocking=False):
            log.warning("refused %s: %d connections open (max_connections)", client_address[0], self.num_connections)
            body = json.dumps({"error": f"server busy: max_connections={self.limits.max_connections} open"}).encode()
            try:
                request.settimeout(1.0)
                request.sendall(_REFUSED % (len(body), body))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        self._count(+1)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._count(-1)
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._count(-1)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """An unexpected error in a connection: one warning line, not the standard library's traceback."""
        log.warning("connection from %s failed", client_address[0], exc_info=log.isEnabledFor(logging.DEBUG))

    def _count(self, step: int) -> None:
        with self._count_lock:
            self.num_connections += step


def make_server(
    retriever: Retriever,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    max_queries: int = 512,
    max_top_k: int = 100,
    timeout_s: float = 30.0,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_json_depth: int = 32,
    max_connections: int = 1024,
    request_queue_size: int = REQUEST_QUEUE_SIZE,
) -> RetrieverServer:
    """A bound (not yet serving) server; call `serve_forever()` (e.g. on a thread) and `shutdown()`."""
    limits = ServerLimits(max_body_bytes, max_queries, max_top_k, max_json_depth, timeout_s, max_connections)
    return RetrieverServer(retriever, (host, port), limits, request_queue_size)


class BadRequest(ValueError):
    """A client error, answered with `status` (400 unless said otherwise) and the message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def exceeds_depth(value: Any, max_depth: int) -> bool:
    """True when JSON `value` nests objects/arrays deeper than `max_depth` (`[]` is depth 1); no recursion."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def parse_request(body: bytes, default_top_k: int, limits: ServerLimits | None = None) -> tuple[list[str], int, bool]:
    """(queries, top_k, return_scores) of a `/retrieve` body.

    Raises:
        BadRequest: not JSON, nested too deep, not an object, a field of the wrong type, or over a cap.
    """
    limits = limits if limits is not None else ServerLimits()
    too_deep = f"body nests deeper than max_json_depth={limits.max_json_depth}"
    try:
        payload = json.loads(body)
    except RecursionError as error:
        raise BadRequest(too_deep) from error
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, an over-long integer
        raise BadRequest(f"body is not valid JSON: {error}") from error
    if not isinstance(payload, dict):
        raise BadRequest(f"body must be a JSON object, got {type(payload).__name__}")
    if exceeds_depth(payload, limits.max_json_depth):
        raise BadRequest(too_deep)
    queries = payload.get("queries")
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise BadRequest("'queries' must be a list of strings")
    if len(queries) > limits.max_queries:
        raise BadRequest(f"{len(queries)} queries is over max_queries={limits.max_queries} per request", 413)
    top_k = payload.get("topk")
    top_k = default_top_k if top_k is None else top_k
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise BadRequest(f"'topk' must be a positive integer, got {top_k!r}")
    if top_k > limits.max_top_k:
        raise BadRequest(f"'topk' {top_k} is over max_top_k={limits.max_top_k}")
    return_scores = payload.get("return_scores", False)
    if not isinstance(return_scores, bool):
        raise BadRequest(f"'return_scores' must be true or false, got {return_scores!r}")
    return queries, top_k, return_scores


class RetrieveHandler(BaseHTTPRequestHandler):
    """Serves /retrieve and /health for the `RetrieverServer` it belongs to."""

    server: RetrieverServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.limits.timeout_s)  # every read and write; idle keep-alive ends

    def handle_one_request(self) -> None:
        self._start = time.perf_counter()
        self._num_queries: int | None = None
        super().handle_one_request()

    def do_GET(self) -> None:
        if self.headers.get("Content-Length", "0").strip() != "0" or "Transfer-Encoding" in self.headers:
            self.close_connection = True  # a body is never read here: it must not be parsed as the next request
        if self.path.rstrip("/") != "/health":
            self._send(404, {"error": f"unknown path {self.path}; use POST /retrieve or GET /health"})
            return
        retriever = self.server.retriever
        size = len(retriever) if isinstance(retriever, Sized) else None
        self._send(200, {"status": "ok", "num_documents": size, "top_k": retriever.top_k})

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/retrieve":
            self.close_connection = True  # the body is not read: it must not be parsed as the next request
            self._send(404, {"error": f"unknown path {self.path}; use POST /retrieve"})
            return
        try:
            body = self._read_body()
            queries, top_k, return_scores = parse_request(body, self.server.retriever.top_k, self.server.limits)
        except BadRequest as error:
            self._send(error.status, {"error": str(error)})
            return
        self._num_queries = len(queries)
        try:
            hits = self.server.search(queries, top_k)
        except Exception as error:  # any retriever failure becomes a 500 the client can retry
            log.exception("retrieval of %d queries failed", len(queries))
            self._send(500, {"error": f"retrieval failed: {type(error).__name__}: {error}"})
            return
        result = [
            [
                {"document": h.document.to_record(), "score": h.score} if return_scores else h.document.to_record()
                for h in row
            ]
            for row in hits
        ]
        self._send(200, {"result": result})

    def _read_body(self) -> bytes:
        """The request body, after checking Content-Length; on any refusal the connection is closed after answering.

        Raises:
            BadRequest: no, several, a negative or a non-integer Content-Length (400/411), chunked
                encoding (411), over `max_body_bytes` (413), or not all sent within `timeout_s` (408/400).
        """
        self.close_connection = True  # until the whole body is read
        limits = self.server.limits
        lengths = self.headers.get_all("Content-Length") or []
        if "Transfer-Encoding" in self.headers:
            raise BadRequest("chunked bodies are not supported; send Content-Length", 411)
        if not lengths:
            raise BadRequest("Content-Length is required", 411)
        raw = lengths[0].strip().encode("latin-1", "replace")
        if len(lengths) > 1 or not _DIGITS.fullmatch(raw):
            raise BadRequest(f"Content-Length must be one non-negative integer, got {', '.join(lengths)!r:.80}")
        length = int(raw)
        if length > limits.max_body_bytes:
            raise BadRequest(f"body of {length} bytes is over max_body_bytes={limits.max_body_bytes}", 413)
        deadline = time.monotonic() + limits.timeout_s
        parts: list[bytes] = []
        remaining = length
        while remaining:
            if time.monotonic() > deadline:
                raise BadRequest(f"body not sent within timeout_s={limits.timeout_s}", 408)
            try:
                part = self.rfile.read1(min(remaining, 1 << 16))
            except TimeoutError as error:
                raise BadRequest(f"body not sent within timeout_s={limits.timeout_s}", 408) from error
            if not part:
                raise BadRequest(f"body ended after {length - remaining} of {length} bytes (Content-Length)")
            parts.append(part)
            remaining -= len(part)
        self.close_connection = False
        return b"".join(parts)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's own refusals (bad request line, headers too long, ...) as JSON too."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # junk request lines default to 0.9, which has no status line
            self.request_version = "HTTP/1.0"
        self._send(code, {"error": message or self.responses.get(code, ("error",))[0]})

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except OSError as error:  # the client left or stopped reading (its timeout); nothing to answer
            self.close_connection = True
            log.debug("client %s left before the response: %s", self.client_address[0], error)
        self._log_access(status)

    def _log_access(self, status: int) -> None:
        requestline = getattr(self, "requestline", "")[:300].translate(_CONTROL)
        method, _, rest = requestline.partition(" ")
        path = rest.partition(" ")[0]
        queries = "-" if self._num_queries is None else str(self._num_queries)
        elapsed_ms = (time.perf_counter() - getattr(self, "_start", time.perf_counter())) * 1000
        client = self.client_address[0]
        log.info("%s %s %s %d queries=%s %.1fms", client, method or "-", path[:200] or "-", status, queries, elapsed_ms)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Replaced by `_log_access` (one line per request, with the query count and time)."""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - " + format, self.client_address[0], *args)


def serve_until_interrupted(server: ThreadingHTTPServer, banner: str) -> int:
    """Print `banner`, serve in the foreground until Ctrl-C, then close the socket (the CLI servers' loop)."""
    print(banner, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


ServerT = TypeVar("ServerT", bound=ThreadingHTTPServer)


@contextmanager
def serving(server: ServerT, poll_interval: float = 0.05) -> Iterator[ServerT]:
    """Run `server` (this module's or serve-policy's) on a daemon thread for the `with` block, then shut it down."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": poll_interval}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
