"""The optimizer and learning-rate schedule of a run: the `optimizer:` and `scheduler:` config sections.

`optimizer:` is any `torch.optim` node (`_component_: torch.optim.AdamW`, `lr`, `betas`, ...); the trainer
supplies `params` (the policy's trainable parameters) at build time. `check_optimizer` range-checks its usual
arguments before any model is built. `scheduler:` is a `Scheduler`, stepped once per optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal, get_args

import torch

from toolkit.config import ConfigError, instantiate, validate
from toolkit.config.types import COMPONENT_KEY, is_component, join_key, show_value, source_of

ScheduleName = Literal["constant", "constant_with_warmup", "linear", "cosine"]
SCHEDULE_NAMES: tuple[str, ...] = get_args(ScheduleName)
OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]

# The optimizer of a run config without an `optimizer:` section (the former trainer.lr/adam_* defaults).
DEFAULT_LR, DEFAULT_BETAS, DEFAULT_EPS, DEFAULT_WEIGHT_DECAY = 1e-6, (0.9, 0.999), 1e-8, 0.0


def default_optimizer(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW with lr 1e-6, betas (0.9, 0.999), eps 1e-8 and no weight decay."""
    return torch.optim.AdamW(
        params, lr=DEFAULT_LR, betas=DEFAULT_BETAS, eps=DEFAULT_EPS, weight_decay=DEFAULT_WEIGHT_DECAY
    )


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _betas_ok(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(_finite(b) and 0 <= b < 1 for b in value)


# Ranges whose wrong sign or zero silently changes the update, for the argument names torch.optim shares.
_OPTIMIZER_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "betas": (_betas_ok, "two numbers in [0, 1)"),
    "eps": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "weight_decay": (lambda v: _finite(v) and v >= 0, "a finite number >= 0 (0 = no decay)"),
}


def check_optimizer(node: Mapping[str, Any], where: str = "optimizer") -> None:
    """Range-check the `lr`, `betas`, `eps` and `weight_decay` an optimizer node sets (any torch.optim class).

    Raises:
        ConfigError (a ValueError): "optimizer.lr: must be a finite number > 0, got 0", naming where it was set.
    """
    for key, (ok, allowed) in _OPTIMIZER_RANGES.items():
        if key in node and not ok(node[key]):
            raise ConfigError(join_key(where, key), f"must be {allowed}, got {node[key]!r}", source_of(node, key))


def optimizer_factory(node: Mapping[str, Any], where: str = "optimizer") -> OptimizerFactory:
    """Check an `optimizer:` node now (keys, types, ranges); returns `params -> optimizer` for the trainer.

    Args:
        node: a `_component_` node naming a torch.optim.Optimizer class, without `params`.
        where: the node's key path, for messages.
    """
    if not is_component(node):
        message = f"expected a node with {COMPONENT_KEY} (e.g. torch.optim.AdamW), got {show_value(node)}"
        raise ConfigError(where, message, source_of(node))
    validate(node, where, runtime_kwargs={where: ["params"]})
    check_optimizer(node, where)

    def build(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        optimizer = instantiate(node, where, params=params)
        if not isinstance(optimizer, torch.optim.Optimizer):
            message = f"{node[COMPONENT_KEY]} built {show_value(optimizer)}, not a torch.optim.Optimizer"
            raise ConfigError(where, message, source_of(node))
        return optimizer

    return build


class Scheduler:
    """Learning-rate schedule from `transformers.get_scheduler`, stepped once per optimizer step.

    "constant" keeps the optimizer's lr; "constant_with_warmup" ramps it linearly over `warmup_steps`, then
    holds it; "linear" and "cosine" warm up, then decay to 0 at the run's last update.
    """

    def __init__(self, name: ScheduleName = "constant", warmup_steps: int = 0) -> None:
        """Validate and store the schedule (keyword names are the YAML keys).

        Args:
            name: one of `SCHEDULE_NAMES`.
            warmup_steps: optimizer steps of linear warm-up, >= 0 ("constant" has none: use
                "constant_with_warmup").
        """
        if name not in SCHEDULE_NAMES:
            raise ValueError(f"scheduler.name must be one of {SCHEDULE_NAMES}, got {name!r}")
        if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
            raise ValueError(f"scheduler.warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if name == "constant" and warmup_steps > 0:
            raise ValueError(
                f"scheduler.name='constant' ignores scheduler.warmup_steps={warmup_steps}; "
                "use name='constant_with_warmup' (or warmup_steps=0)"
            )
        self.name, self.warmup_steps = name, warmup_steps

    def build(self, optimizer: torch.optim.Optimizer, num_training_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        """The schedule over `num_training_steps` optimizer steps (the trainer counts them)."""
        from transformers import get_scheduler  # heavy; only when a trainer is built

        scheduler: torch.optim.lr_scheduler.LRScheduler = get_scheduler(
            self.name, optimizer, self.warmup_steps, num_training_steps
        )
        return scheduler

    def __repr__(self) -> str:
        return f"Scheduler(name={self.name!r}, warmup_steps={self.warmup_steps})"
