"""Seconds per GRPO step on one GPU: renorm's `hf`, `vllm` (colocated) and `server` (a `vllm serve` on loopback)
engines against TRL's GRPOTrainer with vLLM colocated and without vLLM, on one workload (issue 22, item 5).

Workload: bench/trainer_vs_trl.py's prompts, reward, advantages, loss and optimizer on a wider random-init Qwen2
(hidden 512, 4 layers, vocab 1024 by default), bf16 autocast over fp32 weights, 16 prompts x G=8, exactly
--max-new-tokens per completion. The model and its character tokenizer are saved to a temporary folder that every
side loads (vLLM needs a path). Each side runs in its own subprocess; its steps after warm-up are timed wall-clock
with the GPU synchronised at both ends. Sides whose dependency does not import are reported "skipped". Writes the
report `RESULTS` (engines_gpu.md in bench's results folder; not there until a GPU runs it) and prints one FIGURE line
(bench/gpu_check.sh). `--cpu-smoke` runs the plumbing on a CPU with a tiny model (the `hf` and plain TRL sides only),
its report in the temp folder.

    python bench/engines_gpu.py [--max-new-tokens 256 --warmup 2 --steps 5 --sides hf vllm server trl-vllm trl]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.abba import publish  # noqa: E402
from bench.engines_report import SIDES, figure_line, report, summarize  # noqa: E402
from bench.trainer_vs_trl import GROUP_SIZE, letter_reward, make_prompts, renorm_config, step_timer  # noqa: E402
from bench.trainer_vs_trl import trl_settings as cpu_trl_settings  # noqa: E402
from bench.vllm_serve import vllm_server  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "engines_gpu.md"
NEEDS = {"hf": (), "vllm": ("vllm",), "server": ("vllm",), "trl-vllm": ("trl", "vllm"), "trl": ("trl",)}
GPU_ONLY = ("vllm", "server", "trl-vllm")
NEVER_EOS = "<|never|>"  # the tokenizer's EOS: one id past the model's vocabulary, so no side can stop early
SERVED_NAME = "renorm-bench"
PROMPT_ROOM = 64  # prompt tokens planned for in max_model_len (the longest prompt has 19)
SMOKE = {"hidden_size": 64, "num_layers": 2, "vocab_size": 128, "num_prompts": 4, "max_new_tokens": 8}


# ------------------------------------------------------------------------------------------------ the workload
def max_model_len(args: argparse.Namespace) -> int:
    """Longest prompt + completion the vLLM sides plan their KV cache for."""
    return int(args.max_new_tokens) + PROMPT_ROOM


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """`build_tiny_qwen2` keywords: 64-wide attention heads, half as many KV heads, a 3x MLP."""
    heads = max(1, args.hidden_size // 64)
    return {
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": 3 * args.hidden_size,
        "num_layers": args.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "max_position_embeddings": max(1024, max_model_len(args)),
    }


def save_workload(folder: Path, args: argparse.Namespace) -> Path:
    """Save the random-init Qwen2 (bf16, so vLLM's dtype "auto" is bf16) and its tokenizer into `folder`.

    Every model id is a token (ids past the char tokenizer's 108 are single filler characters) and the tokenizer's
    EOS is one more token, id `vocab_size`, which the model cannot emit; the model's configs name no EOS.
    """
    from modalities.text_agent.tiny import build_char_tokenizer, build_tiny_qwen2

    fillers = tuple(chr(0x100 + i) for i in range(args.vocab_size - 108))
    tokenizer = build_char_tokenizer(extra_tokens=(*fillers, NEVER_EOS))
    tokenizer.eos_token = NEVER_EOS
    model = build_tiny_qwen2(**model_options(args), seed=args.seed)
    model.config.eos_token_id = model.generation_config.eos_token_id = None  # the tokenizer's EOS alone
    model.bfloat16().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------ renorm sides
def engine_node(side: str, args: argparse.Namespace, folder: str, url: str | None) -> dict[str, Any]:
    """The sampler's `engine:` node of a renorm side."""
    if side == "hf":
        return {"_component_": "toolkit.engines.HFEngine", "decode": args.decode}
    if side == "vllm":
        return {
            "_component_": "toolkit.engines.VLLMEngine",
            "model": folder,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "max_model_len": max_model_len(args),
            "dtype": "bfloat16",
            "enable_sleep": False,  # as TRL's default (vllm_enable_sleep_mode=False)
            "seed": args.seed,
        }
    if side == "server":
        return {"_component_": "toolkit.engines.ServerEngine", "url": url, "model": SERVED_NAME, "weight_sync": "none"}
    raise ValueError(f"side={side!r} is not a renorm side: one of ['hf', 'vllm', 'server']")


def renorm_side_config(args: argparse.Namespace, side: str, run_dir: str, url: str | None) -> dict[str, Any]:
    """trainer_vs_trl's renorm config with this workload's model folder, batch, precision and engine."""
    config = renorm_config(args, run_dir)
    config["trainer"].update(prompts_per_step=args.num_prompts, mixed_precision="bf16" if args.cuda else "no")
    config["policy"] = {
        "_component_": "modalities.text_agent.policy.CausalLMPolicy",
        "model": args.model_dir,
        "temperature": 1.0,
    }
    config["sampler"]["engine"] = engine_node(side, args, args.model_dir, url)
    config["data"]["records"] = make_prompts(args.num_prompts)
    return config


def serve_options(args: argparse.Namespace) -> dict[str, Any]:
    """`vllm serve` options sized like the colocated sides (bench/vllm_serve.py adds host and port)."""
    return {
        "served-model-name": SERVED_NAME,
        "dtype": "bfloat16",
        "gpu-memory-utilization": args.gpu_memory_utilization,
        "max-model-len": max_model_len(args),
        "max-num-seqs": args.num_prompts * GROUP_SIZE,
        "seed": args.seed,
    }


def serve(args: argparse.Namespace, log: Path) -> contextlib.AbstractContextManager[str]:
    """The workload's `vllm serve` on loopback while the block runs; its API root (`.../v1`)."""
    return vllm_server(args.model_dir, serve_options(args), log, args.server_timeout)


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_renorm(args: argparse.Namespace) -> dict[str, list[float]]:
    """Time `trainer.step()` after warm-up; per step also the generate seconds, mean length and reward."""
    from toolkit.train.runner import build_trainer

    rows: dict[str, list[float]] = {key: [] for key in ("wall_s", "generate_s", "length", "reward")}
    with tempfile.TemporaryDirectory(prefix="engines_gpu_") as run_dir, contextlib.ExitStack() as stack:
        url = stack.enter_context(serve(args, Path(run_dir) / "vllm_serve.log")) if args.side == "server" else None
        trainer = build_trainer(renorm_side_config(args, args.side, f"{run_dir}/run", url))
        for index in range(args.warmup + args.steps):
            synchronize()
            start = time.perf_counter()
            metrics, _ = trainer.step()
            synchronize()
            if index >= args.warmup:
                rows["wall_s"].append(time.perf_counter() - start)
                rows["generate_s"].append(metrics["time/generate_s"])
                rows["length"].append(metrics["rollout/length_mean"])
                rows["reward"].append(metrics["reward/score_mean"])
    return rows


# ------------------------------------------------------------------------------------------------ TRL sides
def trl_side_settings(args: argparse.Namespace, side: str) -> dict[str, Any]:
    """trainer_vs_trl's GRPOConfig keywords on this device and batch; `trl-vllm` adds vLLM colocated."""
    settings = cpu_trl_settings(args)
    batch = args.num_prompts * GROUP_SIZE
    settings.update(
        use_cpu=not args.cuda,
        bf16=args.cuda,
        per_device_train_batch_size=batch,
        generation_batch_size=batch,
        generation_kwargs=None,  # no min_new_tokens: EOS is unreachable (and vLLM's SamplingParams has no such key)
    )
    if side == "trl-vllm":
        settings.update(
            use_vllm=True,
            vllm_mode="colocate",
            vllm_gpu_memory_utilization=args.gpu_memory_utilization,
            vllm_max_model_length=max_model_len(args),
            vllm_enable_sleep_mode=False,
        )
    return settings


def time_generation(trainer: Any) -> list[float]:
    """Wrap the trainer's generation call to record its GPU-synchronised seconds, one entry per call."""
    name = "_generate_single_turn" if hasattr(trainer, "_generate_single_turn") else "_generate"
    original, seconds = getattr(trainer, name), []

    def timed(*args: Any, **kwargs: Any) -> Any:
        synchronize()
        start = time.perf_counter()
        output = original(*args, **kwargs)
        synchronize()
        seconds.append(time.perf_counter() - start)
        return output

    setattr(trainer, name, timed)
    return seconds


def run_trl(args: argparse.Namespace) -> dict[str, list[float]]:
    """Time TRL optimizer steps (consecutive on_step_end, GPU synchronised first) after warm-up."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback

    class Synchronize(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            synchronize()  # runs before the step timer's on_step_end: it was added first

    trl = importlib.import_module("trl")  # an optional extra: typed as Any
    total = args.warmup + args.steps
    rows: dict[str, list[float]] = {"length": [], "reward": []}
    timer = step_timer(args.warmup, total, None)
    with tempfile.TemporaryDirectory(prefix="engines_gpu_trl_") as output_dir:
        trainer = trl.GRPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32),
            reward_funcs=letter_reward(rows),
            args=trl.GRPOConfig(output_dir=output_dir, **trl_side_settings(args, args.side)),
            train_dataset=Dataset.from_list(make_prompts(args.num_prompts)),
            processing_class=AutoTokenizer.from_pretrained(args.model_dir),
            callbacks=[Synchronize(), timer],
        )
        trainer.remove_callback(PrinterCallback)
        generate = time_generation(trainer)
        trainer.train()
    if len(timer.end) != total or len(rows["length"]) != total:
        raise RuntimeError(f"expected {total} TRL steps, saw {len(timer.end)} steps, {len(rows['length'])} rewards")
    ends = [end[0] for end in timer.end]
    return {
        "wall_s": [ends[i] - ends[i - 1] for i in range(args.warmup, total)],
        "generate_s": generate[args.warmup :] if len(generate) == total else [],
        "length": rows["length"][args.warmup :],
        "reward": rows["reward"][args.warmup :],
    }


# ------------------------------------------------------------------------------------------------ driver
def unavailable(side: str, args: argparse.Namespace) -> str | None:
    """Why `side` cannot run here (parent's cheap check: nothing is imported), or None."""
    if side in GPU_ONLY and not args.cuda:
        return "needs CUDA and vLLM"
    missing = [name for name in NEEDS[side] if importlib.util.find_spec(name) is None]
    return f"{', '.join(missing)} not installed" if missing else None


def run_side(args: argparse.Namespace) -> None:
    """Child process: run one side, write {"rows", "device"} or {"skipped": why} as JSON."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run `finally` blocks: stop a vllm serve we started
    for name in NEEDS[args.side]:
        try:
            importlib.import_module(name)
        except ImportError as error:
            Path(args.result_file).write_text(json.dumps({"skipped": f"{name} does not import: {error}"[:200]}))
            return
    import torch

    rows = run_trl(args) if args.side.startswith("trl") else run_renorm(args)
    device = torch.cuda.get_device_name(0) if args.cuda else "CPU"
    Path(args.result_file).write_text(json.dumps({"rows": rows, "device": device}))


def spawn(side: str, args: argparse.Namespace, result_file: Path) -> dict[str, Any]:
    """Run one side in a fresh interpreter; {"failed": why} when it exits non-zero or runs out of time."""
    reason = unavailable(side, args)
    if reason is not None:
        return {"skipped": reason}
    command = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--result-file", str(result_file)]
    forwarded = ("model_dir", "warmup", "steps", "lr", "seed", "max_new_tokens", "num_prompts", "decode")
    for flag in (*forwarded, "gpu_memory_utilization", "server_timeout"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    command += ["--cpu-smoke"] if args.cpu_smoke else []
    environment = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if args.cpu_smoke else {})}
    print(f"[engines_gpu] {side}: {args.warmup} warm-up + {args.steps} measured steps ...", flush=True)
    child = subprocess.Popen(command, env=environment)
    try:
        code = child.wait(timeout=args.side_timeout)
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {args.side_timeout:.0f} s"}
    finally:
        stop_child(child)
    if code != 0 or not result_file.exists():
        return {"failed": f"exit code {code} (its output is above)"}
    result: dict[str, Any] = json.loads(result_file.read_text())
    return result


def stop_child(child: subprocess.Popen[bytes]) -> None:
    """SIGTERM a side still running (its handler stops the vllm serve it started), SIGKILL it after 60 s."""
    if child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(timeout=60)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def compare(args: argparse.Namespace) -> int:
    """Parent: save the workload, run every side, publish the report and the FIGURE line; 1 if a side failed."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a gpu_check timeout: stop the running side first
    with tempfile.TemporaryDirectory(prefix="engines_gpu_") as tmp:
        args.model_dir = str(save_workload(Path(tmp) / "model", args))
        results = {side: spawn(side, args, Path(tmp) / f"{side}.json") for side in args.sides}
    completions = args.num_prompts * GROUP_SIZE
    summaries = {side: summarize(r["rows"], completions) for side, r in results.items() if "rows" in r}
    publish(report(args, GROUP_SIZE, results, summaries), args.out)
    print(figure_line(summaries, results))
    return 1 if any("failed" in result for result in results.values()) else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", nargs="+", choices=list(SIDES), default=list(SIDES), help="which sides, in order")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first (>= 1)")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per side (>= 1)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens per completion (every side)")
    parser.add_argument("--num-prompts", type=int, default=16, help="prompts per step (x G=8 completions)")
    parser.add_argument("--hidden-size", type=int, default=512, help="the Qwen2's width (heads of 64)")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=1024, help=">= 108 (the char tokenizer's ids)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="each vLLM's share of the GPU")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decode", choices=("lean", "generate"), default="lean", help="the hf engine's decode loop")
    parser.add_argument("--side-timeout", type=float, default=600.0, help="seconds one side may take")
    parser.add_argument("--server-timeout", type=float, default=300.0, help="seconds vllm serve may take to start")
    parser.add_argument("--cpu-smoke", action="store_true", help=f"CPU plumbing check: {SMOKE}, 1 + 1 steps")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="report path (default: engines_gpu.md in bench/results; --cpu-smoke: a temp file)",
    )
    parser.add_argument("--side", choices=list(SIDES), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.cpu_smoke:
        vars(args).update(SMOKE, warmup=1, steps=1)
        if args.out is None:
            args.out = Path(tempfile.gettempdir()) / "engines_gpu_smoke.md"
    if min(args.warmup, args.steps, args.max_new_tokens, args.num_prompts) < 1 or args.vocab_size < 108:
        parser.error("--warmup, --steps, --max-new-tokens, --num-prompts must be >= 1 and --vocab-size >= 108")
    if args.side is not None and (args.result_file is None or args.model_dir is None):
        parser.error("--side needs --result-file and --model-dir")
    args.out = args.out or RESULTS
    args.cuda = not args.cpu_smoke
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.side is not None:
        run_side(args)
        return 0
    import torch

    if args.cuda and not torch.cuda.is_available():
        raise SystemExit("engines_gpu: no CUDA here; `--cpu-smoke` checks the plumbing on a CPU")
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
