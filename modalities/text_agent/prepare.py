"""Text datasets of the shipped recipes, written where they read them: `renorm data prepare NAME --out data/NAME`.

Math sets become JSONL `{"id", "problem", "answer", ...}` (what `ReasoningDataset` reads; a boxed solution or an
answer list is reduced to the answer as the papers' data scripts do), search-agent QA sets FlashRAG's
`{"id", "question", "golden_answers"}` JSONL (what `SearchQADataset` reads), and wiki-18 Search-R1's `{"id",
"contents"}` corpus with a BM25 index beside it (what `renorm serve-retriever --index-dir` loads). Registered in
pyproject.toml under `renorm.datasets`; `source` None reads the hub, a local path reads a copy in the hub layout.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rewards.text.math import gold_answer, last_boxed
from toolkit.io.datasets import load_records
from toolkit.io.prepare import atomic_output, download_hub_file, progress_bar, write_jsonl


@dataclass(frozen=True)
class MathSource:
    """Where a math set lives on the hub and which columns hold its problem and answer."""

    hub_id: str
    split: str
    problem: str
    answer: str  # a plain answer, a list (OlympiadBench), or a worked solution whose last \boxed{} is the answer
    boxed: bool = False  # the answer column is a solution: a row without \boxed{} is an error
    join: bool = False  # a list answer is one answer in parts ("-2, 2": all roots), not alternatives
    keep: tuple[str, ...] = ()  # upstream columns copied as they are


# Hub sources: BNPO's data_prepare.py (changyi7231/BNPO) for MATH, MATH-500, AMC23, AIME24/25; the DLER README
# (NVlabs/DLER) for DeepScaleR; the math-ai copies of Minerva and OlympiadBench (DeepScaleR's own test files are
# JSON in its GitHub repository, not on the hub).
MATH_SOURCES = {
    "deepscaler": MathSource(
        "agentica-org/DeepScaleR-Preview-Dataset", "train", "problem", "answer", keep=("solution",)
    ),
    "math": MathSource(
        "DigitalLearningGmbH/MATH-lighteval", "train", "problem", "solution", boxed=True, keep=("level", "type")
    ),
    "math500": MathSource(
        "HuggingFaceH4/MATH-500", "test", "problem", "answer", keep=("solution", "subject", "level", "unique_id")
    ),
    "aime24": MathSource("math-ai/aime24", "test", "problem", "solution", boxed=True, keep=("url",)),
    "aime25": MathSource("math-ai/aime25", "test", "problem", "answer"),
    "amc23": MathSource("math-ai/amc23", "test", "question", "answer", keep=("url",)),
    "minerva": MathSource("math-ai/minervamath", "test", "question", "answer"),
    "olympiadbench": MathSource(
        "math-ai/olympiadbench", "test", "question", "final_answer", join=True, keep=("subfield", "answer_type", "unit")
    ),
}


def math_record(row: Mapping[str, Any], index: int, spec: MathSource, where: str) -> dict[str, Any]:
    """One upstream row -> {"id", "problem", "answer", *spec.keep}; ValueError naming a missing or empty column.

    The answer is a string, or a list of alternatives when the upstream column holds one (any one is correct).
    """
    for column in (spec.problem, spec.answer):
        if column not in row:
            raise ValueError(f"{where}: no column {column!r} (not the {spec.hub_id} layout); columns: {sorted(row)}")
    problem = row[spec.problem]
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError(f"{where}: empty or non-text {spec.problem!r}: {problem!r}")
    if spec.boxed and last_boxed(str(row[spec.answer])) is None:
        raise ValueError(f"{where}: {spec.answer!r} holds no \\boxed{{}} answer: {str(row[spec.answer])[-200:]!r}")
    answer: str | list[str] | None = gold_answer(row, [spec.answer])
    if spec.join and isinstance(answer, list):
        answer = ", ".join(answer)
    if answer is None:
        raise ValueError(f"{where}: empty {spec.answer!r}")
    ident = row.get("id", row.get("unique_id", index))
    kept = {column: row[column] for column in spec.keep if column in row}
    return {"id": str(ident), "problem": problem, "answer": answer, **kept}


def write_math_set(name: str, out: Path, source: str | None, limit: int | None) -> list[Path]:
    """Write `out/<split>.jsonl` for the math set `name` of MATH_SOURCES."""
    spec = MATH_SOURCES[name]
    where = source or spec.hub_id
    is_file = source is not None and Path(source).is_file()
    rows = load_records(where, split=None if is_file else spec.split, max_rows=limit)
    if not rows:
        raise ValueError(f"{where}: no rows")
    records = [math_record(row, i, spec, f"{where}, row {i}") for i, row in enumerate(rows)]
    target = Path(out) / f"{spec.split}.jsonl"
    write_jsonl(target, records)
    return [target]


def prepare_deepscaler(out: Path, *, source: str | None = None, limit: int | None = None) -> list[Path]:
    """DeepScaleR-Preview training problems (agentica-org/DeepScaleR-Preview-Dataset, 40k) for the DLER recipes."""
    return write_math_set("deepscaler", out, source, limit)


def prepare_math(out: Path, *, source: str | None = None, limit: int | None = None) -> list[Path]:
    """MATH training problems (DigitalLearningGmbH/MATH-lighteval, 7.5k; answer = last \\boxed{}) for BNPO."""
    return write_math_set("math", out, source, limit)


def prepare_math500(out: Path, *, source: str | None = None, limit: int | None = None) -> list[Path]:
    """MATH-500 test problems (HuggingFaceH4/MATH-500): the MATH benchmark of DLER and BNPO."""
    return write_math_set("math500", out, source, limit)


def prepare_aime24(out: Path, *, source: str | None = None, limit: int | None = None) -> list[Path]:
    """AIME 2024, 30 problems (math-ai/aime24; answer = the \\boxed{} solution)."""
    return write_math_set("aime24", out, source, limit)


def prepare_aime25(out: Path, *, source: str | None = None, limit: int | None = None) -> list[Path]:
    """AIME 2025, 30 problems (math-ai/aime25) for BNPO's validation."""
    return write_math_set("aime25", out, source, limit)


