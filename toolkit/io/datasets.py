"""Rows of a data source through one loader: a local file, a `save_to_disk` folder or a Hugging Face hub id.

`load_records(source, config=, split=, fields=, max_rows=)` returns plain dicts. JSON Lines / JSON lists and
CSV (cells stay strings: an answer "007" is not turned into 7) are read here, parquet with pyarrow, saved
folders and hub ids with `datasets` (imported only then, so `import toolkit` stays light). `fields` maps
record keys to dotted paths into nested columns (`answer: reward_model.ground_truth`, `prompt: prompt.0.content`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from toolkit.config.types import read_text_file
from toolkit.io.prepare import prepare_hint

# An id on the hub: "name" or "owner/name" (letters, digits, "-", "_", ".").
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
_SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what `save_to_disk` writes (DatasetDict, Dataset)
_TRUE = ("1", "ON", "YES", "TRUE")


def is_hub_id(source: str | Path) -> bool:
    """True when `source` names a hub dataset: a str shaped like an id with no local file or folder of that name."""
    if isinstance(source, Path) or Path(source).expanduser().exists() or Path(source).suffix in DATA_SUFFIXES:
        return False
    return _HUB_ID.fullmatch(source) is not None


def source_name(source: str | Path) -> str:
    """A short name for a source: the file stem, the folder name, or the dataset part of a hub id."""
    return str(source).rstrip("/").split("/")[-1] if is_hub_id(source) else Path(source).stem


def load_records(
    source: str | Path,
    *,
    config: str | None = None,
    split: str | None = None,
    fields: Mapping[str, str] | None = None,
    max_rows: int | None = None,
) -> list[dict[str, Any]]:
    """The rows of `source` as dicts, in source order, with `fields` mapped in.

    Args:
        source: a local `.jsonl` (or any other suffix: JSON Lines), `.json` (a list of objects), `.parquet` or
            `.csv` file; a folder written by `datasets`' `save_to_disk`; a folder of data files; or a hub id
            (a `str` such as "openai/gsm8k"; a `Path` is always local).
        config: the hub subset (`load_dataset(name=...)`); hub ids and data folders only.
        split: the split of a hub id or of a saved DatasetDict; may be left out when there is only one.
        fields: {record key: dotted path into the row}, e.g. {"answer": "reward_model.ground_truth"}; the
            row's own columns are kept and the mapped keys set (or replaced).
        max_rows: keep the first N rows; None keeps all.

    Raises:
        FileNotFoundError: no such local file or folder, or a hub id that is not in the local cache while
            offline (`HF_HUB_OFFLINE=1` / `HF_DATASETS_OFFLINE=1`).
        ValueError: malformed data (named with file and line), a bad split/config, or a field path that is
            not in a row (named with the columns there are).
    """
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
    if is_hub_id(source) and prepare_hint(source):  # "data/nq": shaped like a hub id, but a missing prepared folder
        raise FileNotFoundError(f"data file or folder not found: {source}{prepare_hint(source)}")
    if is_hub_id(source):
        located = _located(_from_hub(str(source), config, split, max_rows), str(source))
    else:
        located = _read_local(Path(source).expanduser(), config, split, max_rows)
    return [map_record(row, fields, where) for where, row in located[:max_rows]]


def check_data_paths(node: Any, where: str) -> None:
    """Fail now, before anything is built, when a local `path`/`paths` source of a data node does not exist.

    Hub ids are left to the loader; a missing `data/NAME/...` path (the recipes' convention) is named with the
    `renorm data prepare NAME` command that writes it.

    Raises:
        FileNotFoundError: naming the key (`data.paths.MATH`, `eval.data.paths[2]`), the path and the command.
    """
    if not isinstance(node, Mapping):
        return
    for key in ("path", "paths"):
        value = node.get(key)
        if isinstance(value, Mapping):
            items: list[tuple[str, Any]] = [(f".{name}", source) for name, source in value.items()]
        elif isinstance(value, list):
            items = [(f"[{i}]", source) for i, source in enumerate(value)]
        else:
            items = [("", value)]
        for suffix, source in items:
            if not isinstance(source, (str, Path)) or (is_hub_id(source) and not prepare_hint(source)):
                continue
            if not Path(source).expanduser().exists():
                raise FileNotFoundError(
                    f"{where}.{key}{suffix}: data file or folder not found: {source}{prepare_hint(source)}"
                )


def map_record(row: Mapping[str, Any], fields: Mapping[str, str] | None, where: str) -> dict[str, Any]:
    """A copy of `row` with each `fields` key set from its dotted path; `where` names the row in errors."""
    out = dict(row)
    for key, path in (fields or {}).items():
        try:
            out[key] = lookup(row, path)
        except LookupError as error:
            raise ValueError(
                f"{where}: fields.{key}: {path!r} not found ({error.args[0]}); columns: {sorted(row)}"
            ) from None
    return out


def lookup(node: Any, path: str) -> Any:
    """The value at a dotted `path` ("reward_model.ground_truth", "prompt.-1.content": list indices allowed).

    A key that itself holds dots ("a.b" as one column) is matched whole first.

    Raises:
        LookupError: naming the missing part and the keys there are.
    """
    found, value = _child(node, path)
    if found:
        return value
    head, dot, rest = path.partition(".")
    found, value = _child(node, head)
    if found and dot:
        try:
            return lookup(value, rest)
        except LookupError as error:
            raise LookupError(f"under {head!r}: {error.args[0]}") from None
    if found:
        return value
    if isinstance(node, Mapping):
        raise LookupError(f"no key {head!r}; keys: {sorted(map(str, node))}")
    if isinstance(node, Sequence) and not isinstance(node, str):
        raise LookupError(f"{head!r} is not an index of a list of {len(node)}")
    raise LookupError(f"cannot look up {head!r} in a {type(node).__name__}")


def read_json_records(file: Path) -> list[tuple[str, dict[str, Any]]]:
    """(location, record) pairs of a JSON list (`.json`) or JSON Lines file (blank lines skipped).

    Raises:
        ValueError: bytes that are not UTF-8 (with the offset and line), a malformed line (with its line
            number) or a record that is not an object.
    """
    text = read_text_file(file)
    if file.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{file}: malformed JSON at line {error.lineno}: {error.msg}") from error
        if not isinstance(data, list):
            raise ValueError(f"{file}: a .json data file must hold a list of objects, got {type(data).__name__}")
        located = [(f"{file}, record {index}", item) for index, item in enumerate(data)]
    else:
        located = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                located.append((f"{file}, line {lineno}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(f"{file}, line {lineno}: malformed JSON ({error.msg})") from error
    for where, item in located:
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
    return located


def read_csv_records(file: Path) -> list[tuple[str, dict[str, Any]]]:
    """(location, record) pairs of a CSV file with a header row; every cell stays a string."""
    reader = csv.DictReader(io.StringIO(read_text_file(file), newline=""))
    located = []
    for row in reader:
        if None in row:
            columns = len(reader.fieldnames or [])
            raise ValueError(f"{file}, line {reader.line_num}: more cells than the {columns} columns of the header")
        located.append((f"{file}, line {reader.line_num}", dict(row)))
    return located


def _child(node: Any, key: str) -> tuple[bool, Any]:
    if isinstance(node, Mapping):
        return (True, node[key]) if key in node else (False, None)
    if isinstance(node, Sequence) and not isinstance(node, str) and re.fullmatch(r"-?\d+", key):
        index = int(key)
        return (True, node[index]) if -len(node) <= index < len(node) else (False, None)
    return False, None


def _located(rows: list[dict[str, Any]], source: str) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{source}, row {index}", row) for index, row in enumerate(rows)]


def _read_local(
    path: Path, config: str | None, split: str | None, max_rows: int | None
) -> list[tuple[str, dict[str, Any]]]:
    if path.is_dir():
        if config is not None and any((path / marker).is_file() for marker in _SAVED_MARKERS):
            raise ValueError(f"config={config!r} applies to hub ids and data folders, not to the saved dataset {path}")
        return _located(_from_folder(path, config, split, max_rows), str(path))
    if not path.is_file():
        raise FileNotFoundError(f"data file or folder not found: {path}{prepare_hint(path)}")
    if config is not None or split is not None:
        raise ValueError(f"config and split apply to hub ids and dataset folders, not to the file {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        rows: list[dict[str, Any]] = table.slice(0, max_rows).to_pylist() if max_rows else table.to_pylist()
        return _located(rows, str(path))
    if path.suffix == ".csv":
        return read_csv_records(path)
    return read_json_records(path)


def _from_folder(path: Path, config: str | None, split: str | None, max_rows: int | None) -> list[dict[str, Any]]:
    import datasets

    if any((path / marker).is_file() for marker in _SAVED_MARKERS):
        return _rows(_one_split(datasets.load_from_disk(str(path)), split, str(path)), max_rows)
    loaded = datasets.load_dataset(str(path), name=config, split=split)  # a folder of data files
    return _rows(_one_split(loaded, None, str(path)), max_rows)


def _from_hub(source: str, config: str | None, split: str | None, max_rows: int | None) -> list[dict[str, Any]]:
    import datasets

    try:
        loaded = datasets.load_dataset(source, name=config, split=split)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
        subset = f" (config {config!r})" if config else ""
        if not _offline():
            raise FileNotFoundError(
                f"no local file or folder named {source!r}, and the hub dataset {source!r}{subset} could not "
                f"be loaded: {error}"
            ) from error
        raise FileNotFoundError(
            f"the hub dataset {source!r}{subset} is not in the local Hugging Face cache and offline mode is on "
            f"(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), and there is no local file or folder of that name: run once "
            f"with network access (offline mode off) to cache it, or write a local copy with `renorm data prepare` "
            f"and give its folder instead"
        ) from error
    return _rows(_one_split(loaded, None, source), max_rows)


def _one_split(loaded: Any, split: str | None, source: str) -> Any:
    """The one Dataset of a load: the named split of a DatasetDict, or its only one."""
    if not hasattr(loaded, "keys"):  # a single Dataset
        if split is not None:
            raise ValueError(f"{source} is a single dataset without splits; drop split={split!r}")
        return loaded
    names = list(loaded.keys())
    if split is None and len(names) == 1:
        return loaded[names[0]]
    if split is None:
        raise ValueError(f"{source} has the splits {names}: choose one with split")
    if split not in names:
        raise ValueError(f"{source} has no split {split!r}; splits: {names}")
    return loaded[split]


def _rows(table: Any, max_rows: int | None) -> list[dict[str, Any]]:
    if max_rows is not None and max_rows < len(table):
        table = table.select(range(max_rows))
    rows: list[dict[str, Any]] = table.to_list()
    return rows


def _offline() -> bool:
    """Whether offline mode is on now (the environment) or was when `datasets` was imported (which reads it then)."""
    import datasets

    switches = (os.environ.get("HF_DATASETS_OFFLINE"), os.environ.get("HF_HUB_OFFLINE"))
    return any(str(value).upper() in _TRUE for value in switches) or bool(datasets.config.HF_HUB_OFFLINE)
