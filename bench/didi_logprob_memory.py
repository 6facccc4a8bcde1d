"""Peak memory of a DiDi-Instruct training micro-step and of a teacher NELBO step: fp32 [N, L, V] SUBS log-probs (the
code before issue 19) vs the blockwise statistics of `modalities.diffusion_lm.subs_stats`.

Student micro-step: the two-step rollout's log-probs and entropy (`log_probs_and_entropy`), the Jeffrey KL to the
teacher (`analytic_kl`, reusing the student forward), a weighted loss and backward. "direct" computes them as the
policy did: `x0_log_probs` ([N, L, V] fp32 SUBS log-probs) with `step_log_probs`, `categorical_entropy`,
`teacher_divergence` and the teacher's `log_probs_x0`. Teacher step: `MaskedDiffusionLM.nelbo` vs
`teacher.blockwise_nelbo` and backward. Tiny DiT trunks (hidden 64) at GPT-2's vocabulary (50,258 with the mask),
so the [N, L, V] tensors dominate. Each measurement runs in a fresh subprocess (glibc mmap threshold 64 KiB so freed
tensors leave the resident set): peak RSS over the call minus RSS before it, after one warm-up call; bytes per
logit are extrapolated to the OWT recipe's micro-batch (32 rows x 1024 tokens, fp32 logits).

    python bench/didi_logprob_memory.py [--rows 4 --length 128 --vocab 50258]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from bench.abba import Report, publish  # noqa: E402
from bench.logprob_memory import peak_rss_extra, run_worker  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "didi_logprob_memory.md"
OWT = {"rows": 32, "length": 1024, "vocab": 50258}  # didi_instruct_owt_small.yaml: 8 prompts x G=4, L = 1024
GIB = 2**30
SIDES = ("direct", "blockwise")

NOTES = """
## Reading the figures

- Student micro-step, direct: per trained step the fp32 SUBS log-probs [N, L, V] (kept for backward, and reused by
  the KL), the entropy's exp and product, the teacher's fp32 log-probs and the divergence's exp / difference
  products, several of them alive at once in backward: 28 bytes per logit. Blockwise: what stays is each step's
  student logits and teacher logits (the KL's backward needs the teacher's distribution; the direct path keeps it
  as fp32 log-probs), the logits' gradient in backward and the block temporaries: ~11 bytes per logit with small
  blocks. The rest would need the output Linear fused into the blocks (not done).
- Teacher step: the NELBO reads one log-prob per position; direct builds the SUBS log-probs first. Blockwise keeps
  the logits and, in backward, their gradient (~10 bytes per logit with small blocks).
- Block size: the default, `subs_stats.BLOCK_ELEMENTS` = 2^26 fp32 values (1,335 positions at this vocabulary), is
  the whole micro-batch at this bench's size, so only what is no longer kept for backward shows (1.0-1.2x); at the
  OWT micro-batch a default block is 1,335 of 32,768 positions, which the 32-position rows (6 % of 512) stand for.
- Values are bitwise the direct path's on CPU and gradients agree to float rounding
  (tests/modalities/diffusion_lm/test_subs_stats.py). Seconds are single calls on a shared 2-core VM (noisy).
- CPU, fp32 trunks (the DiT returns fp32 logits also under bf16 autocast). Nothing here was measured on a GPU.
"""


def direct_policy_terms(policy: Any, rollout: Any) -> tuple[Tensor, Tensor, Tensor]:
    """The student's log-probs, entropy and KL [N, T] through fp32 [N, L, V] SUBS log-probs (the code before)."""
    from modalities.diffusion_lm.didi_policy import (
        categorical_entropy,
        masked_mean,
        rollout_steps,
        step_log_probs,
        teacher_divergence,
    )

    steps, mask_id = rollout_steps(rollout, policy.mask_id), policy.mask_id
    columns: list[list[Tensor]] = [[], [], []]
    for z, target, t in zip(steps.inputs, steps.targets, steps.times, strict=True):
        log_probs = policy.x0_log_probs(z, t)
        with torch.no_grad():
            teacher = policy.teacher.log_probs_x0(z, t)
        columns[0].append(step_log_probs(log_probs, z, target, mask_id, policy.logprob_mode))
        columns[1].append(masked_mean(categorical_entropy(log_probs), z == mask_id))
        divergence = teacher_divergence(log_probs, teacher, policy.regularization, policy.beta)
        columns[2].append(masked_mean(divergence, z == mask_id))
    first, second, third = (torch.where(rollout.mask, torch.stack(c, dim=1), 0.0) for c in columns)
    return first, second, third


