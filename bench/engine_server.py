"""Wall seconds per GRPO step: the synchronous `hf` engine against the `server` engine (renorm serve-policy in its
own process on loopback, weights pushed every step), side by side on the CPU.

Workload: bench/trainer_vs_trl.py's renorm side (2-layer Qwen2, 16 prompts x G=8, exactly 32 new tokens, fp32) and a
wider model. Both trainers live in this process, the server in a subprocess, each on one torch thread; the sides
alternate in ABBA blocks of steps after warm-up. Both see the same prompts and draws and the server generates with
the pushed weights, so their losses must be equal step for step (checked). Generation is not overlapped with the
update (that is the async mode, not built yet): the ratio is the price of the process split.

    python bench/engine_server.py [--steps 3 --repeats 4 --warmup 2]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["OMP_NUM_THREADS"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import yaml  # noqa: E402

from bench.abba import Report, add_abba_arguments, median_min, paired_ratio, publish, run_abba  # noqa: E402
from bench.onpolicy_skip import MODELS  # noqa: E402
from bench.trainer_vs_trl import renorm_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "engine_server.md"
SIDES = ("hf", "server")

NOTES = """
## Reading the figures

- Wall seconds of `trainer.step()` on a shared 2-core VM, one torch thread in the trainer and one in the server.
  The server side's generation runs in the other process while the trainer waits (no overlap yet), so its extra
  time is the process split: the weight push (safetensors of every weight, sent and loaded each step:
  `time/weight_sync_s`), the HTTP round trip and the JSON of N x T token ids and log-probs. `generate_s` is the
  sampler's wall time around the engine call (the push included on the server side).
- The paired-block ratio compares blocks run back to back (ABBA), so a slow drift of the machine's load cancels.
- Losses equal: both sides trained bitwise alike (same tokens from the server as from `generate` in-process).
  Nothing here ran on a GPU; vLLM colocated/server timings need the GPU check script (not written yet).
"""


def start_server(config_path: Path, log: Path) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "modalities.text_agent.serve_policy", str(config_path), "--port", "0"]
    command += ["--log-level", "WARNING"]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env={**os.environ}
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.search(r"at (http://127\.0\.0\.1:\d+/v1)$", line.strip())
    if match is None:
        process.kill()
        raise RuntimeError(f"serve-policy did not start: {line!r}\n{log.read_text()}")
    return process, match.group(1)


def build(args: argparse.Namespace, model: dict[str, int], run_dir: str, url: str | None) -> Any:
    from toolkit.train.runner import build_trainer

    config = trainer_config(args, model, run_dir)
    if url is not None:
        config["sampler"]["engine"] = {"_component_": "toolkit.engines.ServerEngine", "url": url}
    return build_trainer(config)


def trainer_config(args: argparse.Namespace, model: dict[str, int], run_dir: str) -> dict[str, Any]:
    config = renorm_config(args, run_dir)
    config["policy"]["model"].update(model)
    config["trainer"].update(progress=False, num_steps=args.warmup + args.repeats * args.steps, num_threads=1)
    return config


def step_values(trainer: Any) -> dict[str, float]:
    """One step; its generation and weight-push seconds and its loss."""
    metrics, _ = trainer.step()
    return {
        "generate_s": metrics["time/generate_s"],
        "weight_sync_s": metrics.get("time/weight_sync_s", 0.0),
        "loss": metrics["loss/policy"],
    }


def compare(args: argparse.Namespace, model: dict[str, int]) -> dict[str, dict[str, list[float]]]:
    """ABBA blocks of `--steps` wall-timed steps per side, the server in its own process while they run."""
    with tempfile.TemporaryDirectory(prefix="bench_engine_server_") as tmp:
        config_path = Path(tmp) / "config.yaml"
        config_path.write_text(yaml.safe_dump(trainer_config(args, model, f"{tmp}/server_side")), encoding="utf-8")
        process, url = start_server(config_path, Path(tmp) / "server.log")
        try:
            trainers = {side: build(args, model, f"{tmp}/{side}", url if side == "server" else None) for side in SIDES}
            return run_abba(
                SIDES, lambda side: step_values(trainers[side]), args.warmup, args.repeats, args.steps, clock="wall_s"
            )
        finally:
            process.kill()
            process.wait(timeout=30)


def report(args: argparse.Namespace, results: dict[str, dict[str, dict[str, list[float]]]]) -> str:
    md = Report(
        "Server-mode steps against the synchronous hf engine (bench/engine_server.py)",
        f".venv/bin/python bench/engine_server.py --steps {args.steps} --repeats {args.repeats} --warmup {args.warmup}",
        f"1 thread per process · CPU, fp32 · 16 prompts x G=8, {args.max_new_tokens} new tokens · "
        f"{args.repeats} ABBA blocks of {args.steps} steps per side ({args.repeats * args.steps} steps each) after "
        f"{args.warmup} warm-up steps · "
        f"load average (1 min) {args.load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end",
    )
    md.table(
        "model",
        "hf wall s/step: median / min",
        "server wall s/step: median / min",
        "ratio server / hf: median",
        "paired blocks: median ratio",
        "generate s (hf / server, mean)",
        "weight push s (mean)",
        "losses equal",
    )
    for name, rows in results.items():
        hf, server = (rows[side]["wall_s"] for side in SIDES)
        generate = [statistics.fmean(rows[side]["generate_s"]) for side in SIDES]
        md.row(
            name,
            median_min(hf),
            median_min(server),
            f"{statistics.median(server) / statistics.median(hf):.3f}",
            f"{paired_ratio(hf, server, args.steps):.3f}",  # server / hf of same-index blocks
            f"{generate[0]:.3f} / {generate[1]:.3f}",
            f"{statistics.fmean(rows['server']['weight_sync_s']):.3f}",
            rows["hf"]["loss"] == rows["server"]["loss"],
        )
    return md.text(NOTES)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_abba_arguments(parser, warmup=2, steps=3, repeats=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per completion")
    parser.add_argument("--decode", choices=("generate", "lean"), default="generate", help="HFEngine decode")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.load_start = os.getloadavg()[0]  # a shared machine: other jobs' load is part of what the figures saw
    torch.set_num_threads(1)
    results = {name: compare(args, model) for name, model in MODELS.items()}
    publish(report(args, results), args.out)


if __name__ == "__main__":
    main()
