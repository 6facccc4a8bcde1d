"""Durable small files: fsync helpers and the project's one atomic writer (temp file in the same folder, fsync,
rename, fsync the folder), so readers never see a partial file and a crash leaves the old one whole."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fsync_file(path)  # O_RDONLY on a directory works on POSIX and syncs its entries


def write_text_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` so readers never see a partial file: temp file in the same folder, fsync, rename,
    fsync the folder (parents are created). The one atomic small-file writer of the project."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write_text_synced(temp, text)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    fsync_dir(target.parent)


def write_json_atomic(path: str | Path, data: Any, sort_keys: bool = False) -> None:
    """`write_text_atomic` of `data` as indented JSON (a trailing newline; `sort_keys` optional)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")
