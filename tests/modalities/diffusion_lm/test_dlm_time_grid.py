"""The sampling time grid switch: "uniform" (spec §3, E7) and "cosine" (MaskGIT's), through every sampler."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modalities.diffusion_lm.didi_sampler import TwoStepStudentSampler
from modalities.diffusion_lm.discriminator import DiscriminatorReward, discriminator_from_teacher
from modalities.diffusion_lm.nfe_table import NFETableEvaluator
from modalities.diffusion_lm.rgas import rgas_schedule
from modalities.diffusion_lm.sampling import AncestralSampler, sampling_grid
from tests.modalities.diffusion_lm.test_didi import _policy, _prompts, _tiny_teacher
from tests.modalities.diffusion_lm.test_didi_multistep import _samples
from toolkit.config import load_config
from toolkit.evaluation import evaluate
from toolkit.train.runner import build_trainer, fit

MASK = 64
CONFIG = Path(__file__).resolve().parents[3] / "configs" / "diffusion_lm" / "tiny.yaml"


def test_cosine_grid_oracle() -> None:
    # t_i = 1e-5 + (1 − 1e-5)·cos(π/2 · i/4), by hand: cos = 1, 0.9238795325, 0.7071067812, 0.3826834324, 0.
    expected = [1.0, 0.9238802937, 0.7071097101, 0.3826896056, 1e-5]
    torch.testing.assert_close(sampling_grid(4, kind="cosine"), torch.tensor(expected, dtype=torch.float64),
                               atol=1e-9, rtol=0)  # fmt: skip
    assert torch.equal(sampling_grid(4), torch.linspace(1.0, 1e-5, 5, dtype=torch.float64))  # the default is E7's


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 200), st.sampled_from(["uniform", "cosine"]), st.floats(1e-6, 0.1))
def test_grids_run_strictly_down_from_one_to_t_min(num_steps: int, kind: str, t_min: float) -> None:
    grid = sampling_grid(num_steps, t_min, kind=kind)
    assert grid.shape == (num_steps + 1,) and grid.dtype == torch.float64
    assert float(grid[0]) == 1.0 and float(grid[-1]) == t_min
    assert torch.all(grid[1:] < grid[:-1])


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 200))
def test_cosine_unmasks_less_first_and_more_last_than_uniform(num_steps: int) -> None:
    cosine, uniform = sampling_grid(num_steps, kind="cosine"), sampling_grid(num_steps)
    first, last = (lambda g: float(g[0] - g[1])), (lambda g: float(g[-2] - g[-1]))
    assert first(cosine) < first(uniform) and last(cosine) > last(uniform)


def test_unknown_grid_is_rejected_by_name() -> None:
    with pytest.raises(ValueError, match="time_grid='linear'"):
        sampling_grid(4, kind="linear")
    teacher = _tiny_teacher()
    with pytest.raises(ValueError, match="time_grid"):
        AncestralSampler(teacher.log_probs_x0, teacher.schedule, MASK, time_grid="linear")
    with pytest.raises(ValueError, match="time_grid"):
        TwoStepStudentSampler(num_steps=4, time_grid="linear")
    with pytest.raises(ValueError, match="num_steps > 2"):
        TwoStepStudentSampler(num_steps=2, time_grid="cosine")  # the two-step rollout's times are 1 → τ → t0
    with pytest.raises(ValueError, match="teacher_time_grid"):
        DiscriminatorReward(discriminator_from_teacher(_tiny_teacher(), 1), teacher_time_grid="linear")
    with pytest.raises(ValueError, match="time_grid"):
        NFETableEvaluator(time_grid="linear")
    with pytest.raises(ValueError, match="time_grid"):
        rgas_schedule(8, time_grid="linear")


def test_cosine_sampling_fills_every_position_and_differs_from_uniform() -> None:
    teacher = _tiny_teacher(3)
    seen: list[torch.Tensor] = []
    original = teacher.log_probs_x0

    def recording(z: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        seen.append(torch.as_tensor(t).flatten()[0].double())
        return original(z, t)

    teacher.log_probs_x0 = recording  # type: ignore[method-assign]
    out = {}
    for kind in ("uniform", "cosine"):
        seen.clear()
        out[kind] = teacher.sample(6, 10, 4, torch.Generator().manual_seed(0), cache=False, time_grid=kind)
        assert not bool((out[kind] == MASK).any())
        torch.testing.assert_close(torch.stack(seen[:4]), sampling_grid(4, kind=kind)[:4], atol=1e-6, rtol=0)
    assert not torch.equal(out["uniform"], out["cosine"])


def test_student_rollout_follows_the_cosine_grid_and_rescores_exactly() -> None:
    policy = _policy(ema_decay=None)
    sampler = TwoStepStudentSampler(num_steps=5, time_grid="cosine")
    rollout = sampler.sample(policy, _prompts(3), 2, torch.Generator().manual_seed(0))
    expected = sampling_grid(5, 1e-3, kind="cosine").float()
    torch.testing.assert_close(rollout.data["t_path"], expected.expand(6, -1), atol=1e-6, rtol=0)
    torch.testing.assert_close(policy.log_probs(rollout), rollout.old_logprobs, atol=1e-4, rtol=0)


def _record_time_grids(model: Any) -> list[Any]:
    """Wrap model.sample to record the time_grid of every call; returns the (growing) list."""
    grids: list[Any] = []
    original = model.sample

    def recording(*args: Any, **kwargs: Any) -> torch.Tensor:
        grids.append(kwargs.get("time_grid"))
        return original(*args, **kwargs)

    model.sample = recording
    return grids


def test_teacher_real_rows_use_the_teacher_time_grid() -> None:
    samples, _ = _samples()
    teacher = _tiny_teacher(2)
    grids = _record_time_grids(teacher)
    reward = DiscriminatorReward(
        discriminator_from_teacher(_tiny_teacher(), 1), lr=1e-3, warmup_steps=0, real_source="teacher",
        teacher=teacher, teacher_num_steps=4, teacher_pool_size=6, teacher_pool_refresh=2, teacher_holdout_size=3,
        teacher_time_grid="cosine",
    )  # fmt: skip
    reward([None] * 4, samples)  # pool, held-out rows
    reward([None] * 4, samples)  # refresh
    fresh = DiscriminatorReward(discriminator_from_teacher(_tiny_teacher(), 1), lr=1e-3, real_source="teacher",
                                teacher=teacher, teacher_num_steps=4, teacher_time_grid="cosine")  # fmt: skip
    fresh([None] * 4, samples)  # fresh rows at every call
    assert len(grids) >= 4 and set(grids) == {"cosine"}


def test_rgas_schedule_takes_the_grid() -> None:
    plan = rgas_schedule(8, time_grid="cosine")
    assert torch.equal(plan.timesteps, sampling_grid(8, kind="cosine"))
    assert plan.num_tilt_steps == 4 and plan.guidance[:4] == rgas_schedule(8).guidance[:4]


def test_tiny_config_trains_and_evaluates_on_the_cosine_grid(tmp_path: Path) -> None:
    overrides = [
        f"trainer.run_dir={tmp_path}", "trainer.num_steps=1", "trainer.prompts_per_step=2", "sampler.num_steps=4",
        "sampler.time_grid=cosine", "eval.evaluator.time_grid=cosine", "eval.evaluator.steps=[4]",
        "eval.evaluator.num_samples=4", "eval.evaluator.batch_size=4", "eval.evaluator.evaluator_steps=2",
    ]  # fmt: skip
    config = load_config(CONFIG, overrides)
    trainer = build_trainer(config)
    checkpoint = fit(trainer)
    assert checkpoint is not None
    times = trainer.sampler.sample(trainer.policy, _prompts(1, 32), 2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(times.data["t_path"][0], sampling_grid(4, 1e-3, kind="cosine").float(), atol=1e-6,
                               rtol=0)  # fmt: skip
    out = tmp_path / "nfe.json"
    evaluate(config, checkpoint=str(checkpoint), output=str(out))
    rows = json.loads(out.read_text())["rows"]
    assert rows and {r["time_grid"] for r in rows} == {"cosine"}
    with pytest.raises(ValueError, match="time_grid"):
        build_trainer(load_config(CONFIG, [*overrides[:4], "sampler.time_grid=linear"]))


def test_protein_table_samples_on_the_grid() -> None:
    from modalities.diffusion_lm.protein.esm_teacher import build_tiny_protein_teacher
    from modalities.diffusion_lm.protein.evaluation import ProteinNFEEvaluator, protein_nfe_table

    teacher = build_tiny_protein_teacher(max_length=12)
    grids = _record_time_grids(teacher)
    reference = torch.full((20,), 1 / 20)
    rows = {
        kind: protein_nfe_table(
            {"teacher": teacher},
            [4],
            reference,
            num_samples=4,
            length=12,
            num_resamples=2,
            progress=False,
            time_grid=kind,
        )[0]  # fmt: skip
        for kind in ("uniform", "cosine")
    }
    assert rows["cosine"]["time_grid"] == "cosine" and rows["uniform"]["time_grid"] == "uniform"
    assert grids == ["uniform", "cosine"]
    with pytest.raises(ValueError, match="time_grid"):
        ProteinNFEEvaluator(time_grid="linear")
