"""DLER vs GRPO on the tiny arithmetic task (CPU): does truncation + batch normalization cut length at equal reward?

Small-scale reproduction (b) of DLER (arXiv:2510.15110): configs/text_reasoning/tiny.yaml (truncation at
L = 8 tokens, group-mean + batch-std advantages, clip-higher, dynamic sampling) against tiny_grpo.yaml
(GRPO group z-score, no length penalty), same warm-started 2-layer policy, data, reward, 16-token budget,
seed and number of optimizer steps. Both are evaluated on the 110 held-in problems (pass@1 over k samples,
mean length) at the start and every `--eval-every` steps; curves are printed and plotted. Note: DLER's
dynamic sampling generates up to 4 batches per step, so it sees more samples per step than GRPO.
Writes bench/results/dler_vs_grpo.md (the table) and .png (accuracy against length, the key figure); the
other plots and summary.json go next to the runs (runs/bench/dler_vs_grpo/, not committed).
Run: `python bench/dler_vs_grpo.py [--steps 100]` (2–5 minutes on 2 shared CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"DLER": "tiny.yaml", "GRPO": "tiny_grpo.yaml"}
REPORT = ROOT / "bench" / "results" / "dler_vs_grpo.md"  # the one results file (+ the key figure, same stem)
RUN_ROOT = ROOT / "runs" / "bench" / "dler_vs_grpo"  # run directories, summary.json and the other plots (git-ignored)


def train(name: str, config_file: str, args: argparse.Namespace) -> tuple[Path, float]:
    """Train one recipe for `args.steps` steps, saving every `args.eval_every`; returns (run dir, seconds)."""
    from toolkit.config import load_config
    from toolkit.train.runner import build_trainer, fit

    run_dir = RUN_ROOT / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: checkpoints of an earlier one would be evaluated too
    overrides = [
        f"trainer.run_dir={run_dir}",
        f"trainer.num_steps={args.steps}",
        f"trainer.save_every={args.eval_every}",
        "trainer.keep_last=1000",
        "trainer.resume=never",
        "trainer.progress=false",
        f"trainer.seed={args.seed}",
    ]
    trainer = build_trainer(load_config(ROOT / "configs" / "text_reasoning" / config_file, overrides))
    start = time.perf_counter()
    fit(trainer)
    return run_dir, time.perf_counter() - start


def evaluate(config_file: str, run_dir: Path, args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    """pass@1 / length / truncation of the start weights and of every checkpoint, on the eval problems."""
    from modalities.text_agent.reasoning_eval import ReasoningEvaluator
    from toolkit.config import instantiate, load_config
    from toolkit.io.checkpoint import CheckpointManager

    config = load_config(ROOT / "configs" / "text_reasoning" / config_file)
    checkpoints = [str(p) for p in CheckpointManager(run_dir).list()]
    evaluator = ReasoningEvaluator(num_samples=args.samples, batch_size=55, checkpoints=checkpoints, seed=args.seed)
    result = evaluator(
        policy=instantiate(config["policy"], where="policy"),
        sampler=instantiate(config["eval"]["evaluator"]["sampler"], where="eval.evaluator.sampler"),
        rewards={k: instantiate(v, where=f"rewards.{k}") for k, v in config["rewards"].items()},
        data=instantiate(config["eval"]["data"], where="eval.data"),
    )
    return result.results


def step_of(label: str) -> int:
    return 0 if label == "base" else int(label.split("_")[-1])


def write_curves(name: str, results: dict[str, dict[str, dict[str, float]]]) -> Path:
    """The eval curve as a metrics.jsonl (eval/accuracy, eval/length, eval/truncation per step) for plot_compare."""
    curve_dir = RUN_ROOT / f"{name}_eval"
    curve_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for label, per in results.items():
        avg = per["Avg"]
        record = {"step": step_of(label), **{f"eval/{k}": avg[k] for k in ("accuracy", "length", "truncation")}}
        lines.append(json.dumps(record))
    (curve_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return curve_dir


def training_curve(run_dir: Path, key: str, every: int) -> list[tuple[int, float]]:
    """Mean of `key` over consecutive windows of `every` training steps."""
    from toolkit.io.logging import read_metrics

    records = [r for r in read_metrics(run_dir) if isinstance(r.get(key), (int, float))]
    out = []
    for start in range(0, len(records), every):
        window = records[start : start + every]
        out.append((int(window[-1]["step"]), sum(float(r[key]) for r in window) / len(window)))
    return out


def report(results: dict[str, dict[str, dict[str, dict[str, float]]]], runs: dict[str, Path], every: int) -> str:
    labels = list(next(iter(results.values())))
    lines = ["eval (110 problems): pass@1 % / mean length in tokens / truncated %"]
    lines.append("step  | " + " | ".join(f"{name:^24}" for name in results))
    for label in labels:
        cells = []
        for per_run in results.values():
            avg = per_run[label]["Avg"]
            cells.append(f"{avg['accuracy']:6.2f} / {avg['length']:5.2f} / {avg['truncation']:5.1f}")
        lines.append(f"{step_of(label):5d} | " + " | ".join(f"{c:^24}" for c in cells))
    lines.append(f"training rollouts: mean length per {every}-step window (DLER: over the kept groups)")
    for name, run_dir in runs.items():
        curve = training_curve(run_dir, "rollout/length_mean", every)
        lines.append(f"{name:5s} " + "  ".join(f"{step}:{value:.2f}" for step, value in curve))
    return "\n".join(lines)


def write_report(
    path: Path, results: dict[str, Any], text: str, args: argparse.Namespace, seconds: dict[str, float]
) -> None:
    """The markdown results file: the command, the eval table, the training-length curve and the key figure."""
    names, labels = list(results), list(next(iter(results.values())))
    command = "python bench/dler_vs_grpo.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    lines = [
        "# DLER vs GRPO on the tiny arithmetic task (bench/dler_vs_grpo.py)",
        "",
        f"Command: `{command}`",
        "",
        f"Eval on the 110 held-in problems, {args.samples} samples each: pass@1 %, mean length (tokens), truncated %. "
        f"Training wall-clock: {', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}.",
        "",
        "| step | " + " | ".join(f"{n} pass@1 | {n} length | {n} truncated" for n in names) + " |",
        "|---|" + "---|---|---|" * len(names),
    ]
    for label in labels:
        cells = [results[n][label]["Avg"] for n in names]
        row = " | ".join(f"{c['accuracy']:.2f} | {c['length']:.2f} | {c['truncation']:.1f}" for c in cells)
        lines.append(f"| {step_of(label)} | {row} |")
    lines += [
        "",
        "```",
        *text.splitlines()[-len(names) - 1 :],
        "```",
        "",
        f"![accuracy against length]({path.with_suffix('.png').name})",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--samples", type=int, default=4, help="samples per eval problem (pass@1 averaged over them)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 avoids oversubscription)")
    args = parser.parse_args()
    import torch

    from modalities.text_agent.reasoning_eval import plot_accuracy_vs_length
    from toolkit.io.plotting import plot_compare

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    runs: dict[str, Path] = {}
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for name, config_file in RUNS.items():
        runs[name], seconds[name] = train(name, config_file, args)
        results[name] = evaluate(config_file, runs[name], args)
    text = report(results, runs, every=10)
    print(text)
    curves = [write_curves(name, per_run) for name, per_run in results.items()]
    plots = [
        plot_compare(curves, metric, RUN_ROOT / f"{metric.split('/')[1]}.png", labels=list(results))
        for metric in ("eval/accuracy", "eval/length")
    ]
    train_plot = RUN_ROOT / "train_length.png"
    plots.append(plot_compare(list(runs.values()), "rollout/length_mean", train_plot, labels=list(runs)))
    merged = {f"{name}@{step_of(label)}": per for name, per_run in results.items() for label, per in per_run.items()}
    series = {name: [f"{name}@{step_of(label)}" for label in per_run] for name, per_run in results.items()}
    plots.append(plot_accuracy_vs_length(merged, REPORT.with_suffix(".png"), series=series))
    summary = {"args": vars(args), "train_seconds": seconds, "eval": results, "report": text}
    (RUN_ROOT / "summary.json").write_text(json.dumps(summary, indent=2))
    write_report(REPORT, results, text, args, seconds)
    print("plots: " + ", ".join(str(p.relative_to(ROOT)) for p in plots))
    print(
        f"total {time.perf_counter() - started:.0f} s (train: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
        + ")"
    )


if __name__ == "__main__":
    main()
