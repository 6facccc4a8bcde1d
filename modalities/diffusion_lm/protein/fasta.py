"""FASTA read/write with validation: errors name the file, the record and the offending character.

Format accepted: records start with a `>` header line (the id is its first word, the rest the description);
sequence lines follow and are joined; blank lines and `;` comment lines are skipped; residues are
upper-cased. Writing wraps sequence lines at `line_width` and replaces the file atomically.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from modalities.diffusion_lm.protein.tokenizer import STANDARD_AMINO_ACIDS
from toolkit.config.types import read_text_file

EXTENDED_AMINO_ACIDS = STANDARD_AMINO_ACIDS + "XBUZO"


@dataclass(frozen=True)
class FastaRecord:
    """One FASTA record: `id` (first word of the header), `description` (rest of it), `sequence`."""

    id: str
    sequence: str
    description: str = ""


def parse_fasta(text: str, source: str = "<string>") -> list[FastaRecord]:
    """Records of FASTA `text`; `source` names the input in error messages.

    Raises:
        ValueError: sequence lines before the first header, an empty header, or a record with no sequence.
    """
    records: list[FastaRecord] = []
    header: str | None = None
    header_line = 0
    chunks: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(";"):
            continue
        if line.startswith(">"):
            if header is not None:
                records.append(_make_record(header, chunks, source, header_line))
            header, header_line, chunks = line[1:].strip(), lineno, []
            if not header:
                raise ValueError(f"{source}, line {lineno}: empty FASTA header")
        elif header is None:
            raise ValueError(f"{source}, line {lineno}: sequence data before the first '>' header")
        else:
            chunks.append("".join(line.split()).upper())
    if header is not None:
        records.append(_make_record(header, chunks, source, header_line))
    return records


def _make_record(header: str, chunks: list[str], source: str, lineno: int) -> FastaRecord:
    record_id, _, description = header.partition(" ")
    sequence = "".join(chunks)
    if not sequence:
        raise ValueError(f"{source}, record {record_id!r} (line {lineno}): empty sequence")
    return FastaRecord(id=record_id, sequence=sequence, description=description.strip())


def validate_records(
    records: Sequence[FastaRecord],
    alphabet: str = STANDARD_AMINO_ACIDS,
    min_length: int = 1,
    max_length: int | None = None,
    source: str = "<records>",
) -> None:
    """Check every record's residues and length; raise on the first bad one.

    Raises:
        ValueError: naming the record id, and the bad residue with its 1-based position or the bad length.
    """
    allowed = set(alphabet)
    seen: set[str] = set()
    for record in records:
        if record.id in seen:
            raise ValueError(f"{source}: duplicate record id {record.id!r}")
        seen.add(record.id)
        for position, letter in enumerate(record.sequence, start=1):
            if letter not in allowed:
                raise ValueError(
                    f"{source}, record {record.id!r}: residue {letter!r} at position {position} "
                    f"is not in the alphabet {alphabet!r}"
                )
        length = len(record.sequence)
        if length < min_length or (max_length is not None and length > max_length):
            raise ValueError(
                f"{source}, record {record.id!r}: length {length} outside [{min_length}, {max_length or 'inf'}]"
            )


def read_fasta(
    path: str | Path,
    alphabet: str | None = STANDARD_AMINO_ACIDS,
    min_length: int = 1,
    max_length: int | None = None,
) -> list[FastaRecord]:
    """Read and validate a FASTA file (`alphabet=None` skips validation).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a malformed or invalid record (see `parse_fasta`, `validate_records`), or an empty file.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"FASTA file not found: {file}")
    records = parse_fasta(read_text_file(file), source=str(file))
    if not records:
        raise ValueError(f"{file}: no FASTA records")
    if alphabet is not None:
        validate_records(records, alphabet, min_length, max_length, source=str(file))
    return records


def format_fasta(records: Iterable[FastaRecord | tuple[str, str]], line_width: int = 60) -> str:
    """FASTA text of `records` (FastaRecord or (id, sequence) pairs), sequences wrapped at `line_width`."""
    if line_width < 1:
        raise ValueError(f"line_width must be >= 1, got {line_width}")
    lines = []
    for item in records:
        record = item if isinstance(item, FastaRecord) else FastaRecord(id=item[0], sequence=item[1])
        if not record.id or any(ch.isspace() for ch in record.id):
            raise ValueError(f"record id {record.id!r} must be non-empty and contain no whitespace")
        header = f">{record.id} {record.description}".rstrip()
        lines.append(header)
        seq = record.sequence
        lines.extend(seq[start : start + line_width] for start in range(0, len(seq), line_width))
    return "\n".join(lines) + "\n"


def write_fasta(path: str | Path, records: Iterable[FastaRecord | tuple[str, str]], line_width: int = 60) -> Path:
    """Write `records` to `path` atomically (temporary file in the same folder, then rename)."""
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    text = format_fasta(records, line_width)
    handle, temporary = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; a written FASTA is an ordinary shared file
        os.replace(temporary, file)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return file
