"""TrainerConfig: the typed knobs of the `trainer:` section of a run config, range-checked at construction.

`check_group_size` is the cross-section check: a normalizer that works within groups needs `group_size >= 2`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from toolkit.config.schema import import_object
from toolkit.config.types import COMPONENT_KEY, RESERVED_KEYS, ConfigError, source_of
from toolkit.io.logging import check_tracker_init_kwargs


@dataclass
class TrainerConfig:
    """Loop, gradient clipping, checkpoint and logging settings (objects, the optimizer too, have their own sections).

    One training step = sample `prompts_per_step` × `group_size` trajectories, score them,
    transform rewards, compute advantages, then `num_inner_epochs` passes over
    `num_minibatches` minibatches, each split into `gradient_accumulation_steps` micro-batches
    with one optimizer step per minibatch.
    """

    run_dir: str = "runs/default"
    seed: int = 0
    # torch CPU threads, set before any model is built (None = torch's default). Tiny CPU workloads run
    # faster on 1 thread than on 2 oversubscribed ones when anything else shares the cores.
    num_threads: int | None = None
    num_steps: int = 100
    prompts_per_step: int = 8
    group_size: int = 8
    num_inner_epochs: int = 1
    num_minibatches: int = 1
    gradient_accumulation_steps: int = 1
    shuffle_minibatches: bool = True
    keep_groups_in_minibatch: bool = False
    # The optimizer and its lr schedule are the `optimizer:` and `scheduler:` sections (toolkit.train.schedules).
    max_grad_norm: float | None = 1.0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # Critic (PPO + GAE path only, when the config has a `critic:` section): AdamW at critic_lr, with the weight
    # decay of the policy's optimizer.
    critic_lr: float = 1e-5
    value_clip: float | None = 0.5
    # The first `critic_warmup_steps` steps (counted in num_steps) sample, score and normalise as usual but leave
    # the policy untouched: no policy backward, optimizer or lr-scheduler step, no after_optimizer_step hook (so
    # no DiDi EMA update). What learns meanwhile: the critic (verl's `critic_warmup`; PPR's official 0) and
    # self-training reward models; DiDi's DiscriminatorReward updates in every reward call, so with no critic
    # this is DiDi's `discriminator_warmup_steps` (its own lr schedule counts these calls too).
    critic_warmup_steps: int = 0
    # Evaluation during training (verl's `test_freq`, TRL's `eval_steps` + `metric_for_best_model`): every
    # `eval_every` steps the `eval.evaluator` hook runs on the current policy and its report's metrics() are
    # logged as eval/<name>. With `eval_metric`, the best value so far (`eval_mode`) keeps its own checkpoint
    # in run_dir/best/ (atomic, never pruned by keep_last) and run_dir/best/best.json says which step it is.
    eval_every: int = 0
    eval_metric: str | None = None
    eval_mode: Literal["min", "max"] = "max"
    # Async one-step-off-policy rollouts (toolkit.train.async_rollouts): step k+1's rollout is generated in a
    # background thread with step k's weights while step k updates (staleness 1), corrected per token by
    # truncated importance sampling ("tis": weight min(ratio, cap)) or masking ("mis": ratio > cap untrained).
    # async_overlap=false generates in the foreground (staleness 0): exactly the synchronous path.
    async_rollouts: bool = False
    async_overlap: bool = True
    async_correction: Literal["tis", "mis"] = "tis"
    async_ratio_cap: float = 2.0
    # Dynamic sampling (DAPO/DLER): drop zero-variance groups and refill, at most this many rounds.
    drop_zero_variance_groups: bool = False
    max_sampling_rounds: int = 4
    on_sampling_cap: Literal["error", "partial"] = "partial"
    # What "zero variance" is judged on: "scores" or a reward component (DLER: the raw score before truncation).
    dynamic_sampling_on: str = "scores"
    # Rewards: retries for a reward model that raises, before its scores become NaN (counted).
    reward_retries: int = 2
    # A reward model still failing after its retries on more than this fraction of a step's samples (or a judge on
    # more than this fraction of its calls) stops the run (RewardFailure naming the model, the exception and the
    # first failing input, or the judge's failure rate); 1 = train on with NaN scores and fallbacks.
    max_reward_failure_frac: float = 0.05
    # Checkpoints: every `save_every` steps (0 = only at the end), keep the last `keep_last`.
    save_every: int = 0
    keep_last: int = 3
    resume: str = "auto"
    # After the last checkpoint of a finished run, write it to run_dir/export/ in its ecosystem's format (the
    # main process, `renorm export`'s code: toolkit.io.export); a later export of an extended run replaces it.
    export: bool = False
    # resume=never on a run dir holding a run is an error unless true: then the old run is moved aside, not deleted.
    overwrite: bool = False
    # Resuming with a config that changes what is trained is an error unless true: then applied and recorded.
    allow_config_change: bool = False
    # Logging.
    log_every: int = 1
    num_log_samples: int = 4
    trackers: list[str] = field(default_factory=list)
    # Tracker project (default: the run dir's name) and per-tracker keyword arguments for accelerate's
    # init_trackers, e.g. {wandb: {entity: team, name: run-1, tags: [grpo]}, tensorboard: {flush_secs: 60}}.
    # A resumed run continues its W&B run (the id is kept in RUN_DIR/trackers.json).
    tracker_project: str | None = None
    tracker_init_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Print the logged sample rows as a table every this many steps (0 = never).
    print_samples_every: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in _AT_LEAST_ONE:
            _check(name, getattr(self, name), getattr(self, name) >= 1, ">= 1")
        for name in _AT_LEAST_ZERO:
            _check(name, getattr(self, name), getattr(self, name) >= 0, ">= 0")
        _check("num_threads", self.num_threads, self.num_threads is None or self.num_threads >= 1, ">= 1 (or null)")
        self._check_optimizer()
        frac = self.max_reward_failure_frac
        _check("max_reward_failure_frac", frac, _finite(frac) and 0 <= frac <= 1, "a number in [0, 1]")
        self._check_cross_fields()
        self._check_tracking()

    def _check_optimizer(self) -> None:
        """Ranges whose wrong sign or zero silently changes the update (the sign of a clip norm flips it)."""
        _check("critic_lr", self.critic_lr, _finite(self.critic_lr) and self.critic_lr > 0, "a finite number > 0")
        norm = self.max_grad_norm
        ok = norm is None or (_finite(norm) and norm > 0)
        _check("max_grad_norm", norm, ok, "> 0 (or null to disable clipping)")
        clip = self.value_clip
        _check("value_clip", clip, clip is None or (_finite(clip) and clip > 0), "> 0 (or null to disable clipping)")

    def _check_cross_fields(self) -> None:
        if self.eval_mode not in ("min", "max"):
            raise ValueError(f"trainer.eval_mode must be 'min' or 'max', got {self.eval_mode!r}")
        if self.async_correction not in ("tis", "mis"):
            raise ValueError(f"trainer.async_correction must be 'tis' or 'mis', got {self.async_correction!r}")
        cap = self.async_ratio_cap
        _check("async_ratio_cap", cap, _finite(cap) and cap >= 1, "a finite number >= 1")
        if self.eval_metric is not None and self.eval_every == 0:
            raise ValueError(f"trainer.eval_metric={self.eval_metric!r} needs trainer.eval_every > 0")
        n = self.prompts_per_step * self.group_size
        if self.num_minibatches * self.gradient_accumulation_steps > n:
            raise ValueError(
                f"trainer.num_minibatches × gradient_accumulation_steps = "
                f"{self.num_minibatches * self.gradient_accumulation_steps} exceeds the {n} samples per step"
            )
        if self.keep_groups_in_minibatch and self.num_minibatches > self.prompts_per_step:
            raise ValueError(
                f"trainer.keep_groups_in_minibatch puts whole groups in each minibatch: trainer.num_minibatches "
                f"must be <= trainer.prompts_per_step={self.prompts_per_step}, got {self.num_minibatches}"
            )
        if self.drop_zero_variance_groups and self.group_size < 2:
            raise ValueError(
                f"trainer.drop_zero_variance_groups drops every group when trainer.group_size={self.group_size} "
                "(one response has no variance): set group_size >= 2 or drop_zero_variance_groups=false"
            )

    def _check_tracking(self) -> None:
        if self.tracker_project is not None and not self.tracker_project.strip():
            raise ValueError("trainer.tracker_project must be a non-empty name (or null: the run dir's name)")
        check_tracker_init_kwargs(self.tracker_init_kwargs)
        if self.print_samples_every and not self.num_log_samples:
            raise ValueError(
                f"trainer.print_samples_every={self.print_samples_every} prints the sampled rows, but "
                "trainer.num_log_samples=0 samples none: set num_log_samples >= 1 or print_samples_every=0"
            )


# Counts that must be >= 1 (0 would silently skip the step, the update or the log) and counts where 0 means "off".
_AT_LEAST_ONE = (
    "num_steps",
    "prompts_per_step",
    "group_size",
    "num_inner_epochs",
    "num_minibatches",
    "gradient_accumulation_steps",
    "max_sampling_rounds",
    "keep_last",
    "log_every",
)
_AT_LEAST_ZERO = (
    "save_every",
    "reward_retries",
    "num_log_samples",
    "critic_warmup_steps",
    "eval_every",
    "print_samples_every",
)


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _check(name: str, value: object, ok: bool, allowed: str) -> None:
    """ValueError "trainer.<name> must be <allowed>, got <value>" unless `ok`."""
    if not ok:
        raise ValueError(f"trainer.{name} must be {allowed}, got {value!r}")


def groups_needed_by(node: Any) -> list[str]:
    """The `_component_` targets under a config node whose math compares the responses of one prompt's group.

    A target declares it with `needs_groups`: a class attribute (`True`), or a callable taking the node's
    keyword arguments (for targets where it depends on a setting, e.g. a batch normalizer's baseline).
    Nested nodes count too, so a wrapper (`inner:`/`base:` normalizer) inherits its argument's need.
    """
    found: list[str] = []
    if isinstance(node, Mapping):
        kwargs = {k: v for k, v in node.items() if k not in RESERVED_KEYS}
        if COMPONENT_KEY in node:
            flag = getattr(import_object(node[COMPONENT_KEY]), "needs_groups", False)
            if flag(kwargs) if callable(flag) else bool(flag):
                found.append(str(node[COMPONENT_KEY]))
        for value in kwargs.values():
            found += groups_needed_by(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            found += groups_needed_by(value)
    return found


def check_group_size(group_size: int, sections: Mapping[str, Any]) -> None:
    """Raise when `group_size < 2` but a section (normalizer, transforms, ...) normalizes within groups.

    With one response per prompt a group baseline equals the reward itself, so such a normalizer gives
    every response advantage 0 (or an unnormalized one) and the run trains nothing, silently.

    Args:
        group_size: `trainer.group_size`.
        sections: section name (as messages show it) -> config node.
    """
    if group_size >= 2:
        return
    for where, node in sections.items():
        targets = groups_needed_by(node)
        if targets:
            source = source_of(node) if isinstance(node, Mapping) else None
            raise ConfigError(
                "trainer.group_size",
                f"must be >= 2 for {where} {targets[0]}{f' (set at {source})' if source else ''}, which normalizes "
                f"within each prompt's group of responses; got trainer.group_size={group_size}. Raise "
                "trainer.group_size, or use a normalizer without groups (toolkit.advantages.GAENormalizer with a "
                "critic, toolkit.advantages.BatchWhitenNormalizer)",
            )
