"""bench/abba.py: the ABBA schedule of `run_abba`, its columns and clocks, and the paired-block ratio."""

from __future__ import annotations

import pytest

from bench.abba import CLOCKS, paired_ratio, run_abba


def test_run_abba_warms_up_each_side_then_alternates_blocks_and_records_each_value_as_a_column() -> None:
    calls: list[str] = []

    def step(side: str) -> dict[str, float]:
        calls.append(side)
        return {"loss": float(len(calls)), "index": float(calls.count(side))}

    rows = run_abba(("a", "b"), step, warmup=1, repeats=3, steps=2)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] + ["b", "b", "a", "a"] + ["a", "a", "b", "b"]
    timed = calls[2:]
    for side in ("a", "b"):
        assert set(rows[side]) == {"cpu_s", "loss", "index"}
        assert rows[side]["loss"] == [float(i + 3) for i, s in enumerate(timed) if s == side]  # warm-up not recorded
        assert rows[side]["index"] == [float(i) for i in range(2, 2 + 3 * 2)]
        assert len(rows[side]["cpu_s"]) == 6 and all(seconds >= 0 for seconds in rows[side]["cpu_s"])


def test_run_abba_times_with_the_named_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = iter(range(100))
    monkeypatch.setitem(CLOCKS, "wall_s", lambda: float(next(ticks)) ** 2)  # a step's reading grows each time
    rows = run_abba(("a", "b"), lambda side: {}, warmup=0, repeats=1, steps=2, clock="wall_s")
    assert rows == {"a": {"wall_s": [1.0, 5.0]}, "b": {"wall_s": [9.0, 13.0]}}  # (k+1)^2 - k^2 for k = 0, 2, 4, 6
    with pytest.raises(ValueError, match="clock='gpu_s'"):
        run_abba(("a",), lambda side: {}, warmup=0, repeats=1, steps=1, clock="gpu_s")


def test_paired_ratio_is_the_median_of_same_index_block_ratios() -> None:
    before = [1.0, 3.0, 2.0, 2.0, 4.0, 4.0]  # block medians 2, 2, 4
    after = [1.0, 1.0, 3.0, 3.0, 1.0, 1.0]  # block medians 1, 3, 1
    assert paired_ratio(before, after, steps=2) == pytest.approx(sorted([1 / 2, 3 / 2, 1 / 4])[1])
