"""The `optimizer:` and `scheduler:` sections (`toolkit.train.schedules`): defaults equal the former trainer knobs,
any torch.optim class plugs in, range errors come before any model, schedules match transformers and resume exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import get_scheduler

from toolkit.config import ConfigError, load_config
from toolkit.train.runner import build_trainer
from toolkit.train.schedules import Scheduler, default_optimizer, optimizer_factory

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "configs" / "demo" / "tiny_grpo.yaml"
DATA = ROOT / "data" / "text_agent"
FAST = [
    "trainer.prompts_per_step=4",
    "trainer.group_size=4",
    "trainer.num_minibatches=2",
    "trainer.progress=false",
    "trainer.save_every=0",
    "sampler.max_new_tokens=5",
    f"data.path={ROOT / 'data' / 'demo' / 'letters.jsonl'}",
]


def tiny_config(run_dir: Path, *overrides: str) -> dict[str, Any]:
    return load_config(DEMO, [*FAST, f"trainer.run_dir={run_dir}", *overrides])


def group_settings(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    group = optimizer.param_groups[0]
    return {key: group[key] for key in ("lr", "betas", "eps", "weight_decay")}


def test_a_config_without_the_sections_trains_with_the_former_defaults(tmp_path: Path) -> None:
    trainer = build_trainer(tiny_config(tmp_path, "~optimizer", "~scheduler"))
    assert isinstance(trainer.optimizer.optimizer, torch.optim.AdamW)
    settings = group_settings(trainer.optimizer)
    assert settings == {"lr": 1e-6, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    metrics, _ = trainer.step()
    assert metrics["optim/lr"] == 1e-6  # constant
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert group_settings(default_optimizer(params)) == settings


def test_the_optimizer_node_is_built_with_the_trainable_params(tmp_path: Path) -> None:
    trainer = build_trainer(tiny_config(tmp_path, "optimizer.weight_decay=0.01"))
    settings = group_settings(trainer.optimizer)
    assert settings == {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
    trainable = [p for p in trainer.policy.module.parameters() if p.requires_grad]
    assert len(trainer.optimizer.param_groups[0]["params"]) == len(trainable)


def test_any_torch_optimizer_plugs_in(tmp_path: Path) -> None:
    sgd = "optimizer={_component_: torch.optim.SGD, lr: 0.05, momentum: 0.9}"
    trainer = build_trainer(tiny_config(tmp_path, sgd))
    assert isinstance(trainer.optimizer.optimizer, torch.optim.SGD)
    assert trainer.optimizer.param_groups[0]["momentum"] == 0.9
    before = {k: v.detach().clone() for k, v in trainer.policy.module.named_parameters()}
    metrics, _ = trainer.step()
    assert metrics["optim/lr"] == 0.05
    assert any(not torch.equal(before[k], v) for k, v in trainer.policy.module.named_parameters())


def test_critic_shares_the_policy_optimizers_weight_decay(tmp_path: Path) -> None:
    overrides = [
        "trainer.progress=false",
        "trainer.prompts_per_step=2",
        "optimizer.weight_decay=0.05",
        "policy.model.warm_start_steps=0",
        "policy.model.copy_steps=0",
        f"data.paths={DATA / 'synthetic_qa.jsonl'}",
        f"sampler.tools.0.corpus={DATA / 'corpus.jsonl'}",
        f"trainer.run_dir={tmp_path}",
    ]
    trainer = build_trainer(load_config(ROOT / "configs" / "text_agent" / "tiny_ppr.yaml", overrides))
    assert trainer.critic is not None
    assert trainer.critic.optimizer.param_groups[0]["weight_decay"] == 0.05
    assert trainer.critic.optimizer.param_groups[0]["lr"] == 1e-3  # trainer.critic_lr, not optimizer.lr


SCHEDULES = [("constant", 0), ("constant_with_warmup", 3), ("linear", 2), ("cosine", 2)]


@pytest.mark.parametrize(("name", "warmup"), SCHEDULES)
def test_scheduler_matches_transformers(name: str, warmup: int) -> None:
    def lrs(make: Any) -> list[float]:
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        schedule = make(optimizer)
        values = []
        for _ in range(8):
            values.append(schedule.get_last_lr()[0])
            optimizer.step()
            schedule.step()
        return values

    ours = lrs(lambda optimizer: Scheduler(name, warmup).build(optimizer, 8))  # type: ignore[arg-type]
    assert ours == lrs(lambda optimizer: get_scheduler(name, optimizer, warmup, 8))
    if warmup:
        assert ours[0] == 0.0 and ours[warmup] == pytest.approx(0.1)


def test_resume_with_a_decaying_schedule_is_exact(tmp_path: Path) -> None:
    """2 + 2 steps from a checkpoint equal 4 straight steps: lr, schedule state and weights."""
    schedule = ["trainer.num_steps=4", "scheduler.name=linear", "scheduler.warmup_steps=2"]

    def lrs(trainer: Any, steps: int) -> list[float]:
        return [trainer.step()[0]["optim/lr"] for _ in range(steps)]

    straight = build_trainer(tiny_config(tmp_path / "straight", *schedule))
    expected = lrs(straight, 4)
    first = build_trainer(tiny_config(tmp_path / "split", *schedule))
    split = lrs(first, 2)
    checkpoint = first.save()
    assert checkpoint is not None
    second = build_trainer(tiny_config(tmp_path / "split", *schedule))
    second.load(checkpoint)
    split += lrs(second, 2)
    assert split == expected and expected[-1] == 0.0  # warm-up, then linear decay to 0 at the 8th update
    assert second.scheduler.state_dict() == straight.scheduler.state_dict()
    after = dict(straight.policy.module.named_parameters())
    assert all(torch.equal(p, after[k]) for k, p in second.policy.module.named_parameters())


def test_optimizer_node_errors() -> None:
    with pytest.raises(ConfigError, match=r"optimizer: expected a node with _component_"):
        optimizer_factory({"lr": 1e-3})
    with pytest.raises(ConfigError, match=r"optimizer\._component_: .*did you mean 'AdamW'"):
        optimizer_factory({"_component_": "torch.optim.AdamWW", "lr": 1e-3})
    with pytest.raises(ConfigError, match=r"optimizer\.lr: must be a finite number > 0, got -1"):
        optimizer_factory({"_component_": "torch.optim.SGD", "lr": -1})
    built = optimizer_factory({"_component_": "torch.optim.SGD", "lr": 0.5})([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(built, torch.optim.SGD) and built.param_groups[0]["lr"] == 0.5
    with pytest.raises(ConfigError, match=r"optimizer: torch\.nn\.Identity built .*not a torch\.optim\.Optimizer"):
        optimizer_factory({"_component_": "torch.nn.Identity"})([])


def test_range_errors_come_before_any_model(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "optimizer.weight_decay=-0.1")
    config["policy"]["model"]["_component_"] = "tests.toolkit.train.test_schedules.no_model"
    with pytest.raises(ConfigError, match=r"optimizer\.weight_decay: must be a finite number >= 0"):
        build_trainer(config)
    config = tiny_config(tmp_path, "scheduler.name=linear", "scheduler.warmup_steps=-1")
    config["policy"]["model"]["_component_"] = "tests.toolkit.train.test_schedules.no_model"
    with pytest.raises(ConfigError, match=r"scheduler\.warmup_steps must be an int >= 0, got -1"):
        build_trainer(config)


def no_model(seed: int = 0) -> Any:
    raise AssertionError("a model was built before the config's range errors were reported")
