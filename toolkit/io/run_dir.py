"""Run-directory ownership: one trainer per run dir (a lock), created private, never silently emptied.

`RunDirLock` holds an exclusive `fcntl.flock` on `RUN_DIR/.lock` for the life of a run. The kernel drops
the lock when its process dies (kill -9 included), so a stale lock file left by a crash never blocks the
next run; the file records the holder's pid, host and start time for the error message. `prepare_run_dir`
refuses `resume=never` on a run dir that already holds a run unless `overwrite` is set, and then moves the
old run's files aside (into `RUN_DIR.old-<time>/`) instead of deleting anything. Call it with the lock held.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import IO

LOCK_FILE = ".lock"
# Files and folders that show a run dir already holds a run.
RUN_ENTRIES = ("metrics.jsonl", "samples.jsonl", "checkpoints", "config.yaml", "best", "plots")


class RunDirError(RuntimeError):
    """A run directory that cannot be used: locked by another trainer, not writable, or holding another run."""


def describe_os_error(error: OSError, action: str, path: str | Path) -> str:
    """One line for an OSError: what failed on which path and why (disk full, read-only, not a directory ...)."""
    reason = error.strerror or str(error)
    hints = {
        errno.ENOSPC: " (the disk is full)",
        errno.EROFS: " (read-only file system)",
        errno.EDQUOT: " (disk quota exceeded)",
        errno.ENOTDIR: " (a parent of it is a file, not a directory)",
        errno.EEXIST: " (a file of that name exists)",
    }
    return f"cannot {action} {path}: {reason}{hints.get(error.errno or 0, '')}"


def make_run_dir(path: str | Path) -> Path:
    """Create `path` (and parents) if missing; a folder this creates is private to its owner (0700).

    Raises:
        RunDirError: it cannot be created (a file is in the way, read-only file system, no space ...).
    """
    run_dir = Path(path)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run dir {run_dir} exists and is not a directory")
    try:
        if not run_dir.is_dir():
            run_dir.mkdir(parents=True, mode=0o700)
    except FileExistsError:  # another rank or process created it in between
        pass
    except OSError as error:
        raise RunDirError(describe_os_error(error, "create run dir", run_dir)) from error
    return run_dir


def holds_run(run_dir: str | Path) -> bool:
    """True when `run_dir` has metrics, samples, checkpoints or a saved config of an earlier run."""
    return any((Path(run_dir) / name).exists() for name in RUN_ENTRIES)


def move_aside(run_dir: str | Path) -> Path:
    """Move everything in `run_dir` but its lock file into a new `RUN_DIR.old-YYYYmmdd-HHMMSS[-n]` beside it.

    The run dir itself stays (with the lock its owner holds); returns the folder the old run now lives in.
    """
    source = Path(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = source.with_name(f"{source.name}.old-{stamp}")
    count = 1
    while target.exists():
        count += 1
        target = source.with_name(f"{source.name}.old-{stamp}-{count}")
    try:
        target.mkdir(mode=0o700)
        for entry in source.iterdir():
            if entry.name != LOCK_FILE:
                os.replace(entry, target / entry.name)
    except OSError as error:
        raise RunDirError(describe_os_error(error, "move the old run aside from", source)) from error
    return target


class RunDirLock:
    """Exclusive, crash-safe ownership of a run directory (see the module docstring); a context manager."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._file: IO[str] | None = None

    def acquire(self) -> RunDirLock:
        """Take the lock (creating the run dir when missing).

        Raises:
            RunDirError: another live process holds it (naming its pid, host and start), or the lock file
                cannot be written.
        """
        make_run_dir(self.run_dir)
        try:
            handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open until release()
        except OSError as error:
            raise RunDirError(describe_os_error(error, "write the lock file", self.path)) from error
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown process"
            handle.close()
            raise RunDirError(
                f"run dir {self.run_dir} is in use by another trainer ({holder}); wait for it to finish, "
                "or give this run another trainer.run_dir"
            ) from None
        except OSError as error:
            handle.close()
            raise RunDirError(describe_os_error(error, "lock", self.path)) from error
        try:
            handle.seek(0)
            handle.truncate()
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            handle.write(json.dumps(owner) + "\n")
            handle.flush()
        except OSError as error:
            handle.close()
            raise RunDirError(describe_os_error(error, "write the lock file", self.path)) from error
        self._file = handle
        return self

    def release(self) -> None:
        """Drop the lock (idempotent); the lock file stays, holding no lock."""
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()


def prepare_run_dir(run_dir: str | Path, resume: str, overwrite: bool) -> Path | None:
    """Make `run_dir` ready for a run per `resume`; returns where an old run was moved, if it was.

    `resume="never"` on a run dir that holds a run is an error unless `overwrite`, which moves the old run
    aside first (nothing is deleted). Other `resume` values continue the run that is there.

    Raises:
        RunDirError: `resume="never"` without `overwrite` on a run dir that holds a run, or a file-system error.
    """
    directory = Path(run_dir)
    if resume != "never" or not holds_run(directory):
        make_run_dir(directory)
        return None
    if not overwrite:
        raise RunDirError(
            f"resume=never but run dir {directory} already holds a run (metrics, checkpoints or config); "
            "pass --overwrite (trainer.overwrite=true) to move it aside and start fresh, use resume=auto to "
            "continue it, or give this run another trainer.run_dir"
        )
    return move_aside(directory)
