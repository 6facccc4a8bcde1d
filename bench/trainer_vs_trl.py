"""Seconds per optimizer step: renorm's Trainer vs TRL's GRPOTrainer on one tiny CPU GRPO workload.

Workload (both sides): a random-init 2-layer Qwen2 (hidden 64, vocab 512, same seed, same weights),
the character tokenizer, 16 plain-text prompts x G=8 samples, exactly 32 new tokens per completion (--max-new-tokens),
the same letter-share reward, group z-score advantages (unbiased std, eps 1e-4), PPO clip 0.2,
token-mean loss over all 128 completions, one optimizer step per generation, no KL, no reference
model, fp32, AdamW at a constant lr. Each side runs in its own subprocess (in ABBA order when
repeated); warm-up steps are excluded. Run: `make bench` (or `python bench/trainer_vs_trl.py --help`).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

# No network: everything is built in code; fail instead of downloading. CPU only, even on a GPU machine: main() hides
# CUDA before torch is imported, so the benches that import this module's pieces keep their devices.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results" / "trainer_vs_trl.json"
SIDES = ("renorm", "trl")
NUM_PROMPTS = 16
GROUP_SIZE = 8
MAX_NEW_TOKENS = 32
MODEL: dict[str, Any] = {"vocab_size": 512, "hidden_size": 64, "num_layers": 2}
CLIP = 0.2
ADV_EPS = 1e-4  # TRL's group-std epsilon (std + 1e-4), used on both sides
TEMPLATES = ("Write the letter {c}.", "Repeat {c}.", "Only {c}, please:", "Say {c} {c} {c} {c}")
INSTALL_HINT = "TRL is not installed: run `pip install -e '.[bench]'` (or `make bench`)"
# renorm step metrics recorded per measured step: row name -> metric name (stage timers are averaged in the table).
STAGES = ("time/generate_s", "time/old_logprobs_s", "time/sample_s", "time/update_s")
RENORM_ROWS = {"length": "rollout/length_mean", "reward": "reward/score_mean", **{stage: stage for stage in STAGES}}


def make_prompts(num_prompts: int = NUM_PROMPTS) -> list[dict[str, str]]:
    """Synthetic letter prompts of four lengths: {"id", "prompt", "target"} (the target is one letter)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [
        {"id": f"p{i}", "prompt": TEMPLATES[i % len(TEMPLATES)].format(c=letters[i % 26]), "target": letters[i % 26]}
        for i in range(num_prompts)
    ]


def profile_report(profiler: cProfile.Profile, top: int = 15) -> str:
    """The `top` functions by own time (tottime), as pstats prints them."""
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(top)
    return stream.getvalue()


# ---------------------------------------------------------------------------------------------- renorm side
def renorm_config(args: argparse.Namespace, run_dir: str) -> dict[str, Any]:
    """The run config: the node layout of configs/demo/tiny_grpo.yaml with the benchmark's settings."""
    return {
        "trainer": {
            "run_dir": run_dir,
            "seed": args.seed,
            "num_steps": args.warmup + args.steps,
            "prompts_per_step": NUM_PROMPTS,
            "group_size": GROUP_SIZE,
            "num_inner_epochs": 1,
            "num_minibatches": 1,
            "gradient_accumulation_steps": 1,
            "max_grad_norm": 1.0,
            "mixed_precision": "no",
            "progress": False,
        },
        "optimizer": {
            "_component_": "torch.optim.AdamW",
            "lr": args.lr,
            "betas": [0.9, 0.999],
            "eps": 1e-8,
            "weight_decay": 0.0,
        },
        "scheduler": {"_component_": "toolkit.train.schedules.Scheduler", "name": "constant", "warmup_steps": 0},
        "policy": {
            "_component_": "modalities.text_agent.policy.CausalLMPolicy",
            "model": {"_component_": "modalities.text_agent.tiny.build_tiny_qwen2", **MODEL, "seed": args.seed},
            "tokenizer": {"_component_": "modalities.text_agent.tiny.build_char_tokenizer"},
            "temperature": 1.0,
        },
        # No EOS ids: every completion runs the full budget (the sampler has no min_new_tokens knob).
        "sampler": {
            "_component_": "modalities.text_agent.sampler.SingleTurnSampler",
            "max_new_tokens": args.max_new_tokens,
            "eos_token_ids": [],
            "engine": {"_component_": "toolkit.engines.HFEngine", "decode": args.decode},
        },
        "rewards": {"letters": {"_component_": "rewards.text.toy.TargetCharReward"}},
        "normalizer": {"_component_": "toolkit.advantages.GroupNormalizer", "std": "unbiased", "eps": ADV_EPS},
        "objective": {
            "_component_": "toolkit.objective.PolicyObjective",
            "term": {"_component_": "toolkit.objective.ClipTerm", "clip_low": CLIP, "clip_high": CLIP},
            "kl_coef": 0.0,
            "aggregation": "token_mean",
        },
        "data": {"_component_": "toolkit.data.PromptDataset", "records": make_prompts(), "seed": args.seed},
    }


