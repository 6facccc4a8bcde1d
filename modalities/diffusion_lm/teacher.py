"""Train a masked-diffusion teacher with the MDLM NELBO: AdamW + linear warm-up, progress bar, resumable checkpoints.

Spec docs/methods/didi_instruct.md §2 (MDLM arXiv:2406.07524: AdamW 3e-4, betas (0.9, 0.999), wd 0, linear warm-up then
constant); the NELBO is `blockwise_nelbo` (no fp32 [B, L, V] log-probs). Simplified: no teacher EMA, one process.
Checkpoints go through `toolkit.io.checkpoint` (atomic, keep-last-K, resume="auto"); metrics to
`run_dir/metrics.jsonl`; `summary.json` is written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from modalities.diffusion_lm.dit import DiT, DiTConfig
from modalities.diffusion_lm.masked_diffusion import MaskedDiffusionLM, antithetic_times, corrupt
from modalities.diffusion_lm.schedules import make_schedule
from modalities.diffusion_lm.subs_stats import subs_stats
from modalities.diffusion_lm.text_data import collate_input_ids
from toolkit.interfaces import DataSource
from toolkit.io.atomic import write_json_atomic
from toolkit.io.checkpoint import (
    CheckpointManager,
    CheckpointState,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)
from toolkit.io.console import ProgressBar
from toolkit.io.logging import MetricsLogger
from toolkit.io.resume import resolve_resume
from toolkit.io.run_dir import RunDirLock, prepare_run_dir
from toolkit.train.interrupt import GracefulInterrupt

TEACHER_KIND = "dlm_teacher"


@dataclass
class TeacherResult:
    """What `train_teacher` did: the step reached, the last logged loss, and the final checkpoint."""

    step: int
    loss: float
    checkpoint: Path | None
    interrupted: bool = False
    history: list[float] = field(default_factory=list)


@torch.no_grad()
def evaluate_nelbo(
    model: MaskedDiffusionLM,
    chunks: Sequence[Sequence[int]] | Tensor,
    batch_size: int = 32,
    num_repeats: int = 4,
    seed: int = 0,
) -> float:
    """Mean per-token NELBO (nats; exp of it bounds the perplexity) over every chunk, `num_repeats` t draws each."""
    ids = torch.as_tensor(chunks, dtype=torch.long) if not isinstance(chunks, Tensor) else chunks
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training, total, count = model.training, 0.0, 0
    model.eval()
    for _ in range(num_repeats):
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size].to(device)
            total += float(blockwise_nelbo(model, batch, generator)) * batch.numel()
            count += batch.numel()
    model.train(was_training)
    return total / count


def blockwise_nelbo(
    model: MaskedDiffusionLM, x: Tensor, generator: torch.Generator | None = None, chunk_rows: int | None = None
) -> Tensor:
    """`model.nelbo(x, generator)` without the fp32 [B, L, V] SUBS log-probs: the same draws and, on CPU, bitwise the
    same value; log x_θ(z)[x] is taken at the masked positions a block at a time (`subs_stats`), so backward keeps
    the logits and per-position values only.

    Args:
        model: the teacher. x: [B, L] clean ids. generator: draws t and the corruption.
        chunk_rows: positions per block (None: `subs_stats`' default).
    """
    t = antithetic_times(x.shape[0], generator, device=x.device)
    z, masked = corrupt(x, model.schedule.alpha(t), model.mask_id, generator)
    log_px = subs_stats(model.logits_at(z, t), z, model.mask_id, targets=x, chunk_rows=chunk_rows).picked
    assert log_px is not None
    return (-log_px * model.schedule.loss_weight(t).float().unsqueeze(-1) * masked).mean()


LR_SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine")


def lr_factor(
    step: int, warmup_steps: int, num_steps: int, schedule: str = "constant", min_ratio: float = 0.1
) -> float:
    """LR multiplier after `step` scheduler steps: linear warm-up, then constant (MDLM) or a linear/cosine decay
    from 1 to `min_ratio` at `num_steps`."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, num_steps - warmup_steps))
    shape = 1 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return min_ratio + (1 - min_ratio) * shape


def _save(
    manager: CheckpointManager,
    step: int,
    model: MaskedDiffusionLM,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    data: Any,
    generator: torch.Generator,
    meta: dict[str, Any],
) -> Path:
    objects = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "data": data.state_dict(),
        "generator": generator.get_state(),
    }
    model_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return manager.save(CheckpointState(step, model_state, objects, capture_rng_state(), meta))


def teacher_meta(model: MaskedDiffusionLM) -> dict[str, Any]:
    """JSON metadata that lets `load_teacher` rebuild the model (DiT config, schedule, time conditioning)."""
    config = getattr(model.backbone, "config", None)
    return {
        "kind": TEACHER_KIND,
        "dit_config": config.to_dict() if isinstance(config, DiTConfig) else None,
        "schedule": type(model.schedule).__name__,
        "schedule_args": dict(vars(model.schedule)),
        "time_conditioning": model.time_conditioning,
    }


