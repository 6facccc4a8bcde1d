"""Run logging: durable JSONL metrics and samples, accelerate trackers, a progress bar, summary tables.

`metrics.jsonl` and `samples.jsonl` hold one JSON object per line, flushed and fsynced per call, written by
the main process only. JSON has no NaN/inf: a non-finite top-level value is written as `null` and named in
`"nonfinite": {key: "nan" | "inf" | "-inf"}`; `read_metrics` restores the floats (nested ones stay null).
A run dir's W&B run id lives in `trackers.json`, so a resumed run continues the same W&B run.
Console helpers (ProgressBar, tables, get_logger) live in `toolkit.io.console`, tracker helpers in
`toolkit.io.trackers`; both are re-exported here.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from toolkit.io.console import (
    ProgressBar,
    first_last,
    format_progress_fields,
    get_logger,
    print_before_after,
    print_samples_table,
)
from toolkit.io.trackers import (
    TRACKERS_FILE,
    WANDB_STEP_KEY,
    check_tracker_init_kwargs,
    check_trackers,
    init_trackers,
    log_to_trackers,
    to_python,
    tracker_run_kwargs,
    use_step_axis,
    wandb_table,
    wandb_tracker,
)

__all__ = [
    "METRICS_FILE",
    "NONFINITE_KEY",
    "SAMPLES_FILE",
    "TRACKERS_FILE",
    "MetricsLogger",
    "ProgressBar",
    "check_tracker_init_kwargs",
    "check_trackers",
    "encode_record",
    "first_last",
    "format_progress_fields",
    "get_logger",
    "init_trackers",
    "print_before_after",
    "print_samples_table",
    "read_jsonl",
    "read_metrics",
    "read_samples",
    "tracker_run_kwargs",
]

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
NONFINITE_KEY = "nonfinite"
_RESERVED_KEYS = ("step", NONFINITE_KEY)
_NONFINITE_NAMES = ("nan", "inf", "-inf")
# tracker name -> (importable modules, any of which suffices; pip package to suggest)


_LOG = logging.getLogger(__name__)


def _null_nonfinite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _null_nonfinite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_null_nonfinite(v) for v in value]
    return value


def _metric_number(key: str, value: Any) -> int | float:
    """A metric value as int (ints, bools) or float (floats, numpy scalars, one-element tensors)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    try:
        if isinstance(value, str):
            raise TypeError("strings are not metrics")
        return float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"metric {key!r} must be a number (float, int, numpy scalar or one-element tensor), "
            f"got {type(value).__name__}: {err}"
        ) from err


def encode_record(step: int, values: Mapping[str, Any]) -> str:
    """One JSONL line `{"step": step, **values}`; top-level non-finite floats -> null + `nonfinite` entry."""
    record: dict[str, Any] = {"step": int(step)}
    nonfinite: dict[str, str] = {}
    for key, raw in values.items():
        if key in _RESERVED_KEYS:
            raise ValueError(f"key {key!r} is reserved in JSONL records; reserved keys: {list(_RESERVED_KEYS)}")
        value = to_python(raw)
        if isinstance(value, float) and not math.isfinite(value):
            nonfinite[key] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        record[key] = _null_nonfinite(value)
    if nonfinite:
        record[NONFINITE_KEY] = nonfinite
    return json.dumps(record, allow_nan=False, ensure_ascii=False) + "\n"


