"""Every YAML under `configs/` is valid: it loads (with its `base:` parents), every `_component_` node matches
its constructor's signature and types, `trainer:` builds a TrainerConfig, top-level sections are RunSpec
sections, and the first line is a comment saying what the file is. `configs/accelerate/` holds accelerate
launch files (not run configs): they are parsed as plain YAML and must name a `distributed_type`.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from toolkit.config import ConfigError, build_dataclass, check_keys, instantiate, load_config, validate
from toolkit.train.runner import RunSpec, check_moved_keys
from toolkit.train.schedules import Scheduler, optimizer_factory
from toolkit.train.trainer_config import TrainerConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ACCELERATE = CONFIGS / "accelerate"
RUN_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if ACCELERATE not in p.parents)
LAUNCH_CONFIGS = sorted(ACCELERATE.glob("*.yaml"))
RUN_SECTIONS = [f.name for f in dataclasses.fields(RunSpec)]
REQUIRED_SECTIONS = {
    f.name
    for f in dataclasses.fields(RunSpec)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
}
# accelerate.utils.DistributedType values (plain strings here, so the test does not import accelerate).
DISTRIBUTED_TYPES = {"NO", "MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_MLU", "MULTI_XPU", "DEEPSPEED", "FSDP", "XLA"}


def _id(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


def starts_with_comment(path: Path) -> bool:
    """True when the file's first line is a non-empty `# ...` comment."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return bool(lines) and lines[0].startswith("# ") and len(lines[0].strip()) > 2


def check_run_config(path: Path) -> dict[str, Any]:
    """Load and validate one run config (full recipe or partial preset); raises ConfigError on a bad key."""
    config = load_config(path)
    check_keys(config, RUN_SECTIONS, owner="RunSpec (run config sections)")
    check_moved_keys(config)
    for section, node in config.items():
        if section == "optimizer":
            optimizer_factory(node)  # keys, types and ranges; the trainer supplies `params`
        elif section not in ("trainer", "description"):
            validate(node, where=section)
    build_dataclass(TrainerConfig, config.get("trainer"), where="trainer")
    if set(config) >= REQUIRED_SECTIONS:  # a complete run config, not a partial preset
        build_dataclass(RunSpec, config)
    return config


def test_configs_are_found() -> None:
    assert len(RUN_CONFIGS) >= 14, "the algorithm presets at least"
    assert {p.stem for p in LAUNCH_CONFIGS} >= {"ddp", "fsdp", "cpu_ddp", "deepspeed_zero2", "deepspeed_zero3"}


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=_id)
def test_run_config_is_valid(path: Path) -> None:
    config = check_run_config(path)
    assert config, f"{_id(path)} is empty"
    assert starts_with_comment(path), f"{_id(path)}: the first line must be a '# ...' comment"


@pytest.mark.parametrize("path", LAUNCH_CONFIGS, ids=_id)
def test_accelerate_config_names_a_distributed_type(path: Path) -> None:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    assert data.get("distributed_type") in DISTRIBUTED_TYPES, f"{_id(path)}: distributed_type"
    assert starts_with_comment(path)


# ---------------------------------------------------------------------------- the checks can fail


def _copy_with(tmp_path: Path, name: str, old: str, new: str) -> Path:
    source = CONFIGS / "algorithms" / name
    text = source.read_text(encoding="utf-8")
    assert old in text, f"test setup: {old!r} not in {name}"
    target = tmp_path / name
    target.write_text(text.replace(old, new, 1), encoding="utf-8")
    return target


def test_typo_in_a_component_key_fails_naming_the_key(tmp_path: Path) -> None:
    broken = _copy_with(tmp_path, "dapo.yaml", "  clip_high: 0.28", "  clip_hihg: 0.28")
    with pytest.raises(ConfigError, match=r"objective\.term\.clip_hihg") as err:
        check_run_config(broken)
    assert err.value.suggestion == "clip_high"
    assert "dapo.yaml" in str(err.value)  # the file (and line) that set it


def test_typo_in_a_trainer_key_fails_naming_the_key(tmp_path: Path) -> None:
    broken = _copy_with(tmp_path, "grpo.yaml", "  group_size: 64", "  group_szie: 64")
    with pytest.raises(ConfigError, match=r"trainer\.group_szie") as err:
        check_run_config(broken)
    assert err.value.suggestion == "group_size"


