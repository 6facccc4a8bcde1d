"""Protein evaluation: the exact generator likelihood of the shipped set, the bootstrap JS, the protein NFE table."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modalities.diffusion_lm.protein.data import (
    _STATES,
    generate_protein_like,
    load_sequences,
    protein_like_nll,
    protein_like_perplexity,
)
from modalities.diffusion_lm.protein.evaluation import ProteinNFEEvaluator, composition_js_bootstrap
from rewards.protein import metrics as M

CONFIG = Path(__file__).resolve().parents[3] / "configs" / "diffusion_lm" / "protein_tiny.yaml"
FLOOR = 1e-4


def _emission(state: int, letter: str) -> float:
    weights = _STATES[state][2]
    return max(weights.get(letter, 0.0) / sum(weights.values()), FLOOR)


def _transition(a: int, b: int) -> float:
    stay = _STATES[a][1]
    return stay if a == b else (1 - stay) / (len(_STATES) - 1)


def _brute_force_nll(sequence: str, min_length: int, max_length: int) -> float:
    """Sum over every hidden-state path (independent of the forward algorithm)."""
    length_p = 1 / (max_length - min_length + 1) if min_length <= len(sequence) <= max_length else FLOOR
    first_p = 1.0 if sequence[0] == "M" else FLOOR
    residues = sequence[1:]
    total = 0.0
    for path in itertools.product(range(len(_STATES)), repeat=len(residues)):
        p = 1 / len(_STATES)
        for position, (state, letter) in enumerate(zip(path, residues, strict=True)):
            if position:
                p *= _transition(path[position - 1], state)
            p *= _emission(state, letter)
        total += p
    return -math.log(length_p * first_p * (total if residues else 1.0))


def test_generator_nll_oracle() -> None:
    # "MA" with lengths 1..2: P = 1/2 (length) * 1 (leading M) * mean over states of P(A | state);
    # A has weight 6 of 33 in the helix state and is never emitted by strand or loop (floored to 1e-4).
    expected = -math.log(0.5 * (6 / 33 + FLOOR + FLOOR) / 3)
    assert protein_like_nll(["MA"], min_length=1, max_length=2)[0] == pytest.approx(expected, rel=1e-12)
    # a length outside the range, a missing leading M and an X each cost -log(floor)
    (inside,) = protein_like_nll(["MA"], min_length=1, max_length=2)
    (outside,) = protein_like_nll(["MA"], min_length=3, max_length=4)
    assert outside - inside == pytest.approx(-math.log(FLOOR) + math.log(0.5))
    assert protein_like_nll([""])[0] == pytest.approx(-math.log(FLOOR))


@settings(max_examples=30, deadline=None)
@given(st.text(alphabet="MALVGPXW", min_size=1, max_size=6))
def test_generator_nll_is_the_sum_over_hidden_paths(sequence: str) -> None:
    assert protein_like_nll([sequence], min_length=2, max_length=5)[0] == pytest.approx(
        _brute_force_nll(sequence, 2, 5), rel=1e-9
    )


def test_generator_perplexity_ranks_real_over_scrambled() -> None:
    sequences = load_sequences()
    fresh = [r.sequence for r in generate_protein_like(200, seed=7)]
    generator = torch.Generator().manual_seed(0)
    scrambled = ["M" + "".join(s[1:][i] for i in torch.randperm(len(s) - 1, generator=generator)) for s in sequences]
    real = protein_like_perplexity(sequences)
    # fresh draws of the same chain score like the shipped set; destroying the segment structure costs
    assert protein_like_perplexity(fresh) == pytest.approx(real, rel=0.1)
    assert protein_like_perplexity(scrambled) > 1.3 * real
    assert protein_like_perplexity([s[:10] for s in sequences]) > 1.3 * real  # lengths outside 20..44
    assert math.isnan(protein_like_perplexity([]))
    with pytest.raises(ValueError, match="floor"):
        protein_like_nll(["MA"], floor=0.0)


def test_composition_bootstrap() -> None:
    sequences = load_sequences()
    reference = M.amino_acid_composition(sequences)
    value, se = composition_js_bootstrap(sequences, reference, num_resamples=300)
    assert value == pytest.approx(0.0, abs=1e-12)  # a set against its own composition
    assert 0 < se < 0.01  # resampled sets differ a little
    value_small, se_small = composition_js_bootstrap(sequences[:10], reference, num_resamples=300)
    assert value_small > value and se_small > se  # fewer sequences: further off and noisier
    assert composition_js_bootstrap(["XXX"], reference) == (1.0, 0.0)  # no standard residue: the maximum
    assert math.isnan(composition_js_bootstrap(sequences, reference, num_resamples=0)[1])
    # a resample drawing only the residue-free sequence scores the maximum (1 bit) too, about a quarter of them here
    value_one, se_mixed = composition_js_bootstrap(["XXX", sequences[0]], reference, num_resamples=400)
    assert value_one < 0.5 and se_mixed > 0.3


def test_generator_ppl_only_by_default_for_the_shipped_set(tmp_path: Path) -> None:
    from modalities.diffusion_lm.protein.fasta import FastaRecord, write_fasta

    fasta = tmp_path / "real.fasta"
    write_fasta(fasta, [FastaRecord(id=f"p{i}", sequence=s) for i, s in enumerate(load_sequences()[:20])])
    assert ProteinNFEEvaluator().generator_ppl is True
    assert ProteinNFEEvaluator(reference_path=str(fasta)).generator_ppl is False
    assert ProteinNFEEvaluator(reference_path=str(fasta), generator_ppl=True).generator_ppl is True


def test_protein_eval_prints_the_table_and_selects_by_composition(tmp_path: Path) -> None:
    from toolkit.config import load_config
    from toolkit.evaluation import evaluate
    from toolkit.train.eval_hook import BestCheckpoint
    from toolkit.train.runner import build_trainer, fit

    small = ["eval.evaluator.steps=[2,4]", "eval.evaluator.num_samples=8", "eval.evaluator.batch_size=8"]
    config = load_config(
        CONFIG,
        [
            f"trainer.run_dir={tmp_path}",
            "trainer.num_steps=2",
            "trainer.prompts_per_step=2",
            "trainer.group_size=2",
            "trainer.eval_every=1",
            "trainer.eval_metric=composition_js/student_ema@2",
            "trainer.eval_mode=min",
            *small,
        ],
    )
    checkpoint = fit(build_trainer(config))
    best = BestCheckpoint.read(tmp_path)
    assert best is not None and best["step"] in (1, 2)
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [row["eval/composition_js/student_ema@2"] for row in history if "eval/composition_js/student_ema@2" in row]
    assert len(logged) == 2 and best["value"] == pytest.approx(min(logged))

    out = tmp_path / "protein_nfe.json"
    report = evaluate(config, checkpoint=str(checkpoint), output=str(out))
    assert "protein NFE table" in report.table() and "student_ema" in report.table()
    rows = json.loads(out.read_text())["rows"]
    assert {(r["model"], r["steps"]) for r in rows} == {
        (m, n) for m in ("teacher", "student", "student_ema") for n in (2, 4)
    }
    for row in rows:
        assert 0 <= row["composition_js_bits"] <= 1 and row["generator_ppl"] > 1 and row["seconds"] > 0
    metrics = report.metrics()
    assert metrics["composition_js/teacher@4"] == pytest.approx(
        next(r["composition_js_bits"] for r in rows if (r["model"], r["steps"]) == ("teacher", 4))
    )
    with pytest.raises(ValueError, match="steps"):
        ProteinNFEEvaluator(steps=[])