def _decode(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _parse_lines(path: Path) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """(raw line, record) pairs; a torn final line is skipped with a warning, any other bad line raises."""
    lines = path.read_bytes().split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        record = _decode(raw)
        if record is not None:
            yield raw, record
        elif i == last:
            _LOG.warning("%s: skipping truncated final line %d (crash mid-write?)", path, i + 1)
        else:
            raise ValueError(f"{path}: line {i + 1} is not a JSON object; only a truncated final line is tolerated")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL file written by `MetricsLogger`, with non-finite values restored as floats."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such JSONL file: {path}")
    records = []
    for _, record in _parse_lines(path):
        kinds = record.pop(NONFINITE_KEY, None)
        if isinstance(kinds, dict):
            record.update({k: float(v) for k, v in kinds.items() if v in _NONFINITE_NAMES})
        records.append(record)
    return records


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Records of `run_dir/metrics.jsonl` (tolerates a truncated final line: skipped with a warning)."""
    return read_jsonl(Path(run_dir) / METRICS_FILE)


def read_samples(run_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of `run_dir/samples.jsonl`, each with its `step`."""
    return read_jsonl(Path(run_dir) / SAMPLES_FILE)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rewrite_jsonl(path: Path, max_step: int | None) -> None:
    """Atomically keep the intact lines (byte for byte) whose step <= max_step (all of them when None)."""
    kept = [
        raw + b"\n"
        for raw, record in _parse_lines(path)
        if max_step is None or (isinstance(record.get("step"), int) and record["step"] <= max_step)
    ]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(b"".join(kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _ends_cleanly(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


class MetricsLogger:
    """Appends metrics and samples to JSONL files in `run_dir` and forwards metrics to accelerate trackers.

    Args:
        run_dir: Run directory (created).
        trackers: Tracker names ("tensorboard", "wandb", ...) to start with `init_trackers` when the
            accelerator has none started yet; they are finished by `close()`.
        accelerator: Optional `accelerate.Accelerator`; metrics go to `accelerator.log` when it has trackers.
            Its `is_main_process` is honoured too.
        config: Resolved run config stored by the trackers this logger starts.
        resume_step: When resuming from a checkpoint at this step, records with step > resume_step are
            dropped from both files (atomic rewrite), so the resumed files equal an uninterrupted run's.
        is_main_process: False turns every method into a no-op (other ranks).
        project: Tracker project name (default: the run directory's name).
        init_kwargs: Per-tracker keyword arguments for accelerate's `init_trackers` ({"wandb": {"entity": ...}}).
        resumed: True when the run continues from a checkpoint: W&B continues the run whose id `trackers.json`
            holds (see `tracker_run_kwargs`).
    """

    def __init__(
        self,
        run_dir: str | Path,
        trackers: Sequence[str] = (),
        accelerator: Any | None = None,
        config: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
        is_main_process: bool = True,
        project: str | None = None,
        init_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        resumed: bool = False,
    ) -> None:
        if trackers and accelerator is None:
            raise ValueError(f"trackers {list(trackers)} need an accelerator (accelerate.Accelerator); got None")
        check_trackers(trackers)  # fail before touching any file
        check_tracker_init_kwargs(init_kwargs)
        self.run_dir = Path(run_dir)
        self.accelerator = accelerator
        self.is_main_process = bool(is_main_process) and bool(getattr(accelerator, "is_main_process", True))
        self._files: dict[str, IO[bytes]] = {}
        self._closed = False
        self._owns_trackers = False
        if not self.is_main_process:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in (METRICS_FILE, SAMPLES_FILE):
            self._prepare(self.run_dir / name, resume_step)
        if trackers and not getattr(accelerator, "trackers", None):
            kwargs = tracker_run_kwargs(self.run_dir, trackers, init_kwargs, resumed)
            init_trackers(accelerator, trackers, project or self.run_dir.name, config, kwargs)
            self._owns_trackers = True
        tracker = wandb_tracker(accelerator)
        if tracker is not None:
            use_step_axis(tracker)

    @staticmethod
    def _prepare(path: Path, resume_step: int | None) -> None:
        if not path.exists():
            return
        if resume_step is not None or not _ends_cleanly(path):
            _rewrite_jsonl(path, resume_step)
        elif path.stat().st_size > 0:
            _LOG.warning("%s already has records; appending (pass resume_step to drop steps after it)", path)

    def _append(self, name: str, text: str) -> None:
        if self._closed:
            raise RuntimeError(f"MetricsLogger for {self.run_dir} is closed")
        try:
            f = self._files.get(name)
            if f is None:
                path = self.run_dir / name
                new = not path.exists()
                f = self._files[name] = open(path, "ab")  # noqa: SIM115 - kept open across calls, closed in close()
                if new:
                    _fsync_dir(self.run_dir)
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        except OSError as error:  # disk full, read-only: name the file (the rows written so far are intact)
            from toolkit.io.run_dir import RunDirError, describe_os_error

            raise RunDirError(describe_os_error(error, "append to", self.run_dir / name)) from error

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Append `{"step": step, **metrics}` to metrics.jsonl (durably) and forward to the trackers."""
        if not self.is_main_process:
            return
        values = {key: _metric_number(key, value) for key, value in metrics.items()}
        self._append(METRICS_FILE, encode_record(step, values))
        if self.accelerator is not None:
            log_to_trackers(self.accelerator, values, step)

    def log_samples(self, step: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append one line `{"step": step, **row}` per row (prompt, completion, reward...) to samples.jsonl.

        With a W&B tracker the rows also go to it as the table `samples` (other trackers take no tables).
        """
        if not self.is_main_process or not rows:
            return
        self._append(SAMPLES_FILE, "".join(encode_record(step, row) for row in rows))
        tracker = wandb_tracker(self.accelerator)
        if tracker is not None:
            tracker.log({"samples": wandb_table(rows), WANDB_STEP_KEY: int(step)})

    def close(self) -> None:
        """Close the files and finish the trackers this logger started (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for f in self._files.values():
            f.close()
        self._files.clear()
        if self._owns_trackers:
            for tracker in getattr(self.accelerator, "trackers", []):
                tracker.finish()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
