"""Peak memory of token log-probs + backward at vocab 152k: the direct fp32 formula vs toolkit.hf.logprobs (chunked).

Both sides get the same bf16 model output [N, T+1, V] (a leaf standing in for the lm_head output), take its response
view [:, :-1] as the policies do, compute fp32 log-probs of target tokens (optionally with the entropy), a weighted
sum as the loss, and backward to the logits. "Direct" is the formula the policies used before (`logits.float() /
temperature`, gather - logsumexp; entropy from the softmax). Each measurement runs in a fresh subprocess with
glibc's mmap threshold at 64 KiB, so freed tensors leave the resident set: peak RSS over the call (VmHWM, reset
through /proc/self/clear_refs) minus RSS before it, and, as a cross-check, the peak of torch.profiler's memory
timeline (profile_memory=True) minus the output's bytes. Bytes per logit are extrapolated to the DLER-1.5B shape
(micro-batch 16, 4k tokens, vocab 151,936).

    python bench/logprob_memory.py [--rows 2 --steps 256 --vocab 151936 --chunk-rows 441 32 --threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.abba import Report, publish  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "logprob_memory.md"
DLER = {"rows": 16, "steps": 4096, "vocab": 151936}  # DLER-1.5B recipe: micro-batch 16, 4k tokens, Qwen2 vocab
GIB = 2**30
T = TypeVar("T")
OUTPUTS = {False: "log-probs", True: "log-probs + entropy"}  # the table's first column, by `--entropy`


NOTES = """
## Reading the figures

- Direct: 20 bytes per logit at the peak (in backward), i.e. five fp32 [N, T, V] tensors alive at once.
- Chunked: the extra is the larger of the block temporaries (forward and backward, ~4-5 fp32 blocks) and the two bf16
  gradient buffers of backward: the Function's [N, T, V] gradient and autograd's zero-padded [N, T+1, V] copy for the
  `[:, :-1]` slice (4 bytes per logit). At this bench's size the default block (441 positions: one whole 256-token
  row here) is half of all positions, hence only 1.5-1.8x; at the DLER shape a default block is 441 of 65,536
  positions (~0.25 GiB per fp32 block), so the gradient buffers dominate, as with the 32-position block here.
- Not in the figures: the lm_head matmul's own backward. Asking the model for exactly the T response logits
  (`logits_to_keep` as an index tensor) would drop the padded copy: 2 bytes per logit, ~10x.
- Seconds are single calls on a shared 2-core VM (noisy); on CPU many small blocks cost time, the default block
  does not.

## What was tried

A two-point fit a·(N·T·V) + b·(block·V) of the chunked peak was dropped: the peak is a maximum of the forward's block
temporaries and backward's gradient buffers, not a sum, so the fit mixed the two.
"""


def direct(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, entropy: bool) -> list[torch.Tensor]:
    """The policies' formula before toolkit.hf.logprobs: [log-probs] (text) or [log-probs, entropy] (video)."""
    scaled = logits.float() / temperature
    normalizer = torch.logsumexp(scaled, dim=-1)
    picked = scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if not entropy:
        return [picked - normalizer]
    probs = torch.softmax(scaled, dim=-1)
    return [picked - normalizer, normalizer - torch.where(probs > 0, probs * scaled, 0.0).sum(-1)]


def run_call(args: argparse.Namespace, output: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor) -> None:
    from toolkit.hf.logprobs import token_log_probs, token_log_probs_and_entropy

    logits = output[:, :-1]
    if args.side == "direct":
        outputs = direct(logits, tokens, args.temperature, args.entropy)
        loss = (outputs[0] * weights).sum() + sum(entropy.sum() for entropy in outputs[1:])
    elif args.entropy:
        logprobs, entropy = token_log_probs_and_entropy(logits, tokens, args.temperature, chunk_rows=args.chunk)
        loss = (logprobs * weights).sum() + entropy.sum()
    else:
        loss = (token_log_probs(logits, tokens, args.temperature, chunk_rows=args.chunk) * weights).sum()
    loss.backward()
    output.grad = None


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss_extra(call: Callable[[], T]) -> tuple[int, T]:
    """Bytes of peak RSS during `call` over the RSS just before it (VmHWM reset first), and what `call` returned."""
    before = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    result = call()
    return (status_kib("VmHWM") - before) * 1024, result


