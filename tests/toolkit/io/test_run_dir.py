"""Run-dir ownership: one trainer per run dir, stale locks of killed trainers ignored, resume=never that
loses nothing, one-line errors for unusable run dirs and full disks (issue 24)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.demo_run import DEMO, FAST, ROOT, run_cli, tiny_config
from toolkit.io import logging as run_logging
from toolkit.io.checkpoint import CheckpointManager
from toolkit.io.run_dir import LOCK_FILE, RunDirError, RunDirLock
from toolkit.train.runner import build_trainer, fit

# ---------------------------------------------------------------------------------------------- run-dir ownership


def test_a_second_trainer_on_the_same_run_dir_is_refused(tmp_path: Path) -> None:
    trainer = build_trainer(tiny_config(tmp_path, "trainer.num_steps=1"))
    with RunDirLock(tmp_path), pytest.raises(RunDirError, match=rf"in use by another trainer .*\"pid\": {os.getpid()}"):
        fit(trainer)
    fit(build_trainer(tiny_config(tmp_path, "trainer.num_steps=1")))  # released: the run goes ahead
    assert (tmp_path / LOCK_FILE).exists() and CheckpointManager(tmp_path).latest() is not None


def test_a_stale_lock_of_a_killed_trainer_does_not_block(tmp_path: Path) -> None:
    code = f"from toolkit.io.run_dir import RunDirLock; import os; RunDirLock({str(tmp_path)!r}).acquire(); os._exit(9)"
    child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.returncode == 9 and (tmp_path / LOCK_FILE).read_text()  # the file stays, naming the dead holder
    with RunDirLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()


def test_unusable_run_dirs_give_one_line_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, err = run_cli("train", DEMO, *FAST, f"trainer.run_dir={blocker}", "trainer.num_steps=1")
    assert code == 2 and "not a directory" in err and str(blocker) in err and "Traceback" not in err
    code, err = run_cli("train", DEMO, *FAST, f"trainer.run_dir={blocker / 'sub'}", "trainer.num_steps=1")
    assert code == 2 and "cannot create run dir" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_full_disk_while_logging_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logger = run_logging.MetricsLogger(tmp_path)
    logger.log(1, {"a": 1.0})

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_logging.os, "fsync", full)
    with pytest.raises(RunDirError, match=r"cannot append to .*metrics\.jsonl: No space left on device \(the disk"):
        logger.log(2, {"a": 2.0})
    monkeypatch.undo()
    logger.close()


def test_teacher_training_takes_the_lock_and_refuses_resume_never(tmp_path: Path) -> None:
    from modalities.diffusion_lm.teacher import train_teacher
    from modalities.diffusion_lm.text_data import TokenDataset
    from modalities.diffusion_lm.tiny import build_tiny_teacher

    def teach(steps: int, **kwargs: object) -> object:
        model = build_tiny_teacher(74, seed=1, hidden_size=32, num_blocks=1, num_heads=2, cond_dim=8, max_length=16)
        data = TokenDataset(seq_len=16, seed=2)
        return train_teacher(model, data, steps, batch_size=4, warmup_steps=1, progress=False, run_dir=tmp_path / "t",
                             **kwargs)  # type: ignore[arg-type]  # fmt: skip

    teach(1)
    with RunDirLock(tmp_path / "t"), pytest.raises(RunDirError, match="in use by another trainer"):
        teach(2)
    with pytest.raises(RunDirError, match="resume=never"):
        teach(1, resume="never")
    teach(1, resume="never", overwrite=True)
    [old] = tmp_path.glob("t.old-*")
    assert (old / "checkpoints" / "step_00000001").is_dir() and (tmp_path / "t" / "checkpoints").is_dir()
