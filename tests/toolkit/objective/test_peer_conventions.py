"""TRL and verl loss conventions as explicit `PolicyObjective` / term options, on hand-computed cases.

Peers read: TRL f2cd57710ae345ea6428ae95363267fcf38a3dc8 (trl/trainer/grpo_trainer.py `_compute_loss`: the
`grpo` loss is a mean over every row, `dr_grpo` divides by rows × `max_completion_length`, `cispo` caps the IS
weight at `epsilon_high`), verl b178a3cd56f58b2d502255daba591e92833930a7 (verl/trainer/ppo/core_algos.py:
`compute_policy_loss_vanilla` dual-clips at `clip_ratio_c` = 3 by default, `compute_policy_loss_gspo` clamps the
sequence log-ratio at 10, `compute_policy_loss_cispo` bounds the IS weight below at 1 − `clip_ratio_low`;
`agg_loss` leaves fully masked rows out of the `seq-mean-*` denominators). Our defaults stay as they were.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from toolkit.objective.aggregation import aggregate_loss
from toolkit.objective.policy_objective import PolicyObjective
from toolkit.objective.terms import CISPOTerm, ClipTerm

# Three rows, on-policy (ratio 1, so the clip loss is −A per step); row 1 is fully masked, as TRL's
# `mask_truncated_completions` leaves a truncated completion.
MASK = torch.tensor([[True, True], [False, False], [True, False]])
ADVANTAGES = torch.tensor([1.0, 5.0, -3.0])
LOGPROBS = torch.full((3, 2), -1.0)


def on_policy_loss(**options: object) -> float:
    objective = PolicyObjective(**options)  # type: ignore[arg-type]
    return float(objective(LOGPROBS, LOGPROBS, ADVANTAGES, MASK).loss)


@pytest.mark.parametrize(
    ("options", "ours", "trl"),
    [
        # rows: (−1 − 1)/2 = −1, row 1 empty, 3/1 = 3 -> sum 2; / 2 non-empty rows vs / 3 rows
        ({"aggregation": "seq_mean_token_mean"}, 2 / 2, 2 / 3),
        # row sums −2 and 3 -> 1; / (2 · 4) vs TRL dr_grpo / (3 rows · max_completion_length 4)
        ({"aggregation": "seq_mean_token_sum_norm", "norm_length": 4.0}, 1 / 8, 1 / 12),
        ({"aggregation": "seq_mean_token_sum"}, 1 / 2, 1 / 3),
        # token mean: (−1 − 1 + 3) / 3 tokens either way (TRL's dapo/bnpo count tokens, not rows)
        ({"aggregation": "token_mean"}, 1 / 3, 1 / 3),
    ],
)
def test_fully_masked_rows_count_only_with_count_empty_rows(
    options: dict[str, object], ours: float, trl: float
) -> None:
    assert on_policy_loss(**options) == pytest.approx(ours, abs=1e-6)
    assert on_policy_loss(**options, count_empty_rows=True) == pytest.approx(trl, abs=1e-6)
    assert float(aggregate_loss(-ADVANTAGES[:, None].expand(3, 2), MASK, "seq_mean_token_mean")) == pytest.approx(1.0)


def test_count_empty_rows_needs_the_global_row_count_and_accumulates_exactly() -> None:
    objective = PolicyObjective(aggregation="seq_mean_token_mean", count_empty_rows=True)
    with pytest.raises(ValueError, match="num_rows"):
        objective(LOGPROBS, LOGPROBS, ADVANTAGES, MASK, num_tokens=3.0, num_seqs=2.0)
    with pytest.raises(ValueError, match="num_rows=2.0 is smaller"):
        objective(LOGPROBS, LOGPROBS, ADVANTAGES, MASK, num_seqs=2.0, num_rows=2.0)
    # Two micro-batches (rows {0, 1} and {2}) with the global count 3 sum to the whole batch's 2/3.
    parts = [
        objective(LOGPROBS[rows], LOGPROBS[rows], ADVANTAGES[rows], MASK[rows], num_seqs=2.0, num_rows=3.0).loss
        for rows in ([0, 1], [2])
    ]
    assert float(sum(parts)) == pytest.approx(2 / 3, abs=1e-6)
    with pytest.raises(ValueError, match="count_empty_rows"):
        PolicyObjective(count_empty_rows="yes")  # type: ignore[arg-type]


def test_verl_dual_clip_three_is_an_option() -> None:
    """A = −1, ρ = 5: PPO clip keeps max(5, 1.2) = 5; verl's default c = 3 bounds it at −c·A = 3."""
    logprobs = torch.tensor([[math.log(5.0)]], requires_grad=True)
    old, mask, advantages = torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), torch.tensor([-1.0])
    plain = PolicyObjective(term=ClipTerm())(logprobs, old, advantages, mask)
    dual = PolicyObjective(term=ClipTerm(dual_clip=3.0))(logprobs, old, advantages, mask)
    assert plain.loss.item() == pytest.approx(5.0, rel=1e-6) and dual.loss.item() == pytest.approx(3.0)
    assert dual.metrics["policy/dual_clip_frac"] == 1.0
    (grad,) = torch.autograd.grad(dual.loss, logprobs)
    assert float(grad) == 0.0  # the dual-clipped branch is a constant


