"""DiDi-Instruct on the tiny CPU setup: does an 8-step student match the 64-step teacher, and how much faster is it?

Trains a tiny word-level DiT teacher on the shipped corpus, a tiny GPT-2 evaluator on the same corpus, distils
a student with `configs/diffusion_lm/tiny.yaml` through the generic Trainer, then writes the NFE table
(gen-PPL under the evaluator, unigram entropy, wall-clock) to bench/results/didi_nfe.{json,md}.

    .venv/bin/python bench/didi_nfe.py            # ~10 min of CPU on 2 cores
    .venv/bin/python bench/didi_nfe.py --quick    # a 1-minute smoke run (numbers meaningless)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from modalities.diffusion_lm.didi_policy import StudentPolicy
from modalities.diffusion_lm.evaluation import CausalLMEvaluator, build_tiny_gpt2, train_tiny_causal_lm
from modalities.diffusion_lm.nfe_table import nfe_table, print_nfe_table, sample_timed, write_json_atomic
from modalities.diffusion_lm.teacher import load_teacher, train_teacher
from modalities.diffusion_lm.text_data import TokenDataset, build_text_tokenizer, collate_input_ids
from modalities.diffusion_lm.tiny import build_tiny_text_teacher
from toolkit.config import load_config
from toolkit.runner import build_trainer, fit

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "didi_nfe"))
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--teacher-steps", type=int, default=500)
    p.add_argument("--evaluator-steps", type=int, default=300)
    p.add_argument("--distill-steps", type=int, default=100)
    p.add_argument("--distill-lr", type=float, default=1e-4)
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny step counts: checks the pipeline only")
    return p.parse_args()


def train_stage_teacher(args: argparse.Namespace, work: Path) -> Path:
    teacher = build_tiny_text_teacher(seed=0, max_length=args.length)
    data = TokenDataset(seq_len=args.length, split="train", seed=0)
    result = train_teacher(
        teacher,
        data,
        args.teacher_steps,
        lr=2e-3,
        batch_size=32,
        run_dir=work / "teacher",
        warmup_steps=50,
        progress=False,
    )
    print(f"teacher: {result.step} steps, final NELBO {result.loss:.3f}")
    assert result.checkpoint is not None
    return Path(result.checkpoint)


def train_stage_evaluator(args: argparse.Namespace) -> CausalLMEvaluator:
    tokenizer = build_text_tokenizer()
    data = TokenDataset(seq_len=args.length, split="train", seed=1)
    model = build_tiny_gpt2(len(tokenizer), max_length=args.length, num_layers=2, hidden=64)

    def batches() -> Any:
        for rows in data.batches(32):
            yield collate_input_ids(rows)

    losses = train_tiny_causal_lm(model, batches, args.evaluator_steps, lr=3e-3)
    print(f"evaluator GPT-2: {args.evaluator_steps} steps, final loss {losses[-1]:.3f}")
    return CausalLMEvaluator(model, tokenizer, batch_size=64, max_length=args.length)


def distil(args: argparse.Namespace, work: Path, teacher_ckpt: Path) -> StudentPolicy:
    ckpt = str(teacher_ckpt)
    overrides = [
        f"trainer.run_dir={work / 'distil'}",
        f"trainer.num_steps={args.distill_steps}",
        f"trainer.lr={args.distill_lr}",
        "trainer.save_every=0",
        "trainer.resume=never",
        f"data.seq_len={args.length}",
        f"rewards.discriminator.total_steps={args.distill_steps}",
        "policy.ema_decay=0.95",
    ]
    for node in ("policy.student", "policy.teacher", "rewards.discriminator.discriminator.teacher"):
        overrides.append(f"{node}.checkpoint={ckpt}")
    config = load_config(ROOT / "configs" / "diffusion_lm" / "tiny.yaml", overrides)
    trainer = build_trainer(config)
    fit(trainer)
    assert isinstance(trainer.policy, StudentPolicy)
    return trainer.policy


def summary(rows: list[dict[str, Any]], teacher64_nocache_s: float, data_ppl: float) -> dict[str, Any]:
    cell = {(r["model"], r["steps"]): r for r in rows}
    student, teacher = cell[("student", 8)], cell[("teacher", 64)]
    return {
        "student8_gen_ppl": student["gen_ppl"],
        "teacher64_gen_ppl": teacher["gen_ppl"],
        "teacher8_gen_ppl": cell[("teacher", 8)]["gen_ppl"],
        "data_gen_ppl": data_ppl,
        "ppl_goal_met": student["gen_ppl"] <= teacher["gen_ppl"],
        "speedup_vs_teacher64_cached": teacher["seconds"] / student["seconds"],
        "speedup_vs_teacher64_uncached": teacher64_nocache_s / student["seconds"],
        "speed_goal_met": teacher["seconds"] / student["seconds"] >= 5.0,
    }


def main() -> None:
    args = parse_args()
    if args.quick:
        args.teacher_steps, args.evaluator_steps, args.distill_steps, args.num_samples = 5, 5, 2, 8
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    start = time.perf_counter()
    teacher_ckpt = train_stage_teacher(args, work)
    evaluator = train_stage_evaluator(args)
    t_distil = time.perf_counter()
    policy = distil(args, work, teacher_ckpt)
    distil_s = time.perf_counter() - t_distil
    teacher = load_teacher(teacher_ckpt)
    models = {"teacher": teacher, "student": policy.student, "student_ema": policy.ema_model()}
    steps = {"teacher": [8, 16, 32, 64, 128], "student": [8, 16, 32, 64], "student_ema": [8]}
    rows = nfe_table(models, steps, evaluator, num_samples=args.num_samples, length=args.length)
    _, nocache_s, _ = sample_timed(teacher, args.num_samples, args.length, 64, cache=False)
    valid = TokenDataset(seq_len=args.length, split="valid", shuffle=False)
    data_ppl = evaluator.perplexity_of_ids(collate_input_ids(valid.next_batch(min(len(valid), args.num_samples))))
    print_nfe_table(rows, title="DiDi-Instruct tiny: NFE table (gen-PPL under the tiny GPT-2 evaluator)")
    result = {
        "rows": rows,
        "summary": summary(rows, nocache_s, data_ppl),
        "settings": {**vars(args), "distil_seconds": distil_s, "total_seconds": time.perf_counter() - start},
    }
    out = Path(args.out)
    write_json_atomic(out / ("didi_nfe_quick.json" if args.quick else "didi_nfe.json"), result)
    print(result["summary"])


if __name__ == "__main__":
    main()
