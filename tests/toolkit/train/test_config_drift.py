"""Resume safety (issue 23 item 2): a run dir's config.yaml is the contract; a changed config on resume is an error
listing the keys, unless --allow-config-change, which applies the change (the lr included) and records it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.demo_run import DEMO, FAST, run_cli, tiny_config
from toolkit.train.config_drift import CHANGES_FILE, ConfigDriftError, config_changes, is_run_key
from toolkit.train.runner import build_trainer, fit


def saved_lr(run_dir: Path) -> float:
    return float(yaml.safe_load((run_dir / "config.yaml").read_text())["optimizer"]["lr"])


def test_config_changes_lists_differing_leaves() -> None:
    saved = {"optimizer": {"lr": 0.001, "betas": [0.9, 0.99]}, "trainer": {"num_steps": 2}, "gone": 1}
    now = {"optimizer": {"lr": 0.05, "betas": (0.9, 0.99)}, "trainer": {"num_steps": 3}, "new": {"a": 1}}
    assert config_changes(saved, now) == [
        ("gone", 1, "<missing>"),
        ("new.a", "<missing>", 1),
        ("optimizer.lr", 0.001, 0.05),
        ("trainer.num_steps", 2, 3),
    ]
    assert is_run_key("trainer.num_steps") and is_run_key("eval.data.path") and not is_run_key("optimizer.lr")


def test_resuming_with_another_lr_is_refused_then_applied_and_recorded(tmp_path: Path) -> None:
    fit(build_trainer(tiny_config(tmp_path, "trainer.num_steps=1", "optimizer.lr=0.001")))
    assert saved_lr(tmp_path) == 0.001
    changed = tiny_config(tmp_path, "trainer.num_steps=2", "optimizer.lr=0.05")
    with pytest.raises(ConfigDriftError, match=r"optimizer\.lr: 0\.001 -> 0\.05.*--allow-config-change"):
        fit(build_trainer(changed))
    assert saved_lr(tmp_path) == 0.001  # config.yaml untouched by the refused run

    trainer = build_trainer(tiny_config(tmp_path, "trainer.num_steps=2", "optimizer.lr=0.05",
                                        "trainer.allow_config_change=true"))  # fmt: skip
    fit(trainer)
    assert trainer.global_step == 2 and trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert saved_lr(tmp_path) == 0.05
    [record] = [json.loads(line) for line in (tmp_path / CHANGES_FILE).read_text().splitlines()]
    keys = {c["key"]: (c["old"], c["new"]) for c in record["changes"]}
    assert record["step"] == 1 and keys["optimizer.lr"] == (0.001, 0.05) and keys["trainer.num_steps"] == (1, 2)


def test_running_longer_is_no_drift_but_is_recorded(tmp_path: Path) -> None:
    fit(build_trainer(tiny_config(tmp_path, "trainer.num_steps=1")))
    fit(build_trainer(tiny_config(tmp_path, "trainer.num_steps=2", "trainer.progress=true")))
    [record] = [json.loads(line) for line in (tmp_path / CHANGES_FILE).read_text().splitlines()]
    assert [c["key"] for c in record["changes"]] == ["trainer.num_steps", "trainer.progress"]
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["trainer"]["num_steps"] == 2


def test_the_cli_names_the_keys_and_takes_the_flag(tmp_path: Path) -> None:
    base = ["train", DEMO, *FAST, f"trainer.run_dir={tmp_path}"]
    assert run_cli(*base, "trainer.num_steps=1")[0] == 0
    code, err = run_cli(*base, "trainer.num_steps=2", "normalizer.eps=0.001")
    assert code == 2 and "normalizer.eps: 1e-06 -> 0.001" in err and "Traceback" not in err
    code, err = run_cli(*base, "trainer.num_steps=2", "normalizer.eps=0.001", "--allow-config-change")
    assert code == 0, err
