"""Tests for toolkit.io.logging: durable JSONL, resume truncation, trackers, progress lines and tables."""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from rich.console import Console

import toolkit.io.console as console_mod
import toolkit.io.logging as tlog
import toolkit.io.trackers as trackers
from tests.wandb_stand_in import StandInWandB
from toolkit.io.logging import (
    MetricsLogger,
    ProgressBar,
    first_last,
    get_logger,
    init_trackers,
    print_before_after,
    print_samples_table,
    read_metrics,
    read_samples,
    tracker_run_kwargs,
)
from toolkit.io.trackers import WANDB_STEP_KEY


def _plain_console() -> Console:
    return Console(file=io.StringIO(), force_terminal=False, width=200)


def test_round_trip_including_nonfinite(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, {"reward/mean": 0.1 + 0.2, "loss/kl": float("nan"), "x": float("inf"), "y": -math.inf})
        logger.log(2, {"reward/mean": np.float32(0.5), "count": 3, "flag": True, "t": torch.tensor(1.25)})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    for line in lines:  # strictly valid JSON: no NaN/Infinity tokens
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    raw = json.loads(lines[0])
    assert raw["loss/kl"] is None and raw["nonfinite"] == {"loss/kl": "nan", "x": "inf", "y": "-inf"}
    first, second = read_metrics(tmp_path)
    assert first["step"] == 1 and first["reward/mean"] == 0.1 + 0.2
    assert math.isnan(first["loss/kl"]) and first["x"] == math.inf and first["y"] == -math.inf
    assert "nonfinite" not in first
    assert second == {"step": 2, "reward/mean": 0.5, "count": 3, "flag": 1, "t": 1.25}


def test_bad_metric_values_fail_loudly(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as logger:
        with pytest.raises(TypeError, match="'name'"):
            logger.log(1, {"name": "abc"})
        with pytest.raises(ValueError, match="reserved"):
            logger.log(1, {"step": 3.0})
        with pytest.raises(TypeError, match="'vec'"):
            logger.log(1, {"vec": torch.ones(3)})


def test_samples_round_trip(tmp_path: Path) -> None:
    rows = [{"prompt": "p\u2028q", "completion": "c", "reward": float("nan")}, {"prompt": "p2", "reward": 1.0}]
    with MetricsLogger(tmp_path) as logger:
        logger.log_samples(4, rows)
    back = read_samples(tmp_path)
    assert [r["step"] for r in back] == [4, 4]
    assert back[0]["prompt"] == "p\u2028q" and math.isnan(back[0]["reward"])
    assert back[1] == {"step": 4, "prompt": "p2", "reward": 1.0}


def test_truncated_final_line_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, {"a": 1.0})
        logger.log(2, {"a": 2.0})
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 3, "a": 3.')  # crash mid-write
    with caplog.at_level(logging.WARNING):
        records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert "truncated final line 3" in caplog.text


