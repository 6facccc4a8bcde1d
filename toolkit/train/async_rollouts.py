"""Async one-step-off-policy rollouts (`trainer.async_rollouts`): step k+1's rollout is generated in a background
thread, with a snapshot of step k's weights, while step k updates; the staleness is bounded to one step and the
off-policy gap is corrected by truncated importance sampling.

Failures: whatever the background rollout raised (a `server` engine's EngineUnavailableError after its retries) is
raised as is by the next step, in the main thread, after that rollout's thread has ended; no rollout is ever empty.
Each rollout has a daemon thread of its own, so a failed one leaves nothing running. A checkpoint waits for the
rollout in flight but not for its outcome (the steps taken are saved even when it failed). After a resume, or a
step that raised, the next step samples on-policy again (the in-flight rollout's prompts are skipped).

Simplified: one process (no sharding), the snapshot is a full copy of the policy (or, with a `server` engine,
whatever that copy pushes), and dropout must be off in the update: CPU sampling draws from torch's global RNG,
which the background thread shares with the main one.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from toolkit import distributed as dist
from toolkit.interfaces import Policy
from toolkit.rollout import Rollout

AsyncCorrection = Literal["tis", "mis"]
BEHAVIOUR_KEY = "behaviour_logprobs"  # rollout.data: the generating (stale) weights' log-probs [N, T]


def importance_weights(
    old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, cap: float, correction: AsyncCorrection
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Per-token corrections of a stale rollout: (weights [N, T], mask [N, T], metrics).

    ratio = exp(old - behaviour) = pi_old_train / pi_behaviour per trained token. "tis" (truncated importance
    sampling, as verl's and OpenRLHF's TIS options): weight = min(ratio, cap), mask kept. "mis" (masked
    importance sampling): weight 1, tokens whose ratio exceeds `cap` leave the mask.

    Args:
        old_logprobs: [N, T] log-probs under the weights being trained (before this step's update).
        behaviour_logprobs: [N, T] log-probs under the weights that generated the rollout.
        mask: [N, T] trained tokens.
        cap: C >= 1.
        correction: "tis" or "mis".
    """
    if correction not in get_args(AsyncCorrection):
        raise ValueError(f"correction={correction!r} is not one of {list(get_args(AsyncCorrection))}")
    if not cap >= 1.0:
        raise ValueError(f"the importance-ratio cap must be >= 1, got {cap}")
    ratio = torch.where(
        mask, torch.exp(old_logprobs.float() - behaviour_logprobs.float()), torch.ones_like(old_logprobs)
    )
    over = mask & (ratio > cap)
    if correction == "tis":
        weights, kept = ratio.clamp(max=cap), mask
    else:
        weights, kept = torch.ones_like(ratio), mask & ~over
    trained = ratio[mask]
    count = max(int(mask.sum()), 1)
    metrics = {
        "async/is_ratio_mean": float(trained.mean()) if trained.numel() else 1.0,
        "async/is_ratio_max": float(trained.max()) if trained.numel() else 1.0,
        "async/is_clipped_frac": float(over.sum()) / count,
    }
    return weights, kept, metrics


class _Pending:
    """One rollout generating in a daemon thread of its own; `result()` joins the thread, then returns or raises.

    Args:
        collect: what generates it (`Trainer.collect`), called with `policy` (the snapshot).
        step: the step whose weights generate it.
    """

    def __init__(self, collect: Callable[[Policy], Rollout], policy: Policy, step: int) -> None:
        self.step = step
        self.future: Future[Rollout] = Future()
        # Named after the step it is for; a daemon, so a rollout still retrying never holds the interpreter's exit.
        self.thread = threading.Thread(
            target=self._run, args=(collect, policy), name=f"renorm-rollout-{step + 1}", daemon=True
        )
        self.thread.start()

    def _run(self, collect: Callable[[Policy], Rollout], policy: Policy) -> None:
        self.future.set_running_or_notify_cancel()
        try:
            rollout = collect(policy)
        except BaseException as error:  # kept for the main thread, which raises it
            self.future.set_exception(error)
        else:
            self.future.set_result(rollout)

    def join(self) -> None:
        """Block until the rollout is generated or failed (the thread has ended)."""
        self.thread.join()

    def result(self) -> Rollout:
        """The rollout, or its error raised here (the background thread has ended either way)."""
        self.join()
        return self.future.result()


