"""Student@8 against teacher@64 over several sampling seeds: is a finished `didi_nfe.py` run's gap real or noise?

One 128-sample NFE table moves by ±0.3–0.5 gen-PPL between seeds, about the size of the gaps it is read for. This
re-samples the final student (raw and EMA) at 8 steps and the teacher at 64 steps on both time grids, with the
same `--num-samples` per seed and several seeds, and reports per-seed values, means and the paired per-seed
differences (each seed samples every model with the same generator seed).

`--teacher-temperatures` and `--student-temperatures` add teacher@64 and raw student@8 cells on the student's grid
at those sampling temperatures: a cooler sampler has a lower unigram entropy and a lower gen-PPL, so one gen-PPL
says little without its entropy. With a sweep the student is also compared at equal entropy (the diversity-matched
comparison, per seed, gen-PPL interpolated linearly in entropy along the sweep), and the gen-PPL-against-entropy
curves are drawn next to the report (bench/results/didi_seeds.png). The report is bench/results/didi_seeds.md
(`--out`); the raw rows go to the didi_nfe work dir (runs/didi_nfe/didi_seeds_<run>.json, not committed).

    .venv/bin/python bench/didi_seeds.py X11 --time-grid cosine      # ~7 min on 2 threads
    .venv/bin/python bench/didi_seeds.py X11 --time-grid cosine --teacher-temperatures 0.8 --student-temperatures 1.1
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from didi_nfe import ROOT, stage_evaluator, stage_teacher  # noqa: E402
from didi_nfe import parse_args as nfe_args  # noqa: E402

from modalities.diffusion_lm.nfe_table import load_student, nfe_table  # noqa: E402
from modalities.diffusion_lm.sampling import TIME_GRIDS  # noqa: E402
from modalities.diffusion_lm.teacher import load_teacher  # noqa: E402
from toolkit.io.atomic import write_json_atomic


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("name", help="the didi_nfe.py run name (its run is work-dir/distil_NAME)")
    p.add_argument("--time-grid", default="uniform", choices=TIME_GRIDS, help="the student's grid")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument(
        "--teacher-temperatures", type=float, nargs="*", default=[],
        help="extra teacher@64 cells on the student's grid at these temperatures (< 1: lower entropy)",
    )  # fmt: skip
    p.add_argument(
        "--student-temperatures", type=float, nargs="*", default=[],
        help="extra raw student@8 cells at these temperatures (> 1: higher entropy)",
    )  # fmt: skip
    p.add_argument("--num-samples", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--out", default=str(ROOT / "bench" / "results" / "didi_seeds.md"),
        help="the markdown report (the benchmark's one results file); a sweep's plot gets the same stem, .png",
    )  # fmt: skip
    p.add_argument("--from-json", help="no sampling: rebuild the summary, markdown and plot from this result JSON")
    p.add_argument(
        "--reuse", help="a result JSON at the same --num-samples: its teacher cells (and its student cells, if it is "
        "the same run) are taken, not sampled again (sampling is deterministic per seed)",
    )  # fmt: skip
    return p.parse_args(argv)


def mean_se(values: list[float]) -> tuple[float, float]:
    """(mean, standard error of the mean); se is 0 for a single value."""
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return statistics.mean(values), se


def grids_of(time_grid: str) -> list[str]:
    """The student's grid first, then the others: the teacher@64 cells at T = 1."""
    return list(dict.fromkeys((time_grid, "uniform", "cosine")))


def cell_of(row: dict[str, Any]) -> tuple[str, int, str, float]:
    """(model, steps, time_grid, temperature) of an nfe_table row."""
    return row["model"], row["steps"], row["time_grid"], row["temperature"]


def paired_stats(diffs: list[float]) -> dict[str, Any]:
    m, se = mean_se(diffs)
    return {"mean_diff": m, "se": se, "diffs": diffs}


def sweep(per_cell: dict[Any, list[dict[str, Any]]], model: str, grid: str) -> list[list[dict[str, Any]]]:
    """The rows (one per seed) of every temperature cell of `model` on `grid`."""
    return [cell_rows for (name, _, g, _), cell_rows in per_cell.items() if name == model and g == grid]


def at_entropy(cells: list[list[dict[str, Any]]], seed_index: int, entropy: float) -> tuple[float, bool]:
    """(gen-PPL of a temperature sweep's cells for one seed at `entropy`, whether that lies outside the sweep)."""
    xs, ys = zip(*sorted((c[seed_index]["entropy"], c[seed_index]["gen_ppl"]) for c in cells), strict=True)
    return float(np.interp(entropy, xs, ys)), not xs[0] <= entropy <= xs[-1]  # outside: clamped, flagged, not read


