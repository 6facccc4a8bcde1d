"""CPU protein-sequence metrics: composition divergence, repeats, low complexity, diversity, validity.

Pure functions on one-letter residue strings (plus a RewardModel wrapper), no model and no download.
Conventions, chosen because no reference implementation is specified (DiDi-Instruct's protein
experiment, arXiv:2509.25035, names only pLDDT):
- composition = residue frequencies over the 20 standard amino acids (other letters are ignored);
- low complexity = windowed Shannon entropy in bits (window 12, threshold 2.2 bits: SEG's K1 defaults);
- identity between two sequences = ungapped, left-aligned matches / the longer length (no alignment).
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from rewards.base import RewardOutput

STANDARD_AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
# Approximate UniProtKB/Swiss-Prot residue frequencies in percent (release statistics); normalised on use.
SWISSPROT_COMPOSITION: dict[str, float] = {
    "A": 8.25, "C": 1.38, "D": 5.46, "E": 6.72, "F": 3.86, "G": 7.07, "H": 2.27, "I": 5.91, "K": 5.80, "L": 9.65,
    "M": 2.41, "N": 4.06, "P": 4.74, "Q": 3.93, "R": 5.53, "S": 6.63, "T": 5.35, "V": 6.86, "W": 1.10, "Y": 2.92,
}  # fmt: skip
_END_TOKENS = ("<eos>", "</s>")
_LEADING_TOKENS = re.compile(r"^\s*<(bos|cls|s)>")
_TRAILING_PADS = re.compile(r"(<pad>\s*)+$")
_OTHER_TOKENS = re.compile(r"<[^<>]*>")


def sequence_of(sample: Any, unknown: str = "X") -> str:
    """The residue string of a sample: a str, or a mapping with "sequence" or "text".

    Decoded tokenizer text is cleaned: cut at the first <eos> (or </s>), a leading <bos>/<cls>/<s> and trailing
    <pad>s removed, any other angle-bracket token (a leftover <mask>, an interior <pad>) replaced by `unknown`
    (so a malformed sample stays visibly invalid), whitespace removed, upper-cased.
    """
    if isinstance(sample, Mapping):
        key = "sequence" if "sequence" in sample else "text"
        if key not in sample:
            raise ValueError(f"a sample mapping needs a 'sequence' or 'text' key, got keys {sorted(sample)}")
        sample = sample[key]
    if not isinstance(sample, str):
        raise ValueError(f"a protein sample must be a str or a mapping, got {type(sample).__name__}")
    text = sample
    for end in _END_TOKENS:
        text = text.split(end, 1)[0]
    text = _OTHER_TOKENS.sub(unknown, _TRAILING_PADS.sub("", _LEADING_TOKENS.sub("", text)))
    return "".join(text.split()).upper()


def amino_acid_counts(sequences: Sequence[str], alphabet: str = STANDARD_AMINO_ACIDS) -> Tensor:
    """Residue counts [N, A] (float64) over `alphabet`; letters outside it are not counted."""
    index = {letter: position for position, letter in enumerate(alphabet)}
    counts = torch.zeros(len(sequences), len(alphabet), dtype=torch.float64)
    for row, sequence in enumerate(sequences):
        ids = [index[letter] for letter in sequence if letter in index]
        if ids:
            counts[row] = torch.bincount(torch.tensor(ids), minlength=len(alphabet)).double()
    return counts


def amino_acid_composition(
    sequences: Sequence[str],
    alphabet: str = STANDARD_AMINO_ACIDS,
    pooling: Literal["residue", "sequence"] = "residue",
) -> Tensor:
    """Residue frequencies [A] (float64, sums to 1) of a set of sequences.

    Args:
        sequences: one-letter residue strings.
        alphabet: the A letters counted (others are ignored).
        pooling: "residue" pools all residues (long sequences weigh more); "sequence" averages the
            per-sequence compositions (sequences with no counted residue are skipped).

    Raises:
        ValueError: an unknown pooling, or no counted residue at all.
    """
    if pooling not in ("residue", "sequence"):
        raise ValueError(f"pooling={pooling!r}; allowed: ['residue', 'sequence']")
    counts = amino_acid_counts(sequences, alphabet)
    totals = counts.sum(dim=1)
    if not bool((totals > 0).any()):
        raise ValueError(f"no residue of the alphabet {alphabet!r} in {len(sequences)} sequences")
    if pooling == "residue":
        return counts.sum(dim=0) / totals.sum()
    kept = totals > 0
    return (counts[kept] / totals[kept, None]).mean(dim=0)


def composition_from_mapping(frequencies: Mapping[str, float], alphabet: str = STANDARD_AMINO_ACIDS) -> Tensor:
    """A normalised [A] composition from {letter: frequency or percent}; missing letters get 0."""
    values = torch.tensor([float(frequencies.get(letter, 0.0)) for letter in alphabet], dtype=torch.float64)
    if bool((values < 0).any()) or float(values.sum()) <= 0:
        raise ValueError("a composition needs non-negative frequencies with a positive sum")
    return values / values.sum()


def kl_divergence(p: Tensor, q: Tensor, smoothing: float = 1e-6) -> Tensor:
    """KL(p ‖ q) in nats over the last dim, after adding `smoothing` to both and renormalising.

    The smoothing keeps KL finite when q has zeros where p does not (0 log 0 = 0 on p's side).
    """
    p = (p + smoothing) / (p + smoothing).sum(dim=-1, keepdim=True)
    q = (q + smoothing) / (q + smoothing).sum(dim=-1, keepdim=True)
    value: Tensor = torch.special.xlogy(p, p).sum(dim=-1) - torch.special.xlogy(p, q).sum(dim=-1)
    return value


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence in nats over the last dim: ½KL(p‖m) + ½KL(q‖m), m = (p+q)/2; in [0, ln 2]."""
    m = 0.5 * (p + q)
    kl_pm: Tensor = torch.special.xlogy(p, p).sum(-1) - torch.special.xlogy(p, m).sum(-1)
    kl_qm: Tensor = torch.special.xlogy(q, q).sum(-1) - torch.special.xlogy(q, m).sum(-1)
    return (0.5 * (kl_pm + kl_qm)).clamp_min(0.0)


def composition_divergence(
    p: Tensor,
    q: Tensor,
    kind: Literal["js", "kl"] = "js",
    units: Literal["nats", "bits"] = "nats",
    smoothing: float = 1e-6,
) -> Tensor:
    """Divergence between compositions p [..., A] and q [A] or [..., A] (JS, or KL(p ‖ q) with smoothing)."""
    if kind not in ("js", "kl"):
        raise ValueError(f"kind={kind!r}; allowed: ['js', 'kl']")
    if units not in ("nats", "bits"):
        raise ValueError(f"units={units!r}; allowed: ['nats', 'bits']")
    value = js_divergence(p, q) if kind == "js" else kl_divergence(p, q, smoothing)
    return value / math.log(2.0) if units == "bits" else value


def shannon_entropy_bits(text: str) -> float:
    """Shannon entropy (bits) of the letter frequencies of `text` (0 for an empty string)."""
    total = len(text)
    return -sum(c / total * math.log2(c / total) for c in Counter(text).values()) if total else 0.0


def low_complexity_fraction(sequence: str, window: int = 12, threshold: float = 2.2) -> float:
    """Fraction of positions covered by at least one window whose entropy is below `threshold` bits.

    A sequence shorter than `window` is one window. Empty sequence: NaN (undefined).
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    length = len(sequence)
    if length == 0:
        return math.nan
    size = min(window, length)
    covered = [False] * length
    for start in range(length - size + 1):
        if shannon_entropy_bits(sequence[start : start + size]) < threshold:
            covered[start : start + size] = [True] * size
    return sum(covered) / length


def repeat_fraction(sequence: str, k: int = 3) -> float:
    """1 − distinct k-mers / k-mers of one sequence (0 when it has fewer than k residues)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    kmers = [sequence[i : i + k] for i in range(len(sequence) - k + 1)]
    return 1.0 - len(set(kmers)) / len(kmers) if kmers else 0.0


def pairwise_identity(a: str, b: str) -> float:
    """Ungapped identity: equal letters at equal positions / max(len a, len b) (0 for two empty strings)."""
    longest = max(len(a), len(b))
    return sum(x == y for x, y in zip(a, b, strict=False)) / longest if longest else 0.0


def mean_pairwise_identity(sequences: Sequence[str]) -> float:
    """Mean `pairwise_identity` over all unordered pairs; NaN for fewer than two sequences."""
    pairs = list(itertools.combinations(sequences, 2))
    return sum(pairwise_identity(a, b) for a, b in pairs) / len(pairs) if pairs else math.nan


def distinct_kmer_fraction(sequences: Sequence[str], k: int = 3) -> float:
    """Distinct k-mers / all k-mers pooled over the set (1 = no k-mer repeats anywhere); NaN with no k-mer."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    kmers = [s[i : i + k] for s in sequences for i in range(len(s) - k + 1)]
    return len(set(kmers)) / len(kmers) if kmers else math.nan


def is_valid_sequence(
    sequence: str, alphabet: str = STANDARD_AMINO_ACIDS, min_length: int = 1, max_length: int | None = None
) -> bool:
    """True when every letter is in `alphabet` and min_length <= length (<= max_length when given)."""
    length = len(sequence)
    if length < min_length or (max_length is not None and length > max_length):
        return False
    return set(sequence) <= set(alphabet)


def validity_rate(sequences: Sequence[str], **kwargs: Any) -> float:
    """Fraction of valid sequences (see `is_valid_sequence`); NaN for an empty set."""
    return sum(is_valid_sequence(s, **kwargs) for s in sequences) / len(sequences) if sequences else math.nan


class ProteinMetricsReward:
    """Per-sequence reward from the CPU metrics, with set-level statistics as metrics.

    score_i = validity_coef · valid_i − composition_coef · JS_bits(comp_i, reference)
              − repeat_coef · repeat_fraction_i − low_complexity_coef · low_complexity_fraction_i.
    Every penalty lies in [0, 1]; a sample with no standard residue gets the worst value 1 for each.
    Samples are residue strings or mappings with "sequence"/"text" (see `sequence_of`).

    Args:
        reference_sequences: the reference set whose pooled composition is the target; when None,
            `reference_composition` ({letter: frequency}) or else the Swiss-Prot background is used.
        validity_coef, composition_coef, repeat_coef, low_complexity_coef: component weights.
        kmer: k of the repeat fraction and the distinct-k-mer diversity metric.
        window, threshold: the low-complexity window (residues) and entropy threshold (bits).
        min_length, max_length: the validity length bounds.
    """

    def __init__(
        self,
        reference_sequences: list[str] | None = None,
        reference_composition: dict[str, float] | None = None,
        validity_coef: float = 1.0,
        composition_coef: float = 1.0,
        repeat_coef: float = 0.0,
        low_complexity_coef: float = 0.0,
        kmer: int = 3,
        window: int = 12,
        threshold: float = 2.2,
        min_length: int = 1,
        max_length: int | None = None,
    ) -> None:
        if reference_sequences is not None and reference_composition is not None:
            raise ValueError("give at most one of reference_sequences and reference_composition")
        if reference_sequences is not None:
            self.reference = amino_acid_composition([sequence_of(s) for s in reference_sequences])
        else:
            self.reference = composition_from_mapping(reference_composition or SWISSPROT_COMPOSITION)
        self.coefs = {
            "valid": validity_coef,
            "composition_js": -composition_coef,
            "repeat_fraction": -repeat_coef,
            "low_complexity_fraction": -low_complexity_coef,
        }
        self.kmer, self.window, self.threshold = kmer, window, threshold
        self.min_length, self.max_length = min_length, max_length

    def components(self, sequences: Sequence[str]) -> dict[str, Tensor]:
        """The four per-sequence components, each [N] float32."""
        counts = amino_acid_counts(sequences)
        totals = counts.sum(dim=1, keepdim=True)
        empty = totals[:, 0] == 0
        comps = counts / totals.clamp_min(1.0)
        js = composition_divergence(comps, self.reference, kind="js", units="bits")
        standard = ["".join(c for c in s if c in STANDARD_AMINO_ACIDS) for s in sequences]
        valid = [is_valid_sequence(s, min_length=self.min_length, max_length=self.max_length) for s in sequences]
        repeat = [repeat_fraction(s, self.kmer) if s else 1.0 for s in standard]
        low = [low_complexity_fraction(s, self.window, self.threshold) if s else 1.0 for s in standard]
        return {
            "valid": torch.tensor(valid, dtype=torch.float32),
            "composition_js": torch.where(empty, torch.ones_like(js), js).float(),
            "repeat_fraction": torch.tensor(repeat, dtype=torch.float32),
            "low_complexity_fraction": torch.tensor(low, dtype=torch.float32),
        }

    def set_metrics(self, sequences: Sequence[str]) -> dict[str, float]:
        """Set-level statistics: pooled composition JS (bits), diversity, validity, mean length."""
        metrics = {
            "validity": validity_rate(sequences, min_length=self.min_length, max_length=self.max_length),
            "mean_length": sum(map(len, sequences)) / max(len(sequences), 1),
            "mean_pairwise_identity": mean_pairwise_identity(sequences),
            f"distinct_{self.kmer}mer": distinct_kmer_fraction(sequences, self.kmer),
        }
        if any(c in STANDARD_AMINO_ACIDS for s in sequences for c in s):
            pooled = amino_acid_composition(sequences)
            metrics["pooled_composition_js"] = float(composition_divergence(pooled, self.reference, units="bits"))
        return metrics

    def __call__(self, prompts: Sequence[Any], samples: Sequence[Any], **metadata: Any) -> RewardOutput:
        if len(prompts) != len(samples):
            raise ValueError(f"{len(prompts)} prompts but {len(samples)} samples")
        sequences = [sequence_of(sample) for sample in samples]
        components = self.components(sequences)
        scores = sum(coef * components[name] for name, coef in self.coefs.items())
        assert isinstance(scores, Tensor)
        return RewardOutput(scores=scores, components=components, metrics=self.set_metrics(sequences))