def prepare_amc23(out: Path, *, source: str | None = None, limit: int | None = None) -> list[Path]:
    """AMC 2023, 40 problems (math-ai/amc23): the AMC benchmark of DLER and BNPO."""
    return write_math_set("amc23", out, source, limit)


def prepare_minerva(out: Path, *, source: str | None = None, limit: int | None = None) -> list[Path]:
    """Minerva Math, 272 STEM problems (math-ai/minervamath) for DLER's Table 1."""
    return write_math_set("minerva", out, source, limit)


def prepare_olympiadbench(out: Path, *, source: str | None = None, limit: int | None = None) -> list[Path]:
    """OlympiadBench, 674 English text-only math problems (math-ai/olympiadbench; answer parts joined by ", ")."""
    return write_math_set("olympiadbench", out, source, limit)


# FlashRAG (RUC-NLPIR/FlashRAG_datasets, one hub config and folder per dataset): the splits the recipes read.
FLASHRAG_HUB = "RUC-NLPIR/FlashRAG_datasets"
FLASHRAG_SPLITS = {
    "nq": ("train", "test"),
    "hotpotqa": ("train", "dev"),
    "triviaqa": ("test",),
    "popqa": ("test",),
    "2wikimultihopqa": ("dev",),
    "musique": ("dev",),
    "bamboogle": ("test",),
}


def qa_record(row: Mapping[str, Any], index: int, name: str, where: str) -> dict[str, Any]:
    """One FlashRAG row -> {"id", "question", "golden_answers", "dataset"}; ValueError naming a missing field."""
    question, answers = row.get("question"), row.get("golden_answers")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: no 'question' text (not the FlashRAG layout); columns: {sorted(row)}")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, (str, int, float)) for a in answers):
        raise ValueError(f"{where}: 'golden_answers' must be a non-empty list of strings, got {answers!r:.200}")
    golden = [str(answer) for answer in answers]
    return {"id": str(row.get("id", index)), "question": question, "golden_answers": golden, "dataset": name}


def flashrag_rows(name: str, split: str, source: str | None, limit: int | None) -> tuple[str, list[dict[str, Any]]]:
    """(where, rows) of one split: the hub config, or `<source>/<split>.jsonl` / `<source>/<name>/<split>.jsonl`."""
    if source is None or not Path(source).exists():
        hub = source or FLASHRAG_HUB
        return f"{hub} ({name}, {split})", load_records(hub, config=name, split=split, max_rows=limit)
    folder = Path(source)
    candidates = [folder / f"{split}.jsonl", folder / name / f"{split}.jsonl"]
    file = next((c for c in candidates if c.is_file()), None)
    if file is None:
        raise FileNotFoundError(f"{name}: no {split} split in {folder} (looked for {', '.join(map(str, candidates))})")
    return str(file), load_records(file, max_rows=limit)


