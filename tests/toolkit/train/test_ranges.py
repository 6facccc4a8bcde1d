"""Range checks at config time: every numeric knob whose wrong sign or zero silently changes the algorithm is rejected
with a ValueError naming the field, the value and the allowed range, before any model is built.

Covers `TrainerConfig` fields, normalizer and objective constructor arguments, and the cross-section rule that a
normalizer working within groups needs `trainer.group_size >= 2` (checked by `build_trainer` on the config nodes).
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any

import pytest

import modalities.text_agent.tiny as text_tiny
from toolkit.advantages.batch import BatchWhitenNormalizer, GroupMeanBatchStdNormalizer
from toolkit.advantages.beta import BetaNormalizer
from toolkit.advantages.boost import CorrectSampleBoost
from toolkit.advantages.group import GroupNormalizer, LeaveOneOutNormalizer
from toolkit.advantages.history import PromptHistoryNormalizer
from toolkit.advantages.multi_reward import MultiRewardNormalizer
from toolkit.advantages.turn import TurnGroupNormalizer
from toolkit.config import ConfigError, build_dataclass, load_config
from toolkit.objective import CISPOTerm, ClipTerm, PolicyObjective, SAPOTerm
from toolkit.train.runner import RunSpec, build_trainer
from toolkit.train.schedules import Scheduler, check_optimizer
from toolkit.train.trainer_config import TrainerConfig, check_group_size, groups_needed_by

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = ROOT / "configs"
TINY_GRPO = CONFIGS / "demo" / "tiny_grpo.yaml"
RUN_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if CONFIGS / "accelerate" not in p.parents)
REQUIRED_SECTIONS = {"policy", "sampler", "rewards", "normalizer", "objective", "data"}

# ---------------------------------------------------------------------------------------------- TrainerConfig

AT_LEAST_ONE = [
    "num_steps",
    "prompts_per_step",
    "group_size",
    "num_inner_epochs",
    "num_minibatches",
    "gradient_accumulation_steps",
    "max_sampling_rounds",
    "keep_last",
    "log_every",
]
AT_LEAST_ZERO = ["save_every", "reward_retries", "num_log_samples", "critic_warmup_steps", "eval_every"]

BAD_TRAINER_VALUES: list[tuple[str, Any, str]] = [
    *[(name, 0, ">= 1") for name in AT_LEAST_ONE],
    *[(name, -1, ">= 1") for name in AT_LEAST_ONE],
    *[(name, -1, ">= 0") for name in AT_LEAST_ZERO],
    ("num_threads", 0, ">= 1 (or null)"),
    ("critic_lr", 0.0, "> 0"),
    ("critic_lr", -1e-5, "> 0"),
    ("max_grad_norm", -1.0, "> 0 (or null to disable clipping)"),
    ("max_grad_norm", 0.0, "> 0 (or null to disable clipping)"),
    ("max_grad_norm", math.nan, "> 0 (or null to disable clipping)"),
    ("value_clip", 0.0, "> 0 (or null to disable clipping)"),
    ("value_clip", -0.5, "> 0 (or null to disable clipping)"),
]


@pytest.mark.parametrize(("name", "value", "allowed"), BAD_TRAINER_VALUES, ids=lambda x: str(x))
def test_trainer_field_out_of_range_is_rejected(name: str, value: Any, allowed: str) -> None:
    with pytest.raises(ValueError) as raised:
        TrainerConfig(**{name: value})
    message = str(raised.value)
    assert f"trainer.{name} must be" in message and allowed in message, message
    assert f"got {value!r}" in message, message


@pytest.mark.parametrize(
    "fields",
    [
        {"max_grad_norm": None, "value_clip": None},
        {"max_grad_norm": 1e-12, "value_clip": 1e-12},
        {"critic_lr": 1e-12},
        {"group_size": 1, "prompts_per_step": 1},
        {"save_every": 0, "eval_every": 0, "reward_retries": 0, "num_log_samples": 0},
        {"critic_warmup_steps": 0, "num_threads": None},
        {"num_steps": 1, "num_inner_epochs": 1, "keep_last": 1, "log_every": 1, "max_sampling_rounds": 1},
        # num_minibatches × gradient_accumulation_steps may use every sample of the step
        {"prompts_per_step": 2, "group_size": 4, "num_minibatches": 2, "gradient_accumulation_steps": 4},
        {"prompts_per_step": 2, "num_minibatches": 2, "keep_groups_in_minibatch": True},
        {"drop_zero_variance_groups": True, "group_size": 2},
    ],
    ids=lambda fields: ",".join(fields),
)
def test_trainer_edge_values_are_accepted(fields: dict[str, Any]) -> None:
    TrainerConfig(**fields)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"prompts_per_step": 2, "group_size": 2, "num_minibatches": 5}, "exceeds the 4 samples"),
        ({"prompts_per_step": 2, "num_minibatches": 3, "keep_groups_in_minibatch": True}, "prompts_per_step=2"),
        ({"group_size": 1, "drop_zero_variance_groups": True}, "trainer.drop_zero_variance_groups"),
    ],
)
def test_trainer_cross_field_errors(fields: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        TrainerConfig(**fields)


def test_negative_max_grad_norm_is_rejected_from_the_yaml_path() -> None:
    """The issue's case: `trainer.max_grad_norm=-1` used to flip the gradient's sign."""
    config = load_config(TINY_GRPO, ["trainer.max_grad_norm=-1"])
    with pytest.raises(ConfigError) as raised:
        build_dataclass(TrainerConfig, config["trainer"], where="trainer")
    message = str(raised.value)
    assert "trainer.max_grad_norm must be > 0 (or null to disable clipping), got -1" in message
    assert "command-line override 'trainer.max_grad_norm=-1'" in message  # where it was set


# ---------------------------------------------------------------------------------------------- optimizer

BAD_OPTIMIZER_VALUES: list[tuple[str, Any, str]] = [
    ("lr", 0.0, "> 0"),
    ("lr", -1e-6, "> 0"),
    ("lr", math.nan, "> 0"),
    ("lr", math.inf, "> 0"),
    ("weight_decay", -0.01, ">= 0"),
    ("weight_decay", math.nan, ">= 0"),
    ("betas", [0.9, 1.0], "in [0, 1)"),
    ("betas", [-0.1, 0.999], "in [0, 1)"),
    ("betas", [0.9], "two numbers"),
    ("eps", 0.0, "> 0"),
    ("eps", -1e-8, "> 0"),
]


@pytest.mark.parametrize(("name", "value", "allowed"), BAD_OPTIMIZER_VALUES, ids=lambda x: str(x))
def test_optimizer_argument_out_of_range_is_rejected(name: str, value: Any, allowed: str) -> None:
    with pytest.raises(ValueError) as raised:
        check_optimizer({"_component_": "torch.optim.AdamW", name: value})
    message = str(raised.value)
    assert f"optimizer.{name}: must be" in message and allowed in message, message
    assert f"got {value!r}" in message, message


@pytest.mark.parametrize(
    "arguments",
    [
        {"betas": [0.0, 0.0], "eps": 1e-30, "weight_decay": 0.0},
        {"betas": (0.999999, 0.5)},
        {"lr": 1e-12},
        {},
    ],
    ids=lambda arguments: ",".join(arguments) or "none",
)
def test_optimizer_edge_values_are_accepted(arguments: dict[str, Any]) -> None:
    check_optimizer({"_component_": "torch.optim.AdamW", **arguments})


# ---------------------------------------------------------------------------------------------- constructors

BAD_ARGUMENTS: list[tuple[Any, dict[str, Any], str]] = [
    (GroupNormalizer, {"eps": -1e-6}, "eps=-1e-06 must be a finite number >= 0"),
    (GroupNormalizer, {"eps": math.nan}, "eps=nan"),
    (GroupNormalizer, {"std_floor": -0.1}, "std_floor=-0.1 must be"),
    (GroupNormalizer, {"clip": 0.0}, "clip=0.0 must be a finite number > 0"),
    (GroupNormalizer, {"clip": -5.0}, "clip=-5.0"),
    (GroupNormalizer, {"clip": math.inf}, "clip=inf"),
    (LeaveOneOutNormalizer, {"clip": 0.0}, "clip=0.0"),
    (BatchWhitenNormalizer, {"eps": -1e-8}, "eps=-1e-08"),
    (GroupMeanBatchStdNormalizer, {"eps": math.inf}, "eps=inf"),
    (MultiRewardNormalizer, {"restandardize_eps": -1e-8}, "restandardize_eps=-1e-08"),
    (MultiRewardNormalizer, {"weights": {"a": math.nan}}, "weights['a']=nan must be a finite number"),
    (PromptHistoryNormalizer, {"max_history": 0}, "max_history=0"),
    (PromptHistoryNormalizer, {"reset_every": 0}, "reset_every=0"),
    (PromptHistoryNormalizer, {"eps": -1.0}, "eps=-1.0"),
    (TurnGroupNormalizer, {"eps": -1e-6}, "eps=-1e-06"),
    (BetaNormalizer, {"ab_min": 0.0}, "ab_min=0.0 must be a finite number > 0"),
    (BetaNormalizer, {"w_max": 0.0}, "w_max=0.0 must be a finite number > 0"),
    (BetaNormalizer, {"var_floor": -1e-12}, "var_floor=-1e-12 must be a finite number >= 0"),
    (BetaNormalizer, {"r_min": 1.0, "r_max": 1.0}, "max > min"),
    (BetaNormalizer, {"r_max": math.inf}, "max > min"),
    (BetaNormalizer, {"clip": 0.0}, "clip=0.0"),
    (ClipTerm, {"clip_low": -0.1}, "clip_low=-0.1 must be a finite number >= 0.0 and < 1.0"),
    (ClipTerm, {"clip_low": 1.0}, "clip_low=1.0"),
    (ClipTerm, {"clip_high": -0.2}, "clip_high=-0.2 must be a finite number >= 0.0"),
    (ClipTerm, {"dual_clip": 1.0}, "dual_clip=1.0 must be a finite number > 1.0"),
    (PolicyObjective, {"kl_coef": -0.01}, "kl_coef=-0.01 must be a finite number >= 0.0"),
    (PolicyObjective, {"kl_coef": math.nan}, "kl_coef=nan"),
    (PolicyObjective, {"entropy_coef": -0.01}, "entropy_coef=-0.01 must be a finite number >= 0.0"),
    (PolicyObjective, {"norm_length": 0.0}, "norm_length=0.0 must be a finite number > 0.0"),
    (CISPOTerm, {"clip_low": -0.1}, "clip_low=-0.1"),
    (CISPOTerm, {"clip_high": -0.1}, "clip_high=-0.1"),
    (SAPOTerm, {"tau_pos": 0.0}, "tau_pos=0.0 must be a finite number > 0.0"),
    (SAPOTerm, {"tau_neg": -1.0}, "tau_neg=-1.0"),
    (PolicyObjective, {"log_ratio_clamp": 0.0}, "log_ratio_clamp=0.0"),
    (Scheduler, {"warmup_steps": -1}, "scheduler.warmup_steps must be an int >= 0, got -1"),
    (Scheduler, {"name": "constant", "warmup_steps": 5}, "use name='constant_with_warmup'"),
    (Scheduler, {"name": "cosine_with_restarts"}, "scheduler.name must be one of"),
]


@pytest.mark.parametrize(
    ("cls", "kwargs", "expected"),
    BAD_ARGUMENTS,
    ids=[f"{cls.__name__}-{','.join(kwargs)}" for cls, kwargs, _ in BAD_ARGUMENTS],
)
def test_constructor_argument_out_of_range_is_rejected(cls: Any, kwargs: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValueError) as raised:
        cls(**kwargs)
    assert expected in str(raised.value), str(raised.value)


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (GroupNormalizer, {"eps": 0.0, "std_floor": 0.0, "clip": None}),  # eps 0: exact z-scores (tests use it)
        (GroupNormalizer, {"clip": 1e-6}),
        (MultiRewardNormalizer, {"weights": {"a": -1.0, "b": 0.0}, "restandardize_eps": 0.0}),
        (PromptHistoryNormalizer, {"max_history": 1, "reset_every": None}),
        (BetaNormalizer, {"ab_min": 1e-3, "w_max": 1e-3, "var_floor": 0.0, "r_min": -1.0, "r_max": 1.0}),
        (TurnGroupNormalizer, {"eps": 0.0}),
        (ClipTerm, {"clip_low": 0.0, "clip_high": 0.0}),
        (PolicyObjective, {"kl_coef": 0.0, "entropy_coef": 0.0, "log_ratio_clamp": None}),
        (ClipTerm, {"clip_low": 0.999, "dual_clip": 1.0001}),
        (CISPOTerm, {"clip_low": 0.0}),
        (Scheduler, {"name": "constant_with_warmup", "warmup_steps": 5}),
        (Scheduler, {"name": "cosine", "warmup_steps": 0}),
    ],
    ids=lambda x: x.__name__ if isinstance(x, type) else ",".join(x),
)
def test_constructor_edge_values_are_accepted(cls: Any, kwargs: dict[str, Any]) -> None:
    cls(**kwargs)


# ---------------------------------------------------------------------------------------------- group_size


def _node(cls: type, **kwargs: Any) -> dict[str, Any]:
    return {"_component_": f"{cls.__module__}.{cls.__qualname__}", **kwargs}


@pytest.mark.parametrize(
    ("node", "needs"),
    [
        (_node(GroupNormalizer), True),
        (_node(GroupNormalizer, scale_by_std=False), True),  # Dr. GRPO: still a group mean
        (_node(LeaveOneOutNormalizer), True),
        (_node(MultiRewardNormalizer), True),
        (_node(BetaNormalizer), True),
        (_node(TurnGroupNormalizer), True),
        (_node(GroupMeanBatchStdNormalizer), True),
        (_node(BatchWhitenNormalizer), False),  # REINFORCE++: batch statistics only
        (_node(BatchWhitenNormalizer, baseline="group_mean"), True),
        (_node(PromptHistoryNormalizer), True),  # history cleared every call: one reward per prompt
        (_node(PromptHistoryNormalizer, reset_every=None), False),  # history across steps is the baseline
        ({"_component_": "toolkit.advantages.GAENormalizer"}, False),  # the critic is the baseline
        (_node(CorrectSampleBoost, inner=_node(GroupMeanBatchStdNormalizer)), True),  # a wrapper inherits
        (_node(CorrectSampleBoost, inner=_node(BatchWhitenNormalizer)), False),
    ],
    ids=lambda x: (
        x["_component_"].rsplit(".", 1)[-1] + "".join(f",{k}" for k in x if k != "_component_")
        if isinstance(x, dict)
        else str(x)
    ),
)
def test_which_normalizers_need_groups(node: dict[str, Any], needs: bool) -> None:
    assert bool(groups_needed_by(node)) is needs
    if needs:
        with pytest.raises(ValueError, match=r"trainer\.group_size: must be >= 2 for normalizer"):
            check_group_size(1, {"normalizer": node})
    check_group_size(2, {"normalizer": node})


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_has_the_group_size_its_normalizer_needs(path: Path) -> None:
    """The PPO + GAE recipes run group_size 1 with a critic; every group normalizer recipe has groups."""
    config = load_config(path)
    trainer = build_dataclass(TrainerConfig, config.get("trainer"), where="trainer")
    sections = {name: config[name] for name in ("normalizer", "transforms") if name in config}
    check_group_size(trainer.group_size, sections)
    if set(config) >= REQUIRED_SECTIONS:
        build_dataclass(RunSpec, config)


@pytest.fixture
def model_builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of the tiny demo's model builder (same signature, so config validation still passes)."""
    calls: list[int] = []
    original = text_tiny.build_tiny_qwen2

    @functools.wraps(original)
    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(text_tiny, "build_tiny_qwen2", counting)
    return calls


