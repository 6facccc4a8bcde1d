"""Masked-diffusion core: schedules (E1), ancestral step (E2), SUBS, sampler invariants, DiT, teacher, checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TypeVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modalities.diffusion_lm.backbone import DenoiserBackbone
from modalities.diffusion_lm.checkpoint_io import load_mdlm_checkpoint, save_mdlm_checkpoint
from modalities.diffusion_lm.dit import DiT, DiTConfig, count_parameters
from modalities.diffusion_lm.masked_diffusion import MaskedDiffusionLM, antithetic_times, corrupt, subs_log_probs
from modalities.diffusion_lm.sampling import (
    AncestralSampler,
    ancestral_q,
    ancestral_step,
    denoise_final,
    sample_categorical,
    sampling_grid,
)
from modalities.diffusion_lm.schedules import CosineSchedule, LinearSchedule, LogLinearSchedule, make_schedule
from modalities.diffusion_lm.teacher import evaluate_nelbo, load_teacher, lr_factor, train_teacher
from modalities.diffusion_lm.text_data import TokenDataset, build_text_tokenizer, collate_input_ids
from modalities.diffusion_lm.tiny import build_tiny_dit, build_tiny_teacher

V, MASK = 65, 64
ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def randomized(model: ModuleT, seed: int = 0, std: float = 0.3) -> ModuleT:
    """Give the zero-initialised adaLN/output layers non-zero weights so tests see a non-trivial model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


# ------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    ("t", "alpha", "sigma"),
    [(1.0, 0.001, 6.907755), (0.5, 0.5005, 0.692148), (0.25, 0.75025, 0.287349), (1e-5, 0.99999, 1.0e-5)],
)
def test_e1_loglinear_schedule(t: float, alpha: float, sigma: float) -> None:
    schedule = LogLinearSchedule(eps=1e-3)
    tt = torch.tensor([t], dtype=torch.float32)
    assert schedule.alpha(tt).item() == pytest.approx(alpha, abs=1e-5)
    assert schedule.sigma(tt).item() == pytest.approx(sigma, abs=1e-5, rel=1e-4)
    assert schedule.dalpha(tt).item() == pytest.approx(-(1 - 1e-3), abs=1e-7)


@pytest.mark.parametrize("schedule", [LogLinearSchedule(), LinearSchedule(), CosineSchedule()], ids=type)
def test_schedule_derivative_and_endpoints(schedule: LogLinearSchedule) -> None:
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    h = 1e-6
    numeric = (schedule.alpha(t + h) - schedule.alpha(t - h)) / (2 * h)
    torch.testing.assert_close(schedule.dalpha(t), numeric, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(schedule.sigma(t), -torch.log(schedule.alpha(t)))
    assert schedule.alpha(torch.tensor(0.0, dtype=torch.float64)).item() == pytest.approx(1.0, abs=1e-3)
    assert bool((schedule.loss_weight(t) > 0).all())


def test_make_schedule_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="loglinear"):
        make_schedule("geometric")