def plot_frontier(path: Path, result: dict[str, Any]) -> None:
    """Gen-PPL (mean ± se over seeds) against unigram entropy, one line per (model, steps, grid) over temperatures."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    series: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for s in result["summary"]:
        series.setdefault((s["model"], s["steps"], s["time_grid"]), []).append(s)
    for (model, steps, grid), points in series.items():
        points.sort(key=lambda p: p["entropy"])
        xs, ys = [p["entropy"] for p in points], [p["gen_ppl"] for p in points]
        ax.errorbar(xs, ys, yerr=[p["se"] for p in points], marker="o", capsize=3, label=f"{model}@{steps} ({grid})")
        for p in points:
            ax.annotate(f"T={p['temperature']:g}", (p["entropy"], p["gen_ppl"]), fontsize=7,
                        textcoords="offset points", xytext=(4, -10))  # fmt: skip
    ax.set_xlabel("unigram entropy (nats, mean per sample)")
    ax.set_ylabel("gen-PPL (tiny GPT-2 evaluator)")
    ax.set_title(f"Run {result['settings']['name']}: gen-PPL against entropy over sampling temperatures")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, format="png")


def summarize(
    rows: list[dict[str, Any]], cells: list[tuple[str, int, str, float]], time_grid: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-cell mean ± se and entropy, and the paired per-seed differences (equal-entropy ones when swept)."""
    grids = grids_of(time_grid)
    per_cell = {cell: [r for r in rows if cell_of(r) == cell] for cell in cells}
    summary = []
    for (name, steps, grid, temperature), cell_rows in per_cell.items():
        m, se = mean_se([r["gen_ppl"] for r in cell_rows])
        entropy = statistics.mean(r["entropy"] for r in cell_rows)
        summary.append({"model": name, "steps": steps, "time_grid": grid, "temperature": temperature,
                        "gen_ppl": m, "se": se, "entropy": entropy})  # fmt: skip
    paired = []
    for student in ("student", "student_ema"):
        ours = per_cell[(student, 8, time_grid, 1.0)]
        for grid in grids:
            diffs = [
                s["gen_ppl"] - t["gen_ppl"] for s, t in zip(ours, per_cell[("teacher", 64, grid, 1.0)], strict=True)
            ]
            label = f"{student} − teacher@64 ({grid} grid)"
            paired.append({"student": student, "teacher_grid": grid, "label": label, **paired_stats(diffs)})
        teacher_sweep = sweep(per_cell, "teacher", time_grid)
        if len(teacher_sweep) > 1:  # per seed: the teacher's gen-PPL at the student's entropy
            matched = [at_entropy(teacher_sweep, i, row["entropy"]) for i, row in enumerate(ours)]
            diffs = [row["gen_ppl"] - m for row, (m, _) in zip(ours, matched, strict=True)]
            label = f"{student} − teacher@64 at the student's entropy ({time_grid} grid)"
            paired.append({"student": student, "teacher_grid": time_grid, "label": label, **paired_stats(diffs),
                           "extrapolated": sum(out for _, out in matched)})  # fmt: skip
    student_sweep = sweep(per_cell, "student", time_grid)
    if len(student_sweep) > 1:  # per seed: the raw student's gen-PPL at the T = 1 teacher's entropy
        teacher = per_cell[("teacher", 64, time_grid, 1.0)]
        matched = [at_entropy(student_sweep, i, row["entropy"]) for i, row in enumerate(teacher)]
        diffs = [m - row["gen_ppl"] for row, (m, _) in zip(teacher, matched, strict=True)]
        label = f"student at the T = 1 teacher's entropy − teacher@64 ({time_grid} grid)"
        paired.append({"student": "student", "teacher_grid": time_grid, "label": label, **paired_stats(diffs),
                       "extrapolated": sum(out for _, out in matched)})  # fmt: skip
    return summary, paired


def reusable_rows(args: argparse.Namespace) -> dict[tuple[str, int, str, float, int], dict[str, Any]]:
    """(model, steps, grid, temperature, seed) → row of `--reuse`'s result at the same --num-samples: its teacher
    rows (every run of the bench shares the teacher), and its student rows when it is the same run."""
    if not args.reuse:
        return {}
    import json

    old = json.loads(Path(args.reuse).read_text(encoding="utf-8"))
    if old["settings"]["num_samples"] != args.num_samples:
        raise ValueError(f"--reuse {args.reuse}: num_samples={old['settings']['num_samples']}, not {args.num_samples}")
    same_run = old["settings"]["name"] == args.name
    return {(*cell_of(r), r["seed"]): r for r in old["rows"] if same_run or r["model"] == "teacher"}


def has_sweep(settings: dict[str, Any]) -> bool:
    return bool(settings["teacher_temperatures"] or settings["student_temperatures"])


def write_result(report: Path, result: dict[str, Any]) -> None:
    """The markdown report (+ its plot, same stem, with a temperature sweep); the raw rows go to the work dir."""
    settings = result["settings"]
    raw = Path(nfe_args([]).work_dir) / f"didi_seeds_{settings['name'].lower()}.json"
    write_json_atomic(raw, result, sort_keys=True)
    report.parent.mkdir(parents=True, exist_ok=True)
    write_markdown(report, result)
    if has_sweep(settings):
        plot_frontier(report.with_suffix(".png"), result)