def run_renorm(args: argparse.Namespace) -> dict[str, Any]:
    """Time `trainer.step()` (sample + re-score + reward + advantages + update) after warm-up steps."""
    from toolkit.train.runner import build_trainer

    rows: dict[str, list[float]] = {key: [] for key in ("wall_s", "cpu_s", *RENORM_ROWS)}
    profiler = cProfile.Profile(time.process_time) if args.profile else None
    with tempfile.TemporaryDirectory(prefix="bench_renorm_") as run_dir:
        trainer = build_trainer(renorm_config(args, run_dir))
        for index in range(args.warmup + args.steps):
            measured = index >= args.warmup
            if measured and profiler is not None:
                profiler.enable()
            wall, cpu = time.perf_counter(), time.process_time()
            metrics, _ = trainer.step()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if profiler is not None:
                profiler.disable()
            if measured:
                rows["wall_s"].append(wall)
                rows["cpu_s"].append(cpu)
                for row, name in RENORM_ROWS.items():
                    rows[row].append(metrics[name])
    config = {key: value for key, value in renorm_config(args, "<tmp>").items() if key != "data"}
    return {"rows": rows, "config": config, "profile": profile_report(profiler) if profiler else None}


# ---------------------------------------------------------------------------------------------- TRL side
def trl_settings(args: argparse.Namespace) -> dict[str, Any]:
    """GRPOConfig keywords: one optimizer step consumes 16 prompts x 8 completions of exactly --max-new-tokens."""
    return {
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "seed": args.seed,
        "max_steps": args.warmup + args.steps,
        # One generation of 16 x 8 feeds exactly one optimizer step (steps_per_generation = 1).
        "per_device_train_batch_size": NUM_PROMPTS * GROUP_SIZE,
        "gradient_accumulation_steps": 1,
        "generation_batch_size": NUM_PROMPTS * GROUP_SIZE,
        "num_generations": GROUP_SIZE,
        "max_completion_length": args.max_new_tokens,
        # EOS logits are suppressed until the budget is out, so no completion ends early.
        "generation_kwargs": {"min_new_tokens": args.max_new_tokens},
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "beta": 0.0,
        "num_iterations": 1,
        "epsilon": CLIP,
        "scale_rewards": "group",
        "loss_type": "dapo",  # sum over the step's active tokens / their global count = renorm's token_mean
        "learning_rate": args.lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "optim": "adamw_torch",
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "gradient_checkpointing": False,  # TRL defaults to True; renorm's policy does not checkpoint here
        "logging_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "log_completions": False,
        "dataloader_num_workers": 0,
    }


def letter_reward(rows: dict[str, list[float]]) -> Any:
    """A TRL reward function (the same TargetCharReward) that also records each call's mean length and reward."""
    from rewards.text.toy import TargetCharReward

    reward = TargetCharReward()

    def letters(prompts: list[str], completions: list[str], completion_ids: list[list[int]], **kwargs: Any) -> Any:
        scores = reward(prompts, completions, target=kwargs["target"]).scores.tolist()
        rows["length"].append(statistics.fmean(len(ids) for ids in completion_ids))
        rows["reward"].append(statistics.fmean(scores))
        return scores

    return letters


