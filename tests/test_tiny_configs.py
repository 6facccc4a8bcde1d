"""Every CPU config under configs/ (tiny*.yaml, *_tiny.yaml) trains, checkpoints and resumes, and two identical
runs are bitwise identical: one parametrized test instead of a hand-written one per modality.

Only sizes are shrunk, by overrides: fewer steps and prompts, no warm start, no eval during training.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from toolkit.config import load_config
from toolkit.io.checkpoint import CheckpointManager, load_checkpoint
from toolkit.io.logging import read_metrics
from toolkit.train.runner import build_trainer, fit

ROOT = Path(__file__).resolve().parents[1]


def is_tiny(path: Path) -> bool:
    """A CPU config shipped with its own tiny models and data (tiny*.yaml, *_tiny.yaml)."""
    return path.stem.startswith("tiny") or path.stem.endswith("_tiny")


CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if is_tiny(p))
COMMON = [
    "trainer.num_steps=2",
    "trainer.save_every=1",
    "trainer.progress=false",
    "trainer.eval_every=0",
    "trainer.eval_metric=null",
    "trainer.num_log_samples=1",
    "trainer.num_threads=1",
]
# Per config: what makes one step take seconds (the text agent's full supervised warm start takes minutes; 30
# steps of it are enough for rewards that differ within a group).
AGENT = ["policy.model.warm_start_steps=30", "policy.model.copy_steps=0", "trainer.prompts_per_step=4"]
FAST: dict[str, list[str]] = {
    "demo/tiny_grpo.yaml": ["trainer.prompts_per_step=4", "trainer.group_size=4", "sampler.max_new_tokens=4"],
    "text_agent/tiny.yaml": AGENT,
    "text_agent/tiny_ppr.yaml": AGENT,
    "text_reasoning/tiny.yaml": ["trainer.prompts_per_step=2", "trainer.group_size=4"],
}


def test_every_tiny_config_is_covered() -> None:
    names = {str(p.relative_to(ROOT / "configs")) for p in CONFIGS}
    assert len(names) >= 8, names
    for modality in ("demo", "text_agent", "text_reasoning", "diffusion_lm", "text_to_image", "medical_video"):
        assert any(n.startswith(f"{modality}/") for n in names), modality


def config_for(path: Path, run_dir: Path, *extra: str) -> dict[str, Any]:
    name = str(path.relative_to(ROOT / "configs"))
    return load_config(path, [*COMMON, *FAST.get(name, []), f"trainer.run_dir={run_dir}", *extra])


def weights(trainer: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.policy.module.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_tiny_config_trains_checkpoints_resumes_and_reproduces(tmp_path: Path, path: Path) -> None:
    first = build_trainer(config_for(path, tmp_path / "a"))
    initial = weights(first)
    fit(first)
    trained = weights(first)
    assert any(not torch.equal(initial[k], trained[k]) for k in initial), "two steps moved no weight"
    records = read_metrics(tmp_path / "a")
    assert [r["step"] for r in records] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss/policy"])) for r in records if "loss/policy" in r)
    manager = CheckpointManager(tmp_path / "a")
    assert [p.name for p in manager.list()] == ["step_00000001", "step_00000002"]
    assert load_checkpoint(manager.path_for(2)).step == 2

    # The same config again, after other code has drawn from every global RNG: bitwise the same weights.
    random.random(), torch.rand(7)
    second = build_trainer(config_for(path, tmp_path / "b"))
    fit(second)
    again = weights(second)
    assert all(torch.equal(trained[k], again[k]) for k in trained), "two identical runs differ"

    # Resume the first run from its step-1 checkpoint with a third step: it continues where it stopped.
    resumed = build_trainer(config_for(path, tmp_path / "a", "trainer.num_steps=3"))
    fit(resumed)
    assert resumed.global_step == 3 and [r["step"] for r in read_metrics(tmp_path / "a")] == [1, 2, 3]
