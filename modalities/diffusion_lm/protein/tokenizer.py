"""Amino-acid vocabularies for protein masked-diffusion models: a compact one and the ESM-2/DPLM one.

Two layouts share one interface (`ProteinVocab`):
- "compact" (25 ids): <pad>=0, <bos>=1, <eos>=2, <unk>=3, the 20 standard residues in alphabetical
  one-letter order (A=4 ... Y=23), <mask>=24 (last, as MDLM appends its mask token);
- "esm" (33 ids): the ESM-2 vocabulary that DPLM also uses (<cls>=0, <pad>=1, <eos>=2, <unk>=3,
  L A G V S E R T I D P K Q N F Y M H W C X B U Z O . - <null_1>, <mask>=32); <cls> plays <bos>.
`id_mapping(src, dst)` maps ids between layouts, so a DiT teacher and an ESM teacher can swap data.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

STANDARD_AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
COMPACT_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>", *STANDARD_AMINO_ACIDS, "<mask>")
ESM_TOKENS: tuple[str, ...] = (
    "<cls>",
    "<pad>",
    "<eos>",
    "<unk>",
    *"LAGVSERTIDPKQNFYMHWCXBUZO.-",
    "<null_1>",
    "<mask>",
)
Layout = Literal["compact", "esm"]
LAYOUTS: tuple[str, ...] = ("compact", "esm")


@dataclass(frozen=True)
class ProteinVocab:
    """A residue-level vocabulary: one token per residue letter plus angle-bracket specials.

    Attributes:
        layout: "compact" or "esm" (see the module docstring).
        tokens: the token strings, index = id.
        bos_token: the token that opens a sequence (<bos>, or <cls> in the ESM layout).
    """

    layout: Layout
    tokens: tuple[str, ...]
    bos_token: str
    token_to_id: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "token_to_id", {token: index for index, token in enumerate(self.tokens)})

    @classmethod
    def from_layout(cls, layout: str = "compact") -> ProteinVocab:
        """The vocabulary of `layout` ("compact" or "esm")."""
        if layout == "compact":
            return cls(layout="compact", tokens=COMPACT_TOKENS, bos_token="<bos>")
        if layout == "esm":
            return cls(layout="esm", tokens=ESM_TOKENS, bos_token="<cls>")
        raise ValueError(f"layout={layout!r}; allowed: {list(LAYOUTS)}")

    @property
    def size(self) -> int:
        """V, the number of ids including specials and the mask token."""
        return len(self.tokens)

    @property
    def pad_id(self) -> int:
        return self.token_to_id["<pad>"]

    @property
    def bos_id(self) -> int:
        return self.token_to_id[self.bos_token]

    @property
    def eos_id(self) -> int:
        return self.token_to_id["<eos>"]

    @property
    def unk_id(self) -> int:
        return self.token_to_id["<unk>"]

    @property
    def mask_id(self) -> int:
        return self.token_to_id["<mask>"]

    @property
    def residue_ids(self) -> list[int]:
        """Ids of the 20 standard residues, in the order of STANDARD_AMINO_ACIDS."""
        return [self.token_to_id[letter] for letter in STANDARD_AMINO_ACIDS]

    def encode(self, sequence: str, add_special_tokens: bool = True, strict: bool = False) -> list[int]:
        """Ids of a one-letter residue string (upper-cased), wrapped in bos/eos when `add_special_tokens`.

        Letters outside the vocabulary become <unk>; with `strict` they raise a ValueError naming the letter
        and its position.
        """
        ids = []
        for position, letter in enumerate(sequence.upper()):
            index = self.token_to_id.get(letter)
            if index is None:
                if strict:
                    raise ValueError(
                        f"residue {letter!r} at position {position} is not in the {self.layout} vocabulary"
                    )
                index = self.unk_id
            ids.append(index)
        return [self.bos_id, *ids, self.eos_id] if add_special_tokens else ids

    def decode(self, ids: Iterable[int] | torch.Tensor, unknown: str = "X") -> str:
        """The residue string of one generated row.

        The row is read up to its first <eos> (all of it when there is none); a leading bos and trailing
        <pad> tokens are dropped; any other non-letter token left inside (<mask>, <pad>, <unk>, bos, ...)
        becomes `unknown`, so a malformed sample stays visibly invalid rather than silently shortened.
        """
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if self.eos_id in values:
            values = values[: values.index(self.eos_id)]
        if values and values[0] == self.bos_id:
            values = values[1:]
        while values and values[-1] == self.pad_id:
            values.pop()
        pieces = []
        for index in values:
            if not 0 <= int(index) < self.size:
                raise ValueError(f"id {index} is outside the {self.layout} vocabulary of size {self.size}")
            token = self.tokens[int(index)]
            pieces.append(token if len(token) == 1 and token.isalpha() else unknown)
        return "".join(pieces)

    def decode_batch(self, ids: torch.Tensor | Sequence[Sequence[int]], unknown: str = "X") -> list[str]:
        """`decode` of each row of [N, L] ids."""
        return [self.decode(row, unknown=unknown) for row in ids]


def id_mapping(source: ProteinVocab | str, target: ProteinVocab | str) -> torch.Tensor:
    """A lookup table [V_source] of target ids: `table[ids]` converts token ids between layouts.

    Tokens absent from the target (e.g. ESM's "B" or "<null_1>" in the compact layout) map to its <unk>;
    bos maps to bos (<bos> <-> <cls>).
    """
    src = source if isinstance(source, ProteinVocab) else ProteinVocab.from_layout(source)
    dst = target if isinstance(target, ProteinVocab) else ProteinVocab.from_layout(target)
    table = [dst.token_to_id.get(token, dst.unk_id) for token in src.tokens]
    table[src.bos_id] = dst.bos_id
    return torch.tensor(table, dtype=torch.long)


def build_protein_tokenizer(layout: Layout = "compact") -> PreTrainedTokenizerFast:
    """A Hugging Face fast tokenizer with the ids of `ProteinVocab.from_layout(layout)`.

    One token per residue letter (a BPE model with no merges over single characters), the angle-bracket
    tokens as special tokens (so `decode(..., skip_special_tokens=True)` gives the bare residue string),
    `encode` adds bos/eos, and `decode` joins pieces without spaces. `mask_token_id` is the diffusion mask.
    """
    vocab = ProteinVocab.from_layout(layout)
    specials = [token for token in vocab.tokens if len(token) > 1]
    backend = Tokenizer(models.BPE(vocab=dict(vocab.token_to_id), merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(specials)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{vocab.bos_token} $A <eos>",
        pair=f"{vocab.bos_token} $A <eos> $B <eos>",
        special_tokens=[(vocab.bos_token, vocab.bos_id), ("<eos>", vocab.eos_id)],
    )
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend,
        bos_token=vocab.bos_token,
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        additional_special_tokens=[
            t for t in specials if t not in (vocab.bos_token, "<eos>", "<pad>", "<unk>", "<mask>")
        ],
    )
