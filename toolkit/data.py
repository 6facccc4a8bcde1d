"""Prompt data source: records from any `toolkit.io.datasets` source or memory, endless seeded epochs, exact resume.

The order of epoch e is a permutation seeded by (seed, e) alone, so `{"epoch", "position"}` is all
the state a resumed run needs to continue at exactly the next batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from toolkit.config.types import read_text_file as read_text_file  # re-exported for the modality loaders
from toolkit.io.datasets import load_records as load_records  # re-exported: the one loader
from toolkit.io.datasets import map_record

_MIX_SEED = 0x9E3779B97F4A7C15
_MIX_EPOCH = 0xBF58476D1CE4E5B9


def epoch_permutation(num_records: int, seed: int, epoch: int) -> list[int]:
    """The record order of one epoch: a permutation of range(num_records) determined by (seed, epoch)."""
    mixed = (seed * _MIX_SEED + (epoch + 1) * _MIX_EPOCH) % (2**63)
    generator = torch.Generator().manual_seed(mixed)
    order: list[int] = torch.randperm(num_records, generator=generator).tolist()
    return order


class PromptDataset:
    """An endless, seeded, resumable stream of prompt dicts (implements toolkit.interfaces.DataSource).

    Each yielded dict is a copy of a record with "prompt" set from `prompt_key` and "id" set to the
    record's index when the record has none. Batches run straight across epoch boundaries (a batch
    may end one epoch and start the next); each epoch is a fresh permutation when `shuffle`.

    Args:
        path: a data source (see `toolkit.io.datasets.load_records`): a local `.jsonl`, `.json` (list),
            `.parquet` or `.csv` file, a `save_to_disk` folder or a hub id; exactly one of `path` and `records`.
        records: in-memory records (dicts).
        shuffle: permute each epoch; False keeps file order.
        seed: seeds the epoch permutations together with the epoch index.
        prompt_key: the record field holding the prompt (a string or chat messages), after `fields`.
        config: the hub subset of a hub id.
        split: the split of a hub id or saved DatasetDict (optional when there is only one).
        fields: {record key: dotted path into the row}, e.g. {"prompt": "question", "answer":
            "reward_model.ground_truth"}; the row's other columns are kept.
        max_rows: keep the first N rows (before any shuffling); None keeps all.
    """

    def __init__(
        self,
        path: str | None = None,
        records: Sequence[Mapping[str, Any]] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        prompt_key: str = "prompt",
        config: str | None = None,
        split: str | None = None,
        fields: Mapping[str, str] | None = None,
        max_rows: int | None = None,
    ) -> None:
        if (path is None) == (records is None):
            raise ValueError("give exactly one of path and records")
        source = str(path) if path is not None else "records"
        if path is not None:
            raw = load_records(path, config=config, split=split, fields=fields, max_rows=max_rows)
        else:
            if max_rows is not None and max_rows < 1:
                raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
            if config is not None or split is not None:
                raise ValueError("config and split choose what to load from path; they do not apply to records")
            rows = list(records or [])[:max_rows]
            raw = [map_record(r, fields, f"records, row {i}") for i, r in enumerate(rows)]
        if not raw:
            raise ValueError(f"the prompt dataset from {source} is empty")
        self.records = [_normalize(record, index, prompt_key, source) for index, record in enumerate(raw)]
        self.shuffle = shuffle
        self.seed = seed
        self.prompt_key = prompt_key
        self.epoch = 0
        self.position = 0
        self._order: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[list[dict[str, Any]]]:
        """Endless batches of `batch_size` prompt dicts.

        `generator` is accepted for the DataSource protocol but not used: the order depends only on
        (seed, epoch), so resuming from `state_dict()` reproduces it exactly.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        while True:
            yield self.next_batch(batch_size)

    def next_batch(self, batch_size: int) -> list[dict[str, Any]]:
        """The next `batch_size` prompt dicts; advances the state."""
        batch = []
        for _ in range(batch_size):
            batch.append(dict(self.records[self._current_order()[self.position]]))
            self.position += 1
            if self.position == len(self.records):
                self.epoch, self.position = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict[str, Any]:
        """{"epoch", "position"} of the next record, plus "num_records" to detect a changed file."""
        return {"epoch": self.epoch, "position": self.position, "num_records": len(self.records)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at the batch after the one that preceded `state_dict()`."""
        num_records = state.get("num_records", len(self.records))
        if num_records != len(self.records):
            raise ValueError(f"state is for {num_records} records, this dataset has {len(self.records)}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < len(self.records):
            raise ValueError(f"invalid data state epoch={epoch}, position={position} for {len(self.records)} records")
        self.epoch, self.position = epoch, position

    def _current_order(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            n = len(self.records)
            order = epoch_permutation(n, self.seed, self.epoch) if self.shuffle else list(range(n))
            self._order = (self.epoch, order)
        return self._order[1]


def _normalize(record: Mapping[str, Any], index: int, prompt_key: str, source: str) -> dict[str, Any]:
    if not isinstance(record, Mapping):
        raise ValueError(f"{source}, record {index}: expected a dict, got {type(record).__name__}")
    if prompt_key not in record:
        raise ValueError(f"{source}, record {index}: missing prompt key {prompt_key!r}; keys: {sorted(record)}")
    out = dict(record)
    out["prompt"] = record[prompt_key]
    out.setdefault("id", str(index))
    return out
