"""The one-minute demo config (`configs/demo/tiny_grpo.yaml`) cut down to seconds, and a captured `renorm` call,
for tests that need a real training run or the CLI."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

from toolkit.cli import main
from toolkit.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo" / "tiny_grpo.yaml"
FAST = [
    "trainer.prompts_per_step=4",
    "trainer.group_size=4",
    "trainer.num_minibatches=1",
    "trainer.progress=false",
    "sampler.max_new_tokens=4",
    f"data.path={ROOT / 'data' / 'demo' / 'letters.jsonl'}",
]


def tiny_config(run_dir: Path, *overrides: str) -> dict[str, Any]:
    """The fast demo config writing to `run_dir`, with `key=value` overrides applied last."""
    return load_config(DEMO, [*FAST, f"trainer.run_dir={run_dir}", *overrides])


def run_cli(*argv: str | Path) -> tuple[int, str]:
    """`renorm ARGV` in-process: (exit code, stderr); stdout is discarded."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, err.getvalue()
