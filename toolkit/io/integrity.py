"""Checkpoint integrity: the `COMPLETE` manifest, SHA-256 verification and pickle-free loading.

A checkpoint's `COMPLETE` manifest (written last) records every file's size and SHA-256; `verify_checkpoint`
checks them before anything is read, and `safe_torch_load` unpickles with `torch.load(weights_only=True)`, so a
crafted file can neither pass as another nor run code.

Hashing a 7B run's checkpoint (weights and optimizer state, tens of GB) takes minutes, and a resume verifies the
checkpoint it picks and then loads it: a directory that verified in this process is not hashed again while none of
its files changed (same size, modification time and inode, checked with `stat`).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path, PurePosixPath
from typing import Any

import torch

COMPLETE = "COMPLETE"
_HASH_CHUNK = 1 << 20
# Checkpoint directory -> the stat fingerprint of its files when it last verified (this process).
_VERIFIED: dict[Path, tuple[tuple[str, int, int, int], ...]] = {}


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupt; the message names the file."""


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (checkpoints can be tens of GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check every file of a checkpoint directory against its `COMPLETE` manifest; returns the manifest.

    Raises:
        CheckpointError: the directory, the manifest or a file is missing, or a file's size or SHA-256 differs.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    manifest = read_manifest(directory)
    names = [COMPLETE, *manifest["files"]]
    for name in manifest["files"]:
        if not (directory / name).is_file():
            raise CheckpointError(f"checkpoint file missing: {directory / name}")
    key, fingerprint = directory.resolve(), _fingerprint(directory, names)
    if _VERIFIED.get(key) == fingerprint:  # verified in this process and untouched since
        return manifest
    for name, expected in manifest["files"].items():
        file = directory / name
        size, digest = (expected, None) if isinstance(expected, int) else (expected["size"], expected["sha256"])
        if file.stat().st_size != size:
            raise CheckpointError(f"checkpoint file corrupt: {file} has {file.stat().st_size} bytes, expected {size}")
        if digest is not None and file_sha256(file) != digest:
            raise CheckpointError(f"checkpoint file corrupt: {file}: SHA-256 differs from the manifest's")
    _VERIFIED[key] = fingerprint
    return manifest


def _fingerprint(directory: Path, names: list[str]) -> tuple[tuple[str, int, int, int], ...]:
    """(name, size, modification time in ns, inode) of each file: any rewrite, copy over or touch changes it."""
    stats = [(name, os.stat(directory / name)) for name in sorted(names)]
    return tuple((name, s.st_size, s.st_mtime_ns, s.st_ino) for name, s in stats)


def safe_torch_load(path: str | Path) -> Any:
    """`torch.load(weights_only=True)` on CPU: refuses (CheckpointError) any pickle that would import or call code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"refusing to load {path}: it holds pickled objects beyond tensors, numbers, strings and plain "
            f"containers, and loading them could run code from the file ({first_line})"
        ) from e


def read_manifest(directory: Path) -> dict[str, Any]:
    marker = directory / COMPLETE
    if not marker.is_file():
        raise CheckpointError(f"incomplete checkpoint (no {COMPLETE} marker): {directory}")
    try:
        manifest: dict[str, Any] = json.loads(marker.read_text(encoding="utf-8"))
        int(manifest["step"])
        for name, expected in dict(manifest["files"]).items():
            check_relative_name(name)
            if not isinstance(expected, int):
                int(expected["size"]), str(expected["sha256"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint file corrupt: {marker}: {e}") from e
    return manifest


def check_relative_name(name: str) -> None:
    """ValueError unless `name` is a relative path inside the checkpoint ("meta.json", "sharded/__0_0.distcp")."""
    parts = PurePosixPath(name).parts
    if not name or "\\" in name or PurePosixPath(name).is_absolute() or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"file name {name!r} is not a plain name or a relative path inside the checkpoint")