def train_teacher(
    model: MaskedDiffusionLM,
    data: DataSource,
    num_steps: int,
    lr: float = 3e-4,
    batch_size: int = 32,
    run_dir: str | Path | None = None,
    warmup_steps: int = 100,
    lr_schedule: str = "constant",
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    seed: int = 0,
    save_every: int = 0,
    keep_last: int = 2,
    resume: str = "auto",
    log_every: int = 10,
    progress: bool = True,
    overwrite: bool = False,
) -> TeacherResult:
    """Minimise the MDLM NELBO of `model` on `data` for `num_steps` optimizer steps (resumable).

    Args:
        model: the teacher (on its device). data: a DataSource (e.g. TokenDataset) of {"input_ids": [L]} rows;
            its `batches` iterator is advanced once per step, so its state_dict resumes exactly.
        run_dir: checkpoints, metrics.jsonl and summary.json go here; None trains without saving.
        lr_schedule: after the linear warm-up: "constant" (MDLM), "linear" or "cosine" decay to
            `min_lr_ratio`·lr at `num_steps`.
        save_every: checkpoint every this many steps (0: only at the end and on SIGINT/SIGTERM).
        resume: "auto" (latest checkpoint of run_dir that verifies), "never", or a checkpoint path.
        progress: show a progress bar with the running loss.
        overwrite: with resume="never" on a run_dir holding a run, move that run aside instead of failing.
    """
    if num_steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need num_steps >= 1, batch_size >= 1, lr > 0; got {num_steps}, {batch_size}, {lr}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, num_steps, lr_schedule, min_lr_ratio)
    )
    lock = RunDirLock(run_dir).acquire() if run_dir is not None else None  # one trainer per run dir
    try:
        if run_dir is not None:
            prepare_run_dir(run_dir, resume, overwrite)
        manager = CheckpointManager(run_dir, keep_last=keep_last) if run_dir is not None else None
        start = _maybe_resume(manager, resume, model, optimizer, scheduler, data, generator)
        meta = teacher_meta(model)
        logger = MetricsLogger(run_dir, resume_step=start) if run_dir is not None else None
        result = TeacherResult(step=start, loss=math.nan, checkpoint=None)
        batches = data.batches(batch_size, generator)
        model.train()
        with GracefulInterrupt() as interrupt, ProgressBar(num_steps, start, progress, description="teacher") as bar:
            for step in range(start + 1, num_steps + 1):
                loss = _train_step(model, optimizer, scheduler, next(batches), grad_clip, generator, device)
                result.step, result.loss = step, loss
                result.history.append(loss)
                bar.update(step, {"loss": loss})
                if logger is not None and (step % log_every == 0 or step == num_steps):
                    logger.log(step, {"loss/nelbo": loss, "optim/lr": float(scheduler.get_last_lr()[0])})
                stop = interrupt.requested
                if manager is not None and (stop or step == num_steps or (save_every and step % save_every == 0)):
                    result.checkpoint = _save(manager, step, model, optimizer, scheduler, data, generator, meta)
                if stop:
                    result.interrupted = True
                    break
        if logger is not None:
            logger.close()
            summary = {"step": result.step, "loss": result.loss, **meta}
            write_json_atomic(Path(run_dir) / "summary.json", summary, sort_keys=True)  # type: ignore[arg-type]
        return result
    finally:
        if lock is not None:
            lock.release()


def _train_step(
    model: MaskedDiffusionLM,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    rows: list[Any],
    grad_clip: float,
    generator: torch.Generator,
    device: torch.device,
) -> float:
    x = collate_input_ids(rows, device)
    loss = blockwise_nelbo(model, x, generator)
    if not torch.isfinite(loss):
        raise ValueError(f"teacher NELBO is {float(loss)}; lower the lr or check the data")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # type: ignore[no-untyped-call]
    for p in model.parameters():
        if p.grad is not None:
            torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


def _maybe_resume(
    manager: CheckpointManager | None,
    resume: str,
    model: MaskedDiffusionLM,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    data: Any,
    generator: torch.Generator,
) -> int:
    if manager is None:
        return 0
    path = resolve_resume(resume, manager.run_dir)
    if path is None:
        return 0
    state = load_checkpoint(path)
    model.load_state_dict(state.model)
    optimizer.load_state_dict(state.objects["optimizer"])
    scheduler.load_state_dict(state.objects["scheduler"])
    data.load_state_dict(state.objects["data"])
    generator.set_state(state.objects["generator"])
    restore_rng_state(state.rng)
    return state.step


def load_teacher(
    path: str | Path, device: torch.device | str = "cpu", mixed_precision: str = "no"
) -> MaskedDiffusionLM:
    """A teacher saved by `train_teacher`: a checkpoint directory or a run directory (its latest checkpoint)."""
    resolved = resolve_resume(str(path), Path(path))
    if resolved is None:
        raise ValueError(f"no teacher checkpoint at {path}")
    state = load_checkpoint(resolved)
    if state.meta.get("kind") != TEACHER_KIND or not state.meta.get("dit_config"):
        raise ValueError(f"{resolved} is not a DiT teacher checkpoint written by train_teacher (meta kind/dit_config)")
    names = {"LogLinearSchedule": "loglinear", "LinearSchedule": "linear", "CosineSchedule": "cosine"}
    schedule = make_schedule(names[state.meta["schedule"]], **state.meta["schedule_args"])
    model = MaskedDiffusionLM(
        DiT(DiTConfig(**state.meta["dit_config"])),
        schedule=schedule,
        time_conditioning=bool(state.meta["time_conditioning"]),
        mixed_precision=mixed_precision,
    )
    model.load_state_dict(state.model)
    return model.to(device).eval()
