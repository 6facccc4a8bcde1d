"""The protein NFE table: teacher vs DiDi student per step count with the CPU protein metrics and wall-clock.

The protein counterpart of `modalities.diffusion_lm.nfe_table`: each cell samples `num_samples` sequences with
ancestral sampling (timed), decodes them to residue strings and scores the set with `rewards.protein.metrics`
(pooled composition JS to a reference set in bits, with a bootstrap standard error because it is a noisy set
statistic; validity; mean length; diversity) and, for models of the shipped protein-like set, the generator
perplexity (`protein_like_perplexity`, exact because the data's generative chain is known).
`ProteinNFEEvaluator` is the `eval.evaluator` hook (`renorm eval`, and `trainer.eval_every` checkpoint
selection through its report's metrics()).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from modalities.diffusion_lm.masked_diffusion import MaskedDiffusionLM
from modalities.diffusion_lm.nfe_table import NFETableReport, evaluation_models, sample_timed
from modalities.diffusion_lm.protein.data import load_sequences, protein_like_perplexity
from modalities.diffusion_lm.protein.tokenizer import Layout, ProteinVocab
from modalities.diffusion_lm.sampling import check_time_grid
from modalities.diffusion_lm.text_data import split_items
from rewards.protein import metrics as M
from toolkit.io.atomic import write_json_atomic

DEFAULT_PROTEIN_STEPS = (8, 16, 32, 64)


def composition_js_bootstrap(
    sequences: Sequence[str], reference: torch.Tensor, num_resamples: int = 200, seed: int = 0
) -> tuple[float, float]:
    """(pooled composition JS in bits, its bootstrap standard error over resampled sequence sets).

    JS of the residue-pooled composition against `reference` [20]; the error resamples the sequences with
    replacement `num_resamples` times (0: NaN). A set with no standard residue scores JS 1 bit (the maximum).
    """
    counts = M.amino_acid_counts(sequences)
    if float(counts.sum()) == 0:
        return 1.0, 0.0
    value = float(M.composition_divergence(counts.sum(0) / counts.sum(), reference, units="bits"))
    if num_resamples <= 0 or len(sequences) < 2:
        return value, float("nan")
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(sequences), (num_resamples, len(sequences)), generator=generator)
    pooled = counts[picks].sum(1)  # [B, 20]
    totals = pooled.sum(-1, keepdim=True)
    resampled = M.composition_divergence(pooled / totals.clamp_min(1), reference, units="bits")
    resampled = torch.where(totals[:, 0] > 0, resampled, torch.ones_like(resampled))  # no residue: 1 bit, as above
    return value, float(resampled.std())


def protein_row(
    sequences: Sequence[str], reference: torch.Tensor, generator_ppl: bool, num_resamples: int = 200
) -> dict[str, float]:
    """The metric columns of one NFE-table cell."""
    js, js_se = composition_js_bootstrap(sequences, reference, num_resamples)
    row = {
        "composition_js_bits": js,
        "composition_js_se": js_se,
        "validity": M.validity_rate(sequences),
        "mean_length": sum(map(len, sequences)) / max(len(sequences), 1),
        "mean_pairwise_identity": M.mean_pairwise_identity(sequences),
        "distinct_3mer": M.distinct_kmer_fraction(sequences, 3),
    }
    if generator_ppl:
        row["generator_ppl"] = protein_like_perplexity(sequences)
    return row


def protein_nfe_table(
    models: Mapping[str, MaskedDiffusionLM],
    steps: Mapping[str, Sequence[int]] | Sequence[int],
    reference: torch.Tensor,
    num_samples: int = 128,
    length: int = 48,
    layout: Layout = "compact",
    seed: int = 0,
    batch_size: int = 32,
    generator_ppl: bool = False,
    num_resamples: int = 200,
    progress: bool = True,
    time_grid: str = "uniform",
) -> list[dict[str, Any]]:
    """One row per (model, steps): the `protein_row` metrics, seconds, samples_per_s, nfe, on `time_grid`."""
    from rich.progress import Progress

    vocab = ProteinVocab.from_layout(layout)
    plan = [(name, n) for name in models for n in (steps[name] if isinstance(steps, Mapping) else steps)]
    rows: list[dict[str, Any]] = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("protein NFE table", total=len(plan))
        for name, num_steps in plan:
            ids, seconds, forwards = sample_timed(
                models[name], num_samples, length, num_steps, seed, batch_size, time_grid=time_grid
            )
            sequences = vocab.decode_batch(ids)
            rows.append(
                {
                    "model": name,
                    "steps": num_steps,
                    **protein_row(sequences, reference, generator_ppl, num_resamples),
                    "seconds": seconds,
                    "samples_per_s": num_samples / seconds,
                    "nfe": forwards / max(1, -(-num_samples // batch_size)),
                    "time_grid": time_grid,
                }
            )
            bar.update(task, advance=1, description=f"protein NFE table: {name} @ {num_steps}")
    return rows


class ProteinNFEReport(NFETableReport):
    """What `renorm eval` prints for a protein DiDi config, and the metrics() checkpoint selection reads.

    metrics(): composition_js (bits), generator_ppl, validity and mean_length per <model>@<steps>.
    """

    METRICS = (
        ("composition_js", "composition_js_bits"),
        ("generator_ppl", "generator_ppl"),
        ("validity", "validity"),
        ("mean_length", "mean_length"),
    )
    COLUMNS = ("composition_js_bits", "composition_js_se", "generator_ppl", "validity", "mean_length", "seconds")

    def print_to(self, console: Any) -> None:
        from rich.table import Table

        table = Table(title="protein NFE table")
        columns = [c for c in self.COLUMNS if any(c in row for row in self.rows)]
        for column in ("model", "steps", *columns):
            table.add_column(column, justify="left" if column == "model" else "right")
        for row in self.rows:
            table.add_row(str(row["model"]), str(row["steps"]), *(f"{row.get(c, float('nan')):.4f}" for c in columns))
        console.print(table)


class ProteinNFEEvaluator:
    """`eval.evaluator` hook for protein DiDi configs: teacher vs student (and EMA) per step count.

    Args:
        steps: step counts.
        num_samples, length, batch_size, seed: sequences per cell, row length, per sampler call, sampling seed.
        layout: the protein vocabulary layout of the models ("compact" or "esm").
        reference_path: FASTA of the reference set whose composition is the target (default: the shipped set);
            `reference_split` picks its "train" part (what the teacher learned), "valid" or "all".
        generator_ppl: also report the generator perplexity; None (default) reports it only for the shipped
            protein-like set (no `reference_path`), the only data whose generating chain is known.
        num_resamples: bootstrap resamples of the composition JS standard error.
        use_ema, include_teacher, time_grid: as in `NFETableEvaluator`.
    """

    def __init__(
        self,
        steps: Sequence[int] = DEFAULT_PROTEIN_STEPS,
        num_samples: int = 128,
        length: int = 48,
        batch_size: int = 32,
        seed: int = 0,
        layout: Layout = "compact",
        reference_path: str | None = None,
        reference_split: str = "train",
        generator_ppl: bool | None = None,
        num_resamples: int = 200,
        use_ema: bool = True,
        include_teacher: bool = True,
        time_grid: str = "uniform",
    ) -> None:
        if not steps or min(steps) < 1:
            raise ValueError(f"steps must be a non-empty list of positive step counts, got {list(steps)}")
        self.time_grid = check_time_grid(time_grid)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.steps, self.num_samples, self.length, self.batch_size = list(steps), num_samples, length, batch_size
        self.seed, self.layout = seed, layout
        self.generator_ppl = reference_path is None if generator_ppl is None else generator_ppl
        self.num_resamples, self.use_ema, self.include_teacher = num_resamples, use_ema, include_teacher
        self.reference = M.amino_acid_composition(split_items(load_sequences(reference_path), reference_split, 0.1))

    def __call__(
        self, policy: Any, checkpoint: str | None = None, output: str | None = None, **_: Any
    ) -> ProteinNFEReport:
        models = evaluation_models(policy, checkpoint, self.use_ema, self.include_teacher, type(self).__name__)
        rows = protein_nfe_table(
            models,
            self.steps,
            self.reference,
            self.num_samples,
            self.length,
            self.layout,
            self.seed,
            self.batch_size,
            self.generator_ppl,
            self.num_resamples,
            time_grid=self.time_grid,
        )
        report = ProteinNFEReport(rows)
        if output:
            write_json_atomic(output, report.to_json(), sort_keys=True)
        return report
