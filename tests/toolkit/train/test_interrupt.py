"""Stopping `renorm train` from outside: SIGTERM saves and exits 0, kill -9 keeps the last complete checkpoint,
and rerunning the command resumes at the next step with an intact metrics.jsonl.

The interrupted runs are real `renorm` processes, both started at once by a module fixture so their ~10 s
start-ups overlap; the resumed runs call `toolkit.cli.main` in-process with the same arguments (and a small
`trainer.num_steps`), which saves another interpreter start-up.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from toolkit.cli import main
from toolkit.io.checkpoint import CheckpointManager, load_checkpoint
from toolkit.io.resume import resolve_resume

ROOT = Path(__file__).resolve().parents[3]
CONFIG = ROOT / "configs" / "demo" / "tiny_grpo.yaml"
LETTERS = ROOT / "data" / "demo" / "letters.jsonl"
RENORM = Path(sys.executable).with_name("renorm")
FAST = [
    f"data.path={LETTERS}",
    "sampler.max_new_tokens=2",
    "trainer.prompts_per_step=2",
    "trainer.group_size=2",
    "trainer.num_minibatches=1",
    "trainer.progress=false",
    "trainer.log_every=1",
]
SIGTERM_RUN = ("trainer.save_every=0",)
KILL_RUN = ("trainer.save_every=1", "trainer.keep_last=2")


def train_args(run_dir: Path, *extra: str) -> list[str]:
    return ["train", str(CONFIG), *FAST, f"trainer.run_dir={run_dir}", *extra]


@dataclass
class Child:
    process: subprocess.Popen[bytes]
    run_dir: Path
    log: Path


def start(run_dir: Path, *extra: str) -> Child:
    """`renorm train` for 1000 steps in a child process; its output goes to a log file."""
    log = run_dir.parent / f"{run_dir.name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(RENORM), *train_args(run_dir, "trainer.num_steps=1000", *extra)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Child(process, run_dir, log)


@pytest.fixture(scope="module")
def children(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Child]]:
    base = tmp_path_factory.mktemp("interrupt")
    started = {"sigterm": start(base / "sigterm", *SIGTERM_RUN), "kill": start(base / "kill", *KILL_RUN)}
    import toolkit.train.runner  # noqa: F401  (this process's heavy imports for the resumes, while the children start)

    yield started
    for child in started.values():
        child.process.kill()
        child.process.wait()


def wait_until(condition: Callable[[], bool], child: Child, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if child.process.poll() is not None:
            raise AssertionError(
                f"training exited early ({child.process.returncode}):\n{child.log.read_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting:\n{child.log.read_text()[-3000:]}")
        time.sleep(0.05)


def complete_records(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def metric_steps(run_dir: Path) -> list[int]:
    """Steps of metrics.jsonl; every line must be valid JSON."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def resume(run_dir: Path, num_steps: int, *extra: str) -> str:
    """Rerun the training command in-process up to `num_steps`; returns its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(train_args(run_dir, f"trainer.num_steps={num_steps}", *extra))
    assert code == 0, out.getvalue()[-3000:]
    return out.getvalue()


@pytest.mark.integration
def test_kill_9_keeps_the_last_complete_checkpoint_and_resume_works(children: dict[str, Child]) -> None:
    child = children["kill"]
    run_dir = child.run_dir
    manager = CheckpointManager(run_dir)
    wait_until(lambda: len(manager.list()) >= 2, child)
    # Aim the kill at a checkpoint being written (a temp directory exists), else kill it anyway.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(p.name.startswith(".tmp-") for p in manager.directory.iterdir()):
        time.sleep(0.002)
    child.process.send_signal(signal.SIGKILL)
    assert child.process.wait(timeout=60) == -signal.SIGKILL

    latest = manager.latest()
    assert latest is not None and resolve_resume("auto", run_dir) == latest
    saved = load_checkpoint(latest)
    assert saved.step >= 2 and "model.embed_tokens.weight" in saved.model
    assert {"optimizer", "scheduler", "data", "generator"} <= set(saved.objects)

    resume(run_dir, saved.step + 2, *KILL_RUN)
    # Records the killed run wrote past its last checkpoint are dropped, so no step appears twice.
    assert metric_steps(run_dir) == list(range(1, saved.step + 3))
    assert [p.name for p in manager.list()] == [f"step_{saved.step + 1:08d}", f"step_{saved.step + 2:08d}"]
    assert not [p.name for p in manager.directory.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    assert load_checkpoint(manager.path_for(saved.step + 2)).step == saved.step + 2


@pytest.mark.integration
def test_sigterm_saves_exits_zero_and_the_rerun_resumes(children: dict[str, Child]) -> None:
    child = children["sigterm"]
    run_dir = child.run_dir
    wait_until(lambda: complete_records(run_dir) >= 1, child)
    child.process.send_signal(signal.SIGTERM)
    assert child.process.wait(timeout=60) == 0, child.log.read_text()[-3000:]

    steps = metric_steps(run_dir)
    reached = steps[-1]
    assert steps == list(range(1, reached + 1)) and reached < 1000
    manager = CheckpointManager(run_dir)
    assert [p.name for p in manager.list()] == [f"step_{reached:08d}"]  # save_every=0: only the interrupt save
    assert load_checkpoint(manager.path_for(reached)).step == reached
    assert f"interrupted: saved step {reached}" in " ".join(child.log.read_text().split())

    output = resume(run_dir, reached + 2, *SIGTERM_RUN)
    steps = metric_steps(run_dir)
    assert steps == list(range(1, reached + 3))  # first new record: saved step + 1
    assert [p.name for p in manager.list()] == [f"step_{reached:08d}", f"step_{reached + 2:08d}"]
    assert f"step_{reached + 2:08d}" in output
