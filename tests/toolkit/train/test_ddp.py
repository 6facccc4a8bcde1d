"""Two CPU ranks (gloo) through `accelerate launch`: one metrics writer, one checkpoint, identical weights, resume.

The launched script (tests/data/cli/ddp_train_check.py) runs `renorm train` in-process on each rank, then
the same command with a higher `trainer.num_steps` (a resume), and all-gathers each rank's parameters.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
CONFIG = ROOT / "configs" / "demo" / "tiny_grpo.yaml"
LETTERS = ROOT / "data" / "demo" / "letters.jsonl"
SCRIPT = ROOT / "tests" / "data" / "cli" / "ddp_train_check.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.integration
def test_two_cpu_ranks_train_resume_and_agree(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    command = [
        str(ACCELERATE),
        "launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / "cpu_ddp.yaml"),
        "--main_process_port",
        str(free_port()),
        str(SCRIPT),
        "3",  # then resume to step 3
        "train",
        str(CONFIG),
        "trainer.num_steps=2",
        f"trainer.run_dir={run_dir}",
        f"data.path={LETTERS}",
        "sampler.max_new_tokens=2",
        "trainer.prompts_per_step=4",  # 2 prompts per rank
        "trainer.group_size=2",
        "trainer.num_minibatches=1",
        "trainer.progress=false",
        # An entropy bonus gives every rank a non-zero, rank-specific gradient even when all rewards are 0,
        # so identical final weights really mean the gradients were averaged across ranks.
        "objective.entropy_coef=0.01",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]

    reports = sorted(
        (json.loads(line.split("DDP_CHECK ", 1)[1]) for line in done.stdout.splitlines() if "DDP_CHECK " in line),
        key=lambda r: r["rank"],
    )
    assert [r["rank"] for r in reports] == [0, 1], output[-4000:]
    for report in reports:
        assert report["world_size"] == 2 and report["step"] == 3
        assert report["max_abs_diff_between_ranks"] == 0.0
        assert report["moved"] > 0.0
    assert reports[0]["checkpoint_max_abs_diff"] == 0.0

    # One writer: 2 records from the first run + 1 from the resume, never one per rank.
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step_00000002", "step_00000003"]
    assert all((run_dir / "checkpoints" / name / "COMPLETE").is_file() for name in checkpoints)
    assert output.count("resumed from") == 2  # both ranks resumed from step 2
