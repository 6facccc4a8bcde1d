"""Resume safety: a run dir's `config.yaml` is the contract of what was trained.

Resuming with a config that differs from it in anything that changes the training (the lr, the normalizer, the
data ...) is an error listing the differing keys, unless `trainer.allow_config_change` (`renorm train
--allow-config-change`), which applies the new values (optimizer hyper-parameters included) and records the
change. Keys that only say how long or how visibly to run (`RUN_KEYS`) may differ; every difference, allowed or
free, is appended to `config_changes.jsonl` with the step, so `config.yaml` is never silently rewritten.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from toolkit.config import load_config

CONFIG_FILE = "config.yaml"
CHANGES_FILE = "config_changes.jsonl"
# Keys (or key prefixes) that may change between the runs of one run dir without changing what is trained.
RUN_KEYS = (
    "trainer.num_steps",
    "trainer.resume",
    "trainer.overwrite",
    "trainer.allow_config_change",
    "trainer.progress",
    "trainer.num_threads",
    "trainer.keep_last",
    "trainer.save_every",
    "trainer.log_every",
    "trainer.num_log_samples",
    "trainer.trackers",
    "trainer.tracker_project",
    "trainer.tracker_init_kwargs",
    "trainer.print_samples_every",
    "trainer.export",
    "trainer.run_dir",
    "description",
    "eval",
)

Change = tuple[str, Any, Any]  # (dotted key, value in config.yaml, value now); a missing side is MISSING
MISSING = "<missing>"


class ConfigDriftError(ValueError):
    """Resuming a run with a config that changes what is trained, without `trainer.allow_config_change`."""


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> leaf value (lists are leaves) of a nested mapping."""
    if not isinstance(config, Mapping) or (prefix and not config):
        return {prefix: config}
    out: dict[str, Any] = {}
    for key, value in config.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[Change]:
    """Every key whose value differs between two resolved configs, sorted by key."""
    old, new = flatten(saved), flatten(current)
    changes = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, MISSING), new.get(key, MISSING)
        if _plain(before) != _plain(after):
            changes.append((key, before, after))
    return changes


def is_run_key(key: str) -> bool:
    """True for keys that may change on resume (see `RUN_KEYS`)."""
    return any(key == k or key.startswith(f"{k}.") for k in RUN_KEYS)


def check_resume_config(run_dir: str | Path, current: Mapping[str, Any], allow: bool) -> list[Change]:
    """The changes against the run dir's `config.yaml` (none when it has none).

    Raises:
        ConfigDriftError: a change outside `RUN_KEYS` while `allow` is false; the message lists them all.
    """
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return []
    saved = load_config(path)
    changes = config_changes(saved, json.loads(json.dumps(current, default=str)))
    training = [c for c in changes if not is_run_key(c[0])]
    if training and not allow:
        listed = "; ".join(f"{key}: {_show(old)} -> {_show(new)}" for key, old, new in training[:12])
        more = f" (and {len(training) - 12} more)" if len(training) > 12 else ""
        raise ConfigDriftError(
            f"resuming {run_dir} with a config that differs from its {CONFIG_FILE} in what is trained: {listed}{more}. "
            "Pass --allow-config-change (trainer.allow_config_change=true) to apply and record the change, use "
            "trainer.resume=never --overwrite to start over, or give this run another trainer.run_dir"
        )
    return changes


def record_changes(run_dir: str | Path, step: int, changes: list[Change]) -> None:
    """Append `{"step", "changes": [{"key", "old", "new"}]}` to the run dir's `config_changes.jsonl` (fsynced)."""
    if not changes:
        return
    line = {"step": step, "changes": [{"key": k, "old": _plain(o), "new": _plain(n)} for k, o, n in changes]}
    path = Path(run_dir) / CHANGES_FILE
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line, default=str) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def apply_new_hyperparameters(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, fresh: list[dict[str, Any]]
) -> None:
    """After loading a checkpoint, put back the hyper-parameters the new config built (lr, betas, decay ...).

    `fresh` is each param group's settings (without `params`) taken before the checkpoint was loaded. The
    scheduler's base lrs follow, and the current lr is recomputed at the resumed step.
    """
    for group, settings in zip(optimizer.param_groups, fresh, strict=True):
        group.update(settings)
    if "initial_lr" in fresh[0]:
        scheduler.base_lrs = [settings["initial_lr"] for settings in fresh]
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is not None:
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, lambdas, strict=True):
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports


def group_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's hyper-parameters (everything but `params`), copied."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _show(value: Any) -> str:
    text = json.dumps(_plain(value), default=str)
    return text if len(text) <= 60 else text[:57] + "..."