class AsyncRollouts:
    """Produces each step's rollout; with `overlap`, step k+1's in a background thread during step k's update.

    Args:
        collect: samples, scores and transforms one rollout with the given policy (`Trainer.collect`).
        policy: the trained policy (its weights are copied into the snapshot before each background rollout).
        num_steps: the run's steps (no rollout is prefetched after the last one).
        overlap: False generates every rollout in the foreground with the current weights (staleness 0): exactly
            the synchronous path, for checks.
        correction, cap: `importance_weights`' mode and C.
    """

    def __init__(
        self,
        collect: Callable[[Policy], Rollout],
        policy: Policy,
        num_steps: int,
        overlap: bool = True,
        correction: AsyncCorrection = "tis",
        cap: float = 2.0,
    ) -> None:
        if correction not in get_args(AsyncCorrection):
            raise ValueError(f"trainer.async_correction={correction!r} is not one of {list(get_args(AsyncCorrection))}")
        self.collect, self.policy, self.num_steps = collect, policy, num_steps
        self.overlap, self.correction, self.cap = overlap, correction, cap
        self.snapshot: Policy | None = copy.deepcopy(policy) if overlap else None
        self._pending: _Pending | None = None

    def next(self, step: int) -> Rollout:
        """Step `step`'s rollout (the prefetched one if any), then start step + 1's with a snapshot of these weights.

        Raises:
            Exception: whatever the prefetched rollout raised in the background (EngineUnavailableError when a
                server stayed down), as is; nothing is left running, and the next call samples in the foreground.
        """
        if self._pending is not None:
            pending, self._pending = self._pending, None
            rollout, generated_at = pending.result(), pending.step
        else:
            rollout, generated_at = self.collect(self.policy), step
        if self.snapshot is not None and step + 1 < self.num_steps:
            _copy_weights(self.policy, self.snapshot)
            self._pending = _Pending(self.collect, self.snapshot, step)
        rollout.metrics["async/staleness"] = float(step - generated_at)
        rollout.metrics["async/behaviour_step"] = float(generated_at)
        return rollout

    def correct(self, rollout: Rollout) -> Rollout:
        """Re-score a stale rollout with the current weights and apply the TIS/MIS correction (on-policy: as is).

        The sampler's old_logprobs (the snapshot's) become `data["behaviour_logprobs"]`; old_logprobs become the
        current weights'; advantages [N] or [N, T] are multiplied by the TIS weights, or MIS drops tokens.
        """
        if rollout.metrics.get("async/staleness", 0.0) == 0.0:
            return rollout
        assert rollout.advantages is not None, "correct() runs after the advantages"
        module = self.policy.module
        module.eval()
        try:
            with torch.no_grad():
                old = self.policy.log_probs(rollout).detach()
        finally:
            module.train()
        behaviour = rollout.old_logprobs
        weights, mask, metrics = importance_weights(old, behaviour, rollout.mask, self.cap, self.correction)
        advantages = rollout.advantages
        rollout.advantages = (advantages[:, None] if advantages.dim() == 1 else advantages) * weights.to(advantages)
        rollout.data[BEHAVIOUR_KEY] = behaviour
        rollout.old_logprobs, rollout.mask = old, mask
        rollout.metrics.update(metrics)
        return rollout

    def wait(self) -> None:
        """Block until the rollout in flight (if any) is generated or failed, before a checkpoint reads the data
        stream and generator it draws from. Its error is not raised here but by the next `next`: the checkpoint of
        the steps already taken is still written."""
        if self._pending is not None:
            self._pending.join()

    def close(self) -> None:
        """Wait for the rollout in flight (its background thread ends), then drop it and any error it raised."""
        self.wait()
        self._pending = None


def build_async_rollouts(trainer: Any) -> AsyncRollouts:
    """The trainer's `AsyncRollouts`, refusing what it does not support; with overlap, the update's minibatch
    shuffling gets its own generator (the background thread owns `trainer.generator`: prompts and sampling seeds)
    and old log-probs are re-scored rather than taken from the update (the behaviour ones are needed)."""
    cfg = trainer.config
    if dist.world_size() > 1:
        raise ValueError("trainer.async_rollouts runs in one process (no DDP/FSDP/ZeRO yet)")
    if trainer._transforms_need_reference:
        raise ValueError("trainer.async_rollouts: a reward transform needing reference log-probs is not supported")
    rollouts = AsyncRollouts(
        trainer.collect, trainer.policy, cfg.num_steps, cfg.async_overlap, cfg.async_correction, cfg.async_ratio_cap
    )
    if cfg.async_overlap:
        trainer.old_logprobs_from_update = False
        trainer.update_generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7_919)
    return rollouts


def _copy_weights(source: Policy, target: Policy) -> None:
    """Copy `source`'s parameters and buffers into `target`'s module (in place: an engine sees a new version)."""
    state = dist.unwrap(source.module).state_dict()
    dist.unwrap(target.module).load_state_dict(state)
