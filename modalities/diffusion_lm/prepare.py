"""`renorm data prepare openwebtext | uniref50`: the corpora of the diffusion-LM recipes, as the files they read.

Both upstream sets are large hub datasets (OpenWebText: 8.0M documents, ~40 GB of text; DPLM's UniRef50: ~42M
sequences). With no `source` they are streamed from the hub and reading stops after `limit` rows, so only the
shards holding those rows are fetched; the default `limit` covers what one recipe run consumes, not the whole set.
A local `source` (a parquet/JSONL file, a folder of data files or a `save_to_disk` folder) is read with
`toolkit.data.load_records`. Output is written to a temporary file and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from modalities.diffusion_lm.protein.fasta import FastaRecord, format_fasta
from modalities.diffusion_lm.protein.tokenizer import STANDARD_AMINO_ACIDS
from toolkit.data import load_records
from toolkit.io.datasets import is_hub_id, lookup
from toolkit.io.prepare import atomic_output, progress_bar

log = logging.getLogger(__name__)

OPENWEBTEXT_HUB = "Skylion007/openwebtext"  # the corpus of MDLM's OWT checkpoints (train split only)
UNIREF50_HUB = "airkingbd/uniref50"  # DPLM's UniRef50 (EvoDiff's preprocessing): columns seq, length
# 100k OWT documents ≈ 110M GPT-2 tokens (~1.1k per document), more than the 10k steps x 8 rows x 1024 tokens
# (82M) didi_instruct_owt_small.yaml trains on; TokenDataset tokenizes the whole file in memory, so all 8M
# documents (~9B tokens) would not fit.
OPENWEBTEXT_DEFAULT_LIMIT = 100_000
# 100k sequences (tens of MB of FASTA) are ~3x the 2000 steps x 16 rows protein_dplm.yaml draws; its crop to 128
# residues skips the shorter sequences.
UNIREF50_DEFAULT_LIMIT = 100_000


def prepare_openwebtext(
    out: Path, *, source: str | None = None, limit: int | None = OPENWEBTEXT_DEFAULT_LIMIT
) -> list[Path]:
    """OpenWebText (Skylion007/openwebtext) as train.txt, one document per line, for didi_instruct_owt_small.yaml.

    `TokenDataset` reads one document per line, so each document's line breaks are folded into single spaces
    (MDLM's loader tokenizes them as newline tokens; nothing else in the text changes).

    Args:
        out: folder to write `train.txt` into.
        source: a local copy with a `text` column; None streams the hub dataset.
        limit: keep the first N documents (default 100,000); None keeps all 8M (~40 GB, too many to train from).

    Returns:
        The file written.
    """
    target = Path(out) / "train.txt"
    with atomic_output(target) as handle:
        for where, row in read_rows(source or OPENWEBTEXT_HUB, "train", limit, "openwebtext"):
            line = " ".join(part.strip() for part in str(_field(row, "text", where)).splitlines() if part.strip())
            if line:
                handle.write(line + "\n")
    return [target]


def prepare_uniref50(out: Path, *, source: str | None = None, limit: int | None = UNIREF50_DEFAULT_LIMIT) -> list[Path]:
    """DPLM's UniRef50 (airkingbd/uniref50, train split) as train.fasta, for protein_dplm.yaml.

    Sequences with a residue outside the 20 standard ones (X, B, Z, U, O) are left out: `ProteinDataset` and
    the DPLM student accept only those. Records are named by the row's `name`/`id` column when it has one, else
    `UniRef50_train_<row>`.

    Args:
        out: folder to write `train.fasta` into.
        source: a local copy with a `seq` column; None streams the hub dataset.
        limit: read the first N rows (default 100,000; fewer are written when some are left out); None reads
            all ~42M.

    Returns:
        The file written.
    """
    target = Path(out) / "train.fasta"
    standard, kept, skipped = set(STANDARD_AMINO_ACIDS), 0, 0
    with atomic_output(target) as handle:
        for index, (where, row) in enumerate(read_rows(source or UNIREF50_HUB, "train", limit, "uniref50")):
            sequence = str(_field(row, "seq", where)).strip().upper()
            if not sequence or not set(sequence) <= standard:
                skipped += 1
                continue
            name = str(row.get("name") or row.get("id") or f"UniRef50_train_{index}").split()[0]
            handle.write(format_fasta([FastaRecord(id=name, sequence=sequence)]))
            kept += 1
        if not kept:  # raised inside the block: the temporary file is removed, `target` is untouched
            raise ValueError(
                f"none of the {skipped} rows of {source or UNIREF50_HUB} has a sequence of the 20 standard residues"
            )
    if skipped:
        log.warning("%s: %d sequences written, %d left out (empty or non-standard residues)", target, kept, skipped)
    return [target]


def read_rows(source: str, split: str, limit: int | None, name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, row) pairs of the first `limit` rows of `source`'s `split`, with a progress bar.

    A hub id is streamed (nothing beyond the shards holding those rows is fetched); anything else is local and
    read with `load_records` (`split` applies to folders that have splits).

    Raises:
        FileNotFoundError: a hub id that cannot be reached (offline mode, no network, no such dataset).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    if is_hub_id(source):
        rows: Iterator[dict[str, Any]] = itertools.islice(_stream(source, split), limit)
        total = limit
    else:
        path = Path(source).expanduser()
        single = not path.is_dir() or (path / "state.json").is_file()  # a file or a saved single Dataset
        records = load_records(path, split=None if single else split, max_rows=limit)
        rows, total = iter(records), len(records)
    with progress_bar(name, total) as advance:
        for index, row in enumerate(rows):
            yield f"{source}, row {index}", row
            advance(1)


def _stream(source: str, split: str) -> Iterator[dict[str, Any]]:
    import datasets

    try:
        yield from datasets.load_dataset(source, split=split, streaming=True)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
        raise FileNotFoundError(
            f"the hub dataset {source!r} could not be streamed ({type(error).__name__}: {error}); with offline mode "
            f"on or no network, download a copy elsewhere and pass its file or folder as --source"
        ) from error


def _field(row: dict[str, Any], key: str, where: str) -> Any:
    try:
        return lookup(row, key)
    except LookupError:
        raise ValueError(f"{where}: no {key!r} column (the upstream layout has one); columns: {sorted(row)}") from None
