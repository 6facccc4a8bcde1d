"""DiDi-Instruct on proteins, tiny CPU setup: does an 8-step student match the 64-step teacher's composition, faster?

Trains a tiny DiT protein teacher on the shipped protein-like set, distils a student with
`configs/diffusion_lm/protein_tiny.yaml` through the generic Trainer, samples both at several step counts and
writes the CPU protein metrics (composition JS to the training set in bits, validity, length, diversity) and
the sampling wall-clock to bench/results/didi_protein.md (`--out`), and the raw rows to the work dir
(runs/didi_protein/<name>.json, not committed). `--quick` writes both to the work dir.

    .venv/bin/python bench/didi_protein.py            # ~10-20 min of CPU on 2 shared cores
    .venv/bin/python bench/didi_protein.py --quick    # a 1-minute smoke run (numbers meaningless)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from modalities.diffusion_lm.didi_policy import StudentPolicy
from modalities.diffusion_lm.nfe_table import load_student
from modalities.diffusion_lm.protein.data import ProteinDataset, load_sequences, protein_like_perplexity
from modalities.diffusion_lm.protein.esm_teacher import build_tiny_protein_teacher
from modalities.diffusion_lm.protein.evaluation import protein_nfe_table
from modalities.diffusion_lm.sampling import TIME_GRIDS
from modalities.diffusion_lm.teacher import load_teacher, train_teacher
from modalities.diffusion_lm.text_data import split_items
from rewards.protein import metrics as M
from toolkit.config import load_config
from toolkit.io.atomic import write_json_atomic
from toolkit.train.eval_hook import BestCheckpoint
from toolkit.train.runner import build_trainer, fit

sys.path.insert(0, str(Path(__file__).resolve().parent))

from didi_nfe import discriminator_at_end, holdout_lines  # noqa: E402  (the text bench's memorisation report)

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument(
        "--out", default=None, help="the markdown report (default bench/results/didi_protein.md, the benchmark's one "
        "results file; with --quick: WORK_DIR/NAME_quick.md); the raw rows always go to WORK_DIR/NAME.json",
    )  # fmt: skip
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "didi_protein"))
    p.add_argument("--name", default="didi_protein", help="distillation run name and the raw rows' file stem")
    p.add_argument("--length", type=int, default=48)
    p.add_argument("--teacher-steps", type=int, default=1000)
    p.add_argument("--distill-steps", type=int, default=100)
    p.add_argument("--distill-lr", type=float, default=1e-4)
    p.add_argument("--num-samples", type=int, default=512, help="sequences per cell (JS is a set statistic)")
    p.add_argument("--eval-every", type=int, default=0, help="select the EMA student by composition JS at 8 steps")
    p.add_argument("--real-source", choices=["data", "teacher"], default="data", help="discriminator's real side")
    p.add_argument("--teacher-pool", type=int, default=512, help="teacher@64 rows drawn once (--real-source teacher)")
    p.add_argument(
        "--holdout",
        type=int,
        default=64,
        help="held-out real rows the discriminator is checked on: the valid split (data) or teacher samples "
        "(memorisation monitor; training unchanged; 0 = off)",
    )
    p.add_argument("--student-steps", type=int, default=2, help="the student's rollout steps (2: the two-step rollout)")
    p.add_argument(
        "--time-grid", default="uniform", choices=TIME_GRIDS,
        help="grid for the N-step student's rollout, the discriminator's teacher rows, selection and the table; with "
        "cosine the teacher is also sampled on the spec's uniform grid and the goal uses its better grid",
    )  # fmt: skip
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


def distil(args: argparse.Namespace, work: Path, teacher_ckpt: Path) -> tuple[StudentPolicy, Path]:
    """DiDi through the generic Trainer; returns the final policy and the run directory."""
    run_dir = work / ("distil" if args.name == "didi_protein" else f"distil_{args.name}")
    overrides = [
        f"trainer.run_dir={run_dir}",
        f"trainer.num_steps={args.distill_steps}",
        f"optimizer.lr={args.distill_lr}",
        "trainer.save_every=0",
        "trainer.resume=never",
        f"data.seq_len={args.length}",
        f"rewards.discriminator.total_steps={args.distill_steps}",
        "policy.ema_decay=0.95",
        f"sampler.num_steps={args.student_steps}",
        f"eval.evaluator.time_grid={args.time_grid}",
        f"rewards.discriminator.teacher_time_grid={args.time_grid}",
    ]
    if args.student_steps > 2:  # the two-step rollout's times are 1 → τ → t0 on any grid
        overrides.append(f"sampler.time_grid={args.time_grid}")
    if args.eval_every > 0:  # selection samples with another seed than the table below, so it cannot pick noise
        overrides += [
            f"trainer.eval_every={args.eval_every}",
            "trainer.eval_metric=composition_js/student_ema@8",
            "trainer.eval_mode=min",
            "eval.evaluator.steps=[8]",
            "eval.evaluator.num_samples=256",
            "eval.evaluator.seed=1",
            f"eval.evaluator.length={args.length}",
            "eval.evaluator.include_teacher=false",
        ]
    nodes = ["policy.student", "policy.teacher", "rewards.discriminator.discriminator.teacher"]
    if args.real_source == "teacher":
        overrides += [
            "rewards.discriminator.real_source=teacher",
            f"rewards.discriminator.teacher_pool_size={args.teacher_pool}",
            "+rewards.discriminator.teacher._component_="
            "modalities.diffusion_lm.protein.esm_teacher.build_tiny_protein_teacher",
            f"+rewards.discriminator.teacher.max_length={args.length}",
            f"rewards.discriminator.teacher_holdout_size={args.holdout}",
        ]
        nodes.append("+rewards.discriminator.teacher")
    elif args.holdout > 0:
        overrides += [
            "+rewards.discriminator.data_holdout._component_=modalities.diffusion_lm.protein.data.ProteinDataset",
            f"+rewards.discriminator.data_holdout.seq_len={args.length}",
            "+rewards.discriminator.data_holdout.split=valid",
            f"+rewards.discriminator.data_holdout_size={args.holdout}",
        ]
    overrides += args.set
    for node in nodes:
        overrides.append(f"{node}.checkpoint={teacher_ckpt}")
    trainer = build_trainer(load_config(ROOT / "configs" / "diffusion_lm" / "protein_tiny.yaml", overrides))
    fit(trainer)
    assert isinstance(trainer.policy, StudentPolicy)
    return trainer.policy, run_dir


def write_markdown(path: Path, result: dict[str, Any]) -> None:
    st = result["settings"]
    lines = [
        "# DiDi-Instruct on proteins (tiny CPU setup)",
        "",
        "Generated by `bench/didi_protein.py`. Composition JS = Jensen-Shannon divergence (bits) between the pooled",
        f"amino-acid composition of {st['num_samples']} samples and that of the training set (lower is better), ±",
        "its bootstrap standard error. Generator PPL = perplexity under the exact chain that wrote the shipped set",
        "(`protein_like_perplexity`, length included; training data: "
        f"{result['summary']['train_data_generator_ppl']:.2f}), the protein analogue of gen-PPL.",
        "",
        "| model | steps | time grid | composition JS | generator PPL | validity | mean length | pairwise identity "
        "| 3-mers | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        name = row["model"] + (f" (step {row['selected_step']})" if "selected_step" in row else "")
        lines.append(
            f"| {name} | {row['steps']} | {row['time_grid']} | "
            f"{row['composition_js_bits']:.4f} ± {row['composition_js_se']:.4f} | "
            f"{row['generator_ppl']:.2f} | {row['validity']:.3f} | {row['mean_length']:.1f} | "
            f"{row['mean_pairwise_identity']:.3f} | {row['distinct_3mer']:.3f} | {row['seconds']:.2f} |"
        )
    lines += holdout_lines(st.get("discriminator_end") or {}, st["real_source"])
    lines += ["", "Summary: " + ", ".join(f"{k} = {v}" for k, v in result["summary"].items()), ""]
    lines.append("Settings: " + ", ".join(f"{k} = {v}" for k, v in st.items()))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    args = parse_args()
    if args.quick:
        args.teacher_steps, args.distill_steps, args.num_samples = 20, 2, 32
        args.eval_every = min(args.eval_every, 1)
    torch.set_num_threads(args.threads)
    work, start = Path(args.work_dir), time.perf_counter()
    teacher_ckpt = train_stage_teacher(args, work)
    t_distil = time.perf_counter()
    policy, run_dir = distil(args, work, teacher_ckpt)
    distil_s = time.perf_counter() - t_distil
    sequences = load_sequences()
    train_seqs, valid_seqs = split_items(sequences, "train", 0.1), split_items(sequences, "valid", 0.1)
    reference = M.amino_acid_composition(train_seqs)  # what the teacher learned: the train split of ProteinDataset
    models = {"teacher": load_teacher(teacher_ckpt), "student": policy.student, "student_ema": policy.ema_model()}
    plan = {"teacher": [8, 16, 32, 64], "student": [8, 16], "student_ema": [8]}
    best = BestCheckpoint.read(run_dir)
    if best is not None:  # trainer.eval_every selection (seed 1), scored here on fresh samples (seed 0)
        models["student_ema_best"] = load_student(best["checkpoint"], teacher_ckpt)
        plan["student_ema_best"] = [8]
    common: dict[str, Any] = {
        "reference": reference,
        "num_samples": args.num_samples,
        "length": args.length,
        "generator_ppl": True,
    }
    rows = protein_nfe_table(models, plan, time_grid=args.time_grid, **common)
    if args.time_grid != "uniform":  # the spec's grid too: the goal holds the student against the teacher's better one
        rows += protein_nfe_table({"teacher": models["teacher"]}, [8, 64], time_grid="uniform", **common)
    cell = {(r["model"], r["steps"], r["time_grid"]): r for r in rows}
    if best is not None:
        cell[("student_ema_best", 8, args.time_grid)]["selected_step"] = best["step"]
    deployed = "student_ema_best" if best is not None else "student"
    student = cell[(deployed, 8, args.time_grid)]
    teachers = [r for r in rows if r["model"] == "teacher" and r["steps"] == 64]  # one per grid
    teacher = cell[("teacher", 64, args.time_grid)]  # speed: the same grid as the student
    best_js = min(teachers, key=lambda r: r["composition_js_bits"])  # each goal: the teacher's better grid for it
    best_ppl = min(teachers, key=lambda r: r["generator_ppl"])
    summary = {
        "student": deployed,
        "student8_js": round(student["composition_js_bits"], 4),
        "student8_js_se": round(student["composition_js_se"], 4),
        "teacher64_js": round(best_js["composition_js_bits"], 4),
        "teacher64_js_se": round(best_js["composition_js_se"], 4),
        "teacher64_js_time_grid": best_js["time_grid"],
        "teacher8_js": round(cell[("teacher", 8, best_js["time_grid"])]["composition_js_bits"], 4),
        "held_out_data_js": round(
            float(M.composition_divergence(M.amino_acid_composition(valid_seqs), reference, units="bits")), 4
        ),
        "js_goal_met": student["composition_js_bits"] <= best_js["composition_js_bits"],
        "student8_generator_ppl": round(student["generator_ppl"], 3),
        "teacher64_generator_ppl": round(best_ppl["generator_ppl"], 3),
        "teacher64_ppl_time_grid": best_ppl["time_grid"],
        "teacher8_generator_ppl": round(cell[("teacher", 8, best_ppl["time_grid"])]["generator_ppl"], 3),
        "train_data_generator_ppl": round(protein_like_perplexity(train_seqs), 3),
        "speedup_vs_teacher64": round(teacher["seconds"] / student["seconds"], 2),
        "speed_goal_met": teacher["seconds"] / student["seconds"] >= 5.0,
    }
    settings = {
        **vars(args),
        "distil_seconds": round(distil_s, 1),
        "discriminator_end": discriminator_at_end(run_dir),
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    result = {"rows": rows, "summary": summary, "settings": settings}
    name = f"{args.name}_quick" if args.quick else args.name
    default = work / f"{name}.md" if args.quick else ROOT / "bench" / "results" / "didi_protein.md"
    report = Path(args.out) if args.out else default
    write_json_atomic(work / f"{name}.json", result, sort_keys=True)
    report.parent.mkdir(parents=True, exist_ok=True)
    write_markdown(report, result)
    print(summary)


if __name__ == "__main__":
    main()