def setup(args: argparse.Namespace) -> tuple[Any, Any, Tensor]:
    """(student policy, its two-step rollout, clean ids for the teacher step), all seeded."""
    from modalities.diffusion_lm.didi_policy import StudentPolicy
    from modalities.diffusion_lm.didi_sampler import TwoStepStudentSampler
    from modalities.diffusion_lm.tiny import build_tiny_teacher

    policy = StudentPolicy(
        build_tiny_teacher(args.vocab, seed=0, max_length=args.length),
        build_tiny_teacher(args.vocab, seed=1, max_length=args.length),
        ema_decay=None,
    )
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab - 1, (args.rows, args.length), generator=generator)
    prompts = [{"input_ids": row.tolist()} for row in ids[: args.rows // 2]]
    rollout = TwoStepStudentSampler().sample(policy, prompts, 2, generator)
    return policy, rollout, ids


def call(args: argparse.Namespace, policy: Any, rollout: Any, ids: Tensor) -> None:
    from modalities.diffusion_lm.teacher import blockwise_nelbo

    if args.step == "teacher":
        assert policy.teacher is not None
        generator = torch.Generator().manual_seed(1)
        nelbo = (
            policy.teacher.nelbo(ids, generator)
            if args.side == "direct"
            else blockwise_nelbo(policy.teacher, ids, generator)
        )
        nelbo.backward()
        policy.teacher.zero_grad(set_to_none=True)
        return
    if args.side == "direct":
        logprobs, entropy, kl = direct_policy_terms(policy, rollout)
    else:
        logprobs, entropy = policy.log_probs_and_entropy(rollout)
        kl = policy.analytic_kl(rollout)
    advantages = torch.linspace(-1.0, 1.0, len(rollout))[:, None]
    (-(advantages * logprobs).mean() - 0.01 * entropy.mean() + 0.1 * kl.mean()).backward()
    policy.module.zero_grad(set_to_none=True)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    if args.chunk is not None:  # positions per block (the default is BLOCK_ELEMENTS // V)
        from modalities.diffusion_lm import subs_stats

        subs_stats.BLOCK_ELEMENTS = args.chunk * args.vocab
    policy, rollout, ids = setup(args)
    if args.step == "teacher":
        policy.teacher.requires_grad_(True)
    call(args, policy, rollout, ids)  # warm-up
    start = time.perf_counter()
    rss_extra, _ = peak_rss_extra(lambda: call(args, policy, rollout, ids))
    return {"rss_extra": rss_extra, "seconds": time.perf_counter() - start}


def measure(args: argparse.Namespace, step: str, side: str, chunk: int | None) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", "--step", step, "--side", side, "--rows", str(args.rows)]
    command += ["--length", str(args.length), "--vocab", str(args.vocab), "--threads", str(args.threads)]
    command += ["--chunk", str(chunk)] if chunk is not None else []
    return run_worker(command)


def report(args: argparse.Namespace, results: dict[str, dict[tuple[str, int | None], dict[str, Any]]]) -> str:
    from modalities.diffusion_lm.subs_stats import BLOCK_ELEMENTS

    mib = 2**20
    positions = args.rows * args.length
    logits = {"student": 2 * positions * args.vocab, "teacher": positions * args.vocab}
    owt_positions = OWT["rows"] * OWT["length"]
    owt = {"student": 2 * owt_positions * OWT["vocab"], "teacher": owt_positions * OWT["vocab"]}
    default_block = min(positions, max(1, BLOCK_ELEMENTS // args.vocab))
    md = Report(
        "DiDi-Instruct log-prob memory: fp32 [N, L, V] SUBS log-probs vs blockwise (bench/didi_logprob_memory.py)",
        f".venv/bin/python bench/didi_logprob_memory.py --rows {args.rows} --length {args.length} "
        f"--vocab {args.vocab} --chunk-rows {args.chunk_rows} --threads {args.threads}",
        f"{args.threads} threads · CPU, fp32 · N={args.rows} rows x L={args.length} x V={args.vocab} "
        f"({positions * args.vocab * 4 / mib:.0f} MiB per fp32 [N, L, V]); student: T = 2 steps",
    )
    md.lines += [
        "Extra memory = peak during the call minus what was live before it (weights, rollout). Bytes per logit divide",
        "it by the logits of the call (student: both steps) and are extrapolated to the OWT micro-batch "
        f"({OWT['rows']} x {OWT['length']} x {OWT['vocab']}).",
        "",
    ]
    md.table(
        "step",
        "side",
        "block (positions)",
        "peak RSS extra (MiB)",
        "ratio",
        "bytes / logit",
        "at the OWT shape (GiB)",
        "seconds",
    )
    for step, rows in results.items():
        base = rows[("direct", None)]["rss_extra"]
        for (side, chunk), row in rows.items():
            block = "-" if side == "direct" else str(default_block if chunk is None else chunk)
            per_logit = row["rss_extra"] / logits[step]
            extra = row["rss_extra"]
            md.row(
                step,
                side,
                block,
                f"{extra / mib:.0f}",
                f"{base / extra:.1f}x",
                f"{per_logit:.1f}",
                f"{per_logit * owt[step] / GIB:.0f}",
                f"{row['seconds']:.2f}",
            )
    return md.text(NOTES)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4, help="N, rows of the micro-batch (2 prompts x G=2 at 4)")
    parser.add_argument("--length", type=int, default=128, help="L, tokens per row")
    parser.add_argument("--vocab", type=int, default=50258, help="V, with the mask id (GPT-2's 50,257 + 1)")
    parser.add_argument("--chunk-rows", type=int, default=32, help="a small block (positions), besides the default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--step", choices=["student", "teacher"], help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results: dict[str, dict[tuple[str, int | None], dict[str, Any]]] = {}
    for step in ("student", "teacher"):
        results[step] = {("direct", None): measure(args, step, "direct", None)}
        for chunk in (None, args.chunk_rows):
            results[step][("blockwise", chunk)] = measure(args, step, "blockwise", chunk)
    publish(report(args, results), args.out)


if __name__ == "__main__":
    main()
