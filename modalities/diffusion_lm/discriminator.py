"""DiDi-Instruct's self-training reward model (arXiv:2509.25035): `DiscriminatorReward` runs one discriminator update
on (real, fake) in every call, then scores the fake rows with the clamped log-odds averaged over masked positions
(spec docs/methods/didi_instruct.md §6, §11). The network and its loss are in `discriminator_model`, the teacher and
held-out row sources in `discriminator_rows`; configs name `discriminator_from_teacher` here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from modalities.diffusion_lm.discriminator_model import (
    Discriminator,
    discriminator_from_teacher,
    discriminator_log_odds,
    discriminator_loss,
    sequence_reward,
    smoothed_bce,
)
from modalities.diffusion_lm.discriminator_rows import RealRowSource
from modalities.diffusion_lm.sampling import check_time_grid
from rewards.base import RewardOutput
from toolkit import distributed

# With the `discriminator_model` names that configs, docs and tests import from this module (re-exported).
__all__ = [
    "Discriminator",
    "DiscriminatorReward",
    "RealSource",
    "Positions",
    "check_single_process",
    "discriminator_from_teacher",
    "discriminator_log_odds",
    "discriminator_loss",
    "linear_warmup_decay",
    "sequence_reward",
    "smoothed_bce",
    "stack_sample_tokens",
]


def linear_warmup_decay(step: int, warmup_steps: int, total_steps: int, lr: float, min_lr: float) -> float:
    """Learning rate at `step`: linear warm-up to `lr`, then linear decay to `min_lr` at `total_steps` (spec §11).

    Args:
        step: optimizer steps taken so far.
        warmup_steps: warm-up length (1000 in the development code).
        total_steps: step at which `min_lr` is reached (`trainer.max_steps`).
        lr: peak learning rate.
        min_lr: final learning rate (1e-8).
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (lr - min_lr) * (1.0 - progress)


RealSource = Literal["data", "teacher"]
Positions = Literal["masked", "all"]


def check_single_process() -> None:
    """RuntimeError unless one process trains: the discriminator's own update is not synchronised across ranks."""
    world = distributed.world_size()
    if world > 1:
        raise RuntimeError(
            f"DiscriminatorReward trains itself inside its reward call with its own AdamW, outside accelerate, but "
            f"torch.distributed runs {world} processes: each rank would update its own discriminator on its own "
            "rows and the copies would silently drift apart (different rewards for the same sample). Run DiDi on "
            "one process (launch without accelerate/torchrun multi-process), or use train=False for a fixed scorer."
        )


