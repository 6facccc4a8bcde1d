"""Retrieval corpora in the Search-R1 / FlashRAG JSONL layout, search hits, and their observation text.

A corpus line is `{"id", "contents"}` with `contents = '"Title"\\ntext'` (wiki-18), or `{"id", "title",
"text"}`, which is read as that layout. The file is scanned once (every line validated, byte offsets
kept) and documents are read back by offset, so a large corpus is not held in memory as objects.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

INDEX_META_FILE = "renorm_index.json"


@dataclass(frozen=True)
class Document:
    """One passage: `contents` is the title line, a newline, then the text (Search-R1 layout)."""

    id: str
    contents: str

    @property
    def title(self) -> str:
        """The first line of `contents`, as stored (wiki-18 keeps the quotes: '"Title"')."""
        return self.contents.split("\n", 1)[0]

    @property
    def text(self) -> str:
        """Everything after the title line."""
        parts = self.contents.split("\n", 1)
        return parts[1] if len(parts) > 1 else ""

    def to_record(self) -> dict[str, str]:
        """The corpus-line form `{"id", "contents"}` (what a `/retrieve` server returns)."""
        return {"id": self.id, "contents": self.contents}


@dataclass(frozen=True)
class SearchHit:
    """A retrieved document and its retriever score (BM25 score or inner product)."""

    document: Document
    score: float


@runtime_checkable
class Retriever(Protocol):
    """What the `/retrieve` server serves: top-k hits per query, best first."""

    top_k: int

    def retrieve(self, queries: list[str], top_k: int | None = None) -> list[list[SearchHit]]: ...


def document_from_record(record: Any, default_id: str, where: str) -> Document:
    """A Document from a corpus record `{"id", "contents"}` or `{"id", "title", "text"}`.

    Raises:
        ValueError: the record is not an object or has neither layout (`where` names file and line).
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    doc_id = str(record.get("id", default_id))
    contents = record.get("contents")
    if isinstance(contents, str):
        return Document(id=doc_id, contents=contents)
    title, text = record.get("title"), record.get("text")
    if isinstance(title, str) and isinstance(text, str):
        return Document(id=doc_id, contents=f'"{title}"\n{text}')
    raise ValueError(
        f"{where}: a corpus record needs a string 'contents' or 'title' and 'text'; keys: {sorted(record)}"
    )


def format_hits(hits: Sequence[SearchHit]) -> str:
    """Search-R1's observation text: one `Doc i(Title: t) text` line per hit, each ending in a newline.

    The tool-loop sampler wraps it as `<information>...</information>`.
    """
    return "".join(f"Doc {rank}(Title: {hit.document.title}) {hit.document.text}\n" for rank, hit in enumerate(hits, 1))


def check_top_k(top_k: int) -> int:
    """`top_k` if it is a positive int, else ValueError."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    return top_k


class JsonlCorpus:
    """A JSONL corpus file, validated once and read back by byte offset.

    Args:
        path: the `.jsonl` file.

    Raises:
        FileNotFoundError: no file at `path` (the message names it).
        ValueError: a malformed line (file and line number in the message) or an empty corpus.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"retrieval corpus not found: {self.path}")
        self.num_bytes = self.path.stat().st_size
        offsets: list[int] = []
        with self.path.open("rb") as handle:
            position = 0
            for lineno, raw in enumerate(handle, start=1):
                if raw.strip():
                    self._parse(raw, lineno, str(len(offsets)))
                    offsets.append(position)
                position += len(raw)
        if not offsets:
            raise ValueError(f"retrieval corpus {self.path} has no documents")
        self.offsets = np.asarray(offsets, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.offsets.shape[0])

    def __iter__(self) -> Iterator[Document]:
        with self.path.open("rb") as handle:
            index = 0
            for lineno, raw in enumerate(handle, start=1):
                if raw.strip():
                    yield self._parse(raw, lineno, str(index))
                    index += 1

    def get(self, indices: Sequence[int]) -> list[Document]:
        """The documents at corpus positions `indices` (0-based, in order)."""
        docs = []
        with self.path.open("rb") as handle:
            for index in indices:
                handle.seek(int(self.offsets[int(index)]))
                docs.append(self._parse(handle.readline(), None, str(int(index))))
        return docs

    def fingerprint(self) -> dict[str, Any]:
        """What an index saved for this corpus records to detect a different corpus later."""
        return {"num_documents": len(self), "corpus_bytes": self.num_bytes}

    def _parse(self, raw: bytes, lineno: int | None, default_id: str) -> Document:
        where = f"{self.path}, line {lineno}" if lineno is not None else f"{self.path}, document {default_id}"
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{where}: malformed JSON ({error})") from error
        return document_from_record(record, default_id, where)


def read_index_meta(index_dir: Path) -> dict[str, Any] | None:
    """The saved index metadata in `index_dir`, or None when no index was saved there."""
    file = index_dir / INDEX_META_FILE
    if not file.is_file():
        return None
    meta: dict[str, Any] = json.loads(file.read_text(encoding="utf-8"))
    return meta


def write_index_meta(index_dir: Path, meta: Mapping[str, Any]) -> None:
    """Write the index metadata last, so a half-written index is never taken for a complete one."""
    index_dir.mkdir(parents=True, exist_ok=True)
    tmp = index_dir / (INDEX_META_FILE + ".tmp")
    tmp.write_text(json.dumps(dict(meta), indent=1, sort_keys=True), encoding="utf-8")
    tmp.replace(index_dir / INDEX_META_FILE)


def check_index_meta(index_dir: Path, saved: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """ValueError naming every setting where the saved index differs from what is asked for now."""
    diffs = [f"{k}: saved {saved.get(k)!r}, asked {v!r}" for k, v in expected.items() if saved.get(k) != v]
    if diffs:
        raise ValueError(
            f"the index in {index_dir} does not match this corpus/settings ({'; '.join(diffs)}); "
            "delete it or choose another index_dir"
        )


class SearchTool:
    """Base of the search tools: `retrieve` gives hits, calling the tool gives observation texts."""

    name: str = "search"
    top_k: int = 3

    def retrieve(self, queries: list[str], top_k: int | None = None) -> list[list[SearchHit]]:
        """Top-k hits per query, best first."""
        raise NotImplementedError

    def __call__(self, queries: list[str]) -> list[str]:
        """One observation text per query (`format_hits`)."""
        return [format_hits(hits) for hits in self.retrieve(list(queries))]
