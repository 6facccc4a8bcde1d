"""Console output for training runs: a progress bar (rich live bar or plain CI lines), sample and
before/after tables, and a standard logger with a RichHandler. Re-exported by `toolkit.io.logging`.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Collection, Mapping, Sequence
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

# label shown in the progress line -> metric keys, first present wins
_PROGRESS_FIELDS = (
    ("reward", ("reward/mean",)),
    ("kl", ("loss/kl", "policy/approx_kl")),
    ("len", ("rollout/length_mean",)),
)
# Fields shown only from a key that has been nonzero: a run without a KL term logs loss/kl = 0 every step.
_HIDDEN_WHILE_ZERO = frozenset({"kl"})


def format_progress_fields(metrics: Mapping[str, float], seen_nonzero: Collection[str] = ()) -> str:
    """`reward=0.42 kl=0.001 len=12.3 2.1s/step` from the keys that are present.

    `kl` comes from the first KL key that is nonzero now or was at an earlier step (`seen_nonzero`, the keys
    `ProgressBar` has seen nonzero), so a run without a KL term shows no `kl=0`.
    """
    parts = []
    for label, keys in _PROGRESS_FIELDS:
        present = [k for k in keys if k in metrics]
        if label in _HIDDEN_WHILE_ZERO:
            present = [k for k in present if k in seen_nonzero or _nonzero(metrics[k])]
        if present:
            parts.append(f"{label}={float(metrics[present[0]]):.4g}")
    if "time/step_s" in metrics:
        parts.append(f"{float(metrics['time/step_s']):.3g}s/step")
    return " ".join(parts)


def _nonzero(value: float) -> bool:
    return math.isfinite(float(value)) and float(value) != 0


def _format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class ProgressBar:
    """Training progress: a live rich bar on a terminal, plain `step 3/10 reward=...` lines otherwise.

    `update(step, metrics)` takes the number of completed steps. Without a terminal (CI logs) a line is
    written every `print_every` steps and at the last step. `enabled=False` prints nothing (other ranks).
    """

    def __init__(
        self,
        total: int,
        initial: int = 0,
        enabled: bool = True,
        *,
        description: str = "train",
        console: Console | None = None,
        plain: bool | None = None,
        print_every: int = 1,
    ) -> None:
        if total < 0 or initial < 0 or print_every < 1:
            raise ValueError(f"need total >= 0, initial >= 0, print_every >= 1; got {total}, {initial}, {print_every}")
        self.total, self.step, self.enabled, self.print_every = total, initial, enabled, print_every
        self._initial, self._start = initial, time.monotonic()
        self.console = console if console is not None else _default_console()
        self.plain = (not self.console.is_terminal) if plain is None else plain
        self._progress: Progress | None = None
        self._nonzero: set[str] = set()  # metric keys seen nonzero so far (see format_progress_fields)
        if enabled and not self.plain:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[stats]}"),
                console=self.console,
            )
            self._task = self._progress.add_task(description, total=total, completed=initial, stats="")
            self._progress.start()

    def update(self, step: int, metrics: Mapping[str, float] | None = None) -> None:
        """Show `step` completed steps and the live fields present in `metrics`."""
        self.step = step
        metrics = metrics or {}
        self._nonzero.update(k for k, v in metrics.items() if isinstance(v, (int, float)) and _nonzero(v))
        stats = format_progress_fields(metrics, self._nonzero)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, stats=stats)
        elif self.enabled and (step % self.print_every == 0 or step >= self.total):
            line = " ".join(p for p in (f"step {step}/{self.total}", stats, self._eta()) if p)
            self.console.file.write(line + "\n")
            self.console.file.flush()

    def _eta(self) -> str:
        done = self.step - self._initial
        if done <= 0 or self.step >= self.total:
            return ""
        return f"eta {_format_seconds((time.monotonic() - self._start) / done * (self.total - self.step))}"

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _default_console() -> Console:
    from rich import get_console

    return get_console()


def _cell(value: Any, max_chars: int) -> str:
    if value is None:
        return ""
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def print_samples_table(
    rows: Sequence[Mapping[str, Any]],
    max_rows: int = 4,
    *,
    max_chars: int = 200,
    title: str = "Samples",
    console: Console | None = None,
) -> None:
    """Print the first `max_rows` rows as a rich table (columns: union of keys; long text truncated)."""
    console = console if console is not None else _default_console()
    shown = list(rows)[:max_rows]
    columns = list(dict.fromkeys(key for row in shown for key in row))
    table = Table(title=title, show_lines=True)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in shown:
        table.add_row(*(_cell(row.get(column), max_chars) for column in columns))
    console.print(table)


def first_last(
    records: Sequence[Mapping[str, Any]], keys: Sequence[str] | None = None
) -> tuple[dict[str, float], dict[str, float]]:
    """First and last finite value of each metric over `records` (e.g. from `read_metrics`)."""
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for record in records:
        for key, value in record.items():
            wanted = key != "step" and (keys is None or key in keys)
            if wanted and isinstance(value, (int, float)) and math.isfinite(value):
                first.setdefault(key, float(value))
                last[key] = float(value)
    return first, last


def mean_records(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Per-key mean of the numeric, finite values over `records`."""
    sums: dict[str, list[float]] = {}
    for record in records:
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                sums.setdefault(key, []).append(float(value))
    return {key: sum(values) / len(values) for key, values in sums.items()}


def window_means(
    records: Sequence[Mapping[str, Any]], max_window: int = 5
) -> tuple[int, dict[str, float], dict[str, float]]:
    """(window, means of the first `window` records, of the last): the end-of-training table's figures.

    Single steps are noisy, so a few are averaged at each end: `window` = min(max_window, len // 4), at least 1.
    """
    window = max(1, min(max_window, len(records) // 4))
    return window, mean_records(records[:window]), mean_records(records[-window:])


def print_before_after(
    before: Mapping[str, float],
    after: Mapping[str, float],
    keys: Sequence[str] | None = None,
    title: str = "Before vs after training",
    *,
    console: Console | None = None,
) -> None:
    """Print a metric / first / last / ratio table (ratio = last / first; "n/a" when first is 0 or missing)."""
    console = console if console is not None else _default_console()
    names = list(keys) if keys is not None else [k for k in before if k in after]
    table = Table(title=title)
    for column in ("metric", "first", "last", "ratio"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name in names:
        a, b = before.get(name), after.get(name)
        ok = a is not None and b is not None and math.isfinite(a) and math.isfinite(b) and a != 0
        ratio = f"{b / a:.3f}" if ok and a is not None and b is not None else "n/a"
        table.add_row(name, "-" if a is None else f"{a:.4g}", "-" if b is None else f"{b:.4g}", ratio)
    console.print(table)


@functools.cache
def _configure_root_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:  # respect an application's own logging setup
        root.addHandler(RichHandler(show_path=False, console=_default_console()))


def get_logger(name: str, level: int = logging.INFO) -> logging.Logger:
    """A standard logger; the root gets one RichHandler the first time (unless logging is configured)."""
    _configure_root_logging()
    logger = logging.getLogger(name)
    if logger.level == logging.NOTSET:
        logger.setLevel(level)
    return logger
