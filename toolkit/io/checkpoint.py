"""Checkpoints: atomic save, keep-last-K, complete-only and verified loading, RNG capture (choosing one: `resume`).

Layout: `run_dir/checkpoints/step_{step:08d}/` holding `model.safetensors`, `objects.pt` (optimizer,
scheduler, normalizer and data state), `rng.pt`, `meta.json` and a `COMPLETE` manifest written last with
every file's size and SHA-256. A checkpoint is written into a hidden temp directory and renamed into place,
so a crash mid-write leaves the previous checkpoints untouched; only directories with `COMPLETE` count.
One writer (rank 0) per run; the ranks of a sharded (FSDP) run first write their shards into `sharded/` of the
same temp directory (toolkit.train.sharded_checkpoint), and the manifest covers those files too.

Loading never runs code from a file: `objects.pt` and `rng.pt` are unpickled with
`torch.load(weights_only=True)` (tensors, numbers, strings and plain containers only), and every file is
checked against its manifest checksum first. `resume="auto"` skips a latest checkpoint that fails the check
(moved aside as `checkpoints/corrupt-step_*`, never deleted) and falls back to the newest one that verifies.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import random
import re
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import Tensor

from toolkit.io.atomic import fsync_dir, fsync_file, write_text_synced
from toolkit.io.integrity import (
    COMPLETE,
    CheckpointError,
    file_sha256,
    read_manifest,
    safe_torch_load,
    verify_checkpoint,
)

# The integrity helpers are part of the checkpoint API (callers import them from here too).
__all__ = [
    "COMPLETE",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointState",
    "file_sha256",
    "load_checkpoint",
    "read_manifest",
    "safe_torch_load",
    "verify_checkpoint",
]

MODEL_FILE = "model.safetensors"
OBJECTS_FILE = "objects.pt"
RNG_FILE = "rng.pt"
META_FILE = "meta.json"
SHARDED_DIR = "sharded"  # an FSDP run's torch.distributed.checkpoint shards (toolkit.train.sharded_checkpoint)
FORMAT_VERSION = 2  # 1: sizes only; 2: sizes and SHA-256 per file
STEP_DIR = re.compile(r"^step_(\d+)$")
_TEMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
CORRUPT_PREFIX = "corrupt-"

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """State of python `random`, numpy's global RNG, torch CPU and every CUDA device (when available)."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        # numpy's key as a tensor so rng.pt loads with torch.load(weights_only=True)
        "numpy": {**np_state, "state": {**np_state["state"], "key": torch.from_numpy(np_state["state"]["key"])}},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what `capture_rng_state` captured; CUDA states beyond the visible devices are skipped (warned)."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        np_state = state["numpy"]
        key = np.asarray(np_state["state"]["key"], dtype=np.uint32)
        np.random.set_state({**np_state, "state": {**np_state["state"], "key": key}})
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states:
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible < len(cuda_states):
            warnings.warn(
                f"checkpoint has RNG states for {len(cuda_states)} CUDA devices, {visible} visible; "
                "restoring the visible ones",
                stacklevel=2,
            )
        for index, cuda_state in enumerate(cuda_states[:visible]):
            torch.cuda.set_rng_state(cuda_state, index)


# ---------------------------------------------------------------------------------------------- state


