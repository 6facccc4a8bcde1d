"""The NFE table of few-step distillation: teacher vs student gen-PPL, entropy and speed per step count.

Spec docs/methods/didi_instruct.md §13, §15 (paper table: 8/16/32/64/128 steps). Each cell samples `num_samples`
sequences with ancestral sampling, scores them with a causal-LM evaluator (token-weighted gen-PPL, first EOS
counted) and the unigram entropy, and times the sampling wall-clock. Results print as a rich table and are
written as JSON atomically.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from modalities.diffusion_lm.evaluation import CausalLMEvaluator, unigram_entropy
from modalities.diffusion_lm.masked_diffusion import MaskedDiffusionLM
from modalities.diffusion_lm.sampling import TIME_GRIDS, check_temperature, check_time_grid
from toolkit.io.atomic import write_json_atomic

DEFAULT_STEPS = (8, 16, 32, 64, 128)


def sample_timed(
    model: MaskedDiffusionLM,
    num_samples: int,
    length: int,
    num_steps: int,
    seed: int = 0,
    batch_size: int = 32,
    cache: bool = True,
    time_grid: str = "uniform",
    temperature: float = 1.0,
) -> tuple[torch.Tensor, float, int]:
    """(ids [num_samples, length], sampling seconds, denoiser forwards) of ancestral sampling with `model`."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    rows, forwards = [], 0
    model.eval()
    start = time.perf_counter()
    for first in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - first)
        ids = model.sample(
            count, length, num_steps, generator, cache=cache, time_grid=time_grid, temperature=temperature
        )
        rows.append(ids.cpu())
        forwards += model.last_num_forward
    return torch.cat(rows), time.perf_counter() - start, forwards


def teacher_apart(names: Sequence[str], temperature: float, teacher_temperature: float | None) -> dict[str, float]:
    """Per-model temperatures for `nfe_table`: `temperature` for every name, `teacher_temperature` (when set) for
    "teacher"."""
    chosen = {name: temperature for name in names}
    if teacher_temperature is not None and "teacher" in chosen:
        chosen["teacher"] = teacher_temperature
    return chosen