def test_corrupt_middle_line_raises(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": \n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(tmp_path)


def test_append_after_crash_repairs_torn_tail(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a"')
    with MetricsLogger(tmp_path) as logger:
        logger.log(2, {"a": 2.5})
    assert [(r["step"], r["a"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.5)]


def _write_run(run_dir: Path, steps: range, resume_step: int | None = None) -> None:
    with MetricsLogger(run_dir, resume_step=resume_step) as logger:
        for step in steps:
            logger.log(step, {"reward/mean": step / 10, "loss/kl": float("nan") if step == 2 else step * 1e-3})
            logger.log_samples(step, [{"prompt": f"p{step}", "completion": "c" * step, "reward": step / 10}])


def test_resume_truncates_both_files_to_uninterrupted_run(tmp_path: Path) -> None:
    _write_run(tmp_path / "full", range(1, 7))
    crashed = tmp_path / "crashed"
    _write_run(crashed, range(1, 6))  # checkpoint at step 3, crash after step 5 with a torn line
    with open(crashed / "samples.jsonl", "ab") as f:
        f.write(b'{"step": 6, "prompt": "p')
    _write_run(crashed, range(4, 7), resume_step=3)
    for name in ("metrics.jsonl", "samples.jsonl"):
        assert (crashed / name).read_bytes() == (tmp_path / "full" / name).read_bytes()
    assert not list(crashed.glob("*.tmp"))


def test_resume_keeps_only_steps_up_to_resume_step(tmp_path: Path) -> None:
    _write_run(tmp_path, range(1, 6))
    MetricsLogger(tmp_path, resume_step=2).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert [r["step"] for r in read_samples(tmp_path)] == [1, 2]


def test_non_main_process_writes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir, is_main_process=False) as logger:
        logger.log(1, {"a": 1.0})
        logger.log_samples(1, [{"prompt": "p"}])
    assert not run_dir.exists()
    accelerator = SimpleNamespace(is_main_process=False, trackers=[])
    with MetricsLogger(run_dir, accelerator=accelerator) as logger:
        logger.log(1, {"a": 1.0})
    assert not run_dir.exists()


def test_non_main_process_does_not_truncate_on_resume(tmp_path: Path) -> None:
    _write_run(tmp_path, range(1, 4))
    before = (tmp_path / "metrics.jsonl").read_bytes()
    MetricsLogger(tmp_path, resume_step=1, is_main_process=False).close()
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


def test_log_after_close_raises(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path)
    logger.close()
    with pytest.raises(RuntimeError, match="closed"):
        logger.log(1, {"a": 1.0})


def test_forwards_to_real_accelerate_tracker(tmp_path: Path) -> None:
    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker

    class RecordingTracker(GeneralTracker):
        name = "recording"
        requires_logging_directory = False

        def __init__(self) -> None:
            super().__init__()
            self.calls: list[tuple[dict[str, Any], int | None]] = []

        @property
        def tracker(self) -> list[tuple[dict[str, Any], int | None]]:
            return self.calls

        def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
            self.calls.append((values, step))

    recorder = RecordingTracker()
    accelerator = Accelerator(log_with=[recorder], cpu=True)
    accelerator.init_trackers("test")
    with MetricsLogger(tmp_path, accelerator=accelerator) as logger:
        logger.log(7, {"reward/mean": np.float64(0.25), "n": 2})
    assert recorder.calls == [({"reward/mean": 0.25, "n": 2}, 7)]


def test_init_trackers_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"unknown tracker 'tensorbored'.*allowed: \[.*'tensorboard'"):
        init_trackers(SimpleNamespace(log_with=[]), ["tensorbored"], "p")


def test_init_trackers_missing_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(trackers, "_has_module", lambda module: False)
    with pytest.raises(ImportError, match=r"tracker 'wandb' needs the 'wandb' package.*pip install wandb"):
        init_trackers(SimpleNamespace(log_with=[]), ["wandb"], "p")
    with pytest.raises(ImportError, match="'tensorboard'"):
        MetricsLogger(tmp_path / "run", trackers=["tensorboard"], accelerator=SimpleNamespace(trackers=[], log_with=[]))
    assert not (tmp_path / "run").exists()


def test_init_trackers_passes_flat_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trackers, "_has_module", lambda module: True)
    calls: list[tuple[str, Any, Any]] = []
    accelerator = SimpleNamespace(
        log_with=["wandb"],
        init_trackers=lambda project, config, init_kwargs: calls.append((project, config, init_kwargs)),
    )
    init_trackers(accelerator, ["wandb"], "proj", {"optim": {"lr": 1e-5, "betas": (0.9, 0.99)}, "name": None})
    assert calls == [("proj", {"optim.lr": 1e-5, "optim.betas": "[0.9, 0.99]", "name": None}, {})]


def _accelerator_with(trackers: list[str]) -> Any:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    accelerator.log_with = list(trackers)  # what Accelerator(log_with=...) keeps when the packages are installed
    return accelerator


