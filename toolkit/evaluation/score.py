"""`renorm score`: one reward model on its own over a JSONL file (prompt, completion, metadata), JSONL out."""

from __future__ import annotations

import inspect
import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from rewards.base import FunctionReward, RewardModel
from toolkit.config import ConfigError, import_object, instantiate, load_config, validate
from toolkit.config.types import read_text_file


def load_reward(spec: str) -> RewardModel:
    """A reward model from a dotted path (built with no arguments) or a YAML file with a `_component_` node."""
    if spec.endswith((".yaml", ".yml")):
        node = load_config(spec)
        node = node.get("reward", node)
        validate(node, where="reward")
        return instantiate(node, where="reward")  # type: ignore[no-any-return]
    target = import_object(spec)
    model = target() if isinstance(target, type) else target
    if not callable(model):
        raise ConfigError("reward", f"{spec} is not a reward model (not callable)")
    return model  # type: ignore[no-any-return]


def score_file(reward_spec: str, input_path: Path, output_path: Path | None, batch_size: int = 64) -> int:
    """Score a JSONL of {"prompt", "completion", ...metadata} rows; write rows + "score" + components."""
    if not input_path.exists():
        raise FileNotFoundError(f"input file not found: {input_path}")
    rows = []
    for number, line in enumerate(read_text_file(input_path).splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{input_path}:{number}: not valid JSON ({err.msg})") from err
    model = load_reward(reward_spec)
    out = open(output_path, "w") if output_path else sys.stdout  # noqa: SIM115 - stdout is not closed
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            missing = [start + i + 1 for i, r in enumerate(batch) if "completion" not in r]
            if missing:
                raise ValueError(f"{input_path}: rows {missing[:5]} have no 'completion' field")
            keys = sorted({k for r in batch for k in r} - {"prompt", "completion"})
            metadata = {k: [r.get(k) for r in batch] for k in keys}
            result = model([r.get("prompt") for r in batch], [r["completion"] for r in batch], **metadata)
            for i, row in enumerate(batch):
                scored = dict(row, score=_json_float(result.scores[i]))
                scored.update({f"reward/{k}": _json_float(v[i]) for k, v in result.components.items()})
                if scored["score"] is None:
                    scored["null_reason"] = null_reason(model, row)
                out.write(json.dumps(scored) + "\n")
    finally:
        if output_path:
            out.close()
    return len(rows)


def null_reason(model: Any, row: Mapping[str, Any]) -> str:
    """Why a row scored null: the fields the reward names that the row lacks, or that it found it not applicable.

    The named fields are the keyword parameters of a `FunctionReward`'s function (or of the model's `__call__`)
    beyond prompt and sample; a reward that reads `**metadata` by hand is not inspected.
    """
    target = model.fn if isinstance(model, FunctionReward) else model.__call__
    try:
        parameters = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        parameters = []
    skip = 2  # (prompt, sample) of a function, (prompts, samples) of a model
    named = [p.name for p in parameters[skip:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    missing = [name for name in named if name not in row]
    fields = sorted(k for k in row if k not in ("prompt", "completion"))
    if missing:
        return f"the row has no {', '.join(repr(m) for m in missing)} field (it has {fields}); the reward reads {named}"
    return f"the reward returned no score (not applicable) for this row; the row's fields: {fields}"


def _json_float(value: torch.Tensor) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None
