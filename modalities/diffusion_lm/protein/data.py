"""Protein sequence data for masked diffusion: the shipped protein-like set and a FASTA DataSource.

The shipped set (`data/protein_like.fasta`, 120 records, 20-44 residues, ~5 KB) is NOT real proteins: it was
written once by `generate_protein_like()` (seed 0), a 3-state hidden Markov chain whose states stand for helix-,
strand- and loop-like stretches, each with its own residue preferences, every sequence starting with M. It has a
clearly non-uniform composition and local structure that a tiny teacher learns in a minute of CPU, which is all
the tests and the benchmark need. Real work points `ProteinDataset(path=...)` at a real FASTA file.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from modalities.diffusion_lm.protein.fasta import FastaRecord, read_fasta
from modalities.diffusion_lm.protein.tokenizer import (
    STANDARD_AMINO_ACIDS,
    Layout,
    ProteinVocab,
    build_protein_tokenizer,
)
from modalities.diffusion_lm.text_data import TokenDataset, chunk_stream, split_items

PROTEIN_LIKE_FASTA = Path(__file__).parent / "data" / "protein_like.fasta"
PACKINGS: tuple[str, ...] = ("pad", "wrap", "crop")
Packing = Literal["pad", "wrap", "crop"]

# Hidden states of the generator: (name, probability of staying, residue weights).
_STATES: tuple[tuple[str, float, dict[str, float]], ...] = (
    ("helix", 0.85, {"A": 6, "L": 6, "E": 5, "K": 5, "R": 3, "Q": 3, "M": 2, "I": 1, "D": 1, "S": 1}),
    ("strand", 0.75, {"V": 6, "I": 5, "Y": 3, "F": 3, "T": 4, "W": 1, "L": 2, "C": 1, "H": 1}),
    ("loop", 0.65, {"G": 6, "P": 4, "N": 4, "D": 4, "S": 4, "T": 2, "K": 1, "H": 1, "Q": 1}),
)


def generate_protein_like(
    num_sequences: int = 120, min_length: int = 20, max_length: int = 44, seed: int = 0
) -> list[FastaRecord]:
    """Protein-like sequences from the seeded 3-state Markov chain that wrote the shipped set.

    Each sequence: M, then residues emitted by the current state; after each residue the chain stays with the
    state's probability or jumps to one of the other two uniformly; the start state is uniform; the length is
    uniform on [min_length, max_length]. Uses `random.Random(seed)`, whose draws are stable across Pythons.
    """
    if not 1 <= min_length <= max_length:
        raise ValueError(f"need 1 <= min_length <= max_length, got {min_length}, {max_length}")
    rng = random.Random(seed)
    records = []
    for index in range(num_sequences):
        length = rng.randint(min_length, max_length)
        state = rng.randrange(len(_STATES))
        residues = ["M"]
        while len(residues) < length:
            _, stay, weights = _STATES[state]
            residues.append(rng.choices(list(weights), weights=list(weights.values()))[0])
            if rng.random() >= stay:
                state = rng.choice([s for s in range(len(_STATES)) if s != state])
        records.append(FastaRecord(id=f"synthetic_{index:03d}", sequence="".join(residues), description="seed0-hmm"))
    return records


def protein_like_nll(
    sequences: Sequence[str], floor: float = 1e-4, min_length: int = 20, max_length: int = 44
) -> list[float]:
    """Negative log-likelihood (nats) of each sequence under the chain that wrote the shipped set.

    The exact generative model of `generate_protein_like` (seed-free): length uniform on [min_length,
    max_length], a leading M, then the hidden 3-state chain (uniform start, stay or jump uniformly to another
    state) emitting one residue per step, summed over states with the forward algorithm. Events the chain gives
    probability 0 (a residue no state emits, an `X` left by a malformed sample, no leading M, a length outside
    the range) get probability `floor` instead, so every sequence has a finite score and such samples are
    penalised by about -log(floor) each. An empty sequence scores -log(floor).

    This is the oracle behind the protein benchmark's "generator perplexity" (exp of the summed NLL over the
    summed residues): the protein analogue of gen-PPL under GPT-2 Large, exact here because the data's
    distribution is known. It is meaningful only for models trained on the shipped set.
    """
    if not 0 < floor < 1:
        raise ValueError(f"floor must be in (0, 1), got {floor}")
    letters = STANDARD_AMINO_ACIDS
    index = {letter: position for position, letter in enumerate(letters)}
    num_states = len(_STATES)
    emit = torch.zeros(num_states, len(letters) + 1, dtype=torch.float64)  # last column: any other letter
    for state, (_, _, weights) in enumerate(_STATES):
        total = sum(weights.values())
        for letter, weight in weights.items():
            emit[state, index[letter]] = weight / total
    emit = emit.clamp_min(floor)
    stay = torch.tensor([s for _, s, _ in _STATES], dtype=torch.float64)
    move = torch.diag(stay) + (1 - stay)[:, None] / (num_states - 1) * (1 - torch.eye(num_states, dtype=torch.float64))
    log_len = -math.log(max_length - min_length + 1)
    out = []
    for sequence in sequences:
        n = len(sequence)
        if n == 0:
            out.append(-math.log(floor))
            continue
        logp = log_len if min_length <= n <= max_length else math.log(floor)
        logp += 0.0 if sequence[0] == "M" else math.log(floor)
        alpha = torch.full((num_states,), 1.0 / num_states, dtype=torch.float64)  # P(state of the next residue)
        for position, letter in enumerate(sequence[1:]):
            if position:
                alpha = alpha @ move
            alpha = alpha * emit[:, index.get(letter, len(letters))]
            scale = alpha.sum()
            logp += math.log(float(scale))
            alpha = alpha / scale
        out.append(-logp)
    return out


def protein_like_perplexity(sequences: Sequence[str], floor: float = 1e-4) -> float:
    """exp(sum of `protein_like_nll` / sum of lengths) of a set (its "generator perplexity"); NaN if empty."""
    total = sum(max(len(s), 1) for s in sequences)
    return math.exp(sum(protein_like_nll(sequences, floor)) / total) if sequences else math.nan


def load_sequences(path: str | None = None, alphabet: str = STANDARD_AMINO_ACIDS) -> list[str]:
    """Residue strings of a FASTA file (default: the shipped protein-like set), validated against `alphabet`."""
    return [record.sequence for record in read_fasta(path or PROTEIN_LIKE_FASTA, alphabet=alphabet)]


def encode_rows(
    sequences: Sequence[str], vocab: ProteinVocab, seq_len: int, packing: Packing = "pad"
) -> list[list[int]]:
    """Fixed-length id rows of `sequences`.

    "pad": one sequence per row, [bos] residues [eos] then <pad> up to `seq_len` (pads are modelled tokens, as
    in MDLM's padded LM1B setting, so a sampler learns where a protein ends); a longer sequence keeps its first
    seq_len − 1 residues after bos and has no eos. "wrap": [bos] seq [eos] [bos] seq [eos] ... cut into
    windows of `seq_len` (the incomplete tail is dropped), like the text TokenDataset. "crop": the first
    `seq_len` residues of every sequence that has that many, no special token (for teachers such as DPLM that
    only ever denoise residues between fixed ends; shorter sequences are skipped).
    """
    if packing not in PACKINGS:
        raise ValueError(f"packing={packing!r}; allowed: {list(PACKINGS)}")
    if seq_len < 3:
        raise ValueError(f"seq_len must be >= 3, got {seq_len}")
    if packing == "crop":
        return [
            vocab.encode(s[:seq_len], add_special_tokens=False, strict=True) for s in sequences if len(s) >= seq_len
        ]
    encoded = [vocab.encode(sequence, strict=True) for sequence in sequences]
    if packing == "wrap":
        return chunk_stream([index for ids in encoded for index in ids], seq_len, seq_len)
    rows = []
    for ids in encoded:
        row = ids if len(ids) <= seq_len else ids[:seq_len]
        rows.append(row + [vocab.pad_id] * (seq_len - len(row)))
    return rows


class ProteinDataset(TokenDataset):
    """An endless, seeded, resumable stream of fixed-length protein rows {"input_ids": list[int]} (a DataSource).

    Batching, shuffling and `state_dict()` are the text `TokenDataset`'s; only the rows differ. The last
    `valid_fraction` of the records form the "valid" split, the rest "train" ("all" keeps every record).

    Args:
        path: FASTA file (default: the shipped protein-like set); residues must be the 20 standard ones.
        layout: "compact" (V = 25, for our DiT) or "esm" (V = 33, for ESM-2/DPLM teachers).
        seq_len: L, ids per row.
        packing: "pad" (one protein per row), "wrap" (packed stream) or "crop" (residues only), see `encode_rows`.
        split, valid_fraction, shuffle, seed: as in `TokenDataset`.
    """

    def __init__(
        self,
        path: str | None = None,
        layout: Layout = "compact",
        seq_len: int = 48,
        packing: Packing = "pad",
        split: str = "train",
        valid_fraction: float = 0.1,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        chosen = split_items(load_sequences(path), split, valid_fraction)
        self.vocab = ProteinVocab.from_layout(layout)
        self.tokenizer = build_protein_tokenizer(layout)
        self.chunks = encode_rows(chosen, self.vocab, seq_len, packing)
        if not self.chunks:
            raise ValueError(f"the {split} split of {path or PROTEIN_LIKE_FASTA} gives no row of seq_len={seq_len}")
        self.seq_len, self.shuffle, self.seed = seq_len, shuffle, seed
        self.epoch, self.position = 0, 0
