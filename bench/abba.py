"""ABBA-interleaved CPU timing for the side-by-side benches: two sides alternate in blocks of steps in one process.

A step's cost is the process CPU time it took (one torch thread keeps it steady on a shared machine), or its wall
time where a side works in another process; the paired ratio compares each side's block with the other side's block
of the same index, run back to back, so a slow drift of the machine's load cancels. Also what the benches' markdown
reports share: `Report` (head, tables, notes), "median / min" cells and `publish`.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

CLOCKS: dict[str, Callable[[], float]] = {"cpu_s": time.process_time, "wall_s": time.perf_counter}


def run_abba(
    sides: Sequence[str],
    step: Callable[[str], Mapping[str, float]],
    warmup: int,
    repeats: int,
    steps: int,
    clock: str = "cpu_s",
) -> dict[str, dict[str, list[float]]]:
    """{side: {clock: [...], name: [...]}}: `warmup` untimed steps per side, then `repeats` rounds of blocks of
    `steps` timed steps, the sides' order reversed every other round. `step(side)` runs one step and returns named
    values to compare (a loss, a stage's seconds), one column each; its cost goes to the `clock` column: "cpu_s"
    (process CPU time) or "wall_s" (wall time, for work that runs in other processes or threads)."""
    if clock not in CLOCKS:
        raise ValueError(f"clock={clock!r}: one of {sorted(CLOCKS)}")
    timer = CLOCKS[clock]
    rows: dict[str, dict[str, list[float]]] = {side: {clock: []} for side in sides}
    for side in sides:
        for _ in range(warmup):
            step(side)
    for repeat in range(repeats):
        for side in sides if repeat % 2 == 0 else sides[::-1]:
            for _ in range(steps):
                start = timer()
                values = step(side)
                rows[side][clock].append(timer() - start)
                for name, value in values.items():
                    rows[side].setdefault(name, []).append(value)
    return rows


def paired_ratio(before: list[float], after: list[float], steps: int) -> float:
    """Median over same-index blocks of `steps` of after / before median seconds."""
    blocks = [[statistics.median(side[i : i + steps]) for i in range(0, len(side), steps)] for side in (before, after)]
    return float(statistics.median(b / a for a, b in zip(*blocks, strict=True)))


def add_abba_arguments(parser: argparse.ArgumentParser, warmup: int, steps: int, repeats: int) -> None:
    """--warmup, --steps (per block) and --repeats (blocks per side) with this bench's defaults."""
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed steps per side first")
    parser.add_argument("--steps", type=int, default=steps, help="steps per ABBA block")
    parser.add_argument("--repeats", type=int, default=repeats, help="ABBA blocks per side")


def publish(text: str, out: Path) -> None:
    """Print a bench's report and write it to its results file."""
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")


def median_min(values: Sequence[float]) -> str:
    """A "median / min" cell of seconds, 3 decimals."""
    return f"{statistics.median(values):.3f} / {min(values):.3f}"


class Report:
    """A bench's markdown report, built line by line: the head, tables of formatted cells, then the notes.

    The head is `# title`, the command that reproduces the figures and the setting line (date · machine · torch
    version · `setting`), each followed by a blank line; prose goes straight into `lines`.
    """

    def __init__(self, title: str, command: str, setting: str) -> None:
        import torch

        machine = f"{datetime.date.today()} · {platform.machine()} · torch {torch.__version__}"
        self.lines = [f"# {title}", "", f"Command: `{command}`", "", f"{machine} · {setting}", ""]

    def table(self, *columns: str) -> None:
        """Start a markdown table: its header row and the separator row."""
        self.row(*columns)
        self.lines.append("|" + "---|" * len(columns))

    def row(self, *cells: object) -> None:
        """One table row of already formatted cells (anything else is written with `str`)."""
        self.lines.append("| " + " | ".join(map(str, cells)) + " |")

    def text(self, notes: str) -> str:
        """The whole report: its lines, then the bench's notes."""
        return "\n".join(self.lines) + "\n" + notes
