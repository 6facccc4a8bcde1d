"""SD3 true-CFG training micro-step with the unconditional half under no_grad vs batched with gradients (issue 19).

"batched" is the code before issue 19 (`FlowMatchingPolicy(uncond_without_grad=False)`): one [uncond; cond] forward
with gradients, v_u detached after. "split" runs v_u as its own forward under `torch.no_grad()` and only v_c with
gradients. A micro-step is what the Trainer does per micro-batch with the Flow-GRPO preset: `log_probs` of M stored
transitions, a ratio loss, the analytic KL (its reference pass is no-grad on both sides), backward. Both sides share
the weights and the rollout. Step time: CPU seconds (process time, one torch thread), both sides in one process in
ABBA blocks. Peak memory: a fresh subprocess per side, peak RSS over one micro-step minus RSS before it (glibc mmap
threshold 64 KiB so freed tensors leave the resident set), as bench/logprob_memory.py measures.

    python bench/t2i_cfg_no_grad.py [--rows 8 --repeats 6 --steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["CUDA_VISIBLE_DEVICES"] = ""
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.abba import Report, median_min, paired_ratio, publish, run_abba  # noqa: E402
from bench.logprob_memory import peak_rss_extra, run_worker  # noqa: E402
from bench.t2i_sde_logprob import build_policy  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "t2i_cfg_no_grad.md"
SIZES: dict[str, dict[str, int]] = {
    "small (4 layers, width 128, 64 image tokens)": {"num_layers": 4, "heads": 4, "head_dim": 32, "latent": 16},
    "medium (6 layers, width 256, 256 image tokens)": {"num_layers": 6, "heads": 4, "head_dim": 64, "latent": 32},
}
SIDES = ("batched", "split")


NOTES = """
## Reading the figures

- Work: with gradients on, "batched" runs the transformer forward and backward over 2M rows; "split" runs a no-grad
  forward over M rows and a forward and backward over M rows. With checkpointing, the batched side also recomputes
  the 2M-row forward in backward, the split side an M-row one. The reference pass of the KL is the same no-grad
  work on both sides. Losses agree to float rounding (the batched forward groups rows differently); the exactness
  test is tests/modalities/text_to_image/test_t2i_cfg_no_grad.py.
- Memory: without checkpointing the saved activations of the unconditional half are gone (about half of the
  micro-step's extra); with checkpointing only inputs are saved on either side, so the peak is the recompute of
  one forward in backward: 2M rows batched vs M rows split.
- CPU seconds on one torch thread of a shared 2-core VM; the paired-block ratio compares blocks run back to back
  (ABBA), so slow drifts of the machine's load cancel. Nothing here was measured on a GPU.
"""


def setup(size: dict[str, int], rows: int, split: bool, checkpointing: bool) -> tuple[Any, Any]:
    """(policy, rollout): the rollout sampled by a batched-CFG policy of the same weights, M = `rows` transitions."""
    from modalities.text_to_image.sampler import FlowSDESampler

    sampler_policy, policy = build_policy(size), build_policy(size)  # same seed: same weights; reference = copy
    policy.uncond_without_grad, policy.gradient_checkpointing = split, checkpointing
    policy.init_reference()
    height = size["latent"] * 8
    sampler = FlowSDESampler(num_steps=5, guidance_scale=4.5, height=height, width=height, train_step_fraction=0.5)
    prompts = [f"prompt {i}" for i in range(rows // 2)]
    rollout = sampler.sample(sampler_policy, prompts, 2, torch.Generator().manual_seed(0))
    return policy, rollout


def micro_step(policy: Any, rollout: Any) -> float:
    """log-probs + ratio loss + analytic KL + backward over every trained transition; returns the loss."""
    advantages = torch.linspace(-1.0, 1.0, len(rollout))[:, None]
    mask = rollout.mask
    ratio = torch.exp(policy.log_probs(rollout) - rollout.old_logprobs)
    loss = -(advantages * ratio)[mask].mean() + 0.04 * policy.analytic_kl(rollout)[mask].mean()
    loss.backward()
    policy.module.zero_grad(set_to_none=True)
    return float(loss.detach())


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS extra of one micro-step of one side in this fresh process (after a warm-up step)."""
    torch.set_num_threads(1)
    policy, rollout = setup(SIZES[args.size], args.rows, args.side == "split", args.checkpointing)
    micro_step(policy, rollout)
    rss_extra, loss = peak_rss_extra(lambda: micro_step(policy, rollout))
    return {"rss_extra": rss_extra, "loss": loss}


def measure_memory(args: argparse.Namespace, size: str, side: str, checkpointing: bool) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", "--size", size, "--side", side, "--rows", str(args.rows)]
    command += ["--checkpointing"] * checkpointing
    return run_worker(command, OMP_NUM_THREADS="1")


def measure_time(args: argparse.Namespace, size: str, checkpointing: bool) -> dict[str, dict[str, list[float]]]:
    """CPU seconds and loss per micro-step of both sides, ABBA blocks of `--steps` micro-steps after one warm-up."""
    pairs = {side: setup(SIZES[size], args.rows, side == "split", checkpointing) for side in SIDES}
    return run_abba(SIDES, lambda side: {"loss": micro_step(*pairs[side])}, 1, args.repeats, args.steps)


def report(args: argparse.Namespace, results: list[tuple[str, bool, dict[str, Any], dict[str, Any]]]) -> str:
    mib = 2**20
    md = Report(
        "SD3 CFG in training: unconditional half under no_grad vs batched with gradients (bench/t2i_cfg_no_grad.py)",
        f".venv/bin/python bench/t2i_cfg_no_grad.py --rows {args.rows} --repeats {args.repeats} --steps {args.steps}",
        f"1 thread · CPU, fp32 · {args.rows} rows x 2 trained transitions (M = {2 * args.rows}) per micro-step, "
        f"CFG 4.5, KL coef 0.04 · {args.repeats} ABBA blocks of {args.steps} micro-steps per side after 1 warm-up",
    )
    md.table(
        "model",
        "checkpointing",
        "batched CPU s: median / min",
        "split CPU s: median / min",
        "ratio split / batched (paired blocks)",
        "batched peak extra (MiB)",
        "split peak extra (MiB)",
        "memory ratio batched / split",
        "max loss difference",
    )
    for size, checkpointing, times, memory in results:
        batched, split = times["batched"]["cpu_s"], times["split"]["cpu_s"]
        gap = max(abs(a - b) for a, b in zip(times["batched"]["loss"], times["split"]["loss"], strict=True))
        extra = {side: memory[side]["rss_extra"] for side in ("batched", "split")}
        md.row(
            size,
            "on" if checkpointing else "off",
            median_min(batched),
            median_min(split),
            f"{paired_ratio(batched, split, args.steps):.3f}",
            f"{extra['batched'] / mib:.0f}",
            f"{extra['split'] / mib:.0f}",
            f"{extra['batched'] / extra['split']:.2f}x",
            f"{gap:.1e}",
        )
    return md.text(NOTES)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8, help="rollout rows (2 trained transitions each)")
    parser.add_argument("--repeats", type=int, default=6, help="ABBA blocks per side")
    parser.add_argument("--steps", type=int, default=3, help="micro-steps per block")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=list(SIZES), help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    torch.set_num_threads(1)
    results = []
    for size in SIZES:
        for checkpointing in (False, True):
            memory = {side: measure_memory(args, size, side, checkpointing) for side in SIDES}
            results.append((size, checkpointing, measure_time(args, size, checkpointing), memory))
    publish(report(args, results), args.out)


if __name__ == "__main__":
    main()