def test_bad_literal_in_a_component_fails(tmp_path: Path) -> None:
    broken = _copy_with(tmp_path, "dler.yaml", "weighting: sequence", "weighting: sequense")
    with pytest.raises(ConfigError, match=r"normalizer\.weighting") as err:
        check_run_config(broken)
    assert err.value.suggestion == "sequence"


def test_typo_in_a_section_name_fails(tmp_path: Path) -> None:
    broken = _copy_with(tmp_path, "bnpo.yaml", "\nnormalizer:", "\nnormaliser:")
    with pytest.raises(ConfigError, match="normaliser") as err:
        check_run_config(broken)
    assert err.value.suggestion == "normalizer"


def test_recipe_listing_a_preset_under_base_is_validated(tmp_path: Path) -> None:
    preset = CONFIGS / "algorithms" / "dapo.yaml"
    recipe = tmp_path / "recipe.yaml"
    body = "# a recipe on top of DAPO\nbase: {}\nobjective:\n  term:\n    {}: 0.3\n"
    recipe.write_text(body.format(preset, "clip_hihg"), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"objective\.term\.clip_hihg"):
        check_run_config(recipe)
    recipe.write_text(body.format(preset, "clip_high"), encoding="utf-8")
    config = check_run_config(recipe)
    assert config["objective"]["term"]["clip_high"] == 0.3 and config["objective"]["term"]["clip_low"] == 0.2


def test_missing_first_line_comment_is_detected(tmp_path: Path) -> None:
    target = tmp_path / "grpo.yaml"
    shutil.copy(CONFIGS / "algorithms" / "grpo.yaml", target)
    assert starts_with_comment(target)
    body = [line for line in target.read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
    target.write_text("\n".join(body), encoding="utf-8")
    assert not starts_with_comment(target)


# ---------------------------------------------------------------------------- optimizer and scheduler

COMPLETE_CONFIGS = [p for p in RUN_CONFIGS if set(load_config(p)) >= REQUIRED_SECTIONS]
OPTIMIZER_ARGS = {"lr", "betas", "eps", "weight_decay"}


@pytest.mark.parametrize("path", COMPLETE_CONFIGS, ids=_id)
def test_recipe_spells_out_its_optimizer_and_schedule(path: Path) -> None:
    """Every recipe has `optimizer:` and `scheduler:` (so `optimizer.lr=...` overrides work) with every AdamW knob
    set: torch's own AdamW defaults (lr 1e-3, weight_decay 0.01) never sneak in."""
    config = load_config(path)
    optimizer, scheduler = config.get("optimizer"), config.get("scheduler")
    assert optimizer is not None and scheduler is not None, f"{_id(path)}: set optimizer: and scheduler:"
    assert not OPTIMIZER_ARGS - set(optimizer), f"{_id(path)}: optimizer leaves {OPTIMIZER_ARGS - set(optimizer)}"
    assert isinstance(instantiate(scheduler, "scheduler"), Scheduler)


def test_moved_key_names_its_new_place(tmp_path: Path) -> None:
    recipe = tmp_path / "old.yaml"
    recipe.write_text("# an old-style config\ntrainer:\n  lr: 1.0e-5\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"trainer\.lr: moved to optimizer\.lr;.*old\.yaml:3"):
        check_run_config(recipe)
    recipe.write_text("# an old-style config\ntrainer:\n  warmup_steps: 5\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"trainer\.warmup_steps: moved to scheduler\.warmup_steps"):
        check_run_config(recipe)
    preset = CONFIGS / "algorithms" / "dapo.yaml"
    recipe.write_text(f"# an old-style recipe\nbase: {preset}\nobjective:\n  clip_high: 0.3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"objective\.clip_high: moved to objective\.term\.clip_high .*old\.yaml:4"):
        check_run_config(recipe)


def test_optimizer_typo_and_range_fail_naming_the_key(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    tiny = CONFIGS / "demo" / "tiny_grpo.yaml"
    recipe.write_text(f"# a recipe\nbase: {tiny}\noptimizer:\n  wieght_decay: 0.1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"optimizer\.wieght_decay: unknown key") as err:
        check_run_config(recipe)
    assert err.value.suggestion == "weight_decay"
    recipe.write_text(f"# a recipe\nbase: {tiny}\noptimizer:\n  betas: [0.9, 1.0]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"optimizer\.betas: must be two numbers in \[0, 1\), got \[0\.9, 1\.0\]"):
        check_run_config(recipe)