class DiscriminatorReward(RealRowSource):
    """Self-training reward model: one discriminator update on (real, fake), then the log-odds reward (spec §6, §11).

    Inputs through the reward interface: `samples` are the sampler's completion dicts {"tokens": [L] ids,
    "tau": float, ...} (student sequences x and their coupled time τ); real rows come from the per-row
    metadata `input_ids` (the sampler's prompt rows) when `real_source="data"` ([Third-party code], default),
    or are sampled from `teacher` with `teacher_num_steps` ancestral steps (`"teacher"`, the paper's text).
    Both sides are corrupted at the same τ with fresh masks (coupled time); the discriminator sees the real
    σ_τ = −log α_τ. The update uses its own AdamW, linear warm-up + linear decay, `nan_to_num` on the
    gradients and norm clipping. The reward is computed after the update, under no_grad in float32.
    With `train=False` it is a plain scorer. Metrics: `loss`, `acc_real`, `acc_fake`, `grad_norm`, `lr` (and the
    held-out monitor's `acc_real_holdout`, `reward_real_holdout`, `reward_real` with `teacher_holdout_size` or
    `data_holdout`).

    Single process only: the optimizer is not prepared by accelerate and the gradients are not all-reduced, so
    on several processes each rank's copy would train on its own rows and silently drift apart. Every training
    update therefore raises a RuntimeError when torch.distributed runs with world size > 1 (`train=False`, a
    fixed scorer, is fine anywhere).

    Discriminator warm-up (DiDi's `discriminator_warmup_steps`) is `trainer.critic_warmup_steps`: the reward is
    called, and so trains, in every trainer step (once per sampling round with dynamic sampling), while the first
    `critic_warmup_steps` steps leave the student untouched (no backward, optimizer, lr-scheduler or
    `after_optimizer_step` EMA step; its samples come from the initial student). Those steps still count in
    `trainer.num_steps` and in this reward's own lr schedule (`warmup_steps` / `total_steps` count reward calls,
    warm-up calls included).
    """

    def __init__(
        self,
        discriminator: Discriminator,
        train: bool = True,
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 1000,
        total_steps: int = 10_000,
        min_lr: float = 1e-8,
        max_grad_norm: float = 1.0,
        label_smoothing: float = 0.1,
        reward_clip: float = 8.0,
        logodds_eps: float = 1e-6,
        schedule: str = "loglinear",
        schedule_eps: float = 1e-3,
        real_source: RealSource = "data",
        teacher: Any = None,
        teacher_num_steps: int = 64,
        teacher_time_grid: str = "uniform",
        teacher_pool_size: int = 0,
        teacher_pool_refresh: int = 0,
        teacher_holdout_size: int = 0,
        data_holdout: Any = None,
        data_holdout_size: int = 256,
        seed: int = 0,
        updates_per_call: int = 1,
        reward_num_corruptions: int = 1,
        positions: Positions = "masked",
    ) -> None:
        """Store the config and build the optimizer (keyword names are the YAML keys; see the class docstring).

        `updates_per_call` (1 = spec) discriminator steps per reward call, each on fresh corruption masks;
        `reward_num_corruptions` (1 = spec) averages the reward over that many independent corruptions of each
        sample at its τ (the first is the one the update saw), a variance reduction of the same estimator.
        Both are [Our decision] switches for small batches, where one noisy step per call lets the student outrun
        the discriminator. `positions` = "masked" (spec §6: the BCE and the reward average over masked positions)
        or "all" ([Our decision]: every position, so unmasked tokens are judged in context too).
        `teacher_pool_size` > 0 with `real_source="teacher"` samples that many teacher rows once, at the first
        call, and draws each call's real rows from that pool ([Our decision]: a long teacher rollout per step is
        the dominant cost otherwise); the pool is checkpointed with the discriminator. A small pool gets memorised:
        the discriminator then rewards "is one of the pooled rows", not "looks like the teacher".
        `teacher_pool_refresh` > 0 replaces that many pooled rows (oldest first) with fresh teacher samples at
        every training call: each real row is then seen about (rows per call) / refresh times, whatever the pool
        size (refresh = rows per call is the paper's fresh teacher samples at the pool's memory cost).
        `teacher_time_grid` is the time grid of every teacher sample (pool, refresh, held-out rows and fresh rows):
        "uniform" (the spec's) or "cosine" (`sampling.sampling_grid`).
        `teacher_holdout_size` > 0 (real side "teacher") samples that many teacher rows that never train the
        discriminator and logs, at every training call, its accuracy and mean reward on them next to the same on
        the call's real rows (`acc_real_holdout`, `reward_real_holdout`, `reward_real`): a gap between the two is
        memorisation, as a gap between train and validation loss is overfitting. The monitor has its own
        generator, so switching it on does not change training. `data_holdout` (real side "data") is the same
        monitor for data rows: a dataset the discriminator never trains on (e.g. the corpus's "valid" split, a
        `TokenDataset` or `ProteinDataset`), of which the first `data_holdout_size` rows are held out.
        """
        if real_source not in get_args(RealSource):
            raise ValueError(f"real_source={real_source!r} is not one of {get_args(RealSource)}")
        if real_source == "teacher" and teacher is None:
            raise ValueError("real_source='teacher' needs a teacher MaskedDiffusionLM")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 0.5)")
        if positions not in get_args(Positions):
            raise ValueError(f"positions={positions!r} is not one of {get_args(Positions)}")
        if teacher_pool_size < 0:
            raise ValueError(f"teacher_pool_size={teacher_pool_size} must be >= 0")
        if not 0 <= teacher_pool_refresh <= teacher_pool_size:
            raise ValueError(
                f"teacher_pool_refresh={teacher_pool_refresh} must be in [0, teacher_pool_size={teacher_pool_size}]"
            )
        if teacher_holdout_size < 0:
            raise ValueError(f"teacher_holdout_size={teacher_holdout_size} must be >= 0")
        if (teacher_pool_refresh or teacher_holdout_size) and real_source != "teacher":
            raise ValueError(
                "teacher_pool_refresh and teacher_holdout_size need real_source='teacher' "
                f"(got real_source={real_source!r}; data_holdout is the monitor for real_source='data')"
            )
        if data_holdout is not None and real_source != "data":
            raise ValueError(
                f"data_holdout needs real_source='data' (got real_source={real_source!r}; "
                "teacher_holdout_size is the monitor for real_source='teacher')"
            )
        if data_holdout is not None and not hasattr(data_holdout, "next_batch"):
            raise ValueError(
                f"data_holdout must be a dataset with next_batch(n) (e.g. TokenDataset), got {type(data_holdout)}"
            )
        if data_holdout_size < 1:
            raise ValueError(f"data_holdout_size={data_holdout_size} must be >= 1")
        if updates_per_call < 1 or reward_num_corruptions < 1:
            raise ValueError(
                f"updates_per_call={updates_per_call} and reward_num_corruptions={reward_num_corruptions} must be >= 1"
            )
        if warmup_steps < 0 or total_steps < 1 or lr <= 0 or max_grad_norm <= 0:
            raise ValueError("need warmup_steps >= 0, total_steps >= 1, lr > 0 and max_grad_norm > 0")
        from modalities.diffusion_lm.schedules import make_schedule

        self.discriminator, self.train, self.teacher = discriminator, bool(train), teacher
        self.lr, self.min_lr, self.warmup_steps, self.total_steps = lr, min_lr, warmup_steps, total_steps
        self.max_grad_norm, self.label_smoothing = max_grad_norm, label_smoothing
        self.reward_clip, self.logodds_eps, self.real_source = reward_clip, logodds_eps, real_source
        self.teacher_num_steps, self.teacher_pool_size = teacher_num_steps, teacher_pool_size
        self.teacher_time_grid = check_time_grid(teacher_time_grid, "teacher_time_grid")
        self.teacher_pool: Tensor | None = None
        self.teacher_pool_refresh, self.teacher_holdout_size = teacher_pool_refresh, teacher_holdout_size
        self.pool_cursor = 0
        self.data_holdout, self.data_holdout_size = data_holdout, data_holdout_size
        self.holdout_rows: Tensor | None = None
        self.monitor_generator = torch.Generator().manual_seed(seed + 1)
        self.updates_per_call, self.reward_num_corruptions = updates_per_call, reward_num_corruptions
        self.positions = positions
        self.schedule = make_schedule(schedule, eps=schedule_eps)
        params = [p for p in discriminator.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, eps=adam_eps, weight_decay=weight_decay)
        self.generator = torch.Generator().manual_seed(seed)
        self.num_updates = 0

    @property
    def device(self) -> torch.device:
        return next(self.discriminator.parameters()).device

    def __call__(self, prompts: Sequence[Any], samples: Sequence[Any], **metadata: Any) -> RewardOutput:
        fake = stack_sample_tokens(samples).to(self.device)
        tau = torch.tensor([float(s["tau"]) for s in samples], dtype=torch.float32, device=self.device)
        z_fake = self.corrupt(fake, tau)
        metrics: dict[str, float] = {}
        if self.train:
            real = self.real_batch(fake.shape, metadata)
            for update in range(self.updates_per_call):
                fresh = z_fake if update == 0 else self.corrupt(fake, tau)
                metrics = self.update(self.corrupt(real, tau), fresh, tau)
            if self.teacher_holdout_size > 0 or self.data_holdout is not None:
                metrics |= self.holdout_metrics(real, tau)
        scores = self.score_corrupted(z_fake, tau)
        for _ in range(self.reward_num_corruptions - 1):
            scores = scores + self.score_corrupted(self.corrupt(fake, tau), tau)
        scores = scores / self.reward_num_corruptions
        return RewardOutput(scores=scores.cpu(), metrics=metrics)

    def sigma(self, tau: Tensor) -> Tensor:
        """σ_τ = −log α_τ [N] (the discriminator sees the real σ)."""
        return -torch.log(self.schedule.alpha(tau.double())).float()

    def corrupt(self, tokens: Tensor, tau: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Absorbing corruption of [N, L] ids at per-row times τ [N], with this reward's own generator by default."""
        from modalities.diffusion_lm.masked_diffusion import corrupt

        alpha = self.schedule.alpha(tau.double()).float()
        noisy, _ = corrupt(tokens.cpu(), alpha.cpu(), self.discriminator.mask_id, generator or self.generator)
        return noisy.to(tokens.device)

    def real_batch(self, shape: torch.Size, metadata: dict[str, Any]) -> Tensor:
        """[N, L] real rows: the data rows (metadata `input_ids`) or fresh teacher samples."""
        if self.real_source == "teacher" and self.teacher_pool_size > 0:
            if self.teacher_pool is None or self.teacher_pool.shape[1] != shape[1]:
                self.teacher_pool = self.sample_teacher_pool(shape[1])
            elif self.teacher_pool_refresh > 0:
                self.refresh_pool()
            index = torch.randint(0, self.teacher_pool.shape[0], (shape[0],), generator=self.generator)
            return self.teacher_pool[index].to(self.device)
        if self.real_source == "teacher":
            return self.sample_teacher(shape[0], shape[1]).to(self.device)
        if "input_ids" not in metadata:
            raise ValueError("real_source='data' needs per-row `input_ids` metadata (the sampler's data rows)")
        real = torch.as_tensor(metadata["input_ids"], dtype=torch.long, device=self.device)
        if real.shape != shape:
            raise ValueError(f"real rows have shape {tuple(real.shape)}, the samples {tuple(shape)}")
        return real

    @torch.no_grad()
    def holdout_metrics(self, real: Tensor, tau: Tensor) -> dict[str, float]:
        """Accuracy and mean reward on held-out rows against the same on this call's real rows.

        Both sides are corrupted at this call's τ with the monitor's own generator (training's stream is untouched);
        the held-out rows are drawn once, at the first call, like the pool, and checkpointed.
        """
        if self.holdout_rows is None or self.holdout_rows.shape[1] != real.shape[1]:
            self.holdout_rows = self.held_out_rows(real.shape[1])
        index = torch.randint(0, self.holdout_rows.shape[0], (real.shape[0],), generator=self.monitor_generator)
        out: dict[str, float] = {}
        for name, rows in (("real", real), ("real_holdout", self.holdout_rows[index].to(real.device))):
            z = self.corrupt(rows, tau, self.monitor_generator)
            logits, scored = self.eval_logits(z, tau), self.scored(z)
            out[f"reward_{name}"] = float(sequence_reward(logits, scored, self.logodds_eps, self.reward_clip).mean())
            if name == "real_holdout":
                out["acc_real_holdout"] = float(((logits > 0) & scored).sum() / scored.sum().clamp_min(1))
        return out

    def update(self, z_real: Tensor, z_fake: Tensor, tau: Tensor) -> dict[str, float]:
        """One discriminator step on corrupted real and (detached) fake rows; returns its metrics."""
        check_single_process()
        d = self.discriminator
        # The schedule counts reward calls (= student steps, like `total_steps`), not discriminator updates.
        calls = self.num_updates // self.updates_per_call
        lr = linear_warmup_decay(calls, self.warmup_steps, self.total_steps, self.lr, self.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        d.train()
        sigma = self.sigma(tau)
        real_logits, fake_logits = d(z_real, sigma), d(z_fake.detach(), sigma)
        m_real, m_fake = self.scored(z_real), self.scored(z_fake)
        loss = discriminator_loss(real_logits, m_real, fake_logits, m_fake, self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        params = [p for p in d.parameters() if p.grad is not None]
        for p in params:
            torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)  # type: ignore[arg-type]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.num_updates += 1
        with torch.no_grad():
            acc_real = ((real_logits > 0) & m_real).sum() / m_real.sum().clamp_min(1)
            acc_fake = ((fake_logits < 0) & m_fake).sum() / m_fake.sum().clamp_min(1)
        return {
            "loss": float(loss.detach()),
            "acc_real": float(acc_real),
            "acc_fake": float(acc_fake),
            "grad_norm": float(grad_norm),
            "lr": lr,
        }

    @torch.no_grad()
    def score_corrupted(self, z: Tensor, tau: Tensor) -> Tensor:
        """[N] clamped log-odds rewards of already-corrupted rows z [N, L] at times τ (fp32, no grad)."""
        return sequence_reward(self.eval_logits(z, tau), self.scored(z), self.logodds_eps, self.reward_clip)

    def eval_logits(self, z: Tensor, tau: Tensor) -> Tensor:
        """[N, L] discriminator logits of corrupted rows in eval mode (its train/eval mode is restored)."""
        was_training = self.discriminator.training
        self.discriminator.eval()
        logits = self.discriminator(z, self.sigma(tau))
        self.discriminator.train(was_training)
        return logits  # type: ignore[no-any-return]

    def scored(self, z: Tensor) -> Tensor:
        """[N, L] bool positions the loss and the reward average over (`positions`)."""
        if self.positions == "all":
            return torch.ones_like(z, dtype=torch.bool)
        return z == self.discriminator.mask_id

    def score(self, tokens: Tensor, tau: Tensor) -> Tensor:
        """Standalone scorer: corrupt clean rows [N, L] at τ [N] and return their [N] rewards (no update)."""
        return self.score_corrupted(self.corrupt(tokens.to(self.device), tau.to(self.device)), tau.to(self.device))

    def state_dict(self) -> dict[str, Any]:
        """Discriminator weights, optimizer, update count and generator state (checkpointed by the trainer)."""
        return {
            "discriminator": self.discriminator.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "num_updates": self.num_updates,
            "generator": self.generator.get_state(),
            "teacher_pool": self.teacher_pool,
            "pool_cursor": self.pool_cursor,
            "holdout_rows": self.holdout_rows,
            "monitor_generator": self.monitor_generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.discriminator.load_state_dict(state["discriminator"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.num_updates = int(state["num_updates"])
        self.generator.set_state(state["generator"])
        self.teacher_pool = state.get("teacher_pool")
        self.pool_cursor = int(state.get("pool_cursor", 0))
        self.holdout_rows = state.get("holdout_rows", state.get("teacher_holdout"))  # the key before data_holdout
        if "monitor_generator" in state:
            self.monitor_generator.set_state(state["monitor_generator"])


def stack_sample_tokens(samples: Sequence[Any]) -> Tensor:
    """[N, L] LongTensor from completion dicts {"tokens": ...} (or bare token sequences)."""
    if not samples:
        raise ValueError("no samples to score")
    rows = [s["tokens"] if isinstance(s, Mapping) else s for s in samples]
    return torch.stack([torch.as_tensor(r, dtype=torch.long) for r in rows])
