"""Text data for masked diffusion LMs: the shipped tiny corpus, a word-level tokenizer, packed token chunks.

The corpus (`data/tiny_corpus.txt`, ~12 KB) was generated once by a seeded template grammar (five sentence
templates over ~70 words) so a tiny teacher learns it in a minute of CPU. Documents (lines) are packed like
MDLM's "wrap" OpenWebText loader: [BOS] doc [EOS] [BOS] doc [EOS] ... cut into fixed-length chunks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from toolkit.data import epoch_permutation, read_text_file

TINY_CORPUS = Path(__file__).parent / "data" / "tiny_corpus.txt"
PAD, UNK, BOS, EOS, MASK = "[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]"
SPLITS: tuple[str, ...] = ("train", "valid", "all")
T = TypeVar("T")


def read_corpus(path: str | Path | None = None) -> list[str]:
    """Non-empty lines (documents) of a UTF-8 text file (default: the shipped tiny corpus)."""
    file = Path(path) if path is not None else TINY_CORPUS
    if not file.is_file():
        raise ValueError(f"corpus file not found: {file}")
    lines = [line.strip() for line in read_text_file(file).splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"corpus file {file} has no text")
    return lines


def corpus_words(documents: Sequence[str]) -> list[str]:
    """Sorted distinct lower-cased words/punctuation of `documents` (the Whitespace pre-tokenizer's split)."""
    splitter = pre_tokenizers.Whitespace()
    return sorted({word.lower() for doc in documents for word, _ in splitter.pre_tokenize_str(doc)})


def build_text_tokenizer(
    corpus: str | Path | None = None, words: Sequence[str] | None = None
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the corpus vocabulary with [PAD] [UNK] [BOS] [EOS] first and [MASK] last.

    The mask id is the last id (len(tokenizer) − 1), the MDLM convention, so `DiTConfig(vocab_size=len(tok))`
    puts the absorbing state where `DiT` expects it. Decoding joins words with spaces.

    Args:
        corpus: text file whose words form the vocabulary (default: the shipped tiny corpus).
        words: an explicit word list instead of reading `corpus`.
    """
    vocab_words = list(words) if words is not None else corpus_words(read_corpus(corpus))
    specials = [PAD, UNK, BOS, EOS]
    vocab = {token: index for index, token in enumerate([*specials, *vocab_words, MASK])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS, mask_token=MASK
    )


def pack_documents(documents: Sequence[str], tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """One id stream [BOS] doc [EOS] [BOS] doc [EOS] ... (no padding)."""
    stream: list[int] = []
    for doc in documents:
        stream += [tokenizer.bos_token_id, *tokenizer.encode(doc, add_special_tokens=False), tokenizer.eos_token_id]
    return stream


def chunk_stream(stream: Sequence[int], seq_len: int, stride: int) -> list[list[int]]:
    """Windows of `seq_len` ids starting every `stride` ids; the incomplete tail is dropped."""
    if seq_len < 1 or stride < 1:
        raise ValueError(f"need seq_len >= 1 and stride >= 1, got {seq_len}, {stride}")
    return [list(stream[i : i + seq_len]) for i in range(0, len(stream) - seq_len + 1, stride)]


def split_items(items: list[T], split: str, valid_fraction: float) -> list[T]:
    """The "train" / "valid" (the last `valid_fraction`, at least one item) / "all" part of `items`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    num_valid = max(1, round(len(items) * valid_fraction))
    return {"train": items[:-num_valid], "valid": items[-num_valid:], "all": items}[split]


class TokenDataset:
    """An endless, seeded, resumable stream of fixed-length packed chunks {"input_ids": list[int]} (a DataSource).

    The documents are split by position before packing: the last `valid_fraction` of them form "valid",
    the rest "train" ("all" keeps every document), so held-out NELBO is measured on unseen text.

    Args:
        path: text file, one document per line (default: the shipped tiny corpus).
        tokenizer: a tokenizer with bos/eos ids (default: `build_text_tokenizer()` of the same corpus).
        seq_len: L, ids per chunk.
        stride: start offset between chunks (< seq_len gives overlapping windows); None = seq_len.
        split: "train", "valid" or "all".
        valid_fraction: share of documents held out for "valid".
        shuffle: a fresh permutation each epoch (seeded by (seed, epoch)); False keeps order.
        seed: permutation seed.
    """

    def __init__(
        self,
        path: str | None = None,
        tokenizer: PreTrainedTokenizerFast | None = None,
        seq_len: int = 32,
        stride: int | None = None,
        split: str = "train",
        valid_fraction: float = 0.1,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        documents = read_corpus(path)
        chosen = split_items(documents, split, valid_fraction)
        self.tokenizer = tokenizer if tokenizer is not None else build_text_tokenizer(path)
        self.chunks = chunk_stream(pack_documents(chosen, self.tokenizer), seq_len, stride or seq_len)
        if not self.chunks:
            raise ValueError(f"the {split} split of {path or TINY_CORPUS} is shorter than seq_len={seq_len}")
        self.seq_len, self.shuffle, self.seed = seq_len, shuffle, seed
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        return len(self.chunks)

    def _order(self) -> list[int]:
        return epoch_permutation(len(self.chunks), self.seed, self.epoch) if self.shuffle else list(range(len(self)))

    def next_batch(self, batch_size: int) -> list[dict[str, Any]]:
        """The next `batch_size` chunks (crossing epoch boundaries); advances the state."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        batch, order = [], self._order()
        for _ in range(batch_size):
            batch.append({"input_ids": list(self.chunks[order[self.position]])})
            self.position += 1
            if self.position == len(self.chunks):
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order()
        return batch

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[list[dict[str, Any]]]:
        """Endless batches; `generator` is unused (the order depends on (seed, epoch) only, so resume is exact)."""
        while True:
            yield self.next_batch(batch_size)

    def state_dict(self) -> dict[str, Any]:
        """{"epoch", "position", "num_chunks"}."""
        return {"epoch": self.epoch, "position": self.position, "num_chunks": len(self.chunks)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume where `state_dict()` was taken; a different chunk count is an error."""
        if int(state.get("num_chunks", len(self.chunks))) != len(self.chunks):
            raise ValueError(f"state is for {state['num_chunks']} chunks, this dataset has {len(self.chunks)}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < len(self.chunks):
            raise ValueError(f"invalid data state epoch={epoch}, position={position} for {len(self.chunks)} chunks")
        self.epoch, self.position = epoch, position


def collate_input_ids(rows: Sequence[Mapping[str, Any]], device: torch.device | str | None = None) -> torch.Tensor:
    """Stack rows {"input_ids": [L]} into a LongTensor [B, L] (all rows must have one length)."""
    lengths = {len(row["input_ids"]) for row in rows}
    if len(lengths) != 1:
        raise ValueError(f"rows have different lengths {sorted(lengths)}; TokenDataset chunks share one length")
    return torch.tensor([list(row["input_ids"]) for row in rows], dtype=torch.long, device=device)
