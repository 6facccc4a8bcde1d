"""`renorm eval`: sample from a config's policy on its eval prompts and report the mean of each reward component
per dataset (and overall), or run the config's `eval.evaluator`. Modality-specific benchmarks (UniGenBench,
MedVidBench, the NFE table) build on the same pieces.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from toolkit.config import build_dataclass, instantiate, validate
from toolkit.train.scoring import nanmean, score_rollout

# `--output` holds every row's prompt and completion; each is cut to this many characters (with TRUNCATION_MARK
# and the number of characters dropped) so the file stays bounded, and the file's `metadata` says so.
MAX_TEXT_CHARS = 4000
TRUNCATION_MARK = "…[truncated {} chars]"


@dataclass
class EvalConfig:
    """The `eval:` section of a config."""

    data: Any = None
    num_prompts: int = 32
    num_samples: int = 1
    batch_size: int = 8
    seed: int = 1234
    # Per-row [N] entries of `rollout.data` to report next to the rewards (e.g. num_tool_calls).
    row_data: list[str] = field(default_factory=list)
    # A benchmark-specific evaluator (`_component_` node) replacing the generic loop: after the checkpoint is
    # loaded it is called as evaluator(policy=, sampler=, rewards=, data=, checkpoint=, output=) and returns
    # an EvalReport (e.g. modalities.text_agent.reasoning_eval.ReasoningEvaluator).
    evaluator: Any = None


class EvalReport(Protocol):
    """What `renorm eval` prints: the generic EvalResult or a custom evaluator's result."""

    def table(self) -> str: ...


@dataclass
class EvalResult:
    """Mean reward components per dataset; `rows` has every scored sample."""

    per_dataset: dict[str, dict[str, float]]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> str:
        from rich.console import Console
        from rich.table import Table

        metrics = sorted({k for values in self.per_dataset.values() for k in values})
        table = Table(title="evaluation")
        table.add_column("dataset")
        for metric in metrics:
            table.add_column(metric, justify="right")
        for dataset, values in self.per_dataset.items():
            table.add_row(dataset, *(f"{values.get(m, math.nan):.4f}" for m in metrics))
        console = Console(record=True, width=160)
        with console.capture() as capture:
            console.print(table)
        return capture.get()


def evaluate(config: Mapping[str, Any], checkpoint: str | None = None, output: str | None = None) -> EvalReport:
    """Sample `num_samples` completions for `num_prompts` eval prompts and score them (or run `eval.evaluator`).

    `checkpoint` is a checkpoint dir, a run dir (its newest verified checkpoint) or an export folder (`renorm
    export`'s OUT or RUN_DIR/export, loaded through the policy's `load_export`); None evaluates the config's weights.
    """
    from toolkit.io.datasets import check_data_paths
    from toolkit.io.export import is_export_folder, load_export
    from toolkit.io.resume import load_policy_weights

    eval_cfg = build_dataclass(EvalConfig, config.get("eval") or {}, where="eval")
    data_node = eval_cfg.data if eval_cfg.data is not None else config.get("data")
    for name in ("policy", "sampler"):
        validate(config.get(name), where=name)
    validate(data_node, where="eval.data")
    check_data_paths(data_node, "eval.data")  # a missing eval file fails before any weights load
    validate(eval_cfg.evaluator, where="eval.evaluator")
    for name, node in (config.get("rewards") or {}).items():
        validate(node, where=f"rewards.{name}")
    threads = (config.get("trainer") or {}).get("num_threads")
    if threads is not None:  # same CPU threading as training (trainer.num_threads)
        torch.set_num_threads(int(threads))
    policy = instantiate(config["policy"], where="policy")
    sampler = instantiate(config["sampler"], where="sampler")
    rewards = {k: instantiate(v, where=f"rewards.{k}") for k, v in (config.get("rewards") or {}).items()}
    data = instantiate(data_node, where="eval.data")
    if checkpoint is not None and is_export_folder(checkpoint):  # `renorm export`'s OUT, RUN_DIR/export
        checkpoint = str(load_export(policy, checkpoint))
    elif checkpoint is not None:
        checkpoint = str(load_policy_weights(policy.module, checkpoint))
    if eval_cfg.evaluator is not None:
        evaluator = instantiate(eval_cfg.evaluator, where="eval.evaluator")
        report: EvalReport = evaluator(
            policy=policy, sampler=sampler, rewards=rewards, data=data, checkpoint=checkpoint, output=output
        )
        return report
    generator = torch.Generator().manual_seed(eval_cfg.seed)
    batches = data.batches(eval_cfg.batch_size, generator)
    rows: list[dict[str, Any]] = []
    seen = 0
    policy.module.eval()
    while seen < eval_cfg.num_prompts:
        prompts = next(batches)[: eval_cfg.num_prompts - seen]
        seen += len(prompts)
        with torch.no_grad():
            rollout = sampler.sample(policy, prompts, eval_cfg.num_samples, generator)
        score_rollout(rollout, rewards)
        extra = row_data(rollout, eval_cfg.row_data)
        for i in range(len(rollout)):
            row = {"dataset": rollout.dataset_ids[i] if rollout.dataset_ids else "all"}
            row.update({k: float(v[i]) for k, v in rollout.rewards.items()})
            row.update({k: float(v[i]) for k, v in extra.items()})
            if rollout.lengths is not None:
                row["length"] = float(rollout.lengths[i])
            row.update(row_texts(rollout, i))
            rows.append(row)
    result = EvalResult(per_dataset=aggregate(rows), rows=rows)
    if output:
        write_output(output, result)
    return result


