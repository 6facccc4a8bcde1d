"""`renorm export`: a checkpoint's trained weights out of the toolkit, in the format the ecosystem loads.

The policy is rebuilt from the run's config, the checkpoint's trainable weights are loaded into it strictly
(every name and shape must match: another model's checkpoint is refused) and the policy writes itself
(`ExportablePolicy.export`): a causal LM or video VLM as a `save_pretrained` folder, a LoRA policy as a PEFT adapter
folder or, merged, a full one; a flow-matching transformer in diffusers' layout; a diffusion-LM student as safetensors
+ JSON. A policy that checkpoints state beyond its weights (`Stateful`: DiDi's EMA student) gets that state too. The
folder is written beside OUT and renamed into place when complete.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from toolkit.config import instantiate, validate
from toolkit.interfaces import Stateful
from toolkit.io.checkpoint import (
    COMPLETE,
    MODEL_FILE,
    OBJECTS_FILE,
    CheckpointError,
    file_sha256,
    read_manifest,
    safe_torch_load,
)
from toolkit.io.redaction import REDACTED
from toolkit.io.resume import resolve_checkpoint

ExportDType = Literal["auto", "fp32", "bf16"]
# "auto" keeps the dtype the policy's weights have (the config's `policy.dtype`).
EXPORT_DTYPES: dict[str, torch.dtype | None] = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}
RUN_CONFIG = "config.yaml"
EXPORT_DIR = "export"  # RUN_DIR/export/: where `trainer.export` writes the finished run
# The name under which the Trainer checkpoints a Stateful policy's state in objects.pt (Trainer.stateful_parts).
POLICY_STATE = "policy_state"
# What an export folder holds at its top (transformers/DLM, PEFT, diffusers pipeline or LoRA); a checkpoint holds none.
EXPORT_MARKERS = (
    "config.json",
    "adapter_config.json",
    "model_index.json",
    "transformer",
    "pytorch_lora_weights.safetensors",
)
# A `key.path=value`, `+key.path=value` or `~key.path` override (toolkit.config.loader's syntax).
_OVERRIDE = re.compile(r"^(?:\+?[\w\-]+(?:\.[\w\-]+)*=.*|~[\w\-]+(?:\.[\w\-]+)*)$", re.DOTALL)


@runtime_checkable
class ExportablePolicy(Protocol):
    """A policy that loads its checkpointed weights and writes itself in its ecosystem's format."""

    def trainable_state_dict(self) -> dict[str, Tensor]: ...

    def load_trainable_state_dict(self, state: Mapping[str, Tensor]) -> None: ...

    def export(self, out_dir: Path, merge_lora: bool = False, dtype: torch.dtype | None = None) -> None:
        """Write the weights (cast to `dtype` unless None; LoRA merged when `merge_lora`) and side files
        into the existing empty folder `out_dir`. May change the policy in place (cast, merge)."""
        ...


def is_export_folder(path: str | Path) -> bool:
    """True for a folder `export` wrote (transformers, PEFT, diffusers or DLM layout), not a checkpoint or run dir."""
    folder = Path(path).expanduser()
    if not folder.is_dir() or (folder / COMPLETE).exists() or (folder / "checkpoints").is_dir():
        return False
    return any((folder / marker).exists() for marker in EXPORT_MARKERS)


def load_export(policy: Any, folder: str | Path) -> Path:
    """Load an export folder into `policy` (its `load_export`, the inverse of its `export`); returns the folder.

    Raises:
        ValueError: the policy cannot read its exports, or the folder holds another kind of model (LoRA vs full).
        FileNotFoundError: the folder is not in the policy's export layout.
    """
    loader = getattr(policy, "load_export", None)
    if not callable(loader):
        raise ValueError(f"{type(policy).__name__} cannot load an export folder; pass a checkpoint or run dir")
    path = Path(folder).expanduser()
    loader(path)
    return path