def write_flashrag_set(name: str, out: Path, source: str | None, limit: int | None) -> list[Path]:
    """Write `out/<split>.jsonl` for each split of FLASHRAG_SPLITS[name]."""
    written = []
    for split in FLASHRAG_SPLITS[name]:
        where, rows = flashrag_rows(name, split, source, limit)
        if not rows:
            raise ValueError(f"{where}: no rows")
        records = [qa_record(row, i, name, f"{where}, row {i}") for i, row in enumerate(rows)]
        target = Path(out) / f"{split}.jsonl"
        write_jsonl(target, records)
        written.append(target)
    return written


def prepare_nq(out: Path, *, source: str | None = None, limit: int | None = None) -> list[Path]:
    """Natural Questions, FlashRAG layout (RUC-NLPIR/FlashRAG_datasets nq): train (search agents) + test (eval)."""
    return write_flashrag_set("nq", out, source, limit)


def prepare_hotpotqa(out: Path, *, source: str | None = None, limit: int | None = None) -> list[Path]:
    """HotpotQA, FlashRAG layout (RUC-NLPIR/FlashRAG_datasets hotpotqa): train + dev (eval)."""
    return write_flashrag_set("hotpotqa", out, source, limit)


def prepare_triviaqa(out: Path, *, source: str | None = None, limit: int | None = None) -> list[Path]:
    """TriviaQA test, FlashRAG layout (RUC-NLPIR/FlashRAG_datasets triviaqa): a search-agent eval set."""
    return write_flashrag_set("triviaqa", out, source, limit)


def prepare_popqa(out: Path, *, source: str | None = None, limit: int | None = None) -> list[Path]:
    """PopQA test, FlashRAG layout (RUC-NLPIR/FlashRAG_datasets popqa): a search-agent eval set."""
    return write_flashrag_set("popqa", out, source, limit)


def prepare_2wikimultihopqa(out: Path, *, source: str | None = None, limit: int | None = None) -> list[Path]:
    """2WikiMultihopQA dev, FlashRAG layout (RUC-NLPIR/FlashRAG_datasets 2wikimultihopqa): a search-agent eval set."""
    return write_flashrag_set("2wikimultihopqa", out, source, limit)


def prepare_musique(out: Path, *, source: str | None = None, limit: int | None = None) -> list[Path]:
    """MuSiQue dev, FlashRAG layout (RUC-NLPIR/FlashRAG_datasets musique): a search-agent eval set."""
    return write_flashrag_set("musique", out, source, limit)


def prepare_bamboogle(out: Path, *, source: str | None = None, limit: int | None = None) -> list[Path]:
    """Bamboogle test, 125 questions, FlashRAG layout (RUC-NLPIR/FlashRAG_datasets bamboogle): an eval set."""
    return write_flashrag_set("bamboogle", out, source, limit)


WIKI18_REPO, WIKI18_FILE = "PeterJinGo/wiki-18-corpus", "wiki-18.jsonl.gz"  # Search-R1 scripts/download.py
CORPUS_FILE, BM25_DIR = "wiki-18.jsonl", "bm25"


def upstream_file(source: str | None, repo: str, names: tuple[str, ...]) -> Path:
    """The upstream file: downloaded from `repo` (None), `source` itself, or the first of `names` in folder `source`."""
    if source is None:
        return download_hub_file(repo, names[0])
    path = Path(source)
    if path.is_file():
        return path
    found = next((path / n for n in names if (path / n).is_file()), None)
    if found is None:
        raise FileNotFoundError(f"no {' or '.join(names)} at {path}")
    return found


