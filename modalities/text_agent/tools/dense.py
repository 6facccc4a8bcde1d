"""Dense retrieval: e5-style embeddings through transformers, faiss when installed, exact search otherwise.

Search-R1's e5 retriever: "query: " / "passage: " prefixes, mean pooling over the attention mask,
L2-normalized embeddings, inner-product search over a flat index, top-3. Passages are the corpus
`contents` (title line + text). Without faiss the flat search is an exact chunked matmul in torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor, nn

from modalities.text_agent.tools.corpus import (
    JsonlCorpus,
    SearchHit,
    SearchTool,
    check_index_meta,
    check_top_k,
    read_index_meta,
    write_index_meta,
)

Pooling = Literal["mean", "cls", "pooler"]
SearchBackend = Literal["auto", "faiss", "exact"]
EMBEDDINGS_FILE = "embeddings.npy"


def pool_embeddings(
    last_hidden_state: Tensor, attention_mask: Tensor, pooling: Pooling, pooler_output: Tensor | None = None
) -> Tensor:
    """Sentence embeddings [B, H] from token states [B, L, H] and the attention mask [B, L].

    "mean" averages the unmasked tokens (e5, MiniLM), "cls" takes the first token, "pooler" the
    model's pooler output.
    """
    if pooling == "mean":
        mask = attention_mask.to(last_hidden_state.dtype).unsqueeze(-1)
        return (last_hidden_state * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
    if pooling == "cls":
        return last_hidden_state[:, 0]
    if pooler_output is None:
        raise ValueError("pooling='pooler' needs a model with a pooler output")
    return pooler_output


def exact_inner_product_search(
    queries: Tensor, passages: Tensor, k: int, chunk_size: int = 65536
) -> tuple[Tensor, Tensor]:
    """Exact top-k by inner product, chunked over passages so memory stays O(Q·chunk).

    Args:
        queries: [Q, H] float32.
        passages: [M, H] float32.
        k: hits per query (<= M).
        chunk_size: passages scored at once.

    Returns:
        scores [Q, k] (descending) and passage indices [Q, k] (int64).
    """
    best_scores = torch.full((queries.shape[0], 0), -torch.inf)
    best_indices = torch.zeros((queries.shape[0], 0), dtype=torch.long)
    for start in range(0, passages.shape[0], chunk_size):
        scores = queries @ passages[start : start + chunk_size].T
        indices = torch.arange(start, start + scores.shape[1]).expand_as(scores)
        merged_scores = torch.cat([best_scores, scores], dim=1)
        merged_indices = torch.cat([best_indices, indices], dim=1)
        top = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
        best_scores, best_indices = top.values, merged_indices.gather(1, top.indices)
    return best_scores, best_indices


def _faiss() -> Any | None:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


class DenseSearch(SearchTool):
    """Dense search over a JSONL corpus with an encoder from transformers; the index is built on first use.

    Args:
        corpus: the corpus `.jsonl` (Search-R1/FlashRAG layout).
        encoder: a model name/path for `AutoModel.from_pretrained`, or a loaded `nn.Module`.
        tokenizer: tokenizer name/path or object; None = the encoder's path (required for a module).
        top_k: documents per query.
        query_prefix, passage_prefix: prepended before encoding (e5's "query: " / "passage: ").
        pooling: "mean" | "cls" | "pooler".
        normalize: L2-normalize embeddings (inner product = cosine), as for e5.
        max_length: tokens per text (longer texts are truncated).
        batch_size: texts per encoder call.
        index_dir: passage embeddings are saved here after building and loaded next time.
        faiss_index: a prebuilt faiss index file over this corpus (e.g. Search-R1's `e5_Flat.index`).
        search_backend: "auto" (faiss if installed), "faiss", or "exact" (torch matmul).
        build_index: False makes a missing index in `index_dir` an error instead of encoding the corpus.
        device: where the encoder runs.
        name: the action tag the model uses.
    """

    def __init__(
        self,
        corpus: str,
        encoder: str | nn.Module = "intfloat/e5-base-v2",
        tokenizer: Any = None,
        top_k: int = 3,
        query_prefix: str = "query: ",
        passage_prefix: str = "passage: ",
        pooling: Pooling = "mean",
        normalize: bool = True,
        max_length: int = 256,
        batch_size: int = 64,
        index_dir: str | None = None,
        faiss_index: str | None = None,
        search_backend: SearchBackend = "auto",
        build_index: bool = True,
        device: str = "cpu",
        name: str = "search",
    ) -> None:
        if pooling not in get_args(Pooling):
            raise ValueError(f"pooling={pooling!r} is not one of {list(get_args(Pooling))}")
        if search_backend not in get_args(SearchBackend):
            raise ValueError(f"search_backend={search_backend!r} is not one of {list(get_args(SearchBackend))}")
        if isinstance(encoder, nn.Module) and tokenizer is None:
            raise ValueError("an encoder given as a module needs its tokenizer")
        if max_length < 1 or batch_size < 1:
            raise ValueError(f"max_length and batch_size must be >= 1, got {max_length}, {batch_size}")
        if not Path(corpus).is_file():
            raise FileNotFoundError(f"retrieval corpus not found: {corpus}")
        if faiss_index is not None and not Path(faiss_index).is_file():
            raise FileNotFoundError(f"faiss index not found: {faiss_index}")
        if index_dir is None and faiss_index is None and not build_index:
            raise ValueError("build_index=False needs an index_dir or a faiss_index to load")
        self.corpus_path = corpus
        self.encoder, self.tokenizer = encoder, tokenizer
        self.top_k = check_top_k(top_k)
        self.query_prefix, self.passage_prefix = query_prefix, passage_prefix
        self.pooling: Pooling = pooling
        self.normalize, self.max_length, self.batch_size = normalize, max_length, batch_size
        self.index_dir = Path(index_dir) if index_dir is not None else None
        self.faiss_index = faiss_index
        self.search_backend: SearchBackend = search_backend
        self.build_index = build_index
        self.device = torch.device(device)
        self.name = name
        self.corpus: JsonlCorpus | None = None
        self._model: nn.Module | None = None
        self._embeddings: Tensor | None = None
        self._faiss_index: Any = None

    def __len__(self) -> int:
        return len(self.build())

    def build(self) -> JsonlCorpus:
        """Scan the corpus, load the encoder, and load or build the index (done by the first search)."""
        if self.corpus is not None:
            return self.corpus
        faiss = _faiss()
        if self.search_backend == "faiss" and faiss is None:
            raise ValueError("search_backend='faiss' needs faiss (pip install faiss-cpu)")
        corpus = JsonlCorpus(self.corpus_path)
        self._load_encoder()
        if self.faiss_index is not None:
            self._faiss_index = self._read_faiss_index(faiss, len(corpus))
        else:
            embeddings = self._load_or_encode(corpus)
            if faiss is not None and self.search_backend != "exact":
                self._faiss_index = faiss.IndexFlatIP(embeddings.shape[1])
                self._faiss_index.add(embeddings.numpy())
            else:
                self._embeddings = embeddings
        self.corpus = corpus
        return corpus

    def retrieve(self, queries: list[str], top_k: int | None = None) -> list[list[SearchHit]]:
        """Top-k documents per query by inner product of embeddings, best first."""
        corpus = self.build()
        if not queries:
            return []
        k = min(check_top_k(top_k if top_k is not None else self.top_k), len(corpus))
        query_embeddings = self.encode([self.query_prefix + q for q in queries])
        if self._faiss_index is not None:
            scores_np, indices_np = self._faiss_index.search(query_embeddings.numpy(), k)
            scores, indices = scores_np.tolist(), indices_np.tolist()
        else:
            assert self._embeddings is not None
            scores_t, indices_t = exact_inner_product_search(query_embeddings, self._embeddings, k)
            scores, indices = scores_t.tolist(), indices_t.tolist()
        return [
            [SearchHit(doc, float(s)) for doc, s in zip(corpus.get(row), row_scores, strict=True)]
            for row, row_scores in zip(indices, scores, strict=True)
        ]

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> Tensor:
        """Embeddings [len(texts), H] float32 on the CPU (prefixes already applied by the caller)."""
        self._load_encoder()
        assert self._model is not None
        parts = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                max_length=self.max_length,
                padding=True,
                truncation=True,
                return_tensors="pt",
            ).to(self.device)
            output = self._model(**batch, return_dict=True)
            pooled = pool_embeddings(
                output.last_hidden_state, batch["attention_mask"], self.pooling, getattr(output, "pooler_output", None)
            ).float()
            parts.append(nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled)
        return torch.cat(parts).cpu()

    def _load_encoder(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModel, AutoTokenizer

        model = self.encoder if isinstance(self.encoder, nn.Module) else AutoModel.from_pretrained(self.encoder)
        if self.tokenizer is None or isinstance(self.tokenizer, str):
            self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer or self.encoder)
        self._model = model.to(self.device).eval()

    def _settings(self, corpus: JsonlCorpus) -> dict[str, Any]:
        encoder = self.encoder if isinstance(self.encoder, str) else type(self.encoder).__name__
        return {
            "backend": "dense",
            **corpus.fingerprint(),
            "encoder": encoder,
            "passage_prefix": self.passage_prefix,
            "pooling": self.pooling,
            "normalize": self.normalize,
            "max_length": self.max_length,
        }

    def _load_or_encode(self, corpus: JsonlCorpus) -> Tensor:
        expected = self._settings(corpus)
        saved = read_index_meta(self.index_dir) if self.index_dir is not None else None
        if saved is not None and self.index_dir is not None:
            check_index_meta(self.index_dir, saved, expected)
            file = self.index_dir / EMBEDDINGS_FILE
            if not file.is_file():
                raise FileNotFoundError(f"dense index in {self.index_dir} has no {EMBEDDINGS_FILE}")
            return torch.from_numpy(np.load(file))
        if not self.build_index:
            raise FileNotFoundError(f"no dense index in {self.index_dir} (build_index=False)")
        embeddings = self.encode([self.passage_prefix + doc.contents for doc in corpus])
        if self.index_dir is not None:
            self.index_dir.mkdir(parents=True, exist_ok=True)
            np.save(self.index_dir / EMBEDDINGS_FILE, embeddings.numpy())
            write_index_meta(self.index_dir, expected)
        return embeddings

    def _read_faiss_index(self, faiss: Any, num_documents: int) -> Any:
        if faiss is None:
            raise ValueError(f"faiss_index={self.faiss_index!r} needs faiss (pip install faiss-cpu)")
        index = faiss.read_index(self.faiss_index)
        if index.ntotal != num_documents:
            raise ValueError(
                f"faiss index {self.faiss_index} holds {index.ntotal} vectors but corpus "
                f"{self.corpus_path} has {num_documents} documents"
            )
        return index
