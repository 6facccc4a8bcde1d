"""DiDi-Instruct on proteins, tiny CPU setup: does an 8-step student match the 64-step teacher's composition, faster?

Trains a tiny DiT protein teacher on the shipped protein-like set, distils a student with
`configs/diffusion_lm/protein_tiny.yaml` through the generic Trainer, samples both at several step counts and
writes the CPU protein metrics (composition JS to the training set in bits, validity, length, diversity) and
the sampling wall-clock to bench/results/didi_protein.{json,md}.

    .venv/bin/python bench/didi_protein.py            # ~10-20 min of CPU on 2 shared cores
    .venv/bin/python bench/didi_protein.py --quick    # a 1-minute smoke run (numbers meaningless)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from modalities.diffusion_lm.didi_policy import StudentPolicy
from modalities.diffusion_lm.masked_diffusion import MaskedDiffusionLM
from modalities.diffusion_lm.protein.data import ProteinDataset, load_sequences
from modalities.diffusion_lm.protein.esm_teacher import build_tiny_protein_teacher
from modalities.diffusion_lm.protein.tokenizer import ProteinVocab
from modalities.diffusion_lm.teacher import load_teacher, train_teacher
from rewards.protein import metrics as M
from toolkit.checkpoint import write_json_atomic
from toolkit.config import load_config
from toolkit.runner import build_trainer, fit

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "didi_protein"))
    p.add_argument("--name", default="didi_protein", help="result file stem under --out and distillation run name")
    p.add_argument("--length", type=int, default=48)
    p.add_argument("--teacher-steps", type=int, default=1000)
    p.add_argument("--distill-steps", type=int, default=100)
    p.add_argument("--distill-lr", type=float, default=1e-4)
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny step counts: checks the pipeline only")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra distillation config overrides")
    return p.parse_args()


def train_stage_teacher(args: argparse.Namespace, work: Path) -> Path:
    teacher = build_tiny_protein_teacher(max_length=args.length, hidden_size=96, num_blocks=3, num_heads=3)
    data = ProteinDataset(seq_len=args.length, split="train", seed=0)
    result = train_teacher(
        teacher, data, args.teacher_steps, lr=1e-3, batch_size=32, run_dir=work / "teacher", warmup_steps=50
    )
    print(f"teacher: {result.step} steps, final NELBO {result.loss:.3f}")
    return Path(result.checkpoint) if result.checkpoint is not None else work / "teacher"  # None: resumed a done run


def distil(args: argparse.Namespace, work: Path, teacher_ckpt: Path) -> StudentPolicy:
    overrides = [
        f"trainer.run_dir={work / ('distil' if args.name == 'didi_protein' else f'distil_{args.name}')}",
        f"trainer.num_steps={args.distill_steps}",
        f"trainer.lr={args.distill_lr}",
        "trainer.save_every=0",
        "trainer.resume=never",
        f"data.seq_len={args.length}",
        f"rewards.discriminator.total_steps={args.distill_steps}",
        "policy.ema_decay=0.95",
    ]
    overrides += args.set
    for node in ("policy.student", "policy.teacher", "rewards.discriminator.discriminator.teacher"):
        overrides.append(f"{node}.checkpoint={teacher_ckpt}")
    trainer = build_trainer(load_config(ROOT / "configs" / "diffusion_lm" / "protein_tiny.yaml", overrides))
    fit(trainer)
    assert isinstance(trainer.policy, StudentPolicy)
    return trainer.policy


def evaluate(model: MaskedDiffusionLM, steps: int, args: argparse.Namespace, reference: torch.Tensor) -> dict[str, Any]:
    """Sample `num_samples` rows with `steps` ancestral steps (timed) and score them with the CPU metrics."""
    model.eval()
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    ids = torch.cat([model.sample(32, args.length, steps, generator) for _ in range(args.num_samples // 32)])
    seconds = time.perf_counter() - start
    sequences = ProteinVocab.from_layout("compact").decode_batch(ids)
    standard = [s for s in sequences if any(c in M.STANDARD_AMINO_ACIDS for c in s)]
    composition = M.amino_acid_composition(standard) if standard else torch.full_like(reference, 0.05)
    return {
        "steps": steps,
        "composition_js_bits": float(M.composition_divergence(composition, reference, units="bits")),
        "validity": M.validity_rate(sequences),
        "mean_length": sum(map(len, sequences)) / len(sequences),
        "mean_pairwise_identity": M.mean_pairwise_identity(sequences),
        "distinct_3mer": M.distinct_kmer_fraction(sequences, 3),
        "seconds": seconds,
        "forwards": model.last_num_forward,
    }


def write_markdown(path: Path, result: dict[str, Any]) -> None:
    lines = [
        "# DiDi-Instruct on proteins (tiny CPU setup)",
        "",
        "Generated by `bench/didi_protein.py`; composition JS = Jensen-Shannon divergence (bits) between the",
        "pooled amino-acid composition of 128 samples and that of the training set (lower is better).",
        "",
        "| model | steps | composition JS | validity | mean length | pairwise identity | distinct 3-mer | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['model']} | {row['steps']} | {row['composition_js_bits']:.4f} | {row['validity']:.3f} | "
            f"{row['mean_length']:.1f} | {row['mean_pairwise_identity']:.3f} | {row['distinct_3mer']:.3f} | "
            f"{row['seconds']:.2f} |"
        )
    lines += ["", "Summary: " + ", ".join(f"{k} = {v}" for k, v in result["summary"].items()), ""]
    lines.append("Settings: " + ", ".join(f"{k} = {v}" for k, v in result["settings"].items()))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    args = parse_args()
    if args.quick:
        args.teacher_steps, args.distill_steps, args.num_samples = 20, 2, 32
    torch.set_num_threads(args.threads)
    work, start = Path(args.work_dir), time.perf_counter()
    teacher_ckpt = train_stage_teacher(args, work)
    t_distil = time.perf_counter()
    policy = distil(args, work, teacher_ckpt)
    distil_s = time.perf_counter() - t_distil
    reference = M.amino_acid_composition(load_sequences()[:-12])  # the train split of ProteinDataset
    held_out = M.amino_acid_composition(load_sequences()[-12:])
    models = {"teacher": load_teacher(teacher_ckpt), "student": policy.student, "student_ema": policy.ema_model()}
    plan = {"teacher": [8, 16, 32, 64], "student": [8, 16], "student_ema": [8]}
    rows = [{"model": name, **evaluate(models[name], n, args, reference)} for name, ns in plan.items() for n in ns]
    cell = {(r["model"], r["steps"]): r for r in rows}
    student, teacher = cell[("student", 8)], cell[("teacher", 64)]
    summary = {
        "student8_js": round(student["composition_js_bits"], 4),
        "teacher64_js": round(teacher["composition_js_bits"], 4),
        "teacher8_js": round(cell[("teacher", 8)]["composition_js_bits"], 4),
        "held_out_data_js": round(float(M.composition_divergence(held_out, reference, units="bits")), 4),
        "js_goal_met": student["composition_js_bits"] <= teacher["composition_js_bits"],
        "speedup_vs_teacher64": round(teacher["seconds"] / student["seconds"], 2),
        "speed_goal_met": teacher["seconds"] / student["seconds"] >= 5.0,
    }
    settings = {
        **vars(args),
        "distil_seconds": round(distil_s, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    result = {"rows": rows, "summary": summary, "settings": settings}
    out = Path(args.out)
    name = f"{args.name}_quick" if args.quick else args.name
    write_json_atomic(out / f"{name}.json", result, sort_keys=True)
    write_markdown(out / f"{name}.md", result)
    print(summary)


if __name__ == "__main__":
    main()
