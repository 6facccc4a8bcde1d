"""Text reasoning with the Python API: DLER on the tiny arithmetic task, then a DLER Table 1-style evaluation.

Runs on a CPU in about a minute with no downloads: the recipe configs/text_reasoning/tiny.yaml (a 2-layer
Qwen2 warm-started in code, math-verify correctness after `</think>`, truncation at 8 tokens, batch-std
advantages, dynamic sampling). The GPU recipes beside it (BNPO on Qwen2.5-Math-7B, DLER / DA-DLER on
DeepSeek-R1-Distill-Qwen-1.5B) run the same way with `renorm train CONFIG`.

    python examples/text_reasoning.py [--steps 30]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from modalities.text_agent.reasoning_eval import ReasoningEvaluator, format_table
from toolkit.config import instantiate, load_config
from toolkit.train.runner import build_trainer

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models are fastest single-threaded
    config = load_config(ROOT / "configs" / "text_reasoning" / "tiny.yaml", ["trainer.progress=false"])
    trainer = build_trainer(config)
    evaluator = ReasoningEvaluator(num_samples=4, batch_size=55, seed=0)
    parts = {
        "sampler": instantiate(config["eval"]["evaluator"]["sampler"]),
        "rewards": trainer.rewards,
        "data": instantiate(config["eval"]["data"]),
    }
    before = evaluator(policy=trainer.policy, **parts).results["base"]
    for step in range(1, args.steps + 1):
        metrics, _ = trainer.step()
        if step % 10 == 0:
            print(
                f"step {step:3d}  length {metrics['rollout/length_mean']:.2f}  "
                f"sampling rounds {metrics['filter/rounds']:.0f}  batch std {metrics['normalizer/batch_std']:.3f}"
            )
    after = evaluator(policy=trainer.policy, **parts).results["base"]
    print(format_table({"start": before, f"after {args.steps} steps": after}))


if __name__ == "__main__":
    main()