def split_export_args(tokens: Sequence[str]) -> tuple[Path, Path, Path, list[str]]:
    """`[CONFIG] CHECKPOINT_OR_RUN_DIR OUT [key=value ...]` -> (config file, checkpoint, out dir, overrides).

    A token is an override when it has the override syntax and names no existing path (write `./a=b` for a
    path that would read as one). Without CONFIG the run's own `config.yaml` is used (see `run_config_path`);
    a CONFIG that is a directory stands for its `config.yaml`.
    """
    overrides = [t for t in tokens if _OVERRIDE.match(t) and not Path(t).exists()]
    paths = [Path(t).expanduser() for t in tokens if t not in overrides]
    if len(paths) == 2:
        return run_config_path(paths[0]), paths[0], paths[1], overrides
    if len(paths) == 3:
        config = paths[0] / RUN_CONFIG if paths[0].is_dir() else paths[0]
        return config, paths[1], paths[2], overrides
    raise ValueError(
        f"export takes [CONFIG] CHECKPOINT_OR_RUN_DIR OUT and key=value overrides, got {len(paths)} paths: "
        f"{[str(p) for p in paths]}"
    )


def run_config_path(checkpoint: Path) -> Path:
    """The `config.yaml` of the run that holds `checkpoint`: a run dir, `checkpoints/step_*`, `best/` or below it.

    The nearest directory (the path itself or up to three levels above) holding both `checkpoints/` and
    `config.yaml` is the run dir.
    """
    for directory in [checkpoint, *list(checkpoint.parents)[:3]]:
        if (directory / "checkpoints").is_dir() and (directory / RUN_CONFIG).is_file():
            return directory / RUN_CONFIG
    raise FileNotFoundError(
        f"no run directory with a {RUN_CONFIG} at or above {checkpoint}; pass the run's CONFIG first: "
        f"renorm export CONFIG {checkpoint} OUT"
    )


def check_same_weights(
    found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], source: Path
) -> None:
    """ValueError unless `found` (name -> shape) holds exactly the policy's `expected` names and shapes."""
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    reshaped = [
        f"{n}: {found[n]} vs {expected[n]}" for n in sorted(set(found) & set(expected)) if found[n] != expected[n]
    ]
    if not (missing or unexpected or reshaped):
        return
    details = [
        f"{label} ({len(items)}): {items[:3]}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape differs", reshaped))
        if items
    ]
    raise ValueError(
        f"checkpoint {source} does not hold this config's policy weights (another model, or LoRA vs full "
        f"fine-tuning?): {'; '.join(details)}"
    )


def load_trained_weights(policy: ExportablePolicy, checkpoint: str | Path) -> Path:
    """Load a checkpoint's (or a run dir's newest verified checkpoint's) weights into `policy`; returns its path.

    Stricter than `resume.load_policy_weights`, which keeps the values of names a checkpoint lacks: an export
    must hold trained weights only. Only `model.safetensors` is verified against the manifest and read (the
    optimizer state may be twice the model's size), unless the policy is `Stateful`: then `objects.pt` is verified
    too and its `policy_state` (an EMA copy ...) loaded.

    Raises:
        CheckpointError: no checkpoint there, or its weights file is missing or fails its checksum.
        ValueError: the names or shapes differ from the policy's (`check_same_weights`).
    """
    path = resolve_checkpoint(checkpoint)
    _verify_checkpoint_file(path)
    with safe_open(str(path / MODEL_FILE), framework="pt") as f:
        found = {name: tuple(f.get_slice(name).get_shape()) for name in list(f.keys())}
    expected = {name: tuple(t.shape) for name, t in policy.trainable_state_dict().items()}
    check_same_weights(found, expected, path)
    policy.load_trainable_state_dict(load_file(str(path / MODEL_FILE), device="cpu"))
    if isinstance(policy, Stateful):
        _verify_checkpoint_file(path, OBJECTS_FILE)
        state = safe_torch_load(path / OBJECTS_FILE).get(POLICY_STATE)
        if state is None:
            raise CheckpointError(f"checkpoint {path} holds no {POLICY_STATE} for {type(policy).__name__}")
        policy.load_state_dict(state)
    return path


