"""Wall-clock seconds per GRPO step: synchronous vs async one-step-off-policy rollouts (`trainer.async_rollouts`).

Workload: configs/demo/tiny_grpo.yaml (2-layer random-init Qwen2, char tokenizer) with 8 prompts x G=8 and
`--new-tokens` new tokens per completion, 2 minibatches. The async side generates step k+1 in a background thread
while step k updates; each thread runs torch with `--threads` intra-op threads. Sides alternate in blocks (ABAB)
after warm-up; a step's cost is its wall time (the overlap is what is measured, so not CPU time). On a 2-core box
shared with other work the two threads compete for the same cores: the ratio is a lower bound of a GPU/server split.

    python bench/async_rollouts.py [--steps 4 --repeats 3 --new-tokens 24 --threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["CUDA_VISIBLE_DEVICES"] = ""
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tests.demo_run import tiny_config  # noqa: E402
from toolkit.train.runner import build_trainer  # noqa: E402
from toolkit.train.trainer import Trainer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "async_rollouts.md"
SIDES = {"sync": ("trainer.async_rollouts=false",), "async": ("trainer.async_rollouts=true",)}


def make(side: str, run_dir: Path, steps: int, new_tokens: int) -> Trainer:
    overrides = [
        f"trainer.num_steps={steps}",
        "trainer.prompts_per_step=8",
        "trainer.group_size=8",
        "trainer.num_minibatches=2",
        f"sampler.max_new_tokens={new_tokens}",
        *SIDES[side],
    ]
    return build_trainer(tiny_config(run_dir / side, *overrides))


def block(trainer: Trainer, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="steps per block")
    parser.add_argument("--repeats", type=int, default=3, help="blocks per side")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    total = args.warmup + args.steps * args.repeats + 1
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {side: make(side, Path(tmp), total, args.new_tokens) for side in SIDES}
        for trainer in trainers.values():
            block(trainer, args.warmup)
        times: dict[str, list[float]] = {side: [] for side in SIDES}
        for _ in range(args.repeats):
            for side, trainer in trainers.items():
                times[side] += block(trainer, args.steps)
    sync, overlapped = (statistics.median(times[side]) for side in SIDES)
    lines = [
        "# Async one-step-off-policy rollouts vs synchronous steps (CPU)",
        "",
        f"`python bench/async_rollouts.py --steps {args.steps} --repeats {args.repeats} --new-tokens "
        f"{args.new_tokens} --threads {args.threads}` on {datetime.date.today()}, {platform.processor() or 'cpu'}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}.",
        "",
        "| side | median step (s) | steps timed |",
        "|---|---|---|",
        f"| sync | {sync:.3f} | {len(times['sync'])} |",
        f"| async (overlap) | {overlapped:.3f} | {len(times['async'])} |",
        "",
        f"async / sync step time: **{overlapped / sync:.2f}x**",
    ]
    print("\n".join(lines))
    RESULTS.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
