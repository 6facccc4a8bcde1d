"""The NFE table of few-step distillation: teacher vs student gen-PPL, entropy and speed per step count.

Spec didi_instruct.md §13, §15 (paper table: 8/16/32/64/128 steps). Each cell samples `num_samples`
sequences with ancestral sampling, scores them with a causal-LM evaluator (token-weighted gen-PPL, first EOS
counted) and the unigram entropy, and times the sampling wall-clock. Results print as a rich table and are
written as JSON atomically.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from modalities.diffusion_lm.evaluation import CausalLMEvaluator, unigram_entropy
from modalities.diffusion_lm.masked_diffusion import MaskedDiffusionLM

DEFAULT_STEPS = (8, 16, 32, 64, 128)


def sample_timed(
    model: MaskedDiffusionLM,
    num_samples: int,
    length: int,
    num_steps: int,
    seed: int = 0,
    batch_size: int = 32,
    cache: bool = True,
) -> tuple[torch.Tensor, float, int]:
    """(ids [num_samples, length], sampling seconds, denoiser forwards) of ancestral sampling with `model`."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    rows, forwards = [], 0
    model.eval()
    start = time.perf_counter()
    for first in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - first)
        rows.append(model.sample(count, length, num_steps, generator, cache=cache).cpu())
        forwards += model.last_num_forward
    return torch.cat(rows), time.perf_counter() - start, forwards


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
    """
    from rich.progress import Progress

    plan = [(name, n) for name in models for n in (steps[name] if isinstance(steps, Mapping) else steps)]
    rows: list[dict[str, Any]] = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("NFE table", total=len(plan))
        for name, num_steps in plan:
            ids, seconds, forwards = sample_timed(models[name], num_samples, length, num_steps, seed, batch_size, cache)
            rows.append(
                {
                    "model": name,
                    "steps": num_steps,
                    "gen_ppl": evaluator.perplexity_of_ids(ids),
                    "entropy": float(unigram_entropy(ids).mean()),
                    "seconds": seconds,
                    "samples_per_s": num_samples / seconds,
                    "nfe": forwards / max(1, -(-num_samples // batch_size)),
                }
            )
            bar.update(task, advance=1, description=f"NFE table: {name} @ {num_steps}")
    return rows


def print_nfe_table(rows: Sequence[Mapping[str, Any]], title: str = "NFE table") -> None:
    """Rich table of `nfe_table` rows."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("model", "steps", "nfe", "gen_ppl", "entropy", "seconds", "samples_per_s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        table.add_row(
            str(row["model"]),
            str(row["steps"]),
            f"{row['nfe']:.1f}",
            f"{row['gen_ppl']:.3f}",
            f"{row['entropy']:.3f}",
            f"{row['seconds']:.2f}",
            f"{row['samples_per_s']:.1f}",
        )
    Console().print(table)


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Write JSON through a temp file and a rename (readers never see a partial file)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    temp.write_text(json.dumps(payload, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(temp, target)
