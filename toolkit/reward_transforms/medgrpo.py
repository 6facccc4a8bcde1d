"""MedGRPO cross-dataset logistic reward normalization (arXiv:2512.06581; formula from the project page).

r = 1 / (1 + exp(-k (x - p50) / IQR)) per (dataset, task), with p25/p50/p75 fitted once from the SFT
model's predictions (`fit_percentile_table`, saved as JSON) and static during RL. Unseen pairs fall back
to task-level pooled percentiles; IQR = 0 is floored (or the raw metric is passed through).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from toolkit.config.types import read_text_file
from toolkit.reward_transforms.common import check_choice, reject_inf, safe_mean
from toolkit.rollout import Rollout

Interpolation = Literal["linear", "lower", "higher", "midpoint", "nearest"]


def logistic_normalize(x: Tensor, p50: Tensor, iqr: Tensor, k: float = 3.0) -> Tensor:
    """MedGRPO logistic normalization r = sigmoid(k (x - p50) / IQR) (arXiv:2512.06581, §4 of the spec).

    Args:
        x: [N] raw task metric (NaN stays NaN).
        p50: [N] median of the row's (dataset, task) pair.
        iqr: [N] p75 - p25 of the pair, already floored (must be > 0).
        k: steepness (3.0).

    Returns:
        [N] float32 in (0, 1); exactly 0.5 at the median.
    """
    if bool((iqr <= 0).any()):
        raise ValueError("logistic_normalize needs iqr > 0 everywhere (apply the IQR floor first)")
    return torch.sigmoid(k * (x.double() - p50.double()) / iqr.double()).float()


@dataclass(frozen=True)
class Percentiles:
    """p25, p50, p75 of one (dataset, task) pair or one pooled task, and how many values fitted them."""

    p25: float
    p50: float
    p75: float
    count: int = 0

    def to_json(self) -> dict[str, float | int]:
        return {"p25": self.p25, "p50": self.p50, "p75": self.p75, "count": self.count}

    @classmethod
    def from_json(cls, value: Mapping[str, Any], where: str) -> Percentiles:
        try:
            out = cls(float(value["p25"]), float(value["p50"]), float(value["p75"]), int(value.get("count", 0)))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"percentile entry {where} must have numeric p25, p50, p75; got {value!r}") from err
        if not out.p25 <= out.p50 <= out.p75:
            raise ValueError(f"percentile entry {where} is not ordered p25 <= p50 <= p75: {value!r}")
        return out


@dataclass
class PercentileTable:
    """Percentiles per (dataset, task) pair plus task-level pooled percentiles for unseen pairs.

    JSON layout: `{"version": 1, "pairs": {dataset: {task: {p25, p50, p75, count}}}, "tasks": {task: {...}}}`.
    A hand-written table may omit "tasks"; unseen pairs then have no fallback.
    """

    pairs: dict[tuple[str, str], Percentiles] = field(default_factory=dict)
    tasks: dict[str, Percentiles] = field(default_factory=dict)

    def lookup(self, dataset: str, task: str, fallback: Literal["task", "error"] = "task") -> tuple[Percentiles, bool]:
        """Percentiles for (dataset, task) and whether the task-level fallback was used."""
        if (dataset, task) in self.pairs:
            return self.pairs[(dataset, task)], False
        if fallback == "task" and task in self.tasks:
            return self.tasks[task], True
        known = sorted(f"{d}/{t}" for d, t in self.pairs)[:10]
        hint = "no task-level entry for it either" if fallback == "task" else "fallback='error'"
        raise ValueError(f"unknown (dataset, task) pair ({dataset!r}, {task!r}) ({hint}); known pairs: {known}")

    def to_dict(self) -> dict[str, Any]:
        pairs: dict[str, dict[str, Any]] = defaultdict(dict)
        for (dataset, task), value in sorted(self.pairs.items()):
            pairs[dataset][task] = value.to_json()
        tasks = {task: value.to_json() for task, value in sorted(self.tasks.items())}
        return {"version": 1, "pairs": dict(pairs), "tasks": tasks}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PercentileTable:
        if "pairs" not in data:
            raise ValueError(f"a percentile table needs a 'pairs' mapping; got keys {sorted(data)}")
        pairs = {
            (str(d), str(t)): Percentiles.from_json(v, f"{d}/{t}")
            for d, per_task in data["pairs"].items()
            for t, v in per_task.items()
        }
        tasks = {str(t): Percentiles.from_json(v, f"task {t}") for t, v in data.get("tasks", {}).items()}
        return cls(pairs=pairs, tasks=tasks)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PercentileTable:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"percentile table {str(path)!r} does not exist; build it from SFT predictions with "
                "fit_percentile_table(...).save(path)"
            )
        try:
            data = json.loads(read_text_file(path))
        except json.JSONDecodeError as err:
            raise ValueError(f"percentile table {str(path)!r} is not valid JSON: {err}") from err
        return cls.from_dict(data)


def _record_fields(record: Any) -> tuple[str, str, float]:
    if isinstance(record, Mapping):
        value = record["value"] if "value" in record else record["metric"]
        return str(record["dataset"]), str(record["task"]), float(value)
    dataset, task, value = record
    return str(dataset), str(task), float(value)


def _percentiles(values: list[float], interpolation: Interpolation) -> Percentiles:
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64), interpolation=interpolation)
    return Percentiles(float(q[0]), float(q[1]), float(q[2]), len(values))


def fit_percentile_table(
    records: Iterable[Any], interpolation: Interpolation = "linear", min_count: int = 1
) -> PercentileTable:
    """Fit p25/p50/p75 per (dataset, task) and pooled per task from SFT-model predictions.

    Args:
        records: (dataset, task, value) tuples or mappings with keys dataset, task and value (or metric).
            NaN values (not applicable) are skipped; +-inf raises.
        interpolation: quantile rule (`torch.quantile`; "linear" = numpy's default).
        min_count: pairs with fewer values are left out of "pairs" (they use the task fallback);
            the pooled task entries always use every value.

    Returns:
        The fitted PercentileTable.
    """
    check_choice("interpolation", interpolation, ("linear", "lower", "higher", "midpoint", "nearest"))
    per_pair: dict[tuple[str, str], list[float]] = defaultdict(list)
    per_task: dict[str, list[float]] = defaultdict(list)
    for record in records:
        dataset, task, value = _record_fields(record)
        if math.isinf(value):
            raise ValueError(f"record ({dataset!r}, {task!r}) has an infinite metric value")
        if math.isnan(value):
            continue
        per_pair[(dataset, task)].append(value)
        per_task[task].append(value)
    if not per_task:
        raise ValueError("fit_percentile_table got no finite records")
    pairs = {key: _percentiles(v, interpolation) for key, v in per_pair.items() if len(v) >= min_count}
    tasks = {task: _percentiles(v, interpolation) for task, v in per_task.items()}
    return PercentileTable(pairs=pairs, tasks=tasks)


class LogisticDatasetNorm:
    """Raw task metric -> MedGRPO normalized reward in `rollout.scores`, per (dataset_id, task_id) row.

    Reads `rollout.scores` (or component `source`) and `rollout.dataset_ids` / `rollout.task_ids`; keeps
    the raw metric as component `raw_name`.

    Args:
        table: a PercentileTable, its dict form (inline YAML) or a JSON file path.
        k: steepness (3.0).
        iqr_floor: δ for IQR := max(IQR, δ) (1e-3 [Our decision]).
        degenerate_iqr: "floor" applies the floor; "raw" passes the raw metric through where IQR < δ.
        fallback: "task" uses task-level pooled percentiles for unseen pairs; "error" raises.
        format_component / format_fail_reward: when set, rows whose `format_component` is < 0.5 get
            `format_fail_reward` instead of r_norm(x) (otherwise an unparsable answer, x = 0, gets r_norm(0) > 0).
    """

    def __init__(
        self,
        table: str | Mapping[str, Any] | PercentileTable,
        k: float = 3.0,
        iqr_floor: float = 1e-3,
        degenerate_iqr: Literal["floor", "raw"] = "floor",
        fallback: Literal["task", "error"] = "task",
        source: str | None = None,
        raw_name: str = "raw_metric",
        format_component: str | None = None,
        format_fail_reward: float = 0.0,
    ) -> None:
        check_choice("degenerate_iqr", degenerate_iqr, ("floor", "raw"))
        check_choice("fallback", fallback, ("task", "error"))
        if k <= 0 or iqr_floor <= 0:
            raise ValueError(f"k and iqr_floor must be > 0, got k={k}, iqr_floor={iqr_floor}")
        if isinstance(table, PercentileTable):
            self.table = table
        elif isinstance(table, Mapping):
            self.table = PercentileTable.from_dict(table)
        else:
            self.table = PercentileTable.load(table)
        self.k, self.iqr_floor = k, iqr_floor
        self.degenerate_iqr: Literal["floor", "raw"] = degenerate_iqr
        self.fallback: Literal["task", "error"] = fallback
        self.source, self.raw_name = source, raw_name
        self.format_component, self.format_fail_reward = format_component, format_fail_reward

    def _row_stats(self, rollout: Rollout) -> tuple[Tensor, Tensor, Tensor]:
        if rollout.dataset_ids is None or rollout.task_ids is None:
            raise ValueError("LogisticDatasetNorm needs rollout.dataset_ids and rollout.task_ids")
        cache: dict[tuple[str, str], tuple[Percentiles, bool]] = {}
        rows = []
        for dataset, task in zip(rollout.dataset_ids, rollout.task_ids, strict=True):
            if (dataset, task) not in cache:
                cache[(dataset, task)] = self.table.lookup(dataset, task, self.fallback)
            stats, used_fallback = cache[(dataset, task)]
            rows.append((stats.p50, stats.p75 - stats.p25, float(used_fallback)))
        t = torch.tensor(rows, dtype=torch.float64).reshape(-1, 3)
        return t[:, 0], t[:, 1], t[:, 2].bool()

    def __call__(self, rollout: Rollout) -> Rollout:
        x = _source(rollout, self.source).float()
        reject_inf("LogisticDatasetNorm input", x)
        p50, iqr, fell_back = (t.to(x.device) for t in self._row_stats(rollout))
        degenerate = iqr < self.iqr_floor
        r = logistic_normalize(x, p50, iqr.clamp_min(self.iqr_floor), self.k)
        if self.degenerate_iqr == "raw":
            r = torch.where(degenerate, x, r)
        if self.format_component is not None:
            ok = _source(rollout, self.format_component) >= 0.5
            r = torch.where(ok | torch.isnan(x), r, torch.full_like(r, self.format_fail_reward))
        rollout.rewards[self.raw_name] = x
        rollout.scores = r
        rollout.metrics.update(_pair_metrics(rollout, x, r))
        rollout.metrics["dataset_norm/fallback_rows"] = float(fell_back.sum())
        rollout.metrics["dataset_norm/degenerate_iqr_rows"] = float(degenerate.sum())
        return rollout


def _source(rollout: Rollout, name: str | None) -> Tensor:
    if name is None:
        if rollout.scores is None:
            raise ValueError("LogisticDatasetNorm: rollout.scores is not set; name a source component")
        return rollout.scores
    if name not in rollout.rewards:
        raise ValueError(f"unknown reward component {name!r}; available: {sorted(rollout.rewards)}")
    return rollout.rewards[name]


def _pair_metrics(rollout: Rollout, x: Tensor, r: Tensor) -> dict[str, float]:
    assert rollout.dataset_ids is not None and rollout.task_ids is not None
    groups: dict[str, list[int]] = defaultdict(list)
    for i, (dataset, task) in enumerate(zip(rollout.dataset_ids, rollout.task_ids, strict=True)):
        groups[f"{dataset}:{task}"].append(i)
    out: dict[str, float] = {}
    for key, rows in groups.items():
        idx = torch.tensor(rows, dtype=torch.long, device=x.device)
        out[f"dataset_norm/{key}/raw"] = safe_mean(x[idx])
        out[f"dataset_norm/{key}/normalized"] = safe_mean(r[idx])
    return out