def nfe_table(
    models: Mapping[str, MaskedDiffusionLM],
    steps: Mapping[str, Sequence[int]] | Sequence[int],
    evaluator: CausalLMEvaluator,
    num_samples: int = 64,
    length: int = 64,
    seed: int = 0,
    batch_size: int = 32,
    cache: bool = True,
    progress: bool = True,
    time_grid: str = "uniform",
    temperature: float | Mapping[str, float] = 1.0,
) -> list[dict[str, Any]]:
    """One row per (model, steps): gen_ppl, entropy, seconds, samples_per_s, nfe (denoiser forwards per sample).

    Args:
        models: name → model (e.g. {"teacher": ..., "student": ...}).
        steps: step counts for every model, or per model name.
        evaluator: the causal-LM evaluator (token ids are scored directly: the evaluator shares the tokenizer).
        num_samples, length: sequences per cell and their length.
        seed: sampling seed (the same for every cell).
        batch_size: sequences per sampler call.
        cache: skip forwards when nothing changed (MDLM caching; it lowers the teacher's real NFE).
        progress: show a progress bar.
        time_grid: every cell's sampling grid, "uniform" (the spec's) or "cosine"; each row records it.
        temperature: sampling temperature for every model, or per model name (missing names: 1, the spec's);
            each row records it. E.g. {"teacher": 0.9} compares a student with a teacher of matched entropy.
    """
    from rich.progress import Progress

    plan = [(name, n) for name in models for n in (steps[name] if isinstance(steps, Mapping) else steps)]
    if isinstance(temperature, Mapping) and set(temperature) - set(models):
        raise ValueError(f"temperature names {sorted(set(temperature) - set(models))}, not models {sorted(models)}")
    temperatures = {name: temperature.get(name, 1.0) if isinstance(temperature, Mapping) else temperature
                    for name in models}  # fmt: skip
    rows: list[dict[str, Any]] = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("NFE table", total=len(plan))
        for name, num_steps in plan:
            ids, seconds, forwards = sample_timed(
                models[name], num_samples, length, num_steps, seed, batch_size, cache, time_grid, temperatures[name]
            )
            rows.append(
                {
                    "model": name,
                    "steps": num_steps,
                    "gen_ppl": evaluator.perplexity_of_ids(ids),
                    "entropy": float(unigram_entropy(ids).mean()),
                    "seconds": seconds,
                    "samples_per_s": num_samples / seconds,
                    "nfe": forwards / max(1, -(-num_samples // batch_size)),
                    "time_grid": time_grid,
                    "temperature": temperatures[name],
                }
            )
            bar.update(task, advance=1, description=f"NFE table: {name} @ {num_steps}")
    return rows


def print_nfe_table(rows: Sequence[Mapping[str, Any]], title: str = "NFE table") -> None:
    """Rich table of `nfe_table` rows."""
    from rich.console import Console

    print_nfe_table_to(Console(), rows, title)


def load_student(run: str | Path, teacher_checkpoint: str | Path, use_ema: bool = True) -> MaskedDiffusionLM:
    """A DiDi student from a Trainer run (its latest checkpoint) or checkpoint directory, on the teacher's architecture.

    The Trainer saves the student backbone as the model weights and the EMA copy under `policy_state`.
    """
    from modalities.diffusion_lm.teacher import load_teacher
    from toolkit.io.checkpoint import load_checkpoint
    from toolkit.io.resume import resolve_resume

    resolved = resolve_resume(str(run), Path(run))
    if resolved is None:
        raise ValueError(f"no student checkpoint at {run}")
    state = load_checkpoint(resolved)
    student = load_teacher(teacher_checkpoint)
    weights = state.model
    ema = state.objects.get("policy_state", {}).get("ema") if use_ema else None
    student.backbone.load_state_dict(ema if ema is not None else weights)
    return student.eval()


def add_nfe_table_parser(sub: Any) -> None:
    """`renorm dlm nfe-table`: teacher vs DiDi student over step counts."""
    p = sub.add_parser("nfe-table", help="Gen-PPL / entropy / speed of a teacher (and a DiDi student) per step count.")
    p.set_defaults(func=cmd_nfe_table)
    p.add_argument("--teacher", required=True, help="teacher checkpoint or run directory (train-teacher)")
    p.add_argument("--student", help="DiDi run directory or checkpoint (renorm train configs/diffusion_lm/...)")
    p.add_argument("--no-ema", action="store_true", help="evaluate the raw student instead of its EMA")
    p.add_argument("--evaluator", help="a causal LM directory (save_pretrained) sharing the corpus tokenizer")
    p.add_argument("--evaluator-steps", type=int, default=300, help="without --evaluator: train a tiny GPT-2")
    p.add_argument("--steps", type=int, nargs="+", default=list(DEFAULT_STEPS))
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-grid", default="uniform", choices=TIME_GRIDS, help="sampling time grid (spec: uniform)")
    p.add_argument("--temperature", type=float, default=1.0, help="every model's sampling temperature (spec: 1)")
    p.add_argument(
        "--teacher-temperature", type=float, help="the teacher's alone (default: --temperature), e.g. to match entropy"
    )
    p.add_argument("--out", help="write the rows as JSON here")


def cmd_nfe_table(args: Any) -> int:
    """Build the models and the evaluator, print the NFE table, optionally write JSON."""
    from modalities.diffusion_lm.teacher import load_teacher

    evaluator = build_evaluator(args.evaluator, args.length, args.evaluator_steps)
    models = {"teacher": load_teacher(args.teacher)}
    if args.student:
        models["student"] = load_student(args.student, args.teacher, use_ema=not args.no_ema)
    temperature = teacher_apart(list(models), args.temperature, args.teacher_temperature)
    rows = nfe_table(
        models, args.steps, evaluator, args.num_samples, args.length, args.seed,
        time_grid=args.time_grid, temperature=temperature,
    )  # fmt: skip
    temps = ", ".join(f"{name} T={t:g}" for name, t in temperature.items())
    print_nfe_table(rows, title=f"NFE table ({args.time_grid} time grid; {temps})")
    if args.out:
        write_json_atomic(
            args.out, {"rows": rows, "settings": {k: v for k, v in vars(args).items() if k != "func"}}, sort_keys=True
        )
    return 0


class NFETableReport:
    """What `renorm eval` prints for a DiDi config: the NFE table (rows as in `nfe_table`).

    `METRICS` names the (metric prefix, row key) pairs metrics() reports per row; subclasses for other tables
    change it and `print_to`.
    """

    METRICS: tuple[tuple[str, str], ...] = (("gen_ppl", "gen_ppl"), ("entropy", "entropy"))

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def print_to(self, console: Any) -> None:
        print_nfe_table_to(console, self.rows)

    def table(self) -> str:
        import io

        from rich.console import Console

        console = Console(record=True, width=140, file=io.StringIO())
        self.print_to(console)
        return console.export_text()

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def metrics(self) -> dict[str, float]:
        """{"<prefix>/<model>@<steps>"} per row and METRICS pair, e.g. gen_ppl/student_ema@8 (trainer.eval_metric)."""
        out: dict[str, float] = {}
        for row in self.rows:
            cell = f"{row['model']}@{row['steps']}"
            out.update({f"{name}/{cell}": float(row[key]) for name, key in self.METRICS if key in row})
        return out


def print_nfe_table_to(console: Any, rows: Sequence[Mapping[str, Any]], title: str = "NFE table") -> None:
    """`print_nfe_table` onto a given rich console."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("model", "steps", "nfe", "gen_ppl", "entropy", "seconds", "samples_per_s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        values = (row["nfe"], row["gen_ppl"], row["entropy"], row["seconds"], row["samples_per_s"])
        table.add_row(str(row["model"]), str(row["steps"]), *(f"{v:.3f}" for v in values))
    console.print(table)


class NFETableEvaluator:
    """`eval.evaluator` hook: `renorm eval CONFIG --checkpoint DIR` prints teacher vs student per step count.

    The policy is a `StudentPolicy`; its teacher and its student (the checkpoint's weights, or the EMA copy
    stored in the checkpoint's policy state when `use_ema`) are sampled at every step count.

    Args:
        steps: step counts (the paper: 8, 16, 32, 64, 128).
        num_samples, length, batch_size, seed: sequences per cell, their length, per sampler call, sampling seed.
        evaluator_model: a causal-LM directory (`save_pretrained`) sharing the corpus tokenizer; None trains a
            tiny GPT-2 on the shipped corpus for `evaluator_steps` steps (the CPU stand-in for GPT-2 Large).
        use_ema: evaluate the EMA student when the checkpoint has one (during training: the live EMA copy).
        include_teacher: sample the teacher too (false for evaluation during training, where it never changes).
        time_grid: the sampling grid, "uniform" (the spec's) or "cosine"; match `sampler.time_grid` when the
            student is trained on the cosine grid.
        temperature: every model's sampling temperature (`sampling.temper`; 1, the spec's, samples x_θ as is).
        teacher_temperature: the teacher's alone (None: `temperature`), e.g. to sample it at the student's entropy.

    The report's metrics() give gen_ppl/<model>@<steps> and entropy/<model>@<steps>, e.g. for
    `trainer.eval_every: 50`, `eval_metric: gen_ppl/student_ema@8`, `eval_mode: min` (checkpoint selection).
    """

    def __init__(
        self,
        steps: Sequence[int] = DEFAULT_STEPS,
        num_samples: int = 64,
        length: int = 32,
        batch_size: int = 32,
        seed: int = 0,
        evaluator_model: str | None = None,
        evaluator_steps: int = 300,
        use_ema: bool = True,
        include_teacher: bool = True,
        time_grid: str = "uniform",
        temperature: float = 1.0,
        teacher_temperature: float | None = None,
    ) -> None:
        if not steps or min(steps) < 1:
            raise ValueError(f"steps must be a non-empty list of positive step counts, got {list(steps)}")
        self.time_grid = check_time_grid(time_grid)
        self.temperature = check_temperature(temperature)
        self.teacher_temperature = (
            None if teacher_temperature is None else check_temperature(teacher_temperature, "teacher_temperature")
        )
        self.steps, self.num_samples, self.length = list(steps), num_samples, length
        self.batch_size, self.seed, self.use_ema = batch_size, seed, use_ema
        self.evaluator_model, self.evaluator_steps = evaluator_model, evaluator_steps
        self.include_teacher = include_teacher
        self._built: CausalLMEvaluator | None = None

    def __call__(
        self, policy: Any, checkpoint: str | None = None, output: str | None = None, **_: Any
    ) -> NFETableReport:
        models = evaluation_models(policy, checkpoint, self.use_ema, self.include_teacher, type(self).__name__)
        rows = nfe_table(
            models,
            self.steps,
            self._evaluator(),
            self.num_samples,
            self.length,
            self.seed,
            self.batch_size,
            time_grid=self.time_grid,
            temperature=teacher_apart(list(models), self.temperature, self.teacher_temperature),
        )
        report = NFETableReport(rows)
        if output:
            write_json_atomic(output, report.to_json(), sort_keys=True)
        return report

    def _evaluator(self) -> CausalLMEvaluator:
        if self._built is None:  # trained (or loaded) once, then reused by every evaluation of a training run
            self._built = build_evaluator(self.evaluator_model, self.length, self.evaluator_steps)
        return self._built


def evaluation_models(
    policy: Any, checkpoint: str | None, use_ema: bool, include_teacher: bool, who: str = "the NFE table"
) -> dict[str, MaskedDiffusionLM]:
    """The models an NFE-table hook samples: teacher (unless not included), student, and the EMA student.

    During training (`checkpoint` None) the EMA student is the policy's live EMA copy; from a checkpoint it is
    the EMA weights stored in the checkpoint's policy state (when there are any).
    """
    import copy

    models = {"teacher": policy.teacher, "student": policy.student}
    if checkpoint is None and use_ema and getattr(policy, "ema", None) is not None:
        models["student_ema"] = policy.ema_model()
    if checkpoint is not None and use_ema:
        from toolkit.io.checkpoint import load_checkpoint

        ema = load_checkpoint(Path(checkpoint)).objects.get("policy_state", {}).get("ema")
        if ema is not None:
            models["student_ema"] = copy.deepcopy(policy.student)
            models["student_ema"].backbone.load_state_dict(ema)
    if not include_teacher:
        models.pop("teacher")
    elif models["teacher"] is None:
        raise ValueError(f"{who} needs the policy's teacher (StudentPolicy(teacher=...))")
    return models


def build_evaluator(model_dir: str | None, length: int, train_steps: int) -> CausalLMEvaluator:
    """The gen-PPL evaluator: a saved causal LM sharing the corpus tokenizer, or a tiny GPT-2 trained on the corpus."""
    from modalities.diffusion_lm.evaluation import build_tiny_gpt2, train_tiny_causal_lm
    from modalities.diffusion_lm.text_data import TokenDataset, build_text_tokenizer, collate_input_ids

    tokenizer = build_text_tokenizer()
    if model_dir:
        from transformers import AutoModelForCausalLM

        model: Any = AutoModelForCausalLM.from_pretrained(model_dir)
    else:
        model = build_tiny_gpt2(len(tokenizer), max_length=length)
        data = TokenDataset(seq_len=length, tokenizer=tokenizer, seed=1)
        train_tiny_causal_lm(model, (collate_input_ids(rows) for rows in data.batches(32)), train_steps)
    return CausalLMEvaluator(model, tokenizer, batch_size=64, max_length=length)