@dataclass
class CheckpointState:
    """Everything a resumed run needs.

    Attributes:
        step: the number of completed training steps.
        model: parameter/buffer name -> tensor (saved with safetensors; tied tensors are stored twice).
        objects: torch.save-able state: optimizer, scheduler, normalizer, data loader, ...
        rng: `capture_rng_state()`.
        meta: JSON-able: the resolved config, a metrics summary, ...
    """

    step: int
    model: dict[str, Tensor]
    objects: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def _model_tensors(model: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous, one storage per tensor: safetensors refuses shared storage (tied weights)."""
    out: dict[str, Tensor] = {}
    storages: set[int] = set()
    for name, tensor in model.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"model[{name!r}] is a {type(tensor).__name__}, not a Tensor")
        tensor = tensor.detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in storages and tensor.numel() > 0:
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def _write_pickle(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_checkpoint(state: CheckpointState, directory: Path) -> None:
    """Write every piece into `directory` (fsynced), `COMPLETE` last with the size and SHA-256 of every file in it
    (shards other ranks wrote into subdirectories included)."""
    safetensors.torch.save_file(_model_tensors(state.model), str(directory / MODEL_FILE))
    fsync_file(directory / MODEL_FILE)
    _write_pickle(state.objects, directory / OBJECTS_FILE)
    _write_pickle(state.rng, directory / RNG_FILE)
    write_text_synced(directory / META_FILE, json.dumps(state.meta, indent=2, allow_nan=True))
    names = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    files = {
        name: {"size": (directory / name).stat().st_size, "sha256": file_sha256(directory / name)} for name in names
    }
    manifest = {"format_version": FORMAT_VERSION, "step": state.step, "files": files}
    write_text_synced(directory / COMPLETE, json.dumps(manifest, indent=2))
    fsync_dir(directory)


def _check_state(state: CheckpointState) -> None:
    if not isinstance(state.step, int) or isinstance(state.step, bool) or state.step < 0:
        raise ValueError(f"CheckpointState.step must be an int >= 0, got {state.step!r}")
    try:
        json.dumps(state.meta)
    except (TypeError, ValueError) as e:
        raise ValueError(f"CheckpointState.meta must be JSON-serialisable: {e}") from e


# ---------------------------------------------------------------------------------------------- manager


class CheckpointManager:
    """Saves to, lists and loads from `run_dir/checkpoints/`, keeping the newest `keep_last` (None: all)."""

    def __init__(self, run_dir: str | Path, keep_last: int | None = 3) -> None:
        if keep_last is not None and (isinstance(keep_last, bool) or keep_last < 1):
            raise ValueError(f"keep_last must be an int >= 1 or None (keep all), got {keep_last!r}")
        self.run_dir = Path(run_dir)
        self.directory = self.run_dir / "checkpoints"
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        """The directory a checkpoint of `step` is saved to."""
        return self.directory / f"step_{step:08d}"

    def save(self, state: CheckpointState) -> Path:
        """Write `state` atomically to `path_for(state.step)` (replacing one of the same step), then prune."""
        _check_state(state)
        temp = self.make_temp(state.step)
        try:
            return self.publish(state, temp)
        finally:
            if temp.exists():
                shutil.rmtree(temp, ignore_errors=True)

    def make_temp(self, step: int) -> Path:
        """A fresh hidden directory to write the checkpoint of `step` into (stale ones of dead writers removed)."""
        final = self.path_for(step)
        temp = self.directory / f"{_TEMP_PREFIX}{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._remove_stale()
            temp.mkdir()
        except OSError as e:
            raise CheckpointError(
                f"could not write checkpoint {final}: {e.strerror or e} (earlier ones are intact)"
            ) from e
        return temp

    def publish(self, state: CheckpointState, temp: Path) -> Path:
        """Write rank 0's files and the manifest into `temp`, rename it into place, prune; returns the checkpoint."""
        _check_state(state)
        final = self.path_for(state.step)
        try:
            _write_checkpoint(state, temp)
            if final.exists():  # same step again: a crash between the renames falls back to an older step
                self._discard(final)
            os.replace(temp, final)
            fsync_dir(self.directory)
        except OSError as e:  # disk full, read-only, quota: the earlier checkpoints are untouched
            reason = e.strerror or str(e)
            raise CheckpointError(
                f"could not write checkpoint {final}: {reason} (earlier checkpoints are intact)"
            ) from e
        self._prune(keep=final)
        newer = [p.name for p in self.list() if _step_of(p) > state.step]
        if newer:
            warnings.warn(
                f"saved step {state.step} but {self.directory} holds later checkpoints {newer}; "
                "resume='auto' will pick the latest of those",
                stacklevel=3,
            )
        return final

    def list(self) -> builtins.list[Path]:
        """Complete checkpoints, oldest step first (temp directories and ones without COMPLETE are skipped)."""
        if not self.directory.is_dir():
            return []
        found = [
            entry
            for entry in self.directory.iterdir()
            if STEP_DIR.match(entry.name) and entry.is_dir() and (entry / COMPLETE).is_file()
        ]
        return sorted(found, key=_step_of)

    def latest(self) -> Path | None:
        """The complete checkpoint with the highest step, or None."""
        checkpoints = self.list()
        return checkpoints[-1] if checkpoints else None

    def load(self, path: str | Path, read_model: bool = True) -> CheckpointState:
        """Load a checkpoint directory (tensors on CPU); see `load_checkpoint`."""
        return load_checkpoint(path, read_model=read_model)

    def latest_verified(self, quarantine: bool = False) -> Path | None:
        """The newest complete checkpoint whose files match their manifest, or None.

        A newer one that fails the check is reported (a warning naming the file) and skipped; with `quarantine`
        it is renamed to `corrupt-step_*` beside the others (kept for inspection, out of the listing).
        """
        for path in reversed(self.list()):
            try:
                verify_checkpoint(path)
                return path
            except CheckpointError as error:
                aside = self.directory / f"{CORRUPT_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
                if quarantine:
                    os.replace(path, aside)
                where = f"moved to {aside}" if quarantine else "left in place"
                log.warning("skipping checkpoint %s (%s): %s; trying the one before", path.name, where, error)
        return None

    def _prune(self, keep: Path) -> None:
        if self.keep_last is None:
            return
        checkpoints = [p for p in self.list() if p != keep]
        for old in checkpoints[: max(len(checkpoints) - (self.keep_last - 1), 0)]:
            self._discard(old)

    def _discard(self, path: Path) -> None:
        """Rename out of the listing first, so a crash mid-delete never leaves a half-deleted checkpoint."""
        trash = self.directory / f"{_TRASH_PREFIX}{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _remove_stale(self) -> None:
        """Delete temp/trash directories left by crashed writers (not those of a live process on this host)."""
        for entry in self.directory.iterdir():
            if entry.name.startswith((_TEMP_PREFIX, _TRASH_PREFIX)) and not _writer_alive(entry.name):
                shutil.rmtree(entry, ignore_errors=True)


def _step_of(path: Path) -> int:
    match = STEP_DIR.match(path.name)
    assert match is not None
    return int(match.group(1))


def _writer_alive(name: str) -> bool:
    match = re.search(r"-(\d+)-[0-9a-f]{8}$", name)
    if match is None:
        return False
    pid = int(match.group(1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------- loading


def load_checkpoint(path: str | Path, read_model: bool = True) -> CheckpointState:
    """Load a complete checkpoint directory written by `CheckpointManager.save` (tensors on CPU).

    Every file is checked against the manifest (size, and SHA-256 from format 2 on) before it is read;
    `objects.pt` and `rng.pt` are unpickled with `torch.load(weights_only=True)`, so a crafted file cannot run
    code: anything beyond tensors, numbers, strings and plain containers is refused. Without `read_model` the
    weights file is verified but not read (`model` is empty): a sharded run restores its weights from `sharded/`.

    Raises:
        CheckpointError: naming the missing, corrupt or refused file.
    """
    directory = Path(path)
    manifest = verify_checkpoint(directory)
    return CheckpointState(
        step=int(manifest["step"]),
        model=_read(directory / MODEL_FILE, lambda p: safetensors.torch.load_file(str(p), device="cpu"))
        if read_model
        else {},
        objects=_read(directory / OBJECTS_FILE, safe_torch_load),
        rng=_read(directory / RNG_FILE, safe_torch_load),
        meta=_read(directory / META_FILE, lambda p: json.loads(p.read_text(encoding="utf-8"))),
    )


def _read(path: Path, reader: Any) -> Any:
    try:
        return reader(path)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"checkpoint file corrupt: {path}: {type(e).__name__}: {e}") from e
