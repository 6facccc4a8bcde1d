"""Search tools: BM25 over a local JSONL corpus (bm25s), and an HTTP client for a Search-R1 `/retrieve` server.

Both return Search-R1's observation text (`Doc i(Title: t) text` lines, top-3 by default). BM25
defaults to Pyserini's k1 = 0.9, b = 0.4 (the BM25 backend of Search-R1/FlashRAG); tokenization is
bm25s's (lower-case words, English stop words, no stemming unless PyStemmer is installed and asked for).
The dense retriever lives in `dense.py` and is re-exported here.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Literal, get_args

from modalities.text_agent.tools.base import ToolError
from modalities.text_agent.tools.corpus import (
    JsonlCorpus,
    SearchHit,
    SearchTool,
    check_index_meta,
    check_top_k,
    document_from_record,
    read_index_meta,
    write_index_meta,
)
from modalities.text_agent.tools.dense import DenseSearch

__all__ = ["BM25Search", "DenseSearch", "RetrieverClient"]

BM25Method = Literal["lucene", "robertson", "atire", "bm25l", "bm25+"]


class BM25Search(SearchTool):
    """BM25 search over a JSONL corpus with bm25s; the index is built on first use.

    Args:
        corpus: the corpus `.jsonl` (Search-R1/FlashRAG layout, see `corpus.py`).
        top_k: documents per query.
        k1, b: BM25 parameters (Pyserini defaults).
        method: bm25s scoring variant ("lucene" is Lucene/Pyserini's).
        stopwords: bm25s stop-word list ("en") or None to keep every word.
        stemmer_language: a PyStemmer language ("english") or None for no stemming.
        index_dir: where the index is saved after building and loaded from next time; None = memory only.
        build_index: False makes a missing index in `index_dir` an error instead of building it.
        name: the action tag the model uses.
    """

    # Safe to call from several threads once built (the retriever server then skips its lock): bm25s
    # itself scores a batch on a thread pool over the same read-only index, tokenization builds fresh
    # objects per call, and `JsonlCorpus.get` opens its own file handle per call.
    concurrent_retrieve = True

    def __init__(
        self,
        corpus: str,
        top_k: int = 3,
        k1: float = 0.9,
        b: float = 0.4,
        method: BM25Method = "lucene",
        stopwords: str | None = "en",
        stemmer_language: str | None = None,
        index_dir: str | None = None,
        build_index: bool = True,
        name: str = "search",
    ) -> None:
        if method not in get_args(BM25Method):
            raise ValueError(f"method={method!r} is not one of {list(get_args(BM25Method))}")
        if k1 < 0 or not 0 <= b <= 1:
            raise ValueError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        if index_dir is None and not build_index:
            raise ValueError("build_index=False needs an index_dir to load the index from")
        if not Path(corpus).is_file():
            raise FileNotFoundError(f"retrieval corpus not found: {corpus}")
        self.corpus_path = corpus
        self.top_k = check_top_k(top_k)
        self.k1, self.b, self.method = k1, b, method
        self.stopwords = stopwords
        self.stemmer_language = stemmer_language
        self.index_dir = Path(index_dir) if index_dir is not None else None
        self.build_index = build_index
        self.name = name
        self.corpus: JsonlCorpus | None = None
        self._bm25: Any = None

    def __len__(self) -> int:
        return len(self.build())

    def build(self) -> JsonlCorpus:
        """Scan the corpus and load or build the index (done by the first search); returns the corpus."""
        if self.corpus is not None:
            return self.corpus
        import bm25s

        quiet_bm25s()

        corpus = JsonlCorpus(self.corpus_path)
        expected = {"backend": "bm25", **corpus.fingerprint(), **self._settings()}
        saved = read_index_meta(self.index_dir) if self.index_dir is not None else None
        if saved is not None and self.index_dir is not None:
            check_index_meta(self.index_dir, saved, expected)
            self._bm25 = bm25s.BM25.load(str(self.index_dir), show_progress=False)
        elif not self.build_index:
            raise FileNotFoundError(f"no BM25 index in {self.index_dir} (build_index=False)")
        else:
            bm25 = bm25s.BM25(k1=self.k1, b=self.b, method=self.method)
            bm25.index(self._tokenize([doc.contents for doc in corpus]), show_progress=False)
            if self.index_dir is not None:
                bm25.save(str(self.index_dir), show_progress=False)
                write_index_meta(self.index_dir, expected)
            self._bm25 = bm25
        self.corpus = corpus
        return corpus

    def retrieve(self, queries: list[str], top_k: int | None = None) -> list[list[SearchHit]]:
        """Top-k documents per query by BM25 score, best first (a query with no known word scores 0)."""
        corpus = self.build()
        if not queries:
            return []
        k = min(check_top_k(top_k if top_k is not None else self.top_k), len(corpus))
        indices, scores = self._bm25.retrieve(self._tokenize(list(queries)), k=k, show_progress=False, n_threads=0)
        hits = []
        for row_indices, row_scores in zip(indices.tolist(), scores.tolist(), strict=True):
            docs = corpus.get(row_indices)
            hits.append([SearchHit(doc, float(s)) for doc, s in zip(docs, row_scores, strict=True)])
        return hits

    def _settings(self) -> dict[str, Any]:
        return {
            "k1": self.k1,
            "b": self.b,
            "method": self.method,
            "stopwords": self.stopwords,
            "stemmer_language": self.stemmer_language,
        }

    def _tokenize(self, texts: list[str]) -> list[list[str]]:
        import bm25s

        quiet_bm25s()

        stemmer = None
        if self.stemmer_language is not None:
            try:
                import Stemmer
            except ImportError as error:
                raise ValueError("stemmer_language needs PyStemmer (pip install PyStemmer)") from error
            stemmer = Stemmer.Stemmer(self.stemmer_language)
        tokens: list[list[str]] = bm25s.tokenize(
            texts, stopwords=self.stopwords, stemmer=stemmer, return_ids=False, show_progress=False
        )
        return tokens


class RetrieverClient(SearchTool):
    """HTTP client of a Search-R1-compatible `/retrieve` endpoint (standard library only).

    Request `{"queries": [...], "topk": k, "return_scores": true}`, response
    `{"result": [[{"document": {"id", "contents"}, "score": s}, ...], ...]}` (plain document dicts,
    as sent when `return_scores` is false, are accepted too). Connection errors, timeouts, 429 and
    5xx answers are retried `max_retries` times with exponential backoff; other 4xx answers and
    malformed responses (compressed, not UTF-8, not JSON, over `max_response_bytes`, the wrong schema,
    a score that is not a finite number) fail at once. Every failure is a `ToolError` naming the URL
    and what was wrong, which the tool loop turns into a counted error observation.
    Counts: `num_requests`, `num_retries`, `num_failures`.

    Args:
        url: the full endpoint, e.g. "http://127.0.0.1:8000/retrieve".
        top_k: documents per query.
        timeout_s: per-attempt timeout.
        max_retries: extra attempts after the first.
        backoff_s: retry r = 1, 2, ... first sleeps `backoff_s * 2**(r - 1)`.
        max_response_bytes: a longer response body is a malformed response.
        name: the action tag the model uses.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000/retrieve",
        top_k: int = 3,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_response_bytes: int = 256 * 1024 * 1024,
        name: str = "search",
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        if timeout_s <= 0 or max_retries < 0 or backoff_s < 0:
            raise ValueError(
                f"need timeout_s > 0, max_retries >= 0, backoff_s >= 0; got {timeout_s}, {max_retries}, {backoff_s}"
            )
        if max_response_bytes < 1:
            raise ValueError(f"max_response_bytes must be >= 1, got {max_response_bytes}")
        self.url = url
        self.top_k = check_top_k(top_k)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_response_bytes = max_response_bytes
        self.name = name
        self.num_requests = 0
        self.num_retries = 0
        self.num_failures = 0

    def retrieve(self, queries: list[str], top_k: int | None = None) -> list[list[SearchHit]]:
        """Top-k hits per query from the server, best first.

        Raises:
            ToolError: the server could not be reached or answered badly after the retries (names the URL).
        """
        if not queries:
            return []
        k = check_top_k(top_k if top_k is not None else self.top_k)
        payload = {"queries": list(queries), "topk": k, "return_scores": True}
        body = self._post(json.dumps(payload).encode("utf-8"))
        return self._parse(body, len(queries))

    def _post(self, data: bytes) -> Any:
        last_error = ""
        attempts = 0
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.num_retries += 1
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            self.num_requests += 1
            attempts += 1
            request = urllib.request.Request(
                self.url, data=data, headers={"Content-Type": "application/json"}, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
                    raw = response.read(self.max_response_bytes + 1)
            except urllib.error.HTTPError as error:
                detail = error.read(300).decode("utf-8", "replace")
                last_error = f"HTTP {error.code}: {detail}"
                if error.code != 429 and error.code < 500:
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException, OSError) as error:
                last_error = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
            else:
                return self._decode(raw, encoding)
        self.num_failures += 1
        raise ToolError(f"retriever at {self.url} failed after {attempts} attempt(s): {last_error}")

    def _decode(self, raw: bytes, encoding: str) -> Any:
        """The JSON value of a response body; ToolError (counted, not retried) when it is not plain UTF-8 JSON."""
        problem = None
        if encoding not in ("", "identity"):
            problem = f"sent a {encoding!r}-encoded body; expected plain JSON (no Content-Encoding)"
        elif len(raw) > self.max_response_bytes:
            problem = f"sent more than max_response_bytes={self.max_response_bytes}"
        else:
            try:
                return json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                problem = f"sent a body that is not UTF-8 ({error.reason} at byte {error.start})"
            except RecursionError:
                problem = "sent JSON nested too deeply to parse"
            except ValueError as error:  # JSONDecodeError, an over-long integer
                problem = f"sent a body that is not JSON ({getattr(error, 'msg', error)}): {raw[:80]!r}"
        self.num_failures += 1
        raise ToolError(f"retriever at {self.url} {problem}")

    def _parse(self, body: Any, num_queries: int) -> list[list[SearchHit]]:
        result = body.get("result") if isinstance(body, dict) else None
        if not isinstance(result, list) or len(result) != num_queries:
            self.num_failures += 1
            raise ToolError(
                f"retriever at {self.url} sent no 'result' list with {num_queries} entries: {str(body)[:200]}"
            )
        try:
            return [self._parse_row(items, qi) for qi, items in enumerate(result)]
        except ValueError as error:
            self.num_failures += 1
            raise ToolError(str(error)) from error

    def _parse_row(self, items: Any, qi: int) -> list[SearchHit]:
        """One query's hits; ValueError naming the URL, result and item when one is malformed."""
        if not isinstance(items, list):
            raise ValueError(f"retriever at {self.url}: result {qi} is not a list")
        row = []
        for di, item in enumerate(items):
            where = f"retriever at {self.url}, result {qi}, item {di}"
            scored = isinstance(item, dict) and "document" in item
            doc = document_from_record(item["document"] if scored else item, str(di), where)
            score = item.get("score", 0.0) if scored else 0.0
            value = float("nan")
            if isinstance(score, (int, float)) and not isinstance(score, bool):
                value = float(score) if abs(score) < 1e300 else float("inf")  # a huge int overflows float()
            if not math.isfinite(value):
                raise ValueError(f"{where}: 'score' must be a finite number, got {score!r:.80}")
            row.append(SearchHit(doc, value))
        return row


def quiet_bm25s() -> None:
    """bm25s logs every empty query at INFO/DEBUG; keep only its warnings in training logs."""
    logging.getLogger("bm25s").setLevel(logging.WARNING)