def test_tracker_init_kwargs_reach_accelerate_and_resume_keeps_the_wandb_id(
    tmp_path: Path, fake_wandb: type[StandInWandB]
) -> None:
    kwargs = {"wandb": {"entity": "team", "name": "run-1", "tags": ["grpo", "tiny"]}}
    run_dir = tmp_path / "my-run"
    with MetricsLogger(run_dir, ["wandb"], _accelerator_with(["wandb"]), {"a": {"b": 1}}, init_kwargs=kwargs):
        pass
    with MetricsLogger(run_dir, ["wandb"], _accelerator_with(["wandb"]), resumed=True, init_kwargs=kwargs):
        pass
    with MetricsLogger(tmp_path / "other", ["wandb"], _accelerator_with(["wandb"]), project="proj"):
        pass
    first, resumed, other = fake_wandb.built
    assert first.run_name == "my-run" and other.run_name == "proj" and first.config == {"a.b": 1}
    run_id = first.init_kwargs.pop("id")
    assert first.init_kwargs == kwargs["wandb"] and kwargs["wandb"].keys() == {"entity", "name", "tags"}  # untouched
    assert resumed.init_kwargs == {**kwargs["wandb"], "id": run_id, "resume": "allow"}
    assert other.init_kwargs["id"] != run_id and "resume" not in other.init_kwargs
    assert json.loads((run_dir / tlog.TRACKERS_FILE).read_text()) == {"wandb": {"id": run_id}}
    assert all(tracker.finished for tracker in fake_wandb.built)


def test_tracker_run_kwargs_fresh_resumed_explicit_and_other_trackers(tmp_path: Path) -> None:
    tensorboard = {"tensorboard": {"flush_secs": 5}}
    assert tracker_run_kwargs(tmp_path, ["tensorboard"], tensorboard) == tensorboard
    assert not (tmp_path / tlog.TRACKERS_FILE).exists()  # nothing to keep without W&B
    first = tracker_run_kwargs(tmp_path, ["wandb", "tensorboard"], tensorboard)["wandb"]["id"]
    again = tracker_run_kwargs(tmp_path, ["wandb"], resumed=True)
    assert again == {"wandb": {"id": first, "resume": "allow"}}
    fresh = tracker_run_kwargs(tmp_path, ["wandb"])["wandb"]["id"]  # a fresh run in the same dir: a new W&B run
    assert fresh != first and tracker_run_kwargs(tmp_path, ["wandb"], resumed=True)["wandb"]["id"] == fresh
    explicit = tracker_run_kwargs(tmp_path, ["wandb"], {"wandb": {"id": "mine", "resume": "must"}}, resumed=True)
    assert explicit == {"wandb": {"id": "mine", "resume": "must"}}
    assert json.loads((tmp_path / tlog.TRACKERS_FILE).read_text()) == {"wandb": {"id": "mine"}}
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically
    (tmp_path / tlog.TRACKERS_FILE).write_text("{torn")
    with pytest.raises(ValueError, match="trackers.json is not valid JSON.*delete it"):
        tracker_run_kwargs(tmp_path, ["wandb"], resumed=True)


def test_tracker_init_kwargs_are_validated(tmp_path: Path) -> None:
    from toolkit.train.trainer_config import TrainerConfig

    with pytest.raises(ValueError, match=r"unknown tracker 'wandbb'; allowed: \[.*'wandb'"):
        TrainerConfig(tracker_init_kwargs={"wandbb": {"entity": "team"}})
    with pytest.raises(ValueError, match="wandb.project: set trainer.tracker_project instead"):
        TrainerConfig(tracker_init_kwargs={"wandb": {"project": "p"}})
    with pytest.raises(ValueError, match="must be a mapping"):
        MetricsLogger(tmp_path / "run", init_kwargs={"wandb": ["entity"]})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="tracker_project must be a non-empty name"):
        TrainerConfig(tracker_project=" ")
    assert not (tmp_path / "run").exists()


