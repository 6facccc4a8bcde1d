"""The README's figures are the ones their commands produce (issue 23 item 6).

The demo's figures (exact match and search calls, first vs last steps, and the step count) are re-derived by
`python bench/readme_demo.py`, which runs `make demo`'s command and writes bench/results/readme_demo.md; this test
holds the README's sentence to that file and to the config, and the bench's arithmetic to `renorm train`'s table.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench.readme_demo import CONFIG, EM, RESULTS, SEARCHES, readme_figures
from toolkit.config import load_config
from toolkit.io.console import window_means

ROOT = Path(__file__).resolve().parents[1]


def bench_figures() -> dict[str, float]:
    match = re.search(r"Figures \(read by tests/test_readme.py\): `(\{.*\})`", RESULTS.read_text(encoding="utf-8"))
    assert match is not None, f"{RESULTS} holds no figures line: rerun python bench/readme_demo.py"
    return {key: float(value) for key, value in json.loads(match.group(1)).items()}


def test_the_readme_states_the_demo_figures_the_bench_re_derived() -> None:
    stated = readme_figures((ROOT / "README.md").read_text(encoding="utf-8"))
    assert stated == bench_figures(), "README.md and bench/results/readme_demo.md disagree: rerun the bench"
    assert stated["steps"] == load_config(ROOT / CONFIG)["trainer"]["num_steps"]  # what `make demo` runs
    assert "make demo" in (ROOT / "Makefile").read_text() and CONFIG in (ROOT / "Makefile").read_text()


def test_the_bench_reads_the_figures_as_renorm_train_prints_them() -> None:
    records = [{"step": s, EM: s / 10, SEARCHES: 1.0, "other": 0.0} for s in range(1, 21)]
    window, first, last = window_means(records)
    assert window == 5 and first[EM] == pytest.approx(0.3) and last[EM] == pytest.approx(1.8)
    assert window_means(records[:6])[0] == 1  # short runs: single steps at each end
    with pytest.raises(ValueError, match="no longer states the demo's"):
        readme_figures("exact match went up")