def step_timer(warmup: int, total: int, profiler: cProfile.Profile | None) -> Any:
    """A TrainerCallback recording wall and CPU times at on_step_begin/end; profiles the timed window."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.begin: list[float] = []
            self.end: list[tuple[float, float]] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.begin.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.end.append((time.perf_counter(), time.process_time()))
            # global_step counts finished steps here: profile from the end of warm-up to the last step's end.
            if profiler is not None and state.global_step == warmup:
                profiler.enable()
            if profiler is not None and state.global_step == total:
                profiler.disable()

    return StepTimer()


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    """Time TRL optimizer steps: the gap between consecutive on_step_end calls, after warm-up steps."""
    try:
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as error:
        raise SystemExit(f"{INSTALL_HINT} ({error})") from error
    from transformers import PrinterCallback

    from modalities.text_agent.tiny import build_char_tokenizer, build_tiny_qwen2

    warnings.filterwarnings("ignore", category=FutureWarning)  # gradient_checkpointing's rename in transformers 5
    rows: dict[str, list[float]] = {"length": [], "reward": []}
    profiler = cProfile.Profile(time.process_time) if args.profile else None
    total = args.warmup + args.steps
    timer = step_timer(args.warmup, total, profiler)
    with tempfile.TemporaryDirectory(prefix="bench_trl_") as output_dir:
        trainer = GRPOTrainer(
            model=build_tiny_qwen2(**MODEL, seed=args.seed),
            reward_funcs=letter_reward(rows),
            args=GRPOConfig(output_dir=output_dir, **trl_settings(args)),
            train_dataset=Dataset.from_list(make_prompts()),
            processing_class=build_char_tokenizer(),
            callbacks=[timer],
        )
        trainer.remove_callback(PrinterCallback)  # it prints the final metrics dict when tqdm is off
        trainer.train()
        # The values TRL ended up with (validated and derived), not just what was passed.
        names = [*trl_settings(args), "steps_per_generation"]
        config = {name: value for name, value in trainer.args.to_dict().items() if name in names}
    if len(timer.end) != total or len(rows["length"]) != total:
        raise RuntimeError(f"expected {total} TRL steps, saw {len(timer.end)} steps, {len(rows['length'])} rewards")
    ends = timer.end
    rows["wall_s"] = [ends[i][0] - ends[i - 1][0] for i in range(args.warmup, total)]
    rows["cpu_s"] = [ends[i][1] - ends[i - 1][1] for i in range(args.warmup, total)]
    rows["inside_step_s"] = [end[0] - begin for begin, end in zip(timer.begin, ends, strict=True)][args.warmup :]
    rows["length"], rows["reward"] = rows["length"][args.warmup :], rows["reward"][args.warmup :]
    return {"rows": rows, "config": config, "profile": profile_report(profiler) if profiler else None}


# ---------------------------------------------------------------------------------------------- driver
def environment() -> dict[str, Any]:
    """Date, versions and cores of this machine (each side records the torch threads it ran with)."""
    import torch
    import transformers

    try:
        import trl

        trl_version: str | None = trl.__version__
    except ImportError:
        trl_version = None
    return {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl_version,
        "torch_default_threads": torch.get_num_threads(),
    }


def run_side(args: argparse.Namespace) -> None:
    """Child process: run one side and write its result as JSON."""
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    result = run_renorm(args) if args.side == "renorm" else run_trl(args)
    result.update(torch_threads=torch.get_num_threads(), load_average_1min=load)
    Path(args.result_file).write_text(json.dumps(result))


def spawn(side: str, args: argparse.Namespace, result_file: Path) -> dict[str, Any]:
    """Run one side in a fresh interpreter (no shared imports, caches or RNG state) and read its result."""
    command = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--result-file", str(result_file)]
    command += [
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--lr",
        str(args.lr),
        "--seed",
        str(args.seed),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--decode",
        args.decode,
    ]
    command += ["--threads", str(args.threads)] if args.threads is not None else []
    command += ["--profile"] if args.profile else []
    print(f"[bench] {side}: {args.warmup} warm-up + {args.steps} measured steps ...", flush=True)
    if subprocess.run(command, check=False).returncode != 0:
        raise SystemExit(f"[bench] the {side} run failed (see its output above)")
    result: dict[str, Any] = json.loads(result_file.read_text())
    return result


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool one side's measured steps over its runs: medians/means of wall and CPU seconds per step."""
    pooled: dict[str, list[float]] = {}
    for run in runs:
        for key, values in run["rows"].items():
            pooled.setdefault(key, []).extend(values)
    extras = [key for key in pooled if key not in ("wall_s", "cpu_s", "length", "reward")]
    summary: dict[str, Any] = {
        "median_s": statistics.median(pooled["wall_s"]),
        "mean_s": statistics.fmean(pooled["wall_s"]),
        "min_s": min(pooled["wall_s"]),
        "cpu_median_s": statistics.median(pooled["cpu_s"]),
        "completion_length_mean": statistics.fmean(pooled["length"]),
        "reward_mean": statistics.fmean(pooled["reward"]),
        "stage_means_s": {key: statistics.fmean(pooled[key]) for key in extras},
        "torch_threads": runs[0]["torch_threads"],
        "load_average_1min": [run["load_average_1min"] for run in runs],
        "steps": pooled,
        "config": runs[0]["config"],
    }
    if runs[0]["profile"]:
        summary["profile"] = runs[0]["profile"]
    return summary