def test_group_size_one_with_a_group_normalizer_fails_before_any_model(model_builds: list[int]) -> None:
    """The issue's case: group_size=1 with GRPO's group z-score gave every response advantage 0, silently."""
    config = load_config(TINY_GRPO, ["trainer.group_size=1", "trainer.progress=false"])
    start = time.perf_counter()
    with pytest.raises(ValueError) as raised:
        build_trainer(config)
    message = str(raised.value)
    assert "trainer.group_size: must be >= 2" in message and "got trainer.group_size=1" in message
    assert "normalizer toolkit.advantages.GroupNormalizer (set at configs/demo/tiny_grpo.yaml:44)" in message
    assert model_builds == [], "the check must run before the policy's model is built"
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("normalizer.clip=0", "clip=0 must be a finite number > 0"),
        ("normalizer.eps=-1e-6", "eps=-1e-06 must be a finite number >= 0"),
        ("objective.kl_coef=-0.1", "kl_coef=-0.1 must be a finite number >= 0.0"),
        ("objective.term.clip_high=-0.2", "clip_high=-0.2"),
        ("trainer.max_grad_norm=-1", "trainer.max_grad_norm must be > 0"),
        ("optimizer.lr=0", "optimizer.lr: must be a finite number > 0, got 0"),
        ("optimizer.eps=0", "optimizer.eps: must be a finite number > 0"),
        ("scheduler.warmup_steps=3", "scheduler.warmup_steps=3; use name='constant_with_warmup'"),
    ],
)
def test_bad_ranges_in_a_run_config_fail_before_any_model(
    override: str, expected: str, model_builds: list[int]
) -> None:
    config = load_config(TINY_GRPO, [override, "trainer.progress=false"])
    with pytest.raises(ValueError) as raised:
        build_trainer(config)
    assert expected in str(raised.value), str(raised.value)
    assert model_builds == []


def test_group_size_one_with_a_critic_recipe_is_valid() -> None:
    """PPR's official recipe: one trajectory per prompt, GAE with a critic supplies the baseline."""
    config = load_config(CONFIGS / "algorithms" / "ppr.yaml")
    trainer = build_dataclass(TrainerConfig, config["trainer"], where="trainer")
    assert trainer.group_size == 1
    check_group_size(trainer.group_size, {"normalizer": config["normalizer"]})
