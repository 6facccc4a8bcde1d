"""Reasoning evaluation: pass@1 over k samples, mean response length and truncation rate per dataset.

Reported as in DLER's Table 1 (arXiv:2510.15110): one row per model/checkpoint, accuracy and average
length side by side per dataset, then the unweighted average over datasets. Plugged into `renorm eval`
through the config's `eval.evaluator` node; several checkpoints give an accuracy-vs-length plot.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rewards.base import RewardModel
from toolkit.interfaces import Policy, Sampler
from toolkit.io.resume import load_policy_weights
from toolkit.train.scoring import score_rollout

AVERAGE = "Avg"


def pass_at_1(correct: Sequence[Sequence[float]]) -> float:
    """Mean over problems of the mean correctness of each problem's k samples (pass@1 averaged over k).

    Args:
        correct: per problem, its samples' 1/0 correctness (NaN = not gradable, skipped).

    Returns:
        The fraction in [0, 1]; NaN when no problem has a gradable sample.
    """
    means = []
    for samples in correct:
        finite = [float(c) for c in samples if math.isfinite(c)]
        if finite:
            means.append(sum(finite) / len(finite))
    return sum(means) / len(means) if means else math.nan


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per-dataset metrics of sample rows {dataset, problem_id, correct, length, truncated}, plus `Avg`.

    Per dataset: `accuracy` (pass@1 averaged over k, in %), `length` (mean tokens per response),
    `truncation` (share of responses that hit the budget, in %), `num_problems`, `num_samples`,
    `ungraded` (samples with a NaN correctness). `Avg` is the unweighted mean over datasets of
    accuracy, length and truncation (DLER Table 1's "Avg L").
    """
    by_dataset: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for row in rows:
        by_dataset.setdefault(str(row["dataset"]), {}).setdefault(str(row["problem_id"]), []).append(row)
    out: dict[str, dict[str, float]] = {}
    for name, problems in by_dataset.items():
        samples = [r for group in problems.values() for r in group]
        out[name] = {
            "accuracy": 100.0 * pass_at_1([[float(r["correct"]) for r in g] for g in problems.values()]),
            "length": sum(float(r["length"]) for r in samples) / len(samples),
            "truncation": 100.0 * sum(bool(r["truncated"]) for r in samples) / len(samples),
            "num_problems": float(len(problems)),
            "num_samples": float(len(samples)),
            "ungraded": float(sum(not math.isfinite(float(r["correct"])) for r in samples)),
        }
    if out:
        keys = ("accuracy", "length", "truncation")
        out[AVERAGE] = {k: sum(m[k] for m in out.values()) / len(out) for k in keys}
    return out


