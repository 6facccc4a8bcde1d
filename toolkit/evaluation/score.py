"""`renorm score`: one reward model on its own over a JSONL file (prompt, completion, metadata), JSONL out."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from rewards.base import RewardModel
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
                out.write(json.dumps(scored) + "\n")
    finally:
        if output_path:
            out.close()
    return len(rows)


def _json_float(value: torch.Tensor) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None
