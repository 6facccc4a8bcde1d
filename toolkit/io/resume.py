"""Which checkpoint to use: `trainer.resume` ("auto", "never" or a path) for training, and a checkpoint or run
directory for evaluation (`--checkpoint`), falling back past a corrupt newest checkpoint; loading weights into a
policy's module."""

from __future__ import annotations

import difflib
from pathlib import Path

from torch import nn

from toolkit.distributed import unwrap
from toolkit.io.checkpoint import (
    COMPLETE,
    STEP_DIR,
    CheckpointError,
    CheckpointManager,
    load_checkpoint,
    read_manifest,
)


def resolve_resume(resume: str, run_dir: str | Path, quarantine: bool = False) -> Path | None:
    """Which checkpoint to resume from.

    Args:
        resume: "auto" (the latest complete checkpoint of `run_dir` that verifies, or None for a fresh
            start; newer ones that fail their checksums are skipped with a warning),
            "never" (None), or a path: a checkpoint directory (must be complete) or a run directory
            (its latest checkpoint; one must exist). A relative name is also looked up in
            `run_dir/checkpoints/` (so `step_00000100` works).
        run_dir: this run's directory.
        quarantine: with "auto", rename a skipped corrupt checkpoint to `corrupt-step_*` (the main process).

    Raises:
        CheckpointError: the path is missing, incomplete or holds no checkpoint.
    """
    if resume == "auto":
        return CheckpointManager(run_dir).latest_verified(quarantine=quarantine)
    if resume == "never":
        return None
    if not isinstance(resume, str) or not resume:
        raise CheckpointError(f"resume must be 'auto', 'never' or a checkpoint path, got {resume!r}")
    candidates = [Path(resume).expanduser(), CheckpointManager(run_dir).directory / resume]
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        hint = difflib.get_close_matches(resume, ["auto", "never"], n=1)
        extra = f"; did you mean '{hint[0]}'?" if hint else " ('auto' and 'never' are the other choices)"
        raise CheckpointError(f"resume checkpoint not found: {resume}{extra}")
    return resolve_checkpoint(path)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory as given, or a run directory's newest checkpoint that verifies.

    Raises:
        CheckpointError: the path does not exist, is neither a checkpoint (`COMPLETE` inside) nor a run
            directory (`checkpoints/` inside), or the run holds no complete checkpoint.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if (path / "checkpoints").is_dir() and not (path / COMPLETE).exists():
        latest = CheckpointManager(path).latest_verified()
        if latest is None:
            raise CheckpointError(f"run directory {path} has no complete checkpoint")
        return latest
    if not path.is_dir():
        raise CheckpointError(f"not a checkpoint directory: {path}")
    if not (path / COMPLETE).exists() and not STEP_DIR.match(path.name):
        raise CheckpointError(
            f"{path} is neither a checkpoint (checkpoints/step_*/ with a {COMPLETE} manifest) nor a run directory "
            "(holding checkpoints/)"
        )
    read_manifest(path)
    return path


def load_policy_weights(module: nn.Module, checkpoint: str | Path) -> Path:
    """Load a checkpoint's (or a run directory's newest verified checkpoint's) weights into `module`.

    Names the checkpoint doesn't hold keep their values (a LoRA checkpoint holds adapters only); a name the
    module lacks is an error. Returns the checkpoint directory that was loaded.

    Raises:
        CheckpointError: see `resolve_checkpoint` and `load_checkpoint`.
        ValueError: the checkpoint holds weights the module does not have (another model's checkpoint).
    """
    path = resolve_checkpoint(checkpoint)
    state = load_checkpoint(path)
    loaded = unwrap(module).load_state_dict(state.model, strict=False)
    if loaded.unexpected_keys:
        raise ValueError(f"checkpoint {path} has weights the policy does not: {loaded.unexpected_keys[:5]}")
    return path