def format_table(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """DLER Table 1 layout: `label | <dataset> acc | L | ... | Avg acc | Avg L | Trunc%` (plain text)."""
    datasets = list(dict.fromkeys(d for per in results.values() for d in per if d != AVERAGE))
    header = ["model", *[f"{d} {part}" for d in datasets for part in ("acc", "L")], "Avg acc", "Avg L", "Trunc%"]
    lines = []
    for label, per in results.items():
        cells = [label]
        for d in datasets:
            metrics = per.get(d, {})
            cells += [f"{metrics.get('accuracy', math.nan):.2f}", f"{metrics.get('length', math.nan):.0f}"]
        avg = per.get(AVERAGE, {})
        cells += [f"{avg.get(k, math.nan):.{p}f}" for k, p in (("accuracy", 2), ("length", 0), ("truncation", 1))]
        lines.append(cells)
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    render = [
        " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in [header, *lines]
    ]
    return "\n".join([render[0], "-" * len(render[0]), *render[1:]])


def plot_accuracy_vs_length(
    results: Mapping[str, Mapping[str, Mapping[str, float]]],
    out: str | Path,
    series: Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """Accuracy (%) against average length: a faint marker per label and dataset, and per series a line
    through its labels' averages (default: one series `Avg` over all labels, in order)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    datasets = list(dict.fromkeys(d for per in results.values() for d in per if d != AVERAGE))
    for name in datasets:
        points = [(per[name]["length"], per[name]["accuracy"]) for per in results.values() if name in per]
        if points:
            ax.scatter([x for x, _ in points], [y for _, y in points], alpha=0.3, label=name)
    for line_name, labels in (series or {AVERAGE: list(results)}).items():
        averages = [(label, results[label][AVERAGE]) for label in labels if AVERAGE in results.get(label, {})]
        xs, ys = [a["length"] for _, a in averages], [a["accuracy"] for _, a in averages]
        ax.plot(xs, ys, "-o", label=line_name)
        for (label, _), x, y in zip(averages, xs, ys, strict=True):
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("average response length (tokens)")
    ax.set_ylabel("pass@1 (%)")
    ax.set_title("accuracy vs length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


@dataclass
class ReasoningEvalResult:
    """Per-label (checkpoint) per-dataset metrics, every sample row, and the files written."""

    results: dict[str, dict[str, dict[str, float]]]
    rows: list[dict[str, Any]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    def table(self) -> str:
        text = format_table(self.results)
        return text + "".join(f"\nwrote {p}" for p in self.files)

    def to_json(self) -> dict[str, Any]:
        return {"results": self.results, "rows": self.rows}

    def metrics(self) -> dict[str, float]:
        """{"DATASET/METRIC": value} of the one evaluated policy: `trainer.eval_every` logs them as eval/DATASET/METRIC
        (`trainer.eval_metric: Avg/accuracy` keeps the best checkpoint by mean pass@1)."""
        if len(self.results) != 1:
            raise ValueError(f"metrics() describes one evaluated policy, this result holds {sorted(self.results)}")
        [per_dataset] = self.results.values()
        return {f"{name}/{key}": float(value) for name, values in per_dataset.items() for key, value in values.items()}


class ReasoningEvaluator:
    """`eval.evaluator` for math reasoning: k samples per problem, DLER Table 1 metrics, JSON and a plot.

    Called by `toolkit.evaluation.evaluate` with the config's built policy, sampler, rewards and eval
    data (a dataset with `records`, e.g. `ReasoningDataset`). Every problem of every dataset is used
    (or the first `max_problems` per dataset).

    Args:
        num_samples: k samples per problem (DLER: 16, BNPO: 1).
        max_problems: cap per dataset; None = all.
        batch_size: problems per sampler call.
        correct_reward: the reward component holding 1/0 correctness (default: the first reward).
        sampler: an evaluation sampler (e.g. temperature 0.6, top-p 0.95, a longer budget) replacing
            the training one; build it with `compute_old_logprobs: false`.
        checkpoints: more checkpoint directories to evaluate after the current weights, one table row
            each (weights loaded in turn); with two or more rows an accuracy-vs-length plot is written.
        include_current: evaluate the weights the policy has when called (base or `--checkpoint`).
        output_dir: where `reasoning_eval.json` and `accuracy_vs_length.png` go (`--output` names the
            JSON instead, the plot goes beside it); None and no `--output`: nothing is written.
        seed: sampling seed (the same for every checkpoint).
    """

    def __init__(
        self,
        num_samples: int = 16,
        max_problems: int | None = None,
        batch_size: int = 8,
        correct_reward: str | None = None,
        sampler: Sampler | None = None,
        checkpoints: Sequence[str] = (),
        include_current: bool = True,
        output_dir: str | None = None,
        seed: int = 1234,
    ) -> None:
        if num_samples < 1 or batch_size < 1 or (max_problems is not None and max_problems < 1):
            raise ValueError(
                f"need num_samples >= 1, batch_size >= 1, max_problems >= 1 or None; got "
                f"{num_samples}, {batch_size}, {max_problems}"
            )
        if not include_current and not checkpoints:
            raise ValueError("nothing to evaluate: include_current is false and no checkpoints are given")
        self.num_samples, self.max_problems, self.batch_size = num_samples, max_problems, batch_size
        self.correct_reward, self.sampler = correct_reward, sampler
        self.checkpoints, self.include_current = [str(c) for c in checkpoints], include_current
        self.output_dir, self.seed = output_dir, seed

    def __call__(
        self,
        *,
        policy: Policy,
        sampler: Sampler,
        rewards: Mapping[str, RewardModel],
        data: Any,
        checkpoint: str | None = None,
        output: str | None = None,
    ) -> ReasoningEvalResult:
        if not rewards:
            raise ValueError("reasoning evaluation needs a correctness reward under `rewards:`")
        problems = self.problems(data)
        runs: list[tuple[str, str | None]] = []
        if self.include_current:
            runs.append((Path(checkpoint).name if checkpoint else "base", None))
        runs += [(Path(path).name, path) for path in self.checkpoints]
        results: dict[str, dict[str, dict[str, float]]] = {}
        rows: list[dict[str, Any]] = []
        for label, path in runs:
            if path is not None:
                load_weights(policy, path)
            label_rows = self.sample_rows(policy, self.sampler or sampler, rewards, problems)
            results[label] = summarize(label_rows)
            rows += [dict(row, label=label) for row in label_rows]
        result = ReasoningEvalResult(results=results, rows=rows)
        result.files = self.write(result, output)
        return result

    def problems(self, data: Any) -> list[dict[str, Any]]:
        """The eval problems: `data.records`, at most `max_problems` per dataset, in file order."""
        records = getattr(data, "records", None)
        if not records:
            raise ValueError(f"reasoning evaluation needs eval data with records (e.g. ReasoningDataset), got {data!r}")
        counts: dict[str, int] = {}
        chosen = []
        for record in records:
            name = str(record.get("dataset", "all"))
            counts[name] = counts.get(name, 0) + 1
            if self.max_problems is None or counts[name] <= self.max_problems:
                chosen.append(dict(record))
        return chosen

    def sample_rows(
        self, policy: Policy, sampler: Sampler, rewards: Mapping[str, RewardModel], problems: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """One row per sample: dataset, problem id, correctness, length in tokens, truncated, completion."""
        generator = torch.Generator().manual_seed(self.seed)
        key = self.correct_reward or next(iter(rewards))
        rows = []
        policy.module.eval()
        for start in range(0, len(problems), self.batch_size):
            batch = problems[start : start + self.batch_size]
            with torch.no_grad():
                rollout = sampler.sample(policy, batch, self.num_samples, generator)
            score_rollout(rollout, rewards)
            if key not in rollout.rewards:
                raise ValueError(f"correct_reward {key!r} is not a reward component; have {sorted(rollout.rewards)}")
            lengths = rollout.lengths if rollout.lengths is not None else rollout.mask.sum(dim=1)
            for i in range(len(rollout)):
                prompt = batch[i // self.num_samples]
                rows.append(
                    {
                        "dataset": str(prompt.get("dataset", "all")),
                        "problem_id": str(prompt.get("id", start + i // self.num_samples)),
                        "correct": float(rollout.rewards[key][i]),
                        "length": float(lengths[i]),
                        "truncated": bool(rollout.truncated[i]) if rollout.truncated is not None else False,
                        "completion": rollout.completions[i] if rollout.completions is not None else None,
                    }
                )
        return rows

    def write(self, result: ReasoningEvalResult, output: str | None) -> list[Path]:
        """Write the JSON (and, with two or more labels, the plot); returns the paths written."""
        if output is None and self.output_dir is None:
            return []
        json_path = Path(output) if output else Path(str(self.output_dir)) / "reasoning_eval.json"
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result.to_json(), indent=2), encoding="utf-8")
        files = [json_path]
        if len(result.results) >= 2:
            files.append(plot_accuracy_vs_length(result.results, json_path.with_name("accuracy_vs_length.png")))
        return files


def load_weights(policy: Policy, checkpoint: str) -> None:
    """Load a renorm checkpoint (or a run directory's newest) into the policy (strict about unknown names)."""
    load_policy_weights(policy.module, checkpoint)
