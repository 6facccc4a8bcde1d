"""Loopback load test of `renorm serve-retriever`'s server: many concurrent clients, one fresh connection a request.

Each configuration serves BM25 over the shipped tiny corpus (data/text_agent/corpus.jsonl) in its own
process; `--clients` threads start together (a barrier) and send `--requests` POST /retrieve in all (one
question from synthetic_qa.jsonl each, no retries, `--timeout` s per request). Rows: the hardened defaults
(listen backlog 1024) and the same server with the old backlog of 5. A third scenario measures head-of-line
blocking behind the search lock: small requests while one client streams 512-query requests to a retriever
that must be locked, searched in `SEARCH_CHUNK`-query turns of the fair lock (as shipped) or whole (as before).
Only 127.0.0.1 is used.

    python bench/retriever_load.py [--clients 200] [--requests 1000] [--timeout 10] [--output PATH]
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import multiprocessing
import os
import platform
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "data" / "text_agent"
RESULTS = ROOT / "bench" / "results" / "retriever_load.md"
QUESTIONS = [json.loads(line)["question"] for line in (DATA / "synthetic_qa.jsonl").read_text().splitlines()]


class LockedBM25:
    """BM25 that declares itself unsafe for concurrent calls, so the server searches it behind its lock."""

    concurrent_retrieve = False

    def __init__(self, bm25: Any) -> None:
        self.bm25, self.top_k = bm25, bm25.top_k

    def retrieve(self, queries: list[str], top_k: int | None = None) -> Any:
        return self.bm25.retrieve(queries, top_k)


def serve(settings: dict[str, Any], port_pipe: Any) -> None:
    """Child process: build BM25, bind port 0 with `settings`, report the port, serve until killed."""
    from modalities.text_agent.tools import retriever_server
    from modalities.text_agent.tools.search import BM25Search

    retriever: Any = BM25Search(str(DATA / "corpus.jsonl"))
    retriever.build()
    if settings.get("locked"):
        retriever = LockedBM25(retriever)
    if settings.get("whole_requests"):  # the old behaviour: one lock turn for a whole request
        retriever_server.SEARCH_CHUNK = 10**9
    server = retriever_server.make_server(
        retriever, "127.0.0.1", 0, request_queue_size=settings.get("request_queue_size", 1024)
    )
    port_pipe.send(server.server_address[1])
    port_pipe.close()
    signal.signal(signal.SIGTERM, stop_serving)  # `terminate()` then exits cleanly (nothing leaked)
    try:
        server.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def stop_serving(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def start_server(settings: dict[str, Any]) -> tuple[Any, int]:
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=serve, args=(settings, sender), daemon=True)
    process.start()
    sender.close()
    if not receiver.poll(120):
        process.kill()
        raise RuntimeError("the server process did not report its port within 120 s")
    port = int(receiver.recv())
    receiver.close()
    return process, port


def stop_server(process: Any) -> None:
    process.terminate()
    process.join(timeout=10)
    if process.is_alive():
        process.kill()
        process.join(timeout=10)


def one_request(port: int, queries: list[str], timeout: float, top_k: int = 3) -> tuple[str, float]:
    """(outcome, seconds): "ok", "HTTP <status>", or the exception's type name."""
    start = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        body = json.dumps({"queries": queries, "topk": top_k})
        connection.request("POST", "/retrieve", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = response.read()
        outcome = "ok" if response.status == 200 and len(json.loads(payload)["result"]) == len(queries) else ""
        outcome = outcome or f"HTTP {response.status}"
    except Exception as error:  # a load test counts every failure kind
        outcome = type(error).__name__
    finally:
        connection.close()
    return outcome, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def summarize(name: str, results: list[tuple[str, float]], wall_s: float) -> dict[str, Any]:
    outcomes = Counter(outcome for outcome, _ in results)
    ok = [seconds for outcome, seconds in results if outcome == "ok"]
    errors = len(results) - len(ok)
    return {
        "server": name,
        "requests": len(results),
        "ok": len(ok),
        "error_rate": errors / max(len(results), 1),
        "errors": ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()) if k != "ok") or "-",
        "throughput": len(ok) / wall_s,
        "p50_ms": percentile(ok, 0.5) * 1000,
        "p99_ms": percentile(ok, 0.99) * 1000,
        "wall_s": wall_s,
    }


