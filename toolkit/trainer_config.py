"""TrainerConfig: the typed knobs of the `trainer:` section of a run config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class TrainerConfig:
    """Loop, optimizer, checkpoint and logging settings (the objects live in their own sections).

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
    # Optimizer and schedule (AdamW; schedules from transformers.get_scheduler, stepped per optimizer step).
    # "constant" ignores warmup_steps (transformers); "constant_with_warmup" ramps linearly, then holds.
    lr: float = 1e-6
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    lr_schedule: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # Critic (PPO + GAE path only, when the config has a `critic:` section).
    critic_lr: float = 1e-5
    value_clip: float | None = 0.5
    # The first `critic_warmup_steps` steps do not update the policy: they train the critic (verl's
    # `critic_warmup`; PPR's official 0) and self-training reward models (DiDi's `discriminator_warmup_steps`).
    critic_warmup_steps: int = 0
    # Evaluation during training (verl's `test_freq`, TRL's `eval_steps` + `metric_for_best_model`): every
    # `eval_every` steps the `eval.evaluator` hook runs on the current policy and its report's metrics() are
    # logged as eval/<name>. With `eval_metric`, the best value so far (`eval_mode`) keeps its own checkpoint
    # in run_dir/best/ (atomic, never pruned by keep_last) and run_dir/best/best.json says which step it is.
    eval_every: int = 0
    eval_metric: str | None = None
    eval_mode: Literal["min", "max"] = "max"
    # Dynamic sampling (DAPO/DLER): drop zero-variance groups and refill, at most this many rounds.
    drop_zero_variance_groups: bool = False
    max_sampling_rounds: int = 4
    on_sampling_cap: Literal["error", "partial"] = "partial"
    # What "zero variance" is judged on: "scores" or a reward component (DLER: the raw score before truncation).
    dynamic_sampling_on: str = "scores"
    # Rewards: retries for a reward model that raises, before its scores become NaN (counted).
    reward_retries: int = 2
    # Checkpoints: every `save_every` steps (0 = only at the end), keep the last `keep_last`.
    save_every: int = 0
    keep_last: int = 3
    resume: str = "auto"
    # Logging.
    log_every: int = 1
    num_log_samples: int = 4
    trackers: list[str] = field(default_factory=list)
    progress: bool = True

    def __post_init__(self) -> None:
        positive = (
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
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"trainer.num_threads must be >= 1 or null, got {self.num_threads}")
        for name in (
            "warmup_steps",
            "save_every",
            "reward_retries",
            "num_log_samples",
            "critic_warmup_steps",
            "eval_every",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"trainer.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr_schedule == "constant" and self.warmup_steps > 0:
            raise ValueError(
                f"trainer.lr_schedule='constant' ignores warmup_steps={self.warmup_steps}; "
                "use lr_schedule='constant_with_warmup' (or warmup_steps=0)"
            )
        if self.lr <= 0:
            raise ValueError(f"trainer.lr must be > 0, got {self.lr}")
        if self.eval_mode not in ("min", "max"):
            raise ValueError(f"trainer.eval_mode must be 'min' or 'max', got {self.eval_mode!r}")
        if self.eval_metric is not None and self.eval_every == 0:
            raise ValueError(f"trainer.eval_metric={self.eval_metric!r} needs trainer.eval_every > 0")
        n = self.prompts_per_step * self.group_size
        if self.num_minibatches * self.gradient_accumulation_steps > n:
            raise ValueError(
                f"trainer.num_minibatches × gradient_accumulation_steps = "
                f"{self.num_minibatches * self.gradient_accumulation_steps} exceeds the {n} samples per step"
            )
