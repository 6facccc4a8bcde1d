"""`renorm serve-retriever CORPUS`: serve a BM25 or dense retriever over HTTP (Search-R1's `/retrieve`).

Registered through the `renorm.commands` entry-point group; `toolkit.cli` calls `register(subparsers)`.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any


def register(subparsers: Any) -> None:
    """Add the `serve-retriever` subcommand to the `renorm` parser."""
    p = subparsers.add_parser(
        "serve-retriever",
        help="Serve a BM25 or dense retriever over a JSONL corpus at POST /retrieve (Search-R1 compatible).",
        description="Serve a BM25 or dense retriever over a JSONL corpus at POST /retrieve (Search-R1 "
        "compatible) and GET /health, until interrupted.",
    )
    p.set_defaults(func=cmd_serve_retriever)
    p.add_argument("corpus", help='JSONL corpus: {"id", "contents"} or {"id", "title", "text"} per line')
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 = every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to bind (0 = any free port)")
    p.add_argument("--backend", choices=["bm25", "dense"], default="bm25")
    p.add_argument("--top-k", type=int, default=3, help="documents per query when a request gives no topk")
    p.add_argument("--index-dir", help="save the built index here and load it next time")
    p.add_argument("--k1", type=float, default=0.9, help="BM25 k1")
    p.add_argument("--b", type=float, default=0.4, help="BM25 b")
    p.add_argument("--encoder", default="intfloat/e5-base-v2", help="dense: model name or local path")
    p.add_argument("--faiss-index", help="dense: a prebuilt faiss index over this corpus")
    p.add_argument("--pooling", choices=["mean", "cls", "pooler"], default="mean", help="dense: pooling")
    p.add_argument("--query-prefix", default="query: ", help="dense: text before each query")
    p.add_argument("--passage-prefix", default="passage: ", help="dense: text before each passage")
    p.add_argument("--batch-size", type=int, default=64, help="dense: texts per encoder call")
    p.add_argument("--device", default="cpu", help="dense: encoder device")
    p.add_argument("--max-queries", type=int, default=512, help="queries per request (more: 413)")
    p.add_argument("--max-top-k", type=int, default=100, help="largest topk a request may ask (more: 400)")
    p.add_argument("--timeout-s", type=float, default=30.0, help="per-connection socket timeout (idle: closed)")
    p.add_argument("--max-connections", type=int, default=1024, help="open connections at once (more: 503)")
    p.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"], help="INFO: one access-log line a request"
    )


def build_retriever(args: argparse.Namespace) -> Any:
    """The BM25Search or DenseSearch the arguments describe, with its index loaded or built."""
    from modalities.text_agent.tools.search import BM25Search, DenseSearch

    retriever: BM25Search | DenseSearch
    if args.backend == "bm25":
        retriever = BM25Search(args.corpus, top_k=args.top_k, k1=args.k1, b=args.b, index_dir=args.index_dir)
    else:
        retriever = DenseSearch(
            args.corpus,
            encoder=args.encoder,
            top_k=args.top_k,
            query_prefix=args.query_prefix,
            passage_prefix=args.passage_prefix,
            pooling=args.pooling,
            batch_size=args.batch_size,
            index_dir=args.index_dir,
            faiss_index=args.faiss_index,
            device=args.device,
        )
    retriever.build()
    return retriever


def cmd_serve_retriever(args: argparse.Namespace) -> int:
    """Build the retriever, then serve until Ctrl-C."""
    from modalities.text_agent.tools.retriever_server import make_server, serve_until_interrupted

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    retriever = build_retriever(args)
    server = make_server(
        retriever,
        args.host,
        args.port,
        max_queries=args.max_queries,
        max_top_k=args.max_top_k,
        timeout_s=args.timeout_s,
        max_connections=args.max_connections,
    )
    return serve_until_interrupted(server, f"serving {len(retriever)} documents ({args.backend}) at {server.url}")
