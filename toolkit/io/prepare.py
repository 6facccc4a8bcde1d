"""`renorm data`: the dataset preparers registered under the `renorm.datasets` entry points, and what they share.

A preparer is `prepare_<name>(out, *, source=None, limit=None) -> list[Path]` in `modalities/<m>/prepare.py`; its
docstring's first line is what `renorm data list` prints. By convention a recipe reads `data/NAME/<file>`, so a
missing path there names the command that writes it (`prepare_hint`). The writers here stream and are atomic (temp
file, fsync, rename): a 14 GB corpus is never held in memory, and an interrupted run leaves no half-written file.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import IO, Any, Protocol, cast

from toolkit.io.atomic import fsync_dir

GROUP = "renorm.datasets"
DATA_ROOT = "data"  # recipes read data/NAME/<file>


class Preparer(Protocol):
    """Writes one dataset's files under `out` and returns them; `source` None = the upstream default."""

    def __call__(self, out: Path, *, source: str | None = None, limit: int | None = None) -> list[Path]: ...


def registered() -> dict[str, EntryPoint]:
    """The registered preparers by name; listing them imports nothing."""
    return {point.name: point for point in entry_points(group=GROUP)}


def load_preparer(name: str) -> Preparer:
    """The preparer registered as `name`.

    Raises:
        ValueError: `name` is not registered (the message lists the names that are).
    """
    points = registered()
    if name not in points:
        known = ", ".join(sorted(points)) or "none (install the package: pip install -e .)"
        raise ValueError(f"unknown dataset {name!r}; known datasets: {known}")
    return cast(Preparer, points[name].load())


def describe(preparer: Callable[..., Any]) -> str:
    """The first line of a preparer's docstring (what `renorm data list` prints)."""
    lines = (preparer.__doc__ or "").strip().splitlines()
    return lines[0].strip() if lines else ""


def list_datasets() -> list[tuple[str, str]]:
    """(name, one-line description) of every registered dataset, sorted by name; one that fails to import says so."""
    rows = []
    for name, point in sorted(registered().items()):
        try:
            rows.append((name, describe(point.load())))
        except ImportError as error:  # one broken modality must not hide the others
            rows.append((name, f"(cannot be loaded: {error})"))
    return rows


def prepare_dataset(name: str, out: str | Path, *, source: str | None = None, limit: int | None = None) -> list[Path]:
    """Run the preparer registered as `name`: write its files under `out` and return them.

    `limit` None leaves the preparer's default.

    Raises:
        ValueError: an unknown `name` or a `limit` below 1.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (the first N rows), got {limit}")
    # No --limit: the preparer's own default (None: all rows; OpenWebText streams the first 100k of its 8M documents).
    options = {"limit": limit} if limit is not None else {}
    return load_preparer(name)(Path(out), source=source, **options)


def prepare_hint(path: str | Path) -> str:
    """For a path under `data/NAME/` with NAME registered, the sentence naming the command that writes it; else "".

    >>> prepare_hint("data/deepscaler/train.jsonl")  # with `deepscaler` registered
    '; `renorm data prepare deepscaler --out data/deepscaler` writes it'
    """
    parts = Path(path).parts
    names = {name for name in registered()}
    for i in range(len(parts) - 1):
        if parts[i] == DATA_ROOT and parts[i + 1] in names:
            return f"; `renorm data prepare {parts[i + 1]} --out {Path(*parts[: i + 2])}` writes it"
    return ""


@contextmanager
def atomic_output(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """A handle on a temp file beside `path` that replaces `path` only when the block ends without error.

    The folder is created; the file is fsynced before the rename and the folder after it. `mode` is "w" (UTF-8
    text) or "wb".
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(temp, mode, encoding=None if mode == "wb" else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    fsync_dir(target.parent)


def write_jsonl(path: str | Path, records: Iterable[Mapping[str, Any]]) -> int:
    """Write `records` as JSON Lines (UTF-8, not ASCII-escaped) atomically; returns the number written."""
    count = 0
    with atomic_output(path) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


@contextmanager
def progress_bar(description: str, total: float | None, *, unit: str = "rows") -> Iterator[Callable[[float], None]]:
    """A rich progress bar for long preparation work; yields `advance(amount)`.

    `total` None draws a pulsing bar with the elapsed time (work of unknown length, e.g. building an index);
    `unit="bytes"` shows sizes and speed. Without a terminal (CI logs) only the finished bar is printed.
    """
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    counter = (DownloadColumn(), TransferSpeedColumn()) if unit == "bytes" else (MofNCompleteColumn(),)
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), *counter, TimeElapsedColumn(), TimeRemainingColumn()
    ) as progress:
        task = progress.add_task(description, total=total)

        def advance(amount: float) -> None:
            progress.advance(task, amount)

        yield advance
        if total is None:
            progress.update(task, total=1, completed=1)


def download_hub_file(repo_id: str, filename: str) -> Path:
    """A file of a hub dataset repository (`huggingface_hub`, cached), e.g. Search-R1's `wiki-18.jsonl.gz`.

    Raises:
        FileNotFoundError: it is not in the local cache while offline (`HF_HUB_OFFLINE=1`), or cannot be fetched.
    """
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, repo_type="dataset"))
    except (EntryNotFoundError, OSError) as error:  # not cached offline, no such file, network down
        raise FileNotFoundError(
            f"cannot fetch {filename!r} of the hub dataset {repo_id!r} (offline, or not reachable): {error}; "
            "give a local copy with --source"
        ) from error
