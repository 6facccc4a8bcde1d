"""Experiment trackers through accelerate (TensorBoard, W&B, ...): which are installed, their init settings, and
the W&B run id kept in `RUN_DIR/trackers.json`, so a resumed run continues the same W&B run.

W&B drops a `log(step=N)` whose N is below the highest step it has seen, so a run resumed from step k after it
had logged up to step m > k would lose steps k+1..m on W&B. Metrics therefore go to W&B with the trainer step
as a value (`train/step`, the x axis of every chart, `define_metric`) and W&B's own step left to count calls:
nothing is dropped, and the re-run steps k+1..m appear a second time at the same x (the later points are
the ones the run continued from; `metrics.jsonl` keeps only those)."""

from __future__ import annotations

import importlib.util
import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from toolkit.io.atomic import write_json_atomic

TRACKERS_FILE = "trackers.json"
WANDB_STEP_KEY = "train/step"  # the trainer step as a W&B metric: the x axis of every chart
TRACKER_PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "trackio": (("trackio",), "trackio"),
    "comet_ml": (("comet_ml",), "comet_ml"),
    "mlflow": (("mlflow",), "mlflow"),
    "aim": (("aim",), "aim"),
    "clearml": (("clearml",), "clearml"),
    "dvclive": (("dvclive",), "dvclive"),
    "swanlab": (("swanlab",), "swanlab"),
}

_LOG = logging.getLogger(__name__)


def to_python(value: Any) -> Any:
    """Tensors/arrays/numpy scalars -> Python builtins (lists, floats...); unknown objects -> str."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        return {str(k): to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    if hasattr(value, "tolist"):
        return to_python(value.tolist())
    if hasattr(value, "__float__"):
        return float(value)
    return str(value)


def _flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> flat {"a.b": scalar} (trackers such as tensorboard hparams accept scalars only)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten_config(value, prefix=f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(to_python(value))
    return flat


def _has_module(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_trackers(trackers: Sequence[str]) -> list[str]:
    """Validate tracker names and that their packages are importable; returns the names."""
    names = [str(t) for t in trackers]
    for name in names:
        if name not in TRACKER_PACKAGES:
            raise ValueError(f"unknown tracker {name!r}; allowed: {sorted(TRACKER_PACKAGES)}")
        modules, pip_name = TRACKER_PACKAGES[name]
        if not any(_has_module(m) for m in modules):
            raise ImportError(
                f"tracker {name!r} needs the {pip_name!r} package, which is not installed: "
                f"`pip install {pip_name}` (or `pip install renorm[tracking]`), or drop it from `trackers`",
                name=modules[0],
            )
    return names


def check_tracker_init_kwargs(init_kwargs: Mapping[str, Any] | None) -> None:
    """Validate `trainer.tracker_init_kwargs`: {tracker name: {keyword: value}} for known trackers."""
    for name, kwargs in (init_kwargs or {}).items():
        if name not in TRACKER_PACKAGES:
            raise ValueError(
                f"trainer.tracker_init_kwargs: unknown tracker {name!r}; allowed: {sorted(TRACKER_PACKAGES)}"
            )
        if not isinstance(kwargs, Mapping):
            raise ValueError(
                f"trainer.tracker_init_kwargs.{name} must be a mapping of keyword arguments, got {kwargs!r}"
            )
        if name == "wandb" and "project" in kwargs:  # accelerate passes the project itself: a duplicate keyword
            raise ValueError("trainer.tracker_init_kwargs.wandb.project: set trainer.tracker_project instead")


def tracker_run_kwargs(
    run_dir: str | Path,
    trackers: Sequence[str],
    init_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    resumed: bool = False,
) -> dict[str, dict[str, Any]]:
    """Per-tracker init kwargs with this run dir's W&B run: a new id for a fresh run, the stored one on resume.

    The id (the config's `wandb.id` when it sets one) is kept in `RUN_DIR/trackers.json` (written atomically);
    a resumed run gets `{"id": id, "resume": "allow"}`, so W&B continues the same run.
    """
    kwargs = {name: dict(values) for name, values in (init_kwargs or {}).items()}
    if "wandb" not in trackers:
        return kwargs
    path = Path(run_dir) / TRACKERS_FILE
    stored = _read_tracker_state(path) if resumed else {}
    wandb = kwargs.setdefault("wandb", {})
    run_id = str(wandb.get("id") or stored.get("wandb", {}).get("id") or uuid.uuid4().hex[:16])
    wandb["id"] = run_id
    if resumed:
        wandb.setdefault("resume", "allow")
    if stored.get("wandb", {}).get("id") != run_id:
        write_json_atomic(path, {**stored, "wandb": {"id": run_id}})
    return kwargs


def _read_tracker_state(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete it to start a new W&B run") from err
    if not isinstance(state, dict) or not isinstance(state.get("wandb", {}), dict):
        raise ValueError(
            f'{path} must hold {{"wandb": {{"id": ...}}}}, got {state!r}; delete it to start a new W&B run'
        )
    return state


def init_trackers(
    accelerator: Any,
    trackers: Sequence[str],
    project: str,
    config: Mapping[str, Any] | None = None,
    init_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Start accelerate trackers by name, failing loudly where accelerate would silently drop one.

    Trackers missing from `accelerator.log_with` are added (those that write files need
    `Accelerator(project_dir=...)`). `config` is flattened to scalar "a.b" keys before it is stored.
    """
    names = check_trackers(trackers)
    log_with = list(getattr(accelerator, "log_with", None) or [])
    missing = [n for n in names if n not in {str(t) for t in log_with}]
    if missing:
        from accelerate.tracking import filter_trackers

        try:
            added = filter_trackers(missing, getattr(accelerator, "logging_dir", None))
        except ValueError as err:
            raise ValueError(f"{err} Construct the Accelerator with project_dir=<run dir>.") from err
        dropped = sorted(set(missing) - {str(t) for t in added})
        if dropped:
            raise ImportError(f"accelerate reports trackers {dropped} as unavailable in this environment")
        accelerator.log_with = log_with + list(added)
    flat = _flatten_config(config) if config is not None else None
    accelerator.init_trackers(project, config=flat, init_kwargs={k: dict(v) for k, v in (init_kwargs or {}).items()})


def wandb_tracker(accelerator: Any) -> Any | None:
    """The accelerator's started W&B tracker, or None."""
    trackers = getattr(accelerator, "trackers", None) or []
    return next((t for t in trackers if getattr(t, "name", None) == "wandb"), None)


def use_step_axis(tracker: Any) -> None:
    """Plot every W&B metric against `WANDB_STEP_KEY` (see the module docstring)."""
    run = tracker.run
    run.define_metric(WANDB_STEP_KEY)
    run.define_metric("*", step_metric=WANDB_STEP_KEY)


def log_to_trackers(accelerator: Any, values: Mapping[str, Any], step: int) -> None:
    """`values` to every started tracker at trainer step `step`: W&B with the step as the `train/step` value
    (its own step counting calls), the others with `step=`."""
    for tracker in getattr(accelerator, "trackers", None) or []:
        if getattr(tracker, "name", None) == "wandb":
            tracker.log({**values, WANDB_STEP_KEY: int(step)})
        else:
            tracker.log(dict(values), step=int(step))


def wandb_table(rows: Sequence[Mapping[str, Any]]) -> Any:
    """`wandb.Table` of `rows` (columns: the union of their keys); only called with a W&B tracker running."""
    import wandb

    columns = list(dict.fromkeys(key for row in rows for key in row))
    return wandb.Table(columns=columns, data=[[to_python(row.get(c)) for c in columns] for row in rows])