@pytest.mark.parametrize(("log_ratio", "clamped"), [(12.0, 10.0), (0.5, 0.5), (-12.0, -12.0)])
def test_verl_gspo_sequence_log_ratio_bound(log_ratio: float, clamped: float) -> None:
    """A = −1, both steps at log-ratio x: the sequence ratio is e^x; verl bounds it above at e^10 only."""
    logprobs = torch.full((1, 2), log_ratio, requires_grad=True)
    old, mask, advantages = torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), torch.tensor([-1.0])
    term = ClipTerm(clip_low=3e-4, clip_high=4e-4)
    verl = PolicyObjective(term=term, ratio_level="sequence", log_ratio_clamp=None, sequence_log_ratio_clamp=10.0)
    ours = PolicyObjective(term=term, ratio_level="sequence", log_ratio_clamp=None)
    expected = max(math.exp(clamped), 1 - 3e-4)  # max(−A·s, −A·clip(s)) for A = −1
    assert verl(logprobs, old, advantages, mask).loss.item() == pytest.approx(expected, rel=1e-5)
    assert ours(logprobs, old, advantages, mask).loss.item() == pytest.approx(
        max(math.exp(log_ratio), 1 - 3e-4), rel=1e-5
    )
    (grad,) = torch.autograd.grad(verl(logprobs, old, advantages, mask).loss, logprobs)
    assert bool((grad == 0).all()) == (log_ratio > 10.0 or log_ratio < 0)  # above the bound, or clipped below


def test_sequence_bound_needs_the_sequence_level() -> None:
    with pytest.raises(ValueError, match="ratio_level='sequence'"):
        PolicyObjective(sequence_log_ratio_clamp=10.0)
    with pytest.raises(ValueError, match="sequence_log_ratio_clamp"):
        PolicyObjective(ratio_level="sequence", sequence_log_ratio_clamp=0.0)


@pytest.mark.parametrize(
    ("term", "ratio", "weight"),
    [
        (CISPOTerm(clip_low=None, clip_high=0.28), 0.5, 0.5),  # ours / the paper: no lower bound
        (CISPOTerm(clip_low=0.2, clip_high=0.2), 0.5, 0.8),  # verl: clip_ratio_low = clip_ratio_high = 0.2
        (CISPOTerm(clip_low=0.2, clip_high=0.2), 1.5, 1.2),
        (CISPOTerm(clip_low=None, clip_high=4.0), 7.0, 5.0),  # TRL: min(ρ, epsilon_high = 5), no lower bound
    ],
)
def test_cispo_weight_bounds(term: CISPOTerm, ratio: float, weight: float) -> None:
    """l = −sg(w)·A·log π with A = 1, log π = −1: the loss is the clipped IS weight w itself."""
    logprobs = torch.tensor([[-1.0]])
    old = logprobs - math.log(ratio)
    out = PolicyObjective(term=term)(logprobs, old, torch.tensor([1.0]), torch.ones(1, 1, dtype=torch.bool))
    assert float(out.loss) == pytest.approx(weight, rel=1e-5)


def test_the_trainer_gives_count_empty_rows_its_row_count(tmp_path: Path) -> None:
    """`count_empty_rows` needs the global row count: the trainer passes it, and with no empty row the loss is the
    one the non-empty rows give (the same weights after a step)."""
    from tests.demo_run import tiny_config
    from toolkit.train.runner import build_trainer, fit

    weights = []
    for name, flag in (("rows", "true"), ("seqs", "false")):
        overrides = ["trainer.num_steps=1", "objective.aggregation=seq_mean_token_mean"]
        trainer = build_trainer(tiny_config(tmp_path / name, *overrides, f"+objective.count_empty_rows={flag}"))
        fit(trainer)
        weights.append({k: v.clone() for k, v in trainer.policy.module.state_dict().items()})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