def test_samples_go_to_wandb_as_a_table_and_not_to_other_trackers(
    tmp_path: Path, fake_wandb: type[StandInWandB]
) -> None:
    other = SimpleNamespace(name="tensorboard", logged=[], finish=lambda: None)
    other.log = lambda values, step=None: other.logged.append((step, values))
    accelerator = _accelerator_with(["wandb"])
    rows = [{"prompt": "p", "completion": "c", "reward": 1.0, "group": 3}, {"prompt": "q", "advantage": -0.5}]
    with MetricsLogger(tmp_path, ["wandb"], accelerator) as logger:
        accelerator.trackers.append(other)
        logger.log_samples(5, rows)
    [tracker] = fake_wandb.built
    [(step, values)] = tracker.logged
    assert step is None and values[WANDB_STEP_KEY] == 5 and set(values) == {"samples", WANDB_STEP_KEY}
    assert other.logged == []
    assert values["samples"].columns == ["prompt", "completion", "reward", "group", "advantage"]
    assert values["samples"].data == [["p", "c", 1.0, 3, None], ["q", None, None, None, -0.5]]
    assert [r["prompt"] for r in read_samples(tmp_path)] == ["p", "q"]


def test_a_resumed_run_loses_no_wandb_steps(tmp_path: Path, fake_wandb: type[StandInWandB]) -> None:
    """W&B drops `step=` values below its highest step: resumed from step 2 after logging 4, the trainer steps 3
    and 4 would vanish. Logged against `train/step` instead, every step arrives, and the last value per step is
    the continued run's (what metrics.jsonl holds)."""
    other = SimpleNamespace(name="tensorboard", logged=[], finish=lambda: None)
    other.log = lambda values, step=None: other.logged.append((step, values))
    with MetricsLogger(tmp_path, ["wandb"], _accelerator_with(["wandb"])) as logger:
        for step in range(1, 5):
            logger.log(step, {"loss": float(step)})
    accelerator = _accelerator_with(["wandb"])
    with MetricsLogger(tmp_path, ["wandb"], accelerator, resume_step=2, resumed=True) as logger:
        accelerator.trackers.append(other)
        for step in range(3, 6):
            logger.log(step, {"loss": 10.0 * step})
    first, resumed = fake_wandb.built
    assert first.dropped == [] and resumed.dropped == []
    assert resumed.step_metrics == [(WANDB_STEP_KEY, {}), ("*", {"step_metric": WANDB_STEP_KEY})]
    [server] = fake_wandb.server.values()
    last = {row[WANDB_STEP_KEY]: row["loss"] for row in server["history"]}
    assert [row[WANDB_STEP_KEY] for row in server["history"]] == [1, 2, 3, 4, 3, 4, 5]
    assert last == {row["step"]: row["loss"] for row in read_metrics(tmp_path)} == {1: 1, 2: 2, 3: 30, 4: 40, 5: 50}
    assert other.logged == [(3, {"loss": 30.0}), (4, {"loss": 40.0}), (5, {"loss": 50.0})]  # step= as before


def test_trackers_without_accelerator_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="need an accelerator"):
        MetricsLogger(tmp_path, trackers=["tensorboard"])


def test_progress_plain_lines_to_captured_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    with ProgressBar(total=10, initial=2, console=Console()) as bar:
        assert bar.plain
        bar.update(3, {"reward/mean": 0.42, "policy/approx_kl": 0.001, "rollout/length_mean": 12.3, "time/step_s": 2.1})
        bar.update(4, {"reward/mean": 0.5, "loss/kl": 0.002, "policy/approx_kl": 9.0})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("step 3/10 reward=0.42 kl=0.001 len=12.3 2.1s/step eta ")
    assert lines[1].startswith("step 4/10 reward=0.5 kl=0.002 eta")  # loss/kl preferred over approx_kl