def _verify_checkpoint_file(checkpoint: Path, name: str = MODEL_FILE) -> None:
    """CheckpointError unless the checkpoint's file `name` has the size (and SHA-256) its manifest records."""
    entry = read_manifest(checkpoint)["files"].get(name)
    file = checkpoint / name
    if entry is None or not file.is_file():
        raise CheckpointError(f"checkpoint {checkpoint} holds no {name}")
    size, digest = (entry, None) if isinstance(entry, int) else (entry["size"], entry["sha256"])
    if file.stat().st_size != size or (digest is not None and file_sha256(file) != digest):
        raise CheckpointError(f"checkpoint file corrupt: {file}: size or SHA-256 differs from the manifest's")


def export_checkpoint(
    config: Mapping[str, Any],
    checkpoint: str | Path,
    out_dir: str | Path,
    merge_lora: bool = False,
    dtype: ExportDType = "auto",
    replace: bool = False,
) -> Path:
    """Build the config's policy, load `checkpoint` into it and export it to `out_dir`; returns the checkpoint.

    Args:
        config: a run config (only its `policy:` node is used).
        checkpoint: a checkpoint directory or a run directory (its newest verified checkpoint).
        out_dir: the folder to write; it must not exist or be empty.
        merge_lora: write a LoRA policy's adapters merged into the base weights (a full model).
        dtype: "fp32" or "bf16" casts the weights; "auto" keeps the policy's dtype.
        replace: an existing `out_dir` is replaced once the new folder is complete (`trainer.export` rewriting
            RUN_DIR/export/ when a finished run is extended) instead of being an error.

    A LoRA checkpoint holds the adapters only: the base weights come from the config's `policy.model`, which
    must name the base the run trained on (a hub id or path, or a seeded builder such as the tiny ones).
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {list(EXPORT_DTYPES)}")
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not replace)):
        raise FileExistsError(f"export folder {str(out)!r} exists and is not empty; choose a new OUT")
    path = resolve_checkpoint(checkpoint)  # before the policy is built: a wrong path fails in a second
    node = config.get("policy")
    if node is None:
        raise ValueError("the config has no `policy:` node to export")
    validate(node, where="policy")
    redacted = _redacted_keys(node, "policy")
    if redacted:
        raise ValueError(f"{redacted} hold {REDACTED!r} (a redacted run config.yaml): set them with key=value")
    policy = instantiate(node, where="policy")
    if not isinstance(policy, ExportablePolicy):
        raise ValueError(
            f"{type(policy).__name__} cannot be exported yet: only policies with trainable_state_dict, "
            "load_trainable_state_dict and export can"
        )
    loaded = load_trained_weights(policy, path)
    with _staged(out) as staging:
        policy.export(staging, merge_lora=merge_lora, dtype=EXPORT_DTYPES[dtype])
    return loaded


@contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out`, renamed to `out` when the block succeeds (removed when it fails).

    An existing `out` (empty, or one the caller chose to replace) is moved aside first and removed after the rename.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging, old = out.with_name(f".{out.name}.tmp-{tag}"), out.with_name(f".{out.name}.old-{tag}")
    staging.mkdir()
    try:
        yield staging
        if out.exists():
            os.replace(out, old)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _redacted_keys(node: Any, where: str) -> list[str]:
    """Key paths under `node` whose value is the redaction placeholder."""
    if isinstance(node, Mapping):
        return [k for key, value in node.items() for k in _redacted_keys(value, f"{where}.{key}")]
    if isinstance(node, (list, tuple)):
        return [k for i, value in enumerate(node) for k in _redacted_keys(value, f"{where}.{i}")]
    return [where] if node == REDACTED else []
