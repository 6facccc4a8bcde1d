"""Sampling temperature of the masked-diffusion samplers: softmax(log x_θ / T), the spec's T = 1 by default."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modalities.diffusion_lm.evaluation import unigram_entropy
from modalities.diffusion_lm.nfe_table import nfe_table
from modalities.diffusion_lm.sampling import AncestralSampler, check_temperature, temper
from modalities.diffusion_lm.schedules import LogLinearSchedule
from tests.modalities.diffusion_lm.test_didi import _tiny_teacher

MASK = 64


def test_temper_oracle_keeps_the_mask_impossible() -> None:
    # x_θ = (0.5, 0.25, 0.25, mask 0); T = 0.5 squares it: (0.25, 0.0625, 0.0625) / 0.375 = (2/3, 1/6, 1/6).
    log_probs = torch.tensor([0.5, 0.25, 0.25, 0.0]).log()
    tempered = temper(log_probs, 0.5).exp()
    torch.testing.assert_close(tempered, torch.tensor([2 / 3, 1 / 6, 1 / 6, 0.0]))
    # T = 2 takes square roots: (√.5, .5, .5) / (√.5 + 1).
    root = math.sqrt(0.5)
    torch.testing.assert_close(temper(log_probs, 2.0).exp(), torch.tensor([root, 0.5, 0.5, 0.0]) / (root + 1.0))
    assert temper(log_probs, 1.0) is log_probs  # the spec's sampler, untouched


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.05, 0.95), st.floats(1.05, 5.0))
def test_temper_normalises_keeps_the_argmax_and_orders_entropy(seed: int, cold: float, hot: float) -> None:
    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(seed)) * 3
    logits[:, 2] = -math.inf  # a SUBS mask column
    log_probs = torch.log_softmax(logits, dim=-1)

    def entropy(lp: torch.Tensor) -> torch.Tensor:
        return -(lp.exp() * lp.nan_to_num(neginf=0.0)).sum(-1)

    for temperature in (cold, hot):
        tempered = temper(log_probs, temperature)
        torch.testing.assert_close(tempered.exp().sum(-1), torch.ones(3))
        assert torch.equal(tempered.argmax(-1), log_probs.argmax(-1))
        assert torch.all(tempered[:, 2] == -math.inf)
    assert torch.all(entropy(temper(log_probs, cold)) <= entropy(log_probs) + 1e-5)
    assert torch.all(entropy(log_probs) <= entropy(temper(log_probs, hot)) + 1e-5)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, True, "0.5"])
def test_bad_temperature_is_rejected_by_name(bad: object) -> None:
    with pytest.raises(ValueError, match="teacher_temperature must be a finite number > 0"):
        check_temperature(bad, "teacher_temperature")  # type: ignore[arg-type]
    teacher = _tiny_teacher()
    with pytest.raises(ValueError, match="temperature"):
        AncestralSampler(teacher.log_probs_x0, teacher.schedule, MASK, temperature=bad)  # type: ignore[arg-type]


def _fixed_denoiser(probs: torch.Tensor):  # type: ignore[no-untyped-def]
    """log x_θ [B, L, V] the same at every step: position l prefers token l % 3 with probability probs[0]."""

    def log_probs_fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = torch.full((*z.shape, 5), -math.inf)
        for position in range(z.shape[1]):
            out[:, position, :4] = probs.roll(position % 3).log()
        return out

    return log_probs_fn


def test_cold_sampler_picks_the_argmax_and_hot_sampler_spreads() -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])  # mask id 4
    z = torch.full((200, 6), 4)
    argmax = torch.tensor([position % 3 for position in range(6)])
    samples = {}
    for temperature in (0.01, 1.0, 10.0):
        sampler = AncestralSampler(_fixed_denoiser(probs), LogLinearSchedule(), 4, temperature=temperature)
        samples[temperature] = sampler.sample(z, 4, torch.Generator().manual_seed(0))
    assert torch.equal(samples[0.01], argmax.expand(200, 6))
    hit = {temperature: float((ids == argmax).float().mean()) for temperature, ids in samples.items()}
    assert 0.3 < hit[1.0] < 0.5  # x_θ's own 0.4
    assert hit[10.0] < hit[1.0]  # nearer 1/4


def test_model_sample_default_is_the_spec_sampler_and_temperature_lowers_entropy() -> None:
    teacher = _tiny_teacher(2)
    draw = lambda **kw: teacher.sample(64, 12, 8, torch.Generator().manual_seed(5), **kw)  # noqa: E731
    assert torch.equal(draw(), draw(temperature=1.0))
    cold, hot = draw(temperature=0.2), draw(temperature=3.0)
    assert not torch.equal(cold, draw()) and bool((cold != MASK).all())
    assert float(unigram_entropy(cold).mean()) < float(unigram_entropy(draw()).mean())
    assert float(unigram_entropy(draw()).mean()) < float(unigram_entropy(hot).mean())


class _CountingEvaluator:
    def perplexity_of_ids(self, ids: torch.Tensor) -> float:
        return float(ids.float().mean())


def test_nfe_table_takes_a_per_model_temperature() -> None:
    models = {"teacher": _tiny_teacher(1), "student": _tiny_teacher(1)}
    rows = nfe_table(models, [4], _CountingEvaluator(), 16, 12, seed=3, progress=False,  # type: ignore[arg-type]
                     temperature={"teacher": 0.3})  # fmt: skip
    by_model = {r["model"]: r for r in rows}
    assert by_model["teacher"]["temperature"] == 0.3 and by_model["student"]["temperature"] == 1.0
    # the same weights and seed: only the temperature separates the two cells
    assert by_model["teacher"]["entropy"] < by_model["student"]["entropy"]
    with pytest.raises(ValueError, match=r"temperature names \['techer'\]"):
        nfe_table(models, [4], _CountingEvaluator(), 4, 12, progress=False, temperature={"techer": 0.3})  # type: ignore[arg-type]