def run_worker(command: list[str], **env: str) -> dict[str, Any]:
    """Run a bench's `--worker` command in a fresh interpreter and return the JSON object of its last stdout line.

    glibc mmaps every block of 64 KiB or more there, so a freed tensor leaves the resident set at once; CUDA is
    hidden; `env` adds to (or overrides) the environment.
    """
    base = {"MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, env={**os.environ, **base, **env}, check=True, capture_output=True, text=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def profiler_peak(call: Any) -> int:
    """Peak bytes of torch.profiler's CPU memory timeline over `call`."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        call()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return int(max(sum(step) for step in sizes))


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One side in this (fresh) process: RSS peak, profiler peak and the fastest of `--repeats` calls."""
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    output = torch.randn(args.rows, args.steps + 1, args.vocab, generator=generator, dtype=torch.bfloat16)
    output.requires_grad_()
    tokens = torch.randint(0, args.vocab, (args.rows, args.steps), generator=generator)
    weights = torch.randn(args.rows, args.steps, generator=generator)
    run_call(args, output, tokens, weights)  # warm-up: kernels, thread pools, lazy allocations
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run_call(args, output, tokens, weights)
        seconds.append(time.perf_counter() - start)
    rss_peak, _ = peak_rss_extra(lambda: run_call(args, output, tokens, weights))
    output_bytes = output.numel() * output.element_size()
    timeline = profiler_peak(lambda: run_call(args, output, tokens, weights)) - output_bytes
    return {"rss_extra": rss_peak, "profiler_extra": timeline, "seconds": min(seconds), "output_bytes": output_bytes}


def measure(args: argparse.Namespace, side: str, entropy: bool, chunk: int | None) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", "--side", side, "--rows", str(args.rows)]
    command += ["--steps", str(args.steps), "--vocab", str(args.vocab), "--threads", str(args.threads)]
    command += ["--temperature", str(args.temperature), "--repeats", str(args.repeats)]
    command += ["--entropy"] * entropy + (["--chunk", str(chunk)] if chunk is not None else [])
    return run_worker(command)


def block_positions(chunk: int, rows: int, steps: int) -> int:
    """Positions per block of toolkit.hf.logprobs (a part of one row, or whole rows)."""
    return chunk if chunk < steps else min(chunk // steps, rows) * steps


def report(args: argparse.Namespace, results: dict[bool, dict[tuple[str, int | None], dict[str, Any]]]) -> str:
    mib = 2**20
    md = Report(
        "Token log-prob memory: direct fp32 formula vs chunked (bench/logprob_memory.py)",
        f".venv/bin/python bench/logprob_memory.py --rows {args.rows} --steps {args.steps} "
        f"--vocab {args.vocab} --chunk-rows {' '.join(map(str, args.chunk_rows))} --threads {args.threads}",
        f"{args.threads} threads · CPU · bf16 logits [N={args.rows}, T+1={args.steps + 1}, V={args.vocab}] "
        f"({results[False][('direct', None)]['output_bytes'] / mib:.0f} MiB) · temperature {args.temperature}",
    )
    md.lines += [
        "Extra memory = peak during log-probs + loss + backward minus what was live before (the bf16 logits). Both",
        "sides also hold the bf16 gradient of the logits (autograd's slice backward pads it to [N, T+1, V]).",
        "",
    ]
    md.table(
        "outputs",
        "side",
        "block (positions)",
        "peak RSS extra (MiB)",
        "profiler timeline extra (MiB)",
        "ratio (RSS)",
        "fwd+bwd min (s)",
    )
    for entropy, rows in results.items():
        base = rows[("direct", None)]["rss_extra"]
        for (side, chunk), row in rows.items():
            block = "-" if chunk is None else str(block_positions(chunk, args.rows, args.steps))
            extra = row["rss_extra"]
            md.row(
                OUTPUTS[entropy],
                side,
                block,
                f"{extra / mib:.0f}",
                f"{row['profiler_extra'] / mib:.0f}",
                f"{base / extra:.2f}x",
                f"{row['seconds']:.3f}",
            )
    elements = args.rows * args.steps * args.vocab
    dler = DLER["rows"] * DLER["steps"] * DLER["vocab"]
    smallest = min(args.chunk_rows)
    md.lines += ["", f"## Extrapolated to the DLER-1.5B shape (N=16, T=4096, V=151,936: {dler / 1e9:.2f}e9 logits)", ""]
    md.lines += [
        f"Bytes per logit of the measured extra RSS (chunked: block {smallest}) times the DLER logit count.",
        "",
    ]
    md.table("outputs", "direct: bytes / logit", "chunked: bytes / logit", "direct (GiB)", "chunked (GiB)", "ratio")
    for entropy, rows in results.items():
        direct_bytes = rows[("direct", None)]["rss_extra"] / elements
        chunked_bytes = rows[("chunked", smallest)]["rss_extra"] / elements
        gib = (direct_bytes * dler / GIB, chunked_bytes * dler / GIB)
        md.row(
            OUTPUTS[entropy],
            f"{direct_bytes:.1f}",
            f"{chunked_bytes:.1f}",
            f"{gib[0]:.0f}",
            f"{gib[1]:.0f}",
            f"{gib[0] / gib[1]:.1f}x",
        )
    return md.text(NOTES)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2, help="N, rows of the micro-batch")
    parser.add_argument("--steps", type=int, default=256, help="T, response tokens per row")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--chunk-rows", type=int, nargs=2, default=[441, 32], help="two block sizes (positions)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=["direct", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--entropy", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results: dict[bool, dict[tuple[str, int | None], dict[str, Any]]] = {}
    for entropy in (False, True):
        results[entropy] = {("direct", None): measure(args, "direct", entropy, None)}
        for chunk in args.chunk_rows:
            results[entropy][("chunked", chunk)] = measure(args, "chunked", entropy, chunk)
    publish(report(args, results), args.out)


if __name__ == "__main__":
    main()