def test_sampling_grid_matches_e7() -> None:
    grid = sampling_grid(8)
    expected = [1, 0.875001, 0.750003, 0.625004, 0.500005, 0.375006, 0.250007, 0.125009, 1e-5]
    torch.testing.assert_close(grid, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------- ancestral step


def test_e2_ancestral_q() -> None:
    schedule = LogLinearSchedule(eps=1e-3)
    alpha_t, alpha_s = schedule.alpha(torch.tensor([0.5])), schedule.alpha(torch.tensor([0.25]))
    p_x0 = torch.tensor([[[0.7, 0.2, 0.1, 0.0]]])
    q = ancestral_q(p_x0, alpha_t, alpha_s, mask_id=3)
    torch.testing.assert_close(q[0, 0], torch.tensor([0.174825, 0.049950, 0.024975, 0.24975]), atol=1e-6, rtol=0)
    assert q.sum().item() == pytest.approx(0.4995, abs=1e-6)
    normalised = q[0, 0] / q.sum()
    torch.testing.assert_close(normalised, torch.tensor([0.35, 0.10, 0.05, 0.50]), atol=1e-5, rtol=0)


@settings(deadline=None, max_examples=25)
@given(st.floats(0.01, 0.99), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1), st.integers(2, 6), st.integers(0, 5))
def test_ancestral_normaliser_is_one_minus_alpha_t(t: float, frac: float, seed: int, vocab: int, mask_pos: int) -> None:
    mask_id = mask_pos % vocab
    schedule = LogLinearSchedule()
    s = t * frac
    logits = torch.randn(2, 3, vocab, generator=torch.Generator().manual_seed(seed))
    p_x0 = subs_log_probs(logits, torch.full((2, 3), mask_id), mask_id).exp()
    q = ancestral_q(p_x0, schedule.alpha(torch.tensor(t)), schedule.alpha(torch.tensor(s)), mask_id)
    torch.testing.assert_close(q.sum(-1), torch.full((2, 3), 1 - schedule.alpha(t).item()), atol=1e-5, rtol=0)


def test_sample_categorical_frequencies() -> None:
    q = torch.tensor([0.174825, 0.049950, 0.024975, 0.24975]).expand(40000, 4)
    draws = sample_categorical(q, torch.Generator().manual_seed(0))
    freqs = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(freqs, torch.tensor([0.35, 0.10, 0.05, 0.50]), atol=0.01, rtol=0)


def test_unmasked_tokens_never_change_and_mask_never_sampled_at_alpha_one() -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randint(0, MASK, (4, 16), generator=gen)
    z[:, ::2] = MASK
    p_x0 = subs_log_probs(torch.randn(4, 16, V, generator=gen), z, MASK).exp()
    out = ancestral_step(z, p_x0, 0.3, 0.6, MASK, gen)
    keep = z != MASK
    assert torch.equal(out[keep], z[keep])
    assert (out[~keep] == MASK).any() and (out[~keep] != MASK).any()
    final = ancestral_step(z, p_x0, 0.3, 1.0, MASK, gen)
    assert not (final == MASK).any()
    assert torch.equal(final[keep], z[keep])


def test_denoise_final_modes() -> None:
    z = torch.tensor([[MASK, 5, MASK]])
    p_x0 = torch.zeros(1, 3, V)
    p_x0[..., 7], p_x0[..., MASK] = 0.6, 0.4
    assert torch.equal(denoise_final(z, p_x0, MASK, mode="argmax"), torch.tensor([[7, 5, 7]]))
    assert torch.equal(denoise_final(z, p_x0, MASK, torch.Generator().manual_seed(0)), torch.tensor([[7, 5, 7]]))
    assert torch.equal(denoise_final(z, p_x0, MASK, mode="none"), z)
    with pytest.raises(ValueError, match="argmax"):
        denoise_final(z, p_x0, MASK, mode="greedy")


# ------------------------------------------------------------------------------------- SUBS, corrupt


def test_subs_carry_over_and_zero_mask_mass() -> None:
    logits = torch.randn(2, 5, V, generator=torch.Generator().manual_seed(1))
    logits[..., MASK] = 50.0
    z = torch.tensor([[3, MASK, 7, MASK, MASK], [MASK, 1, 2, 3, 4]])
    log_probs = subs_log_probs(logits, z, MASK)
    probs = log_probs.exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 5))
    assert probs[..., MASK].max().item() == 0.0
    unmasked = z != MASK
    assert torch.equal(log_probs[unmasked].argmax(-1), z[unmasked])
    assert torch.all(log_probs[unmasked].gather(-1, z[unmasked][:, None]) == 0)
    expected = torch.log_softmax(logits[0, 1, :MASK], -1)
    torch.testing.assert_close(log_probs[0, 1, :MASK], expected)