def burst(name: str, settings: dict[str, Any], clients: int, requests: int, timeout: float) -> dict[str, Any]:
    """`clients` threads released together, `requests` fresh-connection requests in all."""
    process, port = start_server(settings)
    try:
        one_request(port, QUESTIONS[:1], timeout)  # warm-up
        results: list[tuple[str, float]] = []
        lock = threading.Lock()
        barrier = threading.Barrier(clients + 1)

        def client(index: int) -> None:
            share = [QUESTIONS[i % len(QUESTIONS)] for i in range(index, requests, clients)]
            barrier.wait()
            for question in share:
                outcome = one_request(port, [question], timeout)
                with lock:
                    results.append(outcome)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
        for thread in threads:
            thread.start()
        barrier.wait()
        start = time.perf_counter()
        for thread in threads:
            thread.join(timeout=timeout * (requests // clients + 2))
        return summarize(name, results, time.perf_counter() - start)
    finally:
        stop_server(process)


def head_of_line(name: str, settings: dict[str, Any], seconds: float, timeout: float) -> dict[str, Any]:
    """Single-query requests from 4 clients while 1 client streams 512-query, top-100 requests."""
    process, port = start_server(settings)
    try:
        one_request(port, QUESTIONS[:1], timeout)
        stop = time.perf_counter() + seconds
        small: list[tuple[str, float]] = []
        big: list[tuple[str, float]] = []

        def stream(sink: list[tuple[str, float]], queries: list[str], top_k: int) -> None:
            while time.perf_counter() < stop:
                sink.append(one_request(port, queries, timeout, top_k))

        big_queries = [QUESTIONS[i % len(QUESTIONS)] for i in range(512)]
        threads = [threading.Thread(target=stream, args=(big, big_queries, 60), daemon=True)]
        threads += [
            threading.Thread(target=stream, args=(small, QUESTIONS[i : i + 1], 3), daemon=True) for i in range(4)
        ]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=seconds + timeout + 5)
        row = summarize(name, small, time.perf_counter() - start)
        row["big_done"] = sum(outcome == "ok" for outcome, _ in big)
        row["big_p50_ms"] = percentile([s for o, s in big if o == "ok"], 0.5) * 1000
        return row
    finally:
        stop_server(process)


def write_report(args: argparse.Namespace, bursts: list[dict[str, Any]], hol: list[dict[str, Any]]) -> str:
    command = "python bench/retriever_load.py " + " ".join(sys.argv[1:])
    lines = [
        "# Retriever server under load (loopback)",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"{datetime.date.today()}, {platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs (1-minute load average {os.getloadavg()[0]:.1f} at the end), "
        f"{platform.system()} {platform.release()}; server and clients on 127.0.0.1, "
        "the server in its own process (BM25 over `data/text_agent/corpus.jsonl`, 60 documents).",
        "",
        f"## Burst: {args.clients} clients released together, {args.requests} requests, a new connection each",
        "",
        "No client retries; latency percentiles are over the successful requests; a failed request counts "
        f"toward the error rate (timeout {args.timeout} s).",
        "",
        "`old backlog (5)` is the same server with `request_queue_size=5`, the standard library's default that "
        "`serve-retriever` used before: when the kernel's accept queue overflows, connections are reset.",
        "",
        "| server | ok / requests | error rate | errors | throughput (req/s) | p50 ms | p99 ms | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in bursts:
        lines.append(
            f"| {r['server']} | {r['ok']} / {r['requests']} | {r['error_rate']:.1%} | {r['errors']} | "
            f"{r['throughput']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['wall_s']:.1f} |"
        )
    lines += [
        "",
        f"## Head-of-line blocking: 4 clients of 1-query requests while 1 client streams 512-query requests "
        f"(topk 60), {args.hol_seconds:.0f} s",
        "",
        "The retriever is BM25 declared not thread-safe, so every search goes through the server's FIFO lock "
        "(as `DenseSearch` does). `whole request (old)` takes one lock turn per request, as the server did before "
        "(then with a plain `threading.Lock`, which does not even promise arrival order).",
        "",
        "| lock turns | small ok | small p50 ms | small p99 ms | small req/s | 512-query requests | their p50 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in hol:
        lines.append(
            f"| {r['server']} | {r['ok']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['throughput']:.0f} | "
            f"{r['big_done']} | {r['big_p50_ms']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    parser.add_argument("--hol-seconds", type=float, default=8.0, help="length of the head-of-line scenario")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    bursts = [
        burst("hardened (backlog 1024)", {}, args.clients, args.requests, args.timeout),
        burst("old backlog (5)", {"request_queue_size": 5}, args.clients, args.requests, args.timeout),
    ]
    hol = [
        head_of_line(f"{_chunk()} queries (shipped)", {"locked": True}, args.hol_seconds, args.timeout),
        head_of_line("whole request (old)", {"locked": True, "whole_requests": True}, args.hol_seconds, args.timeout),
    ]
    report = write_report(args, bursts, hol)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print(report)


def _chunk() -> int:
    from modalities.text_agent.tools.retriever_server import SEARCH_CHUNK

    return SEARCH_CHUNK


if __name__ == "__main__":
    main()
