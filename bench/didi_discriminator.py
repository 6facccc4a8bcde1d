"""What did a DiDi run's discriminator learn? Memorisation of its real side, and agreement with the evaluator.

For each finished `bench/didi_nfe.py` run (its final checkpoint) the script scores, at τ = `--tau` with the
reward averaged over `--corruptions` corruptions:
- its own real rows (the teacher pool), fresh teacher rows (same step count, never seen), student@8 (EMA) rows
  and teacher@8 rows: a pool scored far above fresh teacher rows is memorised;
- the Spearman rank correlation of the reward with the evaluator's per-token log-likelihood over one fixed set of
  teacher@8 rows (the same rows for every run): how far the reward points toward lower gen-PPL.

    .venv/bin/python bench/didi_discriminator.py X2 X5 X6     # run names under runs/didi_nfe/distil_<name>
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import didi_nfe  # noqa: E402  (the bench's evaluator recipe)

from modalities.diffusion_lm.masked_diffusion import sample_in_batches  # noqa: E402
from modalities.diffusion_lm.nfe_table import load_student  # noqa: E402
from toolkit.config import load_config  # noqa: E402
from toolkit.config.schema import instantiate  # noqa: E402
from toolkit.io.atomic import write_json_atomic
from toolkit.io.checkpoint import load_checkpoint
from toolkit.io.resume import resolve_resume

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run names (runs/didi_nfe/distil_<name>)")
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "didi_nfe"))
    p.add_argument("--num-samples", type=int, default=512)
    p.add_argument("--tau", type=float, default=0.2, help="corruption time the reward is computed at")
    p.add_argument("--corruptions", type=int, default=4)
    p.add_argument(
        "--out", default=str(ROOT / "bench" / "results" / "didi_discriminator.md"),
        help="the markdown report (the benchmark's one results file); raw rows: WORK_DIR/didi_discriminator.json",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two [N] vectors (continuous scores: ties have probability ~0)."""
    ranks = [torch.argsort(torch.argsort(x)).double() for x in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def load_reward(run_dir: Path) -> tuple[Any, Path]:
    """The run's DiscriminatorReward in its final state, and the checkpoint it came from."""
    checkpoint = resolve_resume("auto", run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"no checkpoint under {run_dir}")
    config = load_config(run_dir / "config.yaml")
    reward = instantiate(config["rewards"]["discriminator"], "rewards.discriminator")
    reward.load_state_dict(load_checkpoint(checkpoint).objects["reward/discriminator"])
    if reward.teacher_pool is None:
        raise ValueError(f"{run_dir} has no teacher pool (real_source must be 'teacher' with teacher_pool_size > 0)")
    return reward, checkpoint


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator, _ = didi_nfe.stage_evaluator(didi_nfe.parse_args([]))
    teacher_ckpt = Path(args.work_dir) / "teacher"
    rows: list[dict[str, Any]] = []
    probe: torch.Tensor | None = None
    quality: torch.Tensor | None = None
    for name in args.runs:
        reward, checkpoint = load_reward(Path(args.work_dir) / f"distil_{name}")
        n, length = args.num_samples, reward.teacher_pool.shape[1]
        if probe is None:  # one fixed teacher@8 set, scored by the evaluator once
            probe = sample_in_batches(reward.teacher, n, length, 8, seed=4321)
            nll, valid = evaluator.nll_and_valid(probe)
            quality = -(nll * valid).sum(-1) / valid.sum(-1)
        assert quality is not None

        def score(ids: torch.Tensor, reward: Any = reward) -> torch.Tensor:
            tau = torch.full((ids.shape[0],), args.tau)
            return torch.stack([reward.score(ids, tau) for _ in range(args.corruptions)]).mean(0)

        fresh = sample_in_batches(reward.teacher, n, length, reward.teacher_num_steps, seed=12345)
        student = sample_in_batches(load_student(checkpoint, teacher_ckpt), n, length, 8, seed=777)
        on_probe = score(probe)
        rows.append(
            {
                "run": name,
                "pool_size": int(reward.teacher_pool.shape[0]),
                "teacher_steps": reward.teacher_num_steps,
                "reward_pool": float(score(reward.teacher_pool[:n]).mean()),
                "reward_fresh_teacher": float(score(fresh).mean()),
                "reward_student8": float(score(student).mean()),
                "reward_teacher8": float(on_probe.mean()),
                "spearman_teacher8": spearman(on_probe, quality),
            }
        )
        print(rows[-1], flush=True)
    write(Path(args.out), rows, args)
    return rows


def write(out: Path, rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    raw = Path(args.work_dir) / "didi_discriminator.json"
    write_json_atomic(raw, {"rows": rows, "settings": vars(args)}, sort_keys=True)
    lines = [
        "# What the DiDi discriminators learned (bench/didi_discriminator.py)",
        "",
        f"Final checkpoint of each run; reward at τ = {args.tau} averaged over {args.corruptions} corruptions, "
        f"{args.num_samples} rows per column. Fresh teacher rows use the run's teacher step count and were never "
        "seen. Spearman: reward against the evaluator's per-token log-likelihood over one fixed set of teacher@8 "
        "rows.",
        "",
        "| run | pool | teacher steps | reward: pool rows | fresh teacher rows | student@8 (EMA) | teacher@8 | "
        "Spearman |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['pool_size']} | {r['teacher_steps']} | {r['reward_pool']:.2f} | "
            f"{r['reward_fresh_teacher']:.2f} | {r['reward_student8']:.2f} | {r['reward_teacher8']:.2f} | "
            f"{r['spearman_teacher8']:.3f} |"
        )
    command = " ".join([".venv/bin/python bench/didi_discriminator.py", *sys.argv[1:]])
    lines += ["", f"Reproduce: `{command}`."]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