def test_corrupt_mask_rate() -> None:
    x = torch.zeros(4, 5000, dtype=torch.long)
    alpha = torch.tensor([1.0, 0.0, 0.25, 0.9])
    z, masked = corrupt(x, alpha, MASK, torch.Generator().manual_seed(0))
    assert torch.equal(z == MASK, masked)
    rates = masked.float().mean(-1)
    torch.testing.assert_close(rates, 1 - alpha, atol=0.02, rtol=0)
    assert rates[0] == 0 and rates[1] == 1


def test_antithetic_times_cover_the_interval() -> None:
    t = antithetic_times(8, torch.Generator().manual_seed(0))
    assert t.min() >= 1e-3 and t.max() <= 1
    gaps = torch.sort(t).values.diff()
    torch.testing.assert_close(gaps, torch.full((7,), (1 - 1e-3) / 8), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ DiT


def test_dit_protocol_shapes_and_presets() -> None:
    dit = build_tiny_dit()
    assert isinstance(dit, DenoiserBackbone) and dit.mask_id == MASK and len(dit.blocks) == 2
    tokens, sigma = torch.randint(0, V, (3, 32)), torch.rand(3)
    assert dit(tokens, sigma).shape == (3, 32, V) and dit(tokens, sigma).dtype == torch.float32
    assert dit.features(tokens, sigma).shape == (3, 32, 64)
    with torch.device("meta"):
        small = DiT(DiTConfig.preset("small", vocab_size=50258))
    assert 169e6 < count_parameters(small) < 170e6  # spec §4: ≈169M
    with pytest.raises(ValueError, match="huge"):
        DiTConfig.preset("huge", vocab_size=10)


def test_soft_tokens_equal_hard_tokens_for_scaled_one_hots() -> None:
    dit = randomized(build_tiny_dit())
    tokens, sigma = torch.randint(0, V, (2, 12)), torch.rand(2)
    soft = torch.nn.functional.one_hot(tokens, V).float() * 1e9
    torch.testing.assert_close(dit(soft, sigma), dit(tokens, sigma), atol=1e-5, rtol=1e-5)


def test_time_conditioning_zeroes_sigma_only_when_off() -> None:
    dit = randomized(build_tiny_dit())
    z = torch.full((2, 8), MASK)
    off, on = MaskedDiffusionLM(dit), MaskedDiffusionLM(dit, time_conditioning=True)
    torch.testing.assert_close(off.log_probs_x0(z, 0.3), off.log_probs_x0(z, 0.9))
    assert not torch.allclose(on.log_probs_x0(z, 0.3), on.log_probs_x0(z, 0.9))


def test_bf16_autocast_path_gives_float32_log_probs() -> None:
    model = build_tiny_teacher(mixed_precision="bf16")
    randomized(model.backbone)
    z = torch.randint(0, V, (2, 16))
    log_probs = model.log_probs_x0(z, 0.5)
    assert log_probs.dtype == torch.float32 and torch.isfinite(log_probs).all()
    assert torch.isfinite(model.nelbo(z, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="bf16"):
        build_tiny_teacher(mixed_precision="fp8")


# ------------------------------------------------------------------------------------------- sampling


def test_cache_gives_identical_samples_with_fewer_forwards() -> None:
    model = build_tiny_teacher()
    randomized(model.backbone)
    cached = model.sample(3, 8, 64, torch.Generator().manual_seed(5), cache=True)
    nfe_cached = model.last_num_forward
    plain = model.sample(3, 8, 64, torch.Generator().manual_seed(5), cache=False)
    assert torch.equal(cached, plain)
    assert model.last_num_forward == 64 + 0 or model.last_num_forward <= 65
    assert nfe_cached < model.last_num_forward
    assert not (cached == MASK).any()


def test_block_sampling_and_prefix() -> None:
    model = build_tiny_teacher()
    randomized(model.backbone)
    prefix = torch.tensor([1, 2, 3])
    out = model.sample(2, 16, 4, torch.Generator().manual_seed(0), block_size=4, cache=False, prefix=prefix)
    assert not (out == MASK).any() and torch.equal(out[:, :3], prefix.expand(2, 3))
    assert model.last_num_forward <= 4 * (4 + 1) and model.last_num_forward >= 4 * 4


def test_block_sampler_fills_blocks_left_to_right() -> None:
    seen: list[torch.Tensor] = []

    def log_probs_fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(z.clone())
        return subs_log_probs(torch.zeros(*z.shape, V), z, MASK)

    sampler = AncestralSampler(log_probs_fn, LogLinearSchedule(), MASK, cache=False)
    sampler.sample(torch.full((1, 8), MASK), 2, torch.Generator().manual_seed(0), block_size=4)
    for z in seen[:2]:  # while the first block is generated the second stays fully masked
        assert (z[:, 4:] == MASK).all()
    assert (seen[-1][:, :4] != MASK).all()


# ---------------------------------------------------------------------------------- data and teacher


def test_tokenizer_and_dataset_resume() -> None:
    tokenizer = build_text_tokenizer()
    assert tokenizer.mask_token_id == len(tokenizer) - 1
    ids = tokenizer.encode("the cat chased the dog .", add_special_tokens=False)
    assert tokenizer.decode(ids) == "the cat chased the dog ."
    data = TokenDataset(seq_len=16, seed=3)
    data.next_batch(5)
    state = data.state_dict()
    expected = data.next_batch(7)
    data.load_state_dict(state)
    assert data.next_batch(7) == expected
    assert all(len(row["input_ids"]) == 16 for row in expected)
    with pytest.raises(ValueError, match="valid"):
        TokenDataset(split="test")


def test_nelbo_decreases_and_teacher_checkpoint_resumes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tokenizer = build_text_tokenizer()
    model = build_tiny_teacher(len(tokenizer), seed=0, max_length=16)
    data = TokenDataset(seq_len=16, tokenizer=tokenizer)
    chunks = collate_input_ids(data.next_batch(8))
    before = evaluate_nelbo(model, chunks, num_repeats=2)
    result = train_teacher(model, data, 15, lr=1e-2, batch_size=8, run_dir=tmp_path, warmup_steps=3, progress=False)
    after = evaluate_nelbo(model, chunks, num_repeats=2)
    assert math.isfinite(before) and after < before - 0.3
    assert result.checkpoint is not None and result.step == 15
    reloaded = load_teacher(tmp_path)
    z = torch.full((2, 16), reloaded.mask_id)
    torch.testing.assert_close(reloaded.log_probs_x0(z, 0.5), model.eval().log_probs_x0(z, 0.5))
    resumed = train_teacher(
        load_teacher(tmp_path).train(), data, 17, lr=1e-2, batch_size=8, run_dir=tmp_path, progress=False
    )
    assert resumed.step == 17 and len(resumed.history) == 2


def test_mdlm_checkpoint_round_trip(tmp_path: Path) -> None:
    dit = randomized(build_tiny_dit(seed=2))
    path = tmp_path / "mdlm.ckpt"
    save_mdlm_checkpoint(dit, path)
    loaded = load_mdlm_checkpoint(path, num_heads=2, max_length=32, dropout=0.0).eval()
    assert loaded.config.hidden_size == 64 and loaded.config.cond_dim == 16 and len(loaded.blocks) == 2
    tokens, sigma = torch.randint(0, V, (2, 10)), torch.rand(2)
    torch.testing.assert_close(loaded(tokens, sigma), dit(tokens, sigma))
    torch.save({"state_dict": {"backbone." + k: v for k, v in dit.state_dict().items()}, "cfg": Path("x")}, path)
    with pytest.raises(ValueError, match=r"pathlib\.\w*Path.*not loaded .*could run code"):
        load_mdlm_checkpoint(path, num_heads=2)  # a class outside the data containers: never unpickled
    torch.save({"state_dict": {"model.foo": torch.zeros(1)}}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="vocab_embed"):
        load_mdlm_checkpoint(tmp_path / "bad.ckpt")


def test_ancestral_q_per_row_alphas_match_a_loop() -> None:
    gen = torch.Generator().manual_seed(3)
    p_x0 = torch.softmax(torch.randn(3, 4, 6, generator=gen), -1)
    alpha_t, alpha_s = torch.tensor([0.1, 0.4, 0.7]), torch.tensor([0.3, 0.5, 0.95])
    batched = ancestral_q(p_x0, alpha_t, alpha_s, mask_id=2)
    for row in range(3):
        single = ancestral_q(p_x0[row : row + 1], float(alpha_t[row]), float(alpha_s[row]), mask_id=2)
        torch.testing.assert_close(batched[row : row + 1], single)


def run_dlm(argv: list[str]) -> int:
    """Parse `renorm dlm ...` arguments with only this plugin registered (no other modality imports)."""
    import argparse

    from modalities.diffusion_lm.cli import register

    parser = argparse.ArgumentParser(prog="renorm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_train_teacher_and_sample(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags = "--hidden-size 32 --num-blocks 1 --num-heads 2 --cond-dim 8 --seq-len 16 --batch-size 4 --warmup-steps 1"
    run_dir = tmp_path / "teacher"
    assert run_dlm(["dlm", "train-teacher", str(run_dir), *flags.split(), "--num-steps", "2", "--no-progress"]) == 0
    assert "held-out NELBO" in capsys.readouterr().out
    assert (run_dir / "summary.json").is_file() and (run_dir / "checkpoints" / "step_00000002").is_dir()
    for grid in ("uniform", "cosine"):
        sample = ["dlm", "sample", str(run_dir), "--num-samples", "2", "--length", "8", "--num-steps", "4"]
        assert run_dlm([*sample, "--time-grid", grid]) == 0
        assert len(capsys.readouterr().out.strip().splitlines()) == 2
    out = tmp_path / "samples.jsonl"
    assert (
        run_dlm(["dlm", "sample", str(run_dir), "--num-samples", "3", "--batch-size", "2", "--output", str(out)]) == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(len(row["input_ids"]) == 16 for row in rows)
    table = tmp_path / "nfe.json"
    nfe = ["dlm", "nfe-table", "--teacher", str(run_dir), "--steps", "2", "4", "--num-samples", "4", "--length", "16"]
    assert run_dlm([*nfe, "--evaluator-steps", "2", "--out", str(table)]) == 0
    assert "NFE table" in capsys.readouterr().out
    assert [(r["model"], r["steps"]) for r in json.loads(table.read_text())["rows"]] == [("teacher", 2), ("teacher", 4)]
    assert run_dlm([*nfe, "--evaluator-steps", "2", "--out", str(table), "--time-grid", "cosine"]) == 0
    assert "cosine time grid" in capsys.readouterr().out
    assert {r["time_grid"] for r in json.loads(table.read_text())["rows"]} == {"cosine"}
    assert run_dlm([*nfe, "--evaluator-steps", "2", "--out", str(table), "--teacher-temperature", "0.7"]) == 0
    assert "teacher T=0.7" in capsys.readouterr().out
    assert {r["temperature"] for r in json.loads(table.read_text())["rows"]} == {0.7}
    assert run_dlm([*sample, "--temperature", "0.5"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        run_dlm([*sample, "--temperature", "0"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("# bad\nnum_step: 3\n")
    with pytest.raises(ValueError, match="did you mean 'num_steps'"):
        run_dlm(["dlm", "train-teacher", str(run_dir), "--config", str(bad)])


def test_teacher_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    def fresh() -> tuple[MaskedDiffusionLM, TokenDataset]:
        model = build_tiny_teacher(74, seed=1, hidden_size=32, num_blocks=1, num_heads=2, cond_dim=8, max_length=16)
        return model, TokenDataset(seq_len=16, seed=2)

    settings = {"lr": 1e-2, "batch_size": 4, "warmup_steps": 2, "progress": False}
    straight, data = fresh()
    train_teacher(straight, data, 4, **settings)  # type: ignore[arg-type]
    first, data = fresh()
    train_teacher(first, data, 2, run_dir=tmp_path, **settings)  # type: ignore[arg-type]
    resumed, data = fresh()
    result = train_teacher(resumed, data, 4, run_dir=tmp_path, **settings)  # type: ignore[arg-type]
    assert result.step == 4 and len(result.history) == 2
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_nelbo_matches_a_per_token_loop() -> None:
    model = build_tiny_teacher()
    randomized(model.backbone)
    x = torch.randint(0, MASK, (3, 6), generator=torch.Generator().manual_seed(4))
    loss = model.nelbo(x, torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(9)  # replay the same draws: t, then the corruption noise
    t = antithetic_times(3, gen)
    alpha = model.schedule.alpha(t)
    z, masked = corrupt(x, alpha, MASK, gen)
    log_probs = model.log_probs_x0(z, t).detach()
    total = 0.0
    for b in range(3):
        for i in range(6):
            if masked[b, i]:
                total += -float(log_probs[b, i, x[b, i]]) * (1 - 1e-3) / (1 - float(alpha[b]))
    assert loss.item() == pytest.approx(total / x.numel(), rel=1e-5)


def test_time_conditioned_sampling_never_caches() -> None:
    model = build_tiny_teacher(time_conditioning=True)
    randomized(model.backbone)
    model.sample(2, 4, 16, torch.Generator().manual_seed(0), cache=True)
    assert model.last_num_forward >= 16


def test_sampler_with_the_exact_denoiser_recovers_a_joint_distribution() -> None:
    """Two positions, three tokens: ancestral sampling with the exact x0-posterior reproduces p(x1, x2) as N grows,
    while one step gives the product of the marginals."""
    joint = torch.tensor([[0.30, 0.05, 0.05], [0.0, 0.25, 0.05], [0.1, 0.0, 0.2]])
    mask = 3

    def exact_log_probs(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond1 = torch.cat([joint.T, joint.sum(1, keepdim=True).T])[z[:, 1]]  # p(x1 | z2) [B, 3]
        cond2 = torch.cat([joint, joint.sum(0, keepdim=True)])[z[:, 0]]  # p(x2 | z1) [B, 3]
        probs = torch.stack([cond1 / cond1.sum(-1, keepdim=True), cond2 / cond2.sum(-1, keepdim=True)], dim=1)
        logits = torch.cat([probs, torch.zeros(*probs.shape[:2], 1)], -1).clamp_min(1e-30).log()
        return subs_log_probs(logits, z, mask)

    def empirical(num_steps: int) -> torch.Tensor:
        sampler = AncestralSampler(exact_log_probs, LogLinearSchedule(), mask, cache=False)
        x = sampler.sample(torch.full((8000, 2), mask), num_steps, torch.Generator().manual_seed(0))
        return torch.bincount(x[:, 0] * 3 + x[:, 1], minlength=9).reshape(3, 3).float() / 8000

    assert (empirical(64) - joint).abs().max() < 0.015
    product = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    assert (empirical(1) - product).abs().max() < 0.015


def test_teacher_lr_schedules() -> None:
    assert [lr_factor(s, 4, 20) for s in (0, 3, 4, 19)] == [0.25, 1.0, 1.0, 1.0]
    assert lr_factor(4, 4, 20, "linear") == 1.0 and lr_factor(20, 4, 20, "linear") == pytest.approx(0.1)
    assert lr_factor(12, 4, 20, "linear", min_ratio=0.0) == pytest.approx(0.5)
    assert lr_factor(12, 4, 20, "cosine", min_ratio=0.0) == pytest.approx(0.5)
    assert lr_factor(20, 4, 20, "cosine") == pytest.approx(0.1)
    with pytest.raises(ValueError, match="cosine"):
        lr_factor(0, 1, 2, "step")