def row_texts(rollout: Any, i: int) -> dict[str, Any]:
    """Row `i`'s prompt (a prompt dict's `prompt` field) and completion as text (None when the rollout has none)."""
    prompt = rollout.prompts[i] if rollout.prompts is not None else None
    if isinstance(prompt, Mapping) and "prompt" in prompt:
        prompt = prompt["prompt"]
    completion = rollout.completions[i] if rollout.completions is not None else None
    return {"prompt": _as_text(prompt), "completion": _as_text(completion)}


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, dict, int, float, bool)):  # chat messages, token ids: JSON
        return json.dumps(value, ensure_ascii=False, default=str)
    return f"<{type(value).__name__}>"  # images, videos, tensors: not text


def truncate_text(text: str | None, max_chars: int = MAX_TEXT_CHARS) -> tuple[str | None, bool]:
    """(`text` cut to `max_chars` plus the marker naming how many characters were dropped, whether it was cut)."""
    if text is None or len(text) <= max_chars:
        return text, False
    return text[:max_chars] + TRUNCATION_MARK.format(len(text) - max_chars), True


def write_output(path: str | Path, result: EvalResult) -> None:
    """`renorm eval --output`: per-dataset means, every row with its prompt and completion (truncated), metadata."""
    rows, cut = [], 0
    for row in result.rows:
        row = dict(row)
        for key in ("prompt", "completion"):
            if key in row:
                row[key], truncated = truncate_text(row[key])
                cut += truncated
        rows.append(row)
    metadata = {
        "num_rows": len(rows),
        "max_text_chars": MAX_TEXT_CHARS,
        "truncated_texts": cut,
        "note": f"prompts and completions longer than {MAX_TEXT_CHARS} characters are cut and end with "
        f"{TRUNCATION_MARK.format('N')!r}",
    }
    report = {"metadata": metadata, "per_dataset": result.per_dataset, "rows": rows}
    Path(path).write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")


def row_data(rollout: Any, keys: list[str]) -> dict[str, torch.Tensor]:
    """The [N] tensors `rollout.data[key]` for `keys` (eval.row_data); a ValueError names a missing or bad one."""
    out = {}
    for key in keys:
        value = rollout.data.get(key)
        if not isinstance(value, torch.Tensor) or value.shape != (len(rollout),):
            shown = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"eval.row_data: rollout.data[{key!r}] must be an [N={len(rollout)}] tensor, got {shown}; "
                f"the sampler wrote {sorted(rollout.data)}"
            )
        out[key] = value.detach().float().cpu()
    return out


def aggregate(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean of every numeric field per dataset, plus an `all` row."""
    out: dict[str, dict[str, float]] = {}
    groups: dict[str, list[dict[str, Any]]] = {"all": list(rows)}  # a copy: the loop below must not grow `rows`
    for row in rows:
        if str(row["dataset"]) != "all":  # rows without a dataset are labelled "all" already
            groups.setdefault(str(row["dataset"]), []).append(row)
    for name, members in groups.items():
        keys = sorted({k for r in members for k, v in r.items() if isinstance(v, float)})
        out[name] = {k: nanmean(torch.tensor([r.get(k, math.nan) for r in members])) for k in keys}
    return out
