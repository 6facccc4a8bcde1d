"""CPU seconds per on-policy GRPO step with and without the sampler's old-log-prob forward.

With one inner epoch over one minibatch the Trainer takes old_logprobs from its first training forward, detached
(TRL's rule), and the sampler skips its re-scoring forward; the step's loss, gradients and weights are bitwise the
same (tests/toolkit/train/test_onpolicy_skip.py). Workload: bench/trainer_vs_trl.py's renorm side (2-layer Qwen2,
16 prompts x G=8, exactly 32 new tokens, fp32), and a wider model. Both trainers live in one process on one torch
thread and alternate in ABBA blocks of steps after warm-up; a step's cost is its process CPU time.

    python bench/onpolicy_skip.py [--steps 5 --repeats 6 --warmup 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["CUDA_VISIBLE_DEVICES"] = ""
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.abba import Report, add_abba_arguments, median_min, paired_ratio, publish, run_abba  # noqa: E402
from bench.trainer_vs_trl import renorm_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "onpolicy_skip.md"
MODELS: dict[str, dict[str, int]] = {
    "tiny (hidden 64, vocab 512)": {"vocab_size": 512, "hidden_size": 64, "num_layers": 2},
    "wider (hidden 256, vocab 8192)": {"vocab_size": 8192, "hidden_size": 256, "num_layers": 2},
}
SIDES = ("rescored", "skipped")


NOTES = """
## Reading the figures

- The skipped side does exactly the rescored side's work minus the sampler's no-grad forward over the N rows
  (`time/old_logprobs_s`, the last column but one); the losses, gradients and weights are bitwise equal (asserted
  here step by step on the losses, and by tests/toolkit/train/test_onpolicy_skip.py on gradients and weights).
- CPU seconds on one torch thread of a shared 2-core VM: single steps vary by ~30 %, and the load drifts over a
  run. The paired-block ratio compares blocks run back to back (ABBA), so a slow drift cancels; the saving it shows
  (1 - ratio times the rescored s/step) is to be read against the skipped forward. Nothing here ran on a GPU.
- Both trainers live in one process (same caches, allocator, import state) and see the same prompts and draws.

## What was tried

A first run with 4 ABBA blocks reported the medians only and put the tiny model's ratio at 1.14 (skipped slower):
load drift across blocks on the shared machine; the paired-block ratio and more blocks (6) were added for that.
"""


def build(args: argparse.Namespace, model: dict[str, int], run_dir: str, skip: bool) -> Any:
    from toolkit.train.runner import build_trainer

    config = renorm_config(args, run_dir)
    config["policy"]["model"].update(model)
    config["trainer"].update(progress=False, num_steps=args.warmup + args.repeats * args.steps)
    trainer = build_trainer(config)
    assert trainer.old_logprobs_from_update, "the workload is on-policy"
    trainer.old_logprobs_from_update = skip
    return trainer


def step_values(trainer: Any) -> dict[str, float]:
    """One step; its old-log-prob forward's seconds and its loss."""
    metrics, _ = trainer.step()
    return {"old_logprobs_s": metrics.get("time/old_logprobs_s", 0.0), "loss": metrics["loss/policy"]}


def compare(args: argparse.Namespace, model: dict[str, int]) -> dict[str, dict[str, list[float]]]:
    """ABBA blocks of `--steps` steps per side; both trainers see the same prompts and draws, step for step."""
    with tempfile.TemporaryDirectory(prefix="bench_onpolicy_") as tmp:
        trainers = {side: build(args, model, f"{tmp}/{side}", side == "skipped") for side in SIDES}
        rows = run_abba(SIDES, lambda side: step_values(trainers[side]), args.warmup, args.repeats, args.steps)
    assert rows["rescored"]["loss"] == rows["skipped"]["loss"], "the two paths trained differently"
    return rows


def report(args: argparse.Namespace, results: dict[str, dict[str, dict[str, list[float]]]]) -> str:
    md = Report(
        "On-policy steps without the old-log-prob forward (bench/onpolicy_skip.py)",
        f".venv/bin/python bench/onpolicy_skip.py --steps {args.steps} --repeats {args.repeats} --warmup {args.warmup}",
        f"1 thread · CPU, fp32 · 16 prompts x G=8, {args.max_new_tokens} new tokens · {args.repeats} ABBA blocks of "
        f"{args.steps} steps per side ({args.repeats * args.steps} steps each) after {args.warmup} warm-up steps",
    )
    md.table(
        "model",
        "rescored CPU s/step: median / min",
        "skipped CPU s/step: median / min",
        "ratio skipped / rescored: median / min",
        "paired blocks: median ratio",
        "old-log-prob forward (s, rescored mean)",
        "losses equal",
    )
    for name, rows in results.items():
        rescored, skipped = (rows[side]["cpu_s"] for side in SIDES)
        ratios = statistics.median(skipped) / statistics.median(rescored), min(skipped) / min(rescored)
        md.row(
            name,
            median_min(rescored),
            median_min(skipped),
            f"{ratios[0]:.3f} / {ratios[1]:.3f}",
            f"{paired_ratio(rescored, skipped, args.steps):.3f}",  # skipped / rescored of same-index blocks
            f"{statistics.fmean(rows['rescored']['old_logprobs_s']):.3f}",
            rows["rescored"]["loss"] == rows["skipped"]["loss"],
        )
    return md.text(NOTES)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_abba_arguments(parser, warmup=2, steps=5, repeats=6)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per completion")
    parser.add_argument("--decode", choices=("generate", "lean"), default="generate", help="HFEngine decode")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    results = {name: compare(args, model) for name, model in MODELS.items()}
    publish(report(args, results), args.out)


if __name__ == "__main__":
    main()