def print_table(record: dict[str, Any]) -> None:
    ours, theirs, env = record["renorm"], record["trl"], record["environment"]
    rows = [
        ("median s/step (wall)", f"{ours['median_s']:.3f}", f"{theirs['median_s']:.3f}"),
        ("mean s/step (wall)", f"{ours['mean_s']:.3f}", f"{theirs['mean_s']:.3f}"),
        ("min s/step (wall)", f"{ours['min_s']:.3f}", f"{theirs['min_s']:.3f}"),
        ("median CPU s/step", f"{ours['cpu_median_s']:.3f}", f"{theirs['cpu_median_s']:.3f}"),
        ("mean completion length", f"{ours['completion_length_mean']:.1f}", f"{theirs['completion_length_mean']:.1f}"),
        ("mean reward", f"{ours['reward_mean']:.4f}", f"{theirs['reward_mean']:.4f}"),
        ("torch threads", str(ours["torch_threads"]), str(theirs["torch_threads"])),
    ]
    print(
        f"\nrenorm Trainer vs TRL {env['trl']} GRPOTrainer: {NUM_PROMPTS} prompts x G={GROUP_SIZE}, "
        f"{record['workload']['max_new_tokens']} new tokens, CPU ({env['usable_cores']} cores), {env['date']}"
    )
    print(f"{'':<26}{'renorm':>10}{'TRL':>10}")
    for name, left, right in rows:
        print(f"{name:<26}{left:>10}{right:>10}")
    print(
        f"ratio renorm/TRL: median wall {record['ratio_median']:.2f}, mean wall {record['ratio_mean']:.2f}, "
        f"min wall {record['ratio_min']:.2f}, median CPU {record['ratio_cpu_median']:.2f}  (> 1: renorm slower)"
    )
    stages = ", ".join(f"{k.removeprefix('time/')} {v:.3f}" for k, v in ours["stage_means_s"].items())
    print(f"renorm stage means (s): {stages}")
    loads = ours["load_average_1min"] + theirs["load_average_1min"]
    if max(loads) > 0.5 * env["usable_cores"]:
        print(f"WARNING: 1-min load average up to {max(loads):.1f} on {env['usable_cores']} cores: timings are noisy")
    for side in SIDES:
        if "profile" in record[side]:
            print(f"\n--- cProfile, {side}, measured steps of its first run, top 15 by own CPU time ---")
            print(record[side]["profile"])


def compare(args: argparse.Namespace) -> None:
    """Parent process: run both sides (ABBA order), print the table, write the JSON record."""
    try:
        import trl  # noqa: F401
    except ImportError as error:
        raise SystemExit(INSTALL_HINT) from error
    order = [side for r in range(args.repeats) for side in (SIDES if r % 2 == 0 else SIDES[::-1])]
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        for index, side in enumerate(order):
            runs[side].append(spawn(side, args, Path(tmp) / f"{index}_{side}.json"))
    ours, theirs = summarize(runs["renorm"]), summarize(runs["trl"])
    record = {
        "environment": environment(),
        "workload": {"num_prompts": NUM_PROMPTS, "group_size": GROUP_SIZE, "max_new_tokens": args.max_new_tokens},
        "args": {k: v for k, v in vars(args).items() if k not in ("side", "result_file")},
        "ratio_median": ours["median_s"] / theirs["median_s"],
        "ratio_mean": ours["mean_s"] / theirs["mean_s"],
        "ratio_min": ours["min_s"] / theirs["min_s"],
        "ratio_cpu_median": ours["cpu_median_s"] / theirs["cpu_median_s"],
        "renorm": ours,
        "trl": theirs,
        "prompts": make_prompts(),
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print_table(record)
    print(f"\nwrote {output}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=2, help="steps run before timing starts (>= 1)")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per run (>= 1)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side, in ABBA order, pooled (>= 1)")
    parser.add_argument("--lr", type=float, default=1e-3, help="constant AdamW learning rate (both sides)")
    parser.add_argument("--seed", type=int, default=0, help="model-init, data and sampling seed (both sides)")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="tokens per completion (both sides)")
    parser.add_argument(
        "--decode",
        choices=("lean", "generate"),
        default="lean",
        help="renorm's hf engine: its lean decode loop (default) or HF generate",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="cProfile the measured steps; print the top 15")
    parser.add_argument("--output", default=str(RESULTS), help="where to write the JSON record")
    parser.add_argument("--side", choices=("both", *SIDES), default="both", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.warmup, args.steps, args.repeats, args.max_new_tokens) < 1:
        parser.error(
            f"--warmup, --steps, --repeats and --max-new-tokens must be >= 1, got {args.warmup}, {args.steps}, "
            f"{args.repeats}, {args.max_new_tokens}"
        )
    if args.side != "both" and args.result_file is None:
        parser.error("--side renorm|trl needs --result-file")
    return args


def main(argv: list[str] | None = None) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the side subprocesses inherit it
    args = parse_args(argv)
    if args.side == "both":
        compare(args)
    else:
        run_side(args)


if __name__ == "__main__":
    main()
