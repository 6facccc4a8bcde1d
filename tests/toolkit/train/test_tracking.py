"""Tracking (issue 23 item 4): tracker settings reach accelerate, a resumed run continues its W&B run, and the
logged sample rows span groups, are reproducible and leave training untouched.

W&B is not installed here: accelerate builds the stand-in of tests/wandb_stand_in.py for the "wandb" tracker.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.demo_run import tiny_config
from tests.wandb_stand_in import StandInWandB
from toolkit.io.logging import TRACKERS_FILE, read_samples
from toolkit.io.redaction import REDACTED
from toolkit.io.trackers import WANDB_STEP_KEY
from toolkit.rollout import Rollout
from toolkit.train.runner import build_trainer, fit, sample_rows

SECRET = "sk-tracking-test-0123456789"
SETTINGS = [
    "trainer.trackers=[wandb]",
    "+trainer.tracker_project=renorm-tests",
    "+trainer.tracker_init_kwargs.wandb.entity=team",
    "+trainer.tracker_init_kwargs.wandb.name=tiny-grpo",
    "+trainer.tracker_init_kwargs.wandb.tags=[grpo, tiny]",
    f"+trainer.tracker_init_kwargs.wandb.settings.api_key={SECRET}",
]


def test_tracker_settings_reach_wandb_and_a_resume_continues_its_run(
    tmp_path: Path, fake_wandb: type[StandInWandB]
) -> None:
    run_dir, other_dir = tmp_path / "run", tmp_path / "other-run"
    fit(build_trainer(tiny_config(run_dir, "trainer.num_steps=1", *SETTINGS)))
    fit(build_trainer(tiny_config(run_dir, "trainer.num_steps=2", *SETTINGS)))  # resumes from step 1
    fit(build_trainer(tiny_config(other_dir, "trainer.num_steps=1", "trainer.trackers=[wandb]")))
    first, resumed, other = fake_wandb.built
    run_id = first.init_kwargs.pop("id")
    expected = {"entity": "team", "name": "tiny-grpo", "tags": ["grpo", "tiny"], "settings": {"api_key": SECRET}}
    assert first.run_name == resumed.run_name == "renorm-tests" and first.init_kwargs == expected
    assert resumed.init_kwargs == {**expected, "id": run_id, "resume": "allow"}
    assert json.loads((run_dir / TRACKERS_FILE).read_text()) == {"wandb": {"id": run_id}}
    assert other.run_name == "other-run" and other.init_kwargs["id"] != run_id and "resume" not in other.init_kwargs
    # The secret reaches W&B's init (it needs it) but neither the tracked config nor config.yaml.
    assert first.config["trainer.tracker_init_kwargs.wandb.settings.api_key"] == REDACTED
    assert SECRET not in json.dumps(first.config) and SECRET not in (run_dir / "config.yaml").read_text()
    logged = [values for _, values in first.logged + resumed.logged]
    assert [values[WANDB_STEP_KEY] for values in logged if "reward/mean" in values] == [1, 2]
    tables = [(values[WANDB_STEP_KEY], values["samples"]) for values in logged if "samples" in values]
    assert [step for step, _ in tables] == [1, 2]
    for step, table in tables:
        assert table.columns[:5] == ["prompt", "completion", "reward", "advantage", "group"]
        rows = [r for r in read_samples(run_dir) if r["step"] == step]
        assert [[r.get(c) for c in table.columns] for r in rows] == table.data


def grouped_rollout(num_groups: int, group_size: int) -> Rollout:
    n = num_groups * group_size
    return Rollout(
        group_ids=torch.arange(n) // group_size,
        old_logprobs=torch.zeros(n, 3),
        mask=torch.ones(n, 3, dtype=torch.bool),
        scores=torch.arange(n, dtype=torch.float32),
        advantages=torch.linspace(-1, 1, n),
        prompts=[{"prompt": f"prompt {i // group_size}", "target": "x"} for i in range(n)],
        completions=[f"completion {i}" for i in range(n)],
    )


def test_sample_rows_span_groups_reproducibly_without_touching_the_rngs() -> None:
    rollout = grouped_rollout(num_groups=6, group_size=4)
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    rows = sample_rows(rollout, 4, seed=7)
    assert torch.equal(states[0], torch.get_rng_state()) and states[1] == random.getstate()
    assert np.array_equal(states[2], np.random.get_state()[1])
    assert len(rows) == 4 and len({r["group"] for r in rows}) == 4  # one row from each of 4 groups
    for row in rows:
        index = int(row["completion"].split()[1])
        assert row["prompt"] == f"prompt {row['group']}" and index // 4 == row["group"]
        assert row["reward"] == index and row["advantage"] == pytest.approx(float(rollout.advantages[index]))
    assert sample_rows(rollout, 4, seed=7) == rows
    picks = {tuple(r["completion"] for r in sample_rows(rollout, 4, seed=seed)) for seed in range(10)}
    assert len(picks) > 1  # not always the first rows
    more = sample_rows(rollout, 9, seed=1)  # more rows than groups: every group, then second rows
    assert len({r["completion"] for r in more}) == 9 and len({r["group"] for r in more}) == 6
    assert len(sample_rows(rollout, 100, seed=1)) == 24 and sample_rows(rollout, 0) == []


def weights(run_dir: Path, *overrides: str) -> dict[str, torch.Tensor]:
    trainer = build_trainer(tiny_config(run_dir, "trainer.num_steps=2", *overrides))
    fit(trainer)
    return {k: v.detach().clone() for k, v in trainer.policy.module.state_dict().items()}


def test_logging_and_printing_samples_leave_training_unchanged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    quiet = weights(tmp_path / "quiet", "trainer.num_log_samples=0")
    assert not (tmp_path / "quiet" / "samples.jsonl").exists()
    assert "samples at step" not in capsys.readouterr().out
    loud = weights(tmp_path / "loud", "trainer.num_log_samples=3", "+trainer.print_samples_every=1")
    printed = capsys.readouterr().out
    assert "samples at step 1" in printed and "samples at step 2" in printed and "completion" in printed
    assert quiet.keys() == loud.keys() and all(torch.equal(quiet[k], loud[k]) for k in quiet)
    rows = read_samples(tmp_path / "loud")
    for step in (1, 2):
        assert len({r["group"] for r in rows if r["step"] == step}) == 3  # 3 rows from 3 of the 4 groups
    weights(tmp_path / "again", "trainer.num_log_samples=3")
    assert read_samples(tmp_path / "again") == rows  # a rerun logs the same rows


def test_print_samples_every_needs_sampled_rows() -> None:
    from toolkit.train.trainer_config import TrainerConfig

    with pytest.raises(ValueError, match="print_samples_every=2 prints.*num_log_samples=0"):
        TrainerConfig(print_samples_every=2, num_log_samples=0)
    with pytest.raises(ValueError, match="print_samples_every must be >= 0"):
        TrainerConfig(print_samples_every=-1)
