"""Evaluation during training and best-checkpoint selection (`trainer.eval_every`, `eval_metric`, `eval_mode`).

Every `eval_every` steps the config's `eval.evaluator` hook is called on the live policy exactly as `renorm eval`
calls it (policy=, sampler=, rewards=, data=, checkpoint=None, output=None); its report must have `metrics()`
(name → float). The training RNG state (torch, numpy, python, the trainer's generator) is saved before the hook
and restored after it, so evaluating never changes what training does and a resumed run stays exact. The hook
runs on every rank (it must be deterministic, as the shipped ones are), so every rank takes the same
best-checkpoint decision. The best checkpoint lives in `run_dir/best/checkpoints/` (written atomically, only one
kept) with `run_dir/best/best.json` = {metric, mode, value, step, checkpoint}; a resumed run reads it back, a
fresh run in the same directory first moves an earlier run's `best/` to `best.previous/`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

from toolkit.interfaces import MetricsReport
from toolkit.io.atomic import write_json_atomic
from toolkit.io.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from toolkit.train import sharding

BEST_DIR = "best"
BEST_FILE = "best.json"
STALE_BEST_DIR = "best.previous"
log = logging.getLogger(__name__)


def set_aside_stale_best(run_dir: str | Path) -> Path | None:
    """A fresh (not resumed) run must not inherit an earlier run's best: move `best/` to `best.previous/`.

    Nothing is deleted except an older `best.previous/`; returns the new location, or None when there was none.
    """
    best = Path(run_dir) / BEST_DIR
    if not best.exists():
        return None
    previous = Path(run_dir) / STALE_BEST_DIR
    if previous.exists():
        shutil.rmtree(previous)
    best.rename(previous)
    log.warning("a fresh run in %s: moved the earlier run's best checkpoint to %s", run_dir, previous)
    return previous


def evaluate_during_training(trainer: Any) -> dict[str, float]:
    """Run `trainer.evaluator` on the current policy; returns its metrics (RNG and train/eval mode restored)."""
    if trainer.evaluator is None:
        raise ValueError("trainer.eval_every > 0 needs an `eval.evaluator` hook in the config")
    module = trainer.policy.module
    was_training = module.training
    rng, generator = capture_rng_state(), trainer.generator.get_state()
    module.eval()
    try:
        with sharding.gathered_weights(trainer.accelerator, module):  # FSDP/ZeRO-3: one gather, not one per token
            report = trainer.evaluator(
                policy=trainer.policy,
                sampler=trainer.sampler,
                rewards=trainer.rewards,
                data=trainer.eval_data,
                checkpoint=None,
                output=None,
            )
    finally:
        module.train(was_training)
        restore_rng_state(rng)
        trainer.generator.set_state(generator)
    if not isinstance(report, MetricsReport):
        raise TypeError(
            f"{type(report).__name__} has no metrics(): trainer.eval_every needs an evaluator whose report returns "
            "{name: float} from metrics()"
        )
    return {str(k): float(v) for k, v in report.metrics().items()}


class BestCheckpoint:
    """Tracks the best `metric` (`mode` "min" or "max") and keeps its checkpoint under `run_dir/best/`."""

    def __init__(self, run_dir: str | Path, metric: str, mode: str = "max") -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.directory = Path(run_dir) / BEST_DIR
        self.metric, self.mode = metric, mode
        self.manager = CheckpointManager(self.directory, keep_last=1)
        self.value: float | None = None
        record = self.read(run_dir)
        if record is not None and record.get("metric") == metric and record.get("mode") == mode:
            self.value = float(record["value"])

    @staticmethod
    def read(run_dir: str | Path) -> dict[str, Any] | None:
        """The run's best.json, or None."""
        path = Path(run_dir) / BEST_DIR / BEST_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def value_of(self, metrics: dict[str, float]) -> float:
        if self.metric not in metrics:
            raise KeyError(
                f"trainer.eval_metric={self.metric!r} is not among the evaluator's metrics {sorted(metrics)}"
            )
        return metrics[self.metric]

    def improves(self, value: float) -> bool:
        """Whether `value` beats the best so far (NaN never does)."""
        if math.isnan(value):
            return False
        if self.value is None:
            return True
        return value < self.value if self.mode == "min" else value > self.value

    def update(self, trainer: Any, metrics: dict[str, float]) -> bool:
        """Save a best checkpoint when the metric improved (every rank takes part: FSDP shards are written by all,
        the rest by the main process, which records it); True if saved."""
        value = self.value_of(metrics)
        if not self.improves(value):
            return False
        path = trainer.save(self.manager)
        if trainer.accelerator.is_main_process:
            record = {"metric": self.metric, "mode": self.mode, "value": value, "step": trainer.global_step}
            record["checkpoint"] = str(path)
            write_json_atomic(self.directory / BEST_FILE, record)
        trainer.accelerator.wait_for_everyone()
        self.value = value
        return True
