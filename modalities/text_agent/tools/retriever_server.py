"""A Search-R1-compatible retrieval server on the standard library's `ThreadingHTTPServer`.

POST /retrieve  {"queries": [str, ...], "topk": int (optional), "return_scores": bool (default false)}
             -> {"result": [[{"document": {"id", "contents"}, "score": float}, ...], ...]}
                (with return_scores false, each entry is the document dict alone)
GET  /health    -> {"status": "ok", "num_documents": int, "top_k": int}

Bad requests get 400 with {"error": "..."}; retriever failures 500. Requests are handled on
threads, but retrieval itself is serialized with a lock (bm25s and the encoder are not meant to be
called concurrently), so throughput is one batch at a time — batch the queries on the client side.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sized
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from modalities.text_agent.tools.corpus import Retriever

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024 * 1024


class RetrieverServer(ThreadingHTTPServer):
    """The HTTP server; `retriever`, `lock` and `url` are read by the request handler."""

    daemon_threads = True

    def __init__(self, retriever: Retriever, address: tuple[str, int]) -> None:
        super().__init__(address, RetrieveHandler)
        self.retriever = retriever
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        """The `/retrieve` endpoint, with the port actually bound (port 0 picks a free one)."""
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}/retrieve"


def make_server(retriever: Retriever, host: str = "127.0.0.1", port: int = 8000) -> RetrieverServer:
    """A bound (not yet serving) server; call `serve_forever()` (e.g. on a thread) and `shutdown()`."""
    return RetrieverServer(retriever, (host, port))


class BadRequest(ValueError):
    """A client error, answered with 400."""


def parse_request(body: bytes, default_top_k: int) -> tuple[list[str], int, bool]:
    """(queries, top_k, return_scores) of a `/retrieve` body.

    Raises:
        BadRequest: not JSON, not an object, or a field of the wrong type.
    """
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadRequest(f"body is not valid JSON: {error}") from error
    if not isinstance(payload, dict):
        raise BadRequest(f"body must be a JSON object, got {type(payload).__name__}")
    queries = payload.get("queries")
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise BadRequest("'queries' must be a list of strings")
    top_k = payload.get("topk")
    top_k = default_top_k if top_k is None else top_k
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise BadRequest(f"'topk' must be a positive integer, got {top_k!r}")
    return_scores = payload.get("return_scores", False)
    if not isinstance(return_scores, bool):
        raise BadRequest(f"'return_scores' must be true or false, got {return_scores!r}")
    return queries, top_k, return_scores


class RetrieveHandler(BaseHTTPRequestHandler):
    """Serves /retrieve and /health for the `RetrieverServer` it belongs to."""

    server: RetrieverServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.rstrip("/") != "/health":
            self._send(404, {"error": f"unknown path {self.path}; use POST /retrieve or GET /health"})
            return
        retriever = self.server.retriever
        size = len(retriever) if isinstance(retriever, Sized) else None
        self._send(200, {"status": "ok", "num_documents": size, "top_k": retriever.top_k})

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/retrieve":
            self._send(404, {"error": f"unknown path {self.path}; use POST /retrieve"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self._send(413, {"error": f"body larger than {MAX_BODY_BYTES} bytes"})
            return
        try:
            queries, top_k, return_scores = parse_request(self.rfile.read(length), self.server.retriever.top_k)
        except BadRequest as error:
            self._send(400, {"error": str(error)})
            return
        try:
            with self.server.lock:
                hits = self.server.retriever.retrieve(queries, top_k)
        except Exception as error:  # any retriever failure becomes a 500 the client can retry
            log.exception("retrieval failed")
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

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        try:
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (its timeout) before the answer was ready; nothing to answer.
            self.close_connection = True
            log.debug("client %s left before the response", self.address_string())

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - " + format, self.address_string(), *args)