def rebuild(path: Path, out: Path) -> dict[str, Any]:
    """Summary, paired differences, markdown and plot again from a saved result's rows (no sampling)."""
    import json

    result = json.loads(path.read_text(encoding="utf-8"))
    settings = {"student_temperatures": [], "teacher_temperatures": [], **result["settings"]}
    cells = list(dict.fromkeys(cell_of(r) for r in result["rows"]))
    summary, paired = summarize(result["rows"], cells, settings["time_grid"])
    result = {"rows": result["rows"], "summary": summary, "paired": paired, "settings": settings}
    write_result(out, result)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.from_json:
        return rebuild(Path(args.from_json), Path(args.out))
    torch.set_num_threads(args.threads)
    base = nfe_args([])  # the bench's teacher and evaluator settings
    teacher_ckpt = stage_teacher(base, Path(base.work_dir))[0]
    evaluator, _ = stage_evaluator(base)
    run = Path(base.work_dir) / f"distil_{args.name}"
    models = {
        "teacher": load_teacher(teacher_ckpt),
        "student": load_student(run, teacher_ckpt, use_ema=False),
        "student_ema": load_student(run, teacher_ckpt),
    }
    grids = grids_of(args.time_grid)
    cells: list[tuple[str, int, str, float]] = [
        ("student", 8, args.time_grid, 1.0),
        ("student_ema", 8, args.time_grid, 1.0),
    ]
    cells += [("teacher", 64, grid, 1.0) for grid in grids]
    cells += [("teacher", 64, args.time_grid, t) for t in args.teacher_temperatures if t != 1.0]
    cells += [("student", 8, args.time_grid, t) for t in args.student_temperatures if t != 1.0]
    rows: list[dict[str, Any]] = []
    done = reusable_rows(args)
    for seed in args.seeds:
        for name, steps, grid, temperature in cells:
            if (name, steps, grid, temperature, seed) in done:
                rows.append(done[(name, steps, grid, temperature, seed)])
                continue
            row = nfe_table({name: models[name]}, [steps], evaluator, args.num_samples, base.length, seed,
                            progress=False, time_grid=grid, temperature=temperature)[0]  # fmt: skip
            rows.append(row | {"seed": seed})
            print(
                f"seed {seed} {name}@{steps} {grid} T={temperature:g}: "
                f"gen-PPL {row['gen_ppl']:.3f} entropy {row['entropy']:.3f}"
            )
    summary, paired = summarize(rows, cells, args.time_grid)
    settings = {k: v for k, v in vars(args).items() if k not in ("from_json", "reuse")}
    result = {"rows": rows, "summary": summary, "paired": paired, "settings": settings}
    write_result(Path(args.out), result)
    return result


def write_markdown(path: Path, result: dict[str, Any]) -> None:
    st = result["settings"]
    lines = [
        f"# Student@8 against teacher@64 over sampling seeds: run {st['name']} (bench/didi_seeds.py)",
        "",
        f"{st['num_samples']} samples per cell and seed, seeds {st['seeds']}; the student on the {st['time_grid']} "
        "grid, the teacher on each grid. Gen-PPL under the bench's tiny GPT-2 evaluator.",
        "",
        "| model | steps | time grid | temperature | per seed | mean ± se | entropy |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in result["summary"]:
        key = (s["model"], s["steps"], s["time_grid"], s["temperature"])
        values = [r["gen_ppl"] for r in result["rows"] if cell_of(r) == key]
        lines.append(
            f"| {s['model']} | {s['steps']} | {s['time_grid']} | {s['temperature']:g} | "
            f"{', '.join(f'{v:.2f}' for v in values)} | {s['gen_ppl']:.2f} ± {s['se']:.2f} | {s['entropy']:.3f} |"
        )
    lines += ["", "Paired per-seed difference, student@8 − teacher@64 (negative: the student is better):", ""]
    for p in result["paired"]:
        if p.get("extrapolated"):  # a straight line far past the sweep's ends reads as anything: not reported
            lines.append(
                f"* {p['label']}: not read, the entropy lies outside the temperature sweep in {p['extrapolated']} "
                f"of {len(p['diffs'])} seeds (widen the sweep)"
            )
            continue
        lines.append(
            f"* {p['label']}: {p['mean_diff']:+.2f} ± {p['se']:.2f} "
            f"(per seed {', '.join(f'{d:+.2f}' for d in p['diffs'])})"
        )
    command = " ".join(
        [".venv/bin/python bench/didi_seeds.py", st["name"], "--time-grid", st["time_grid"], "--seeds"]
        + [str(s) for s in st["seeds"]]
        + ["--num-samples", str(st["num_samples"])]
        + [
            f"--{who}-temperatures " + " ".join(f"{t:g}" for t in st[f"{who}_temperatures"])
            for who in ("teacher", "student")
            if st[f"{who}_temperatures"]
        ]  # fmt: skip
    )
    if has_sweep(st):
        lines += ["", f"![gen-PPL against entropy over sampling temperatures]({path.with_suffix('.png').name})"]
    lines += ["", f"Reproduce: `{command}`."]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
