"""The report of bench/engines_gpu.py: per-side summaries, the markdown table against TRL+vLLM colocated, and the
FIGURE line bench/gpu_check.sh puts in its table."""

from __future__ import annotations

import argparse
import statistics
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from bench.abba import Report, median_min

SIDES = {
    "hf": "renorm, hf engine",
    "vllm": "renorm, vllm engine (colocated)",
    "server": "renorm, server engine + vllm serve",
    "trl-vllm": "TRL GRPOTrainer, vLLM colocate",
    "trl": "TRL GRPOTrainer, HF generate",
}
BASELINE = "trl-vllm"
NOTES = """
## Reading the figures

- Seconds per optimizer step after warm-up, wall-clock with the GPU synchronised at both ends (vLLM starts before
  the timed steps: TRL's at trainer init, renorm's at its first generation). `generate s` is the generation call
  alone (renorm's `time/generate_s`, TRL's `_generate_single_turn`; weight sync into vLLM included on both);
  tokens/s = completions x mean length / generate seconds.
- Same work on every side: the tokenizer's EOS is an id outside the model's vocabulary, so every completion runs
  exactly --max-new-tokens (no `min_tokens`/`ignore_eos` knob needed); bf16 autocast over fp32 weights (renorm
  `mixed_precision: bf16`, TRL `bf16=True`), vLLM in bf16 with CUDA graphs, sleep mode off, 0.3 of the GPU each.
  TRL keeps its defaults otherwise (vLLM importance-sampling correction on).
- The server side uses `weight_sync: none`: a stock `vllm serve` takes no full weights (toolkit/engines/vllm_lora.py),
  and a LoRA policy (`weight_sync: vllm_lora`) would train and generate something other than the other four sides.
  So its row prices the process split (HTTP, JSON of token ids and log-probs) but no weight push, and it samples
  from the initial weights: its rollouts are off-policy after the first step. Its figure is a lower bound.
"""


def summarize(rows: dict[str, list[float]], completions: int) -> dict[str, float]:
    """Median / min wall s per step, mean generate s, median generation tokens/s, mean length and reward."""
    summary = {
        "median_s": statistics.median(rows["wall_s"]),
        "min_s": min(rows["wall_s"]),
        "length": statistics.fmean(rows["length"]),
        "reward": statistics.fmean(rows["reward"]),
    }
    if rows["generate_s"]:
        summary["generate_s"] = statistics.fmean(rows["generate_s"])
        pairs = zip(rows["length"], rows["generate_s"], strict=True)
        summary["tokens_per_s"] = statistics.median(completions * length / seconds for length, seconds in pairs)
    return summary


def status(result: dict[str, Any]) -> str:
    """A side's status cell: ok, skipped (why) or FAIL (why)."""
    if "skipped" in result:
        return f"skipped ({result['skipped']})"
    return f"FAIL ({result['failed']})" if "failed" in result else "ok"


def figure_line(summaries: dict[str, dict[str, float]], results: dict[str, dict[str, Any]]) -> str:
    """One line for gpu_check's table: failed sides first, then each side's s/step over TRL+vLLM colocated's (or the
    seconds, without it)."""
    failed = [side for side, result in results.items() if "failed" in result]
    head = f"FIGURE: FAIL {' '.join(failed)}; " if failed else "FIGURE: "
    if BASELINE in summaries:
        base = summaries[BASELINE]["median_s"]
        ratios = " ".join(f"{side} {s['median_s'] / base:.2f}x" for side, s in summaries.items() if side != BASELINE)
        return f"{head}s/step vs TRL+vLLM colocate ({base:.3f} s): {ratios}".rstrip(": ")
    seconds = " ".join(f"{side} {s['median_s']:.3f}" for side, s in summaries.items())
    return f"{head}TRL+vLLM {status(results.get(BASELINE, {'skipped': 'not run'}))}; s/step {seconds}"


def report(
    args: argparse.Namespace, group_size: int, results: dict[str, dict[str, Any]], summaries: dict[str, Any]
) -> str:
    """The markdown report of `bench/engines_gpu.py`'s `args`: one row per side, ratios against TRL+vLLM colocated."""
    devices = sorted({str(r["device"]) for r in results.values() if "device" in r}) or ["no side ran"]
    versions = ", ".join(f"{name} {version_of(name)}" for name in ("transformers", "trl", "vllm"))
    md = Report(
        "renorm's engines against TRL's GRPOTrainer with vLLM on one GPU (bench/engines_gpu.py)",
        "python bench/engines_gpu.py " + " ".join(args.argv),
        f"{', '.join(devices)} · {versions} · Qwen2 hidden {args.hidden_size}, {args.num_layers} layers, vocab "
        f"{args.vocab_size} · {args.num_prompts} prompts x G={group_size}, {args.max_new_tokens} new tokens · "
        f"{args.warmup} warm-up + {args.steps} measured steps per side · hf engine decode: {args.decode}",
    )
    md.table("side", "status", "s/step: median / min", "vs TRL+vLLM", "generate s", "gen tokens/s", "length", "reward")
    base = summaries.get(BASELINE, {}).get("median_s")
    for side, result in results.items():
        s = summaries.get(side)
        if s is None:
            md.row(SIDES[side], status(result), "", "", "", "", "", "")
            continue
        rows = result["rows"]
        md.row(
            SIDES[side],
            status(result),
            median_min(rows["wall_s"]),
            f"{s['median_s'] / base:.2f}x" if base else "n/a",
            f"{s['generate_s']:.3f}" if "generate_s" in s else "n/a",
            f"{s['tokens_per_s']:.0f}" if "tokens_per_s" in s else "n/a",
            f"{s['length']:.1f}",
            f"{s['reward']:.4f}",
        )
    return md.text(NOTES)


def version_of(name: str) -> str:
    """The installed version of distribution `name`, or "not installed"."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"
