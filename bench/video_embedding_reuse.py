"""CPU seconds per MedGRPO step with the frozen vision tower run once per distinct video vs in every forward (issue 19).

"re-encoded" is the code before issue 19 (`VideoVLMPolicy(reuse_vision_embeddings=False)`): every one of the G rows of
a prompt carries its video's patches into generation, the old-log-prob pass and each training forward. "reused"
encodes each prompt's video once per step (`video_embeddings`) and feeds the embeddings to all of them. Workload:
configs/medical_video/tiny.yaml with a wider model (LM 4 layers x 256, vision tower 8 blocks x 128) on 112x112 frames
(8 frames: 256 patches, 64 video tokens per prompt), 4 prompts x G=4, 24 new tokens; "on-policy" is the recipe
(generation + one training pass: the Trainer takes old log-probs from it), "2 epochs" adds the old-log-prob pass and
a second training pass. Both trainers live in one process on one torch thread and alternate in ABBA blocks of steps
after warm-up; a step's cost is its process CPU time; the two sides' losses are compared step by step.

    python bench/video_embedding_reuse.py [--steps 2 --repeats 6 --warmup 1]
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
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.abba import Report, add_abba_arguments, median_min, paired_ratio, publish, run_abba  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "video_embedding_reuse.md"
SIDES = ("re-encoded", "reused")
MODEL = [
    "policy.model.hidden_size=256",
    "policy.model.intermediate_size=512",
    "policy.model.num_layers=4",
    "policy.model.vision_depth=8",
    "policy.model.vision_hidden_size=128",
    "sampler.video.min_pixels=12544",
    "sampler.video.max_pixels=12544",
    "trainer.progress=false",
    "trainer.save_every=0",
]
WORKLOADS = {"on-policy (tiny.yaml)": [], "2 epochs (+ old-log-prob pass)": ["trainer.num_inner_epochs=2"]}

NOTES = """
## Reading the figures

- Tower calls per step: re-encoded runs the tower over all N = 16 rows in generation's prefill and in each training
  (and old-log-prob) forward; reused runs it over the B = 4 distinct videos once. The language model's work is the
  same on both sides, so the saving grows with the tower's share of a forward (here the tower is wide relative to the
  LM; in Qwen2.5-VL-7B it is ~0.67B parameters over 4 patches per video token, against the 7B LM).
- The two sides sample the same tokens and train to the same losses (the exactness test is
  tests/modalities/medical_video/test_video_embedding_reuse.py: samples, log-probs and gradients, bitwise on this CPU).
- CPU seconds on one torch thread of a shared 2-core VM; the paired-block ratio compares blocks run back to back
  (ABBA), so a slow drift of the machine's load cancels. Nothing here was measured on a GPU.
"""


def build(args: argparse.Namespace, run_dir: str, overrides: list[str], reuse: bool) -> Any:
    from toolkit.config import load_config
    from toolkit.train.runner import build_trainer

    data_dir = f"{args.data_dir}/synthetic"
    settings = [*MODEL, *overrides, f"trainer.run_dir={run_dir}", f"data.out_dir={data_dir}"]
    settings += [
        f"trainer.num_steps={args.warmup + args.repeats * args.steps}",
        f"policy.reuse_vision_embeddings={reuse}",
    ]
    return build_trainer(load_config(ROOT / "configs" / "medical_video" / "tiny.yaml", settings))


def compare(args: argparse.Namespace, overrides: list[str]) -> dict[str, dict[str, list[float]]]:
    """ABBA blocks of `--steps` steps per side; both trainers see the same prompts and draws, step for step."""
    with tempfile.TemporaryDirectory(prefix="bench_video_") as tmp:
        trainers = {side: build(args, f"{tmp}/{side}", overrides, side == "reused") for side in SIDES}
        return run_abba(
            SIDES, lambda side: {"loss": trainers[side].step()[0]["loss/policy"]}, args.warmup, args.repeats, args.steps
        )


def report(args: argparse.Namespace, results: dict[str, dict[str, dict[str, list[float]]]]) -> str:
    md = Report(
        "Video VLM steps with the frozen vision tower's embeddings reused (bench/video_embedding_reuse.py)",
        f".venv/bin/python bench/video_embedding_reuse.py --steps {args.steps} --repeats {args.repeats} "
        f"--warmup {args.warmup}",
        f"1 thread · CPU, fp32 · 4 prompts x G=4, 24 new tokens, 64 video tokens per prompt · {args.repeats} ABBA "
        f"blocks of {args.steps} steps per side after {args.warmup} warm-up steps",
    )
    md.table(
        "workload",
        "re-encoded CPU s/step: median / min",
        "reused CPU s/step: median / min",
        "ratio reused / re-encoded: median",
        "paired blocks: median ratio",
        "losses equal",
    )
    for name, rows in results.items():
        encoded, reused = (rows[side]["cpu_s"] for side in SIDES)
        md.row(
            name,
            median_min(encoded),
            median_min(reused),
            f"{statistics.median(reused) / statistics.median(encoded):.3f}",
            f"{paired_ratio(encoded, reused, args.steps):.3f}",
            rows["re-encoded"]["loss"] == rows["reused"]["loss"],
        )
    return md.text(NOTES)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_abba_arguments(parser, warmup=1, steps=2, repeats=6)
    parser.add_argument("--data-dir", default=str(ROOT / "runs" / "bench_video_embedding_reuse"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    results = {name: compare(args, overrides) for name, overrides in WORKLOADS.items()}
    publish(report(args, results), args.out)


if __name__ == "__main__":
    main()