def test_progress_hides_kl_while_it_has_been_zero() -> None:
    console = _plain_console()
    with ProgressBar(total=5, console=console) as bar:
        bar.update(1, {"reward/mean": 0.1, "loss/kl": 0.0})  # no KL term: loss/kl = 0 every step
        bar.update(2, {"reward/mean": 0.2, "loss/kl": 0.0, "policy/approx_kl": 0.003})
        bar.update(3, {"reward/mean": 0.3, "loss/kl": 0.01})
        bar.update(4, {"reward/mean": 0.4, "loss/kl": 0.0})  # nonzero before: a zero now is shown
        bar.update(5, {"reward/mean": 0.5, "loss/kl": math.nan})
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert lines[0].startswith("step 1/5 reward=0.1 eta")
    assert lines[1].startswith("step 2/5 reward=0.2 kl=0.003 eta")  # the first nonzero KL key
    assert lines[2].startswith("step 3/5 reward=0.3 kl=0.01 eta")
    assert lines[3].startswith("step 4/5 reward=0.4 kl=0 eta")
    assert lines[4] == "step 5/5 reward=0.5 kl=nan"
    assert tlog.format_progress_fields({"loss/kl": 0.0, "rollout/length_mean": 3.0}) == "len=3"
    assert tlog.format_progress_fields({"loss/kl": 0.0}, seen_nonzero={"loss/kl"}) == "kl=0"


def test_progress_print_every_and_last_step() -> None:
    console = _plain_console()
    with ProgressBar(total=5, console=console, print_every=2) as bar:
        for step in range(1, 6):
            bar.update(step, {"reward/mean": step})
    out = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert [line.split()[1] for line in out] == ["2/5", "4/5", "5/5"]
    assert "eta" not in out[-1]


def test_progress_disabled_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with ProgressBar(total=3, enabled=False, console=Console()) as bar:
        bar.update(1, {"reward/mean": 1.0})
    assert capsys.readouterr().out == ""


def test_progress_rich_terminal_mode() -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=160)
    with ProgressBar(total=4, console=console) as bar:
        assert not bar.plain
        bar.update(2, {"reward/mean": 0.75, "time/step_s": 1.5})
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "2/4" in text and "reward=0.75" in text and "1.5s/step" in text


def test_print_before_after_shows_ratio() -> None:
    console = _plain_console()
    print_before_after({"reward/mean": 0.25, "loss/kl": 0.0}, {"reward/mean": 0.5, "loss/kl": 0.1}, console=console)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    for column in ("metric", "first", "last", "ratio"):
        assert column in text
    reward_row = next(line for line in text.splitlines() if "reward/mean" in line)
    assert "0.25" in reward_row and "0.5" in reward_row and "2.000" in reward_row
    kl_row = next(line for line in text.splitlines() if "loss/kl" in line)
    assert "n/a" in kl_row


def test_first_last_skips_nonfinite() -> None:
    records = [{"step": 1, "a": math.nan}, {"step": 2, "a": 1.0, "b": 3.0}, {"step": 3, "a": 4.0, "b": math.inf}]
    assert first_last(records) == ({"a": 1.0, "b": 3.0}, {"a": 4.0, "b": 3.0})


def test_print_samples_table_truncates() -> None:
    console = _plain_console()
    rows = [{"prompt": "hello", "completion": "x" * 500, "reward": 0.123456}] * 6
    print_samples_table(rows, max_rows=2, max_chars=40, console=console)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "completion" in text and "0.1235" in text and "…" in text
    assert "x" * 41 not in text and text.count("hello") == 2


def test_get_logger_configures_root_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.logging import RichHandler

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    console_mod._configure_root_logging.cache_clear()
    try:
        first, second = get_logger("toolkit.test_a"), get_logger("toolkit.test_b")
        assert first.name == "toolkit.test_a" and second.getEffectiveLevel() == logging.INFO
        assert sum(isinstance(h, RichHandler) for h in root.handlers) == 1
    finally:
        console_mod._configure_root_logging.cache_clear()