def corpus_lines(file: Path, advance: Any) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of a `.jsonl` or `.jsonl.gz` file, advancing `advance` by the file bytes read."""
    with open(file, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if file.suffix == ".gz" else raw
        done = 0
        for lineno, line in enumerate(stream, start=1):
            if lineno % 4096 == 0:
                advance(raw.tell() - done)
                done = raw.tell()
            yield lineno, line
        advance(raw.tell() - done)


def write_corpus(file: Path, target: Path, limit: int | None) -> int:
    """Copy a `{"id", "contents"}` (or `{"id", "title", "text"}`) corpus to `target` as `{"id", "contents"}` JSONL."""
    from modalities.text_agent.tools.corpus import document_from_record

    count = 0
    with (
        progress_bar(f"corpus {file.name}", file.stat().st_size, unit="bytes") as advance,
        atomic_output(target) as handle,
    ):
        for lineno, line in corpus_lines(file, advance):
            if not line.strip():
                continue
            where = f"{file}, line {lineno}"
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(f"{where}: malformed JSON ({error})") from error
            document = document_from_record(record, str(count), where)
            handle.write(json.dumps(document.to_record(), ensure_ascii=False) + "\n")
            count += 1
            if limit is not None and count >= limit:
                break
        if count == 0:  # inside the block: an empty source leaves an earlier corpus in place
            raise ValueError(f"{file}: no documents")
    return count


def build_bm25_index(corpus: Path, index_dir: Path) -> list[Path]:
    """Build the BM25 index `renorm serve-retriever CORPUS --index-dir DIR` loads (default k1, b), replacing DIR."""
    from modalities.text_agent.tools.search import BM25Search

    temp = index_dir.with_name(f".{index_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(temp, ignore_errors=True)
    try:
        with progress_bar(f"BM25 index of {corpus.name}", None):
            BM25Search(str(corpus), index_dir=str(temp)).build()
        if index_dir.exists():
            shutil.rmtree(index_dir)
        os.replace(temp, index_dir)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return sorted(p for p in index_dir.rglob("*") if p.is_file())


def prepare_wiki18(out: Path, *, source: str | None = None, limit: int | None = None) -> list[Path]:
    """The wiki-18 retrieval corpus of Search-R1 (PeterJinGo/wiki-18-corpus, 21M passages) and its BM25 index."""
    file = upstream_file(source, WIKI18_REPO, (WIKI18_FILE, CORPUS_FILE))
    corpus = Path(out) / CORPUS_FILE
    write_corpus(file, corpus, limit)
    return [corpus, *build_bm25_index(corpus, Path(out) / BM25_DIR)]


E5_REPO, E5_PARTS, E5_FILE = "PeterJinGo/wiki-18-e5-index", ("part_aa", "part_ab"), "e5_Flat.index"
# faiss IndexFlat file: fourcc, d (int32), ntotal (int64), two int64, is_trained (bool), metric (int32), then the
# number of floats (uint64) and the float32 vectors.
_FLAT_HEADER = struct.Struct("<4siqqq?iQ")
_FLAT_FOURCC = (b"IxFI", b"IxF2")


def check_flat_index(file: Path) -> tuple[int, int]:
    """(dimension, vectors) of a faiss flat index file; ValueError when its header or size is not a whole index."""
    with open(file, "rb") as handle:
        head = handle.read(_FLAT_HEADER.size)
    if len(head) < _FLAT_HEADER.size or head[:4] not in _FLAT_FOURCC:
        raise ValueError(f"{file}: not a faiss flat index (header {head[:4]!r}, expected one of {_FLAT_FOURCC})")
    _, dim, ntotal, _, _, _, _, floats = _FLAT_HEADER.unpack(head)
    expected = _FLAT_HEADER.size + 4 * dim * ntotal
    size = file.stat().st_size
    if floats != dim * ntotal or size != expected:
        raise ValueError(f"{file}: {size} bytes, but a flat index of {ntotal} x {dim} vectors has {expected}")
    return dim, ntotal


def prepare_wiki18_e5(out: Path, *, source: str | None = None, limit: int | None = None) -> list[Path]:
    """Search-R1's e5 flat faiss index of wiki-18 (PeterJinGo/wiki-18-e5-index, ~65 GB) for the dense retriever."""
    if limit is not None:
        raise ValueError("limit does not apply to wiki18-e5: the prebuilt index covers the whole wiki-18 corpus")
    if source is not None and Path(source).is_file():
        parts = [Path(source)]
    elif source is not None and (Path(source) / E5_FILE).is_file():
        parts = [Path(source) / E5_FILE]
    else:
        parts = [upstream_file(source, E5_REPO, (part,)) for part in E5_PARTS]
    target = Path(out) / E5_FILE
    total = sum(part.stat().st_size for part in parts)
    with progress_bar(f"join {E5_FILE}", total, unit="bytes") as advance, atomic_output(target, "wb") as handle:
        for part in parts:
            with open(part, "rb") as chunk:
                while block := chunk.read(1 << 24):
                    handle.write(block)
                    advance(len(block))
    try:
        check_flat_index(target)
    except ValueError:
        target.unlink()
        raise
    return [target]
