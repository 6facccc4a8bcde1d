"""From a resolved config to a finished run: validate, build, resume, loop, log, checkpoint.

`RunSpec` lists the sections a run config may have; every object section is validated against
its constructor before anything (a model above all) is built, so a typo fails in a second.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from toolkit.config import ConfigError, build_dataclass, dump_config, instantiate, validate
from toolkit.config.types import source_of
from toolkit.distributed import all_reduce_sum
from toolkit.evaluation import EvalConfig
from toolkit.io.datasets import check_data_paths
from toolkit.io.export import ExportablePolicy
from toolkit.io.logging import MetricsLogger, ProgressBar, get_logger, print_samples_table
from toolkit.io.redaction import redact, register_secrets
from toolkit.io.resume import resolve_resume
from toolkit.io.run_dir import RunDirError, RunDirLock, prepare_run_dir
from toolkit.train.config_drift import CONFIG_FILE, Change, check_resume_config, is_run_key, record_changes
from toolkit.train.eval_hook import BestCheckpoint, evaluate_during_training, set_aside_stale_best
from toolkit.train.interrupt import GracefulInterrupt
from toolkit.train.schedules import Scheduler, optimizer_factory
from toolkit.train.trainer import Trainer, seed_everything
from toolkit.train.trainer_config import TrainerConfig, check_group_size

log = get_logger(__name__)


@dataclass
class RunSpec:
    """The sections of a training config (`base:` is consumed by the loader)."""

    policy: Any
    sampler: Any
    rewards: dict[str, Any]
    normalizer: Any
    objective: Any
    data: Any
    trainer: dict[str, Any] = field(default_factory=dict)
    transforms: list[Any] = field(default_factory=list)
    eval: dict[str, Any] = field(default_factory=dict)
    critic: Any = None
    optimizer: Any = None  # a torch.optim node without `params`; None = AdamW lr 1e-6 (toolkit.train.schedules)
    scheduler: Any = None  # a toolkit.train.schedules.Scheduler node; None = constant lr
    description: str = ""


# Keys that moved: TrainerConfig knobs now arguments of the `optimizer:` / `scheduler:` nodes, PolicyObjective
# arguments now arguments of its `term:` node (toolkit.objective.ClipTerm / CISPOTerm / SAPOTerm).
MOVED_KEYS = {
    "trainer.lr": "optimizer.lr",
    "trainer.adam_betas": "optimizer.betas",
    "trainer.adam_eps": "optimizer.eps",
    "trainer.weight_decay": "optimizer.weight_decay",
    "trainer.lr_schedule": "scheduler.name",
    "trainer.warmup_steps": "scheduler.warmup_steps",
    "objective.policy_term": "objective.term._component_ (toolkit.objective.ClipTerm, CISPOTerm or SAPOTerm)",
    "objective.clip_low": "objective.term.clip_low (toolkit.objective.ClipTerm)",
    "objective.clip_high": "objective.term.clip_high (toolkit.objective.ClipTerm)",
    "objective.dual_clip": "objective.term.dual_clip (toolkit.objective.ClipTerm)",
    "objective.cispo_eps_low": "objective.term.clip_low (toolkit.objective.CISPOTerm)",
    "objective.cispo_eps_high": "objective.term.clip_high (toolkit.objective.CISPOTerm)",
    "objective.sapo_tau_pos": "objective.term.tau_pos (toolkit.objective.SAPOTerm)",
    "objective.sapo_tau_neg": "objective.term.tau_neg (toolkit.objective.SAPOTerm)",
}


def build_trainer(config: Mapping[str, Any]) -> Trainer:
    """Validate every section, then build the objects and the Trainer.

    Everything is seeded with `trainer.seed` first, so components that draw random numbers when built (LoRA
    adapters, a discriminator head) start the same in every run and process. The cheap parts and the data
    are built before the policy and sampler, so a bad range or a missing file fails before any weights load.
    """
    register_secrets(config)  # before any component logs: its keys are scrubbed from every log line
    spec, trainer_cfg, eval_cfg = validate_run_config(config)
    if trainer_cfg.num_threads is not None:
        torch.set_num_threads(trainer_cfg.num_threads)
    seed_everything(trainer_cfg.seed)
    normalizer = instantiate(spec.normalizer, where="normalizer")
    objective = instantiate(spec.objective, where="objective")
    optimizer = optimizer_factory(spec.optimizer) if spec.optimizer is not None else None
    scheduler = build_scheduler(spec.scheduler)
    data = instantiate(spec.data, where="data")
    eval_data = None
    if trainer_cfg.eval_every > 0:
        data_node = eval_cfg.data if eval_cfg.data is not None else spec.data
        eval_data = instantiate(data_node, where="eval.data")
    transforms = [instantiate(node, where=f"transforms[{i}]") for i, node in enumerate(spec.transforms)]
    rewards = {name: instantiate(node, where=f"rewards.{name}") for name, node in spec.rewards.items()}
    trainer = Trainer(
        policy=instantiate(spec.policy, where="policy"),
        sampler=instantiate(spec.sampler, where="sampler"),
        rewards=rewards,
        normalizer=normalizer,
        objective=objective,
        data=data,
        transforms=transforms,
        config=trainer_cfg,
        run_config=config,
        critic=instantiate(spec.critic, where="critic") if spec.critic is not None else None,
        optimizer=optimizer,
        scheduler=scheduler,
    )
    if trainer_cfg.eval_every > 0:
        trainer.evaluator = instantiate(eval_cfg.evaluator, where="eval.evaluator")
        trainer.eval_data = eval_data
    if trainer_cfg.export and not isinstance(trainer.policy, ExportablePolicy):  # fail now, not after training
        raise ValueError(
            f"trainer.export is true but {type(trainer.policy).__name__} cannot be exported (it needs "
            "trainable_state_dict, load_trainable_state_dict and export): set trainer.export=false"
        )
    return trainer


def validate_run_config(config: Mapping[str, Any]) -> tuple[RunSpec, TrainerConfig, EvalConfig]:
    """Check every section against its constructor (nothing is built): the spec, trainer and eval settings."""
    spec = build_dataclass(RunSpec, config)
    check_moved_keys(config)
    trainer_cfg = build_dataclass(TrainerConfig, spec.trainer, where="trainer")
    if spec.optimizer is not None:
        optimizer_factory(spec.optimizer)  # validates the node and its ranges
    for name in ("policy", "sampler", "normalizer", "objective", "data"):
        validate(getattr(spec, name), where=name)
    for name, node in spec.rewards.items():
        validate(node, where=f"rewards.{name}")
    for i, node in enumerate(spec.transforms):
        validate(node, where=f"transforms[{i}]")
    if spec.critic is not None:
        validate(spec.critic, where="critic")
    eval_cfg = build_dataclass(EvalConfig, spec.eval, where="eval")
    if trainer_cfg.eval_every > 0:
        if eval_cfg.evaluator is None:
            raise ValueError(
                "trainer.eval_every > 0 needs an `eval.evaluator` hook (its report's metrics() are logged as eval/*)"
            )
        validate(eval_cfg.evaluator, where="eval.evaluator")
        if eval_cfg.data is not None:
            validate(eval_cfg.data, where="eval.data")
    check_group_size(trainer_cfg.group_size, {"normalizer": spec.normalizer, "transforms": spec.transforms})
    # Missing data files fail here, in seconds, naming the `renorm data prepare` command that writes them.
    check_data_paths(spec.data, "data")
    if trainer_cfg.eval_every > 0:
        check_data_paths(eval_cfg.data, "eval.data")
    return spec, trainer_cfg, eval_cfg


def check_moved_keys(config: Mapping[str, Any]) -> None:
    """ConfigError naming the new place of a key that moved (`trainer.lr` -> `optimizer.lr`, see `MOVED_KEYS`)."""
    for old, new in MOVED_KEYS.items():
        section, key = old.split(".")
        node = config.get(section)
        if isinstance(node, Mapping) and key in node:
            raise ConfigError(old, f"moved to {new}; see configs/demo/tiny_grpo.yaml", source_of(node, key))


def build_scheduler(node: Any) -> Scheduler | None:
    """The `scheduler:` section built (range errors before any model), or None for a constant lr."""
    if node is None:
        return None
    scheduler = instantiate(node, where="scheduler")
    if not isinstance(scheduler, Scheduler):
        raise ConfigError("scheduler", f"expected a toolkit.train.schedules.Scheduler node, got {scheduler!r}")
    return scheduler


def fit(trainer: Trainer) -> Path | None:
    """Run `trainer` to `num_steps` (resuming per `trainer.resume`); returns the last checkpoint.

    The main process holds the run dir's lock for the whole run (a second trainer on it is refused).
    SIGINT/SIGTERM finish the current step, save a checkpoint and return normally.
    """
    register_secrets(trainer.run_config)  # scrubbed from every log line from here on
    lock = claim_run_dir(trainer)
    try:
        return _fit_locked(trainer)
    finally:
        if lock is not None:
            lock.release()


def claim_run_dir(trainer: Trainer) -> RunDirLock | None:
    """The main process locks and prepares the run dir; every rank raises when it could not (so none hangs)."""
    cfg, main = trainer.config, trainer.accelerator.is_main_process
    lock: RunDirLock | None = None
    error: RunDirError | None = None
    if main:
        try:
            lock = RunDirLock(trainer.run_dir).acquire()
            moved = prepare_run_dir(trainer.run_dir, cfg.resume, cfg.overwrite)
            if moved is not None:
                log.warning("trainer.overwrite: moved the earlier run in %s to %s", trainer.run_dir, moved)
        except RunDirError as raised:
            error = raised
            if lock is not None:
                lock.release()
    if all_reduce_sum(torch.tensor(float(error is not None))) > 0:
        raise error or RunDirError(f"the main process could not claim run dir {trainer.run_dir}")
    return lock


def _fit_locked(trainer: Trainer) -> Path | None:
    cfg = trainer.config
    main = trainer.accelerator.is_main_process
    resume_from = resolve_resume(cfg.resume, trainer.run_dir, quarantine=main)
    changes: list[Change] = []
    if resume_from is not None:
        changes = check_resume_config(trainer.run_dir, redact(trainer.run_config), cfg.allow_config_change)
        trainer.load(resume_from, keep_new_hyperparameters=any(not is_run_key(key) for key, _, _ in changes))
        log.info("resumed from %s at step %d", resume_from, trainer.global_step)
        for key, old, new in changes:
            log.warning("config change on resume at step %d: %s: %r -> %r", trainer.global_step, key, old, new)
    if main:
        if resume_from is None or changes:  # a fresh run, or a recorded change: config.yaml says what runs now
            dump_config(redact(trainer.run_config), trainer.run_dir / CONFIG_FILE)
        record_changes(trainer.run_dir, trainer.global_step, changes)
        if resume_from is None:
            set_aside_stale_best(trainer.run_dir)
    trainer.accelerator.wait_for_everyone()
    last: Path | None = resume_from
    saved_at = trainer.global_step if resume_from is not None else -1
    best = BestCheckpoint(trainer.run_dir, cfg.eval_metric, cfg.eval_mode) if cfg.eval_metric else None
    with (
        MetricsLogger(
            trainer.run_dir,
            trackers=cfg.trackers,
            accelerator=trainer.accelerator,
            config=redact(trainer.run_config),
            resume_step=trainer.global_step,
            is_main_process=main,
            project=cfg.tracker_project,
            init_kwargs=cfg.tracker_init_kwargs,
            resumed=resume_from is not None,
        ) as logger,
        ProgressBar(cfg.num_steps, initial=trainer.global_step, enabled=cfg.progress and main) as bar,
        GracefulInterrupt() as interrupt,
    ):
        while trainer.global_step < cfg.num_steps:
            metrics, rollout = trainer.step()
            step = trainer.global_step
            log_step(logger, cfg, step, metrics, rollout)
            bar.update(step, metrics)
            if cfg.eval_every and step % cfg.eval_every == 0:
                evaluated = evaluate_during_training(trainer)
                logger.log(step, {f"eval/{name}": value for name, value in evaluated.items()})
                if best is not None and best.update(trainer, evaluated):
                    log.info("step %d: best %s = %.6g (saved to %s)", step, best.metric, best.value, best.directory)
            stop = stop_requested(interrupt.requested)
            if (cfg.save_every and step % cfg.save_every == 0) or stop:
                last, saved_at = trainer.save(), step
            if stop:
                log.warning("interrupted: saved step %d to %s; rerun the same command to resume", step, last)
                return last
    if saved_at != trainer.global_step:
        last = trainer.save()
    if cfg.export and main and last is not None:  # the finished run in its ecosystem's format (`renorm export`)
        from toolkit.io.export import EXPORT_DIR, export_checkpoint

        export_checkpoint(trainer.run_config, last, trainer.run_dir / EXPORT_DIR, replace=True)
        log.info("exported %s to %s", last, trainer.run_dir / EXPORT_DIR)
    return last


def stop_requested(local: bool) -> bool:
    """True on every rank when a signal reached any rank (so all ranks save and stop together)."""
    return bool(all_reduce_sum(torch.tensor(float(local))) > 0)


def log_step(logger: MetricsLogger, cfg: TrainerConfig, step: int, metrics: dict[str, float], rollout: Any) -> None:
    """Metrics and sampled rows every `log_every` steps (and the last); the rows printed every `print_samples_every`."""
    log_now = step % cfg.log_every == 0 or step == cfg.num_steps
    print_now = cfg.print_samples_every > 0 and step % cfg.print_samples_every == 0 and logger.is_main_process
    if not (log_now or print_now):
        return
    rows = sample_rows(rollout, cfg.num_log_samples, seed=step)
    if log_now:
        logger.log(step, metrics)
        logger.log_samples(step, rows)
    if print_now and rows:
        print_samples_table(rows, max_rows=len(rows), title=f"samples at step {step}")


def sample_rows(rollout: Any, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """Up to `count` (prompt, completion, reward, advantage, group) rows spread over the rollout's groups.

    Groups are taken in a random order, one row from each, then a second row from each... so `count` rows span
    `min(count, groups)` groups. The choice uses its own generator seeded with `seed` (the step): reproducible,
    and the training RNG is never touched.
    """
    if count <= 0 or len(rollout) == 0:
        return []
    generator = torch.Generator().manual_seed(seed)
    group_ids = rollout.group_ids.detach().cpu()
    groups = torch.unique(group_ids)
    members = [(group_ids == groups[g]).nonzero().flatten() for g in torch.randperm(len(groups), generator=generator)]
    members = [rows[torch.randperm(len(rows), generator=generator)] for rows in members]
    depth = max(len(rows) for rows in members)
    picked = [int(rows[d]) for d in range(depth) for rows in members if d < len(rows)][:count]
    return [_sample_row(rollout, i) for i in picked]


def _sample_row(rollout: Any, i: int) -> dict[str, Any]:
    prompt = rollout.prompts[i] if rollout.prompts is not None else None
    if isinstance(prompt, Mapping):
        prompt = prompt.get("prompt")
    completion = rollout.completions[i] if rollout.completions is not None else None
    row: dict[str, Any] = {"prompt": _printable(prompt), "completion": _printable(completion)}
    if rollout.scores is not None:
        row["reward"] = float(rollout.scores[i])
    if rollout.advantages is not None:
        row["advantage"] = float(rollout.advantages[i].float().mean())
    row["group"] = int(rollout.group_ids[i])
    if rollout.dataset_ids is not None:
        row["dataset"] = rollout.dataset_ids[i]
    return row


def _printable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, dict)):
        return str(value)[:500]
    return f"<{type(value).__name__}>"
