"""The README's demo figures, re-derived by the command the README names (`make demo`'s `renorm train`).

Runs `renorm train configs/text_agent/tiny.yaml` in a fresh run dir (1 torch thread, as the config sets), then
computes the end-of-training table's first- and last-window means exactly as `renorm train` prints them
(`toolkit.io.console.window_means`) and the wall time, writes them to bench/results/readme_demo.md (with a JSON line
tests/test_readme.py compares with the README's sentence) and says whether the README states the same figures.

    python bench/readme_demo.py [--steps N]   # N: a shorter try (the results file is only written for the config's)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolkit.config import load_config  # noqa: E402
from toolkit.io.console import window_means  # noqa: E402
from toolkit.io.logging import read_metrics  # noqa: E402

CONFIG = "configs/text_agent/tiny.yaml"
RESULTS = ROOT / "bench" / "results" / "readme_demo.md"
EM, SEARCHES = "reward/em", "agent/tool_calls_mean"
# The README sentence these figures appear in (tests/test_readme.py reads it the same way).
README_FIGURES = re.compile(
    r"exact match (?P<em_first>[\d.]+) → (?P<em_last>[\d.]+) and\s+search calls per episode "
    r"(?P<search_first>[\d.]+) → (?P<search_last>[\d.]+) in (?P<steps>\d+) steps",
)


def readme_figures(text: str) -> dict[str, float]:
    """The demo figures the README states (ValueError when its sentence is gone)."""
    match = README_FIGURES.search(text)
    if match is None:
        raise ValueError("README.md no longer states the demo's 'exact match A → B and search calls ...' figures")
    return {key: float(value) for key, value in match.groupdict().items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help="trainer.num_steps (default: the config's)")
    args = parser.parse_args(argv)
    steps = args.steps or int(load_config(ROOT / CONFIG)["trainer"]["num_steps"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "toolkit.cli", "train", CONFIG, f"trainer.run_dir={tmp}/run"]
        command += ["trainer.progress=false", f"trainer.num_steps={steps}"]
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        window, first, last = window_means(read_metrics(Path(tmp) / "run"))
    found = {
        "em_first": round(first[EM], 2),
        "em_last": round(last[EM], 2),
        "search_first": round(first[SEARCHES], 2),
        "search_last": round(last[SEARCHES], 2),
        "steps": steps,
    }
    print(f"first vs last {window} steps: {json.dumps(found)}; {seconds / 60:.1f} min wall")
    stated = readme_figures((ROOT / "README.md").read_text(encoding="utf-8"))
    same = all(stated[key] == value for key, value in found.items())
    print("README states the same figures" if same else f"README states {stated}: update it")
    if args.steps is None or args.steps == steps:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        RESULTS.write_text(
            "# The README's demo figures, re-derived\n\n"
            f"Command: `python bench/readme_demo.py` (runs `renorm train {CONFIG}`, 1 torch thread); "
            f"{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} cores, "
            f"load average {load:.1f} at the end.\n\n"
            f"| metric (mean of the first / last {window} steps) | first | last |\n|---|---|---|\n"
            f"| exact match (`{EM}`) | {found['em_first']:.2f} | {found['em_last']:.2f} |\n"
            f"| search calls per episode (`{SEARCHES}`) | {found['search_first']:.2f} "
            f"| {found['search_last']:.2f} |\n\n"
            f"{steps} steps, {seconds / 60:.1f} min wall (warm start included).\n\n"
            f"Figures (read by tests/test_readme.py): `{json.dumps(found)}`\n",
            encoding="utf-8",
        )
        print(f"wrote {RESULTS}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
