"""The text-reasoning recipes, exercised through their YAML: docs/methods/bnpo.md E1–E8 and docs/methods/dler.md D1–D6
on hand-made rollouts
fed to the objects each recipe builds, degenerate batches, the correct-sample boost, dynamic sampling in the
trainer, one training step of the tiny recipes, and reproduction (a): BNPO with α = β = 1.5 forced equals
π/8 × GRPO with the population std on real rollouts of the tiny policy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import toolkit.advantages.beta as beta_module
from toolkit.advantages.batch import GroupMeanBatchStdNormalizer
from toolkit.advantages.beta import BetaNormalizer
from toolkit.advantages.boost import CorrectSampleBoost
from toolkit.advantages.group import GroupNormalizer
from toolkit.cli import main as renorm
from toolkit.config import instantiate, load_config, merge_configs
from toolkit.reward_transforms.dler import DifficultyTiers, TruncationPenalty
from toolkit.rollout import Rollout
from toolkit.train.filters import RefillCapError
from toolkit.train.runner import build_trainer

ROOT = Path(__file__).resolve().parents[3]
RECIPES = ROOT / "configs" / "text_reasoning"
BNPO = "bnpo_qwen2.5-math-7b.yaml"
DLER = "dler_r1-distill-1.5b.yaml"
DLER_OFFICIAL = "dler_r1-distill-1.5b_official.yaml"
DA_DLER = "da_dler_r1-distill-1.5b.yaml"
GRPO = "grpo_baseline.yaml"
# Every convention the BNPO oracles assume, set explicitly (docs/methods/bnpo.md §11: official logic, float32).
BNPO_OPTIONS = ["normalizer.variance=unbiased", "normalizer.ab_min=1.0", "normalizer.w_max=1.0e6"]
BNPO_OPTIONS += ["normalizer.var_floor=1.0e-12", "normalizer.official_compat=false", "normalizer.clip=null"]
FAST = ["trainer.progress=false", "trainer.save_every=0", "trainer.prompts_per_step=4", "trainer.group_size=4"]


def recipe(name: str, *overrides: str) -> dict[str, Any]:
    return load_config(RECIPES / name, list(overrides))


def normalizer(name: str, *overrides: str) -> Any:
    return instantiate(recipe(name, *overrides)["normalizer"], where="normalizer")


def transforms(name: str, *overrides: str) -> list[Any]:
    return [instantiate(node, where="transforms") for node in recipe(name, *overrides)["transforms"]]


def make_rollout(
    scores: Sequence[float],
    group_size: int,
    lengths: Sequence[int] | None = None,
    truncated: Sequence[bool] | None = None,
    rewards: dict[str, Sequence[float]] | None = None,
) -> Rollout:
    n = len(scores)
    lengths_t = torch.tensor(list(lengths) if lengths is not None else [3] * n)
    steps = int(lengths_t.max())
    return Rollout(
        group_ids=torch.arange(n) // group_size,
        old_logprobs=torch.zeros(n, steps),
        mask=torch.arange(steps)[None, :] < lengths_t[:, None],
        scores=torch.tensor(list(scores), dtype=torch.float32),
        lengths=lengths_t,
        truncated=torch.tensor(list(truncated)) if truncated is not None else None,
        rewards={k: torch.tensor(list(v), dtype=torch.float32) for k, v in (rewards or {}).items()},
    )


def close(actual: torch.Tensor, expected: Sequence[float], atol: float = 1e-5) -> None:
    target = torch.tensor([float(x) for x in expected])
    assert torch.allclose(actual.float(), target, atol=atol), (actual.tolist(), list(expected))


def apply(steps: list[Any], rollout: Rollout) -> Rollout:
    for step in steps:
        rollout = step(rollout)
    return rollout


# ------------------------------------------------------------------------------- recipes inherit the presets


def test_recipes_build_their_algorithms() -> None:
    assert isinstance(normalizer(BNPO), BetaNormalizer)
    for name in (DLER, DA_DLER):
        assert isinstance(normalizer(name), GroupMeanBatchStdNormalizer)
        config = recipe(name)
        assert config["trainer"]["drop_zero_variance_groups"] is True
        assert config["trainer"]["dynamic_sampling_on"] == "raw_score"
        assert recipe(name)["objective"]["term"]["clip_high"] == 0.28
    assert [type(t) for t in transforms(DA_DLER)] == [DifficultyTiers, TruncationPenalty]
    assert isinstance(normalizer(GRPO), GroupNormalizer) and recipe(GRPO)["transforms"][0]["max_length"] == 4000
    boost = normalizer(DLER_OFFICIAL)
    assert isinstance(boost, CorrectSampleBoost) and boost.value == 0.1
    assert recipe(BNPO)["rewards"]["accuracy"]["last_n_chars"] == 500
    for name in (BNPO, DLER, DA_DLER, GRPO, DLER_OFFICIAL):
        assert isinstance(recipe(name)["policy"]["model"], str), "GPU recipes name hub models"


# ---------------------------------------------------------------------------- docs/methods/bnpo.md E1–E8 via the recipe


E1 = [1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0]


@pytest.mark.parametrize(
    ("rewards", "group_size", "overrides", "expected"),
    [
        (E1, 4, [], [0.680175, -0.226725, -0.226725, -0.226725, 0.392699, 0.392699, -0.392699, -0.392699,
                     0.226725, 0.226725, 0.226725, -0.680175]),
        ([0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1], 4, [],
         [0, 0, 0, 0, 0.742179, -0.247393, -0.247393, -0.247393, 0.247393, 0.247393, 0.247393, -0.742179,
          0, 0, 0, 0]),
        ([1, 0, 1, 1], 2, [], [0.477390, -0.477390, 0, 0]),
        ([1, 0, 1, 0], 4, [], [0.5, -0.5, 0.5, -0.5]),
        ([2, 1, 0, 0, 2, 2, 1, 0, 2, 2, 2, 1], 4, ["normalizer.r_max=2.0"],
         [0.551928, 0.110386, -0.331157, -0.331157, 0.294573, 0.294573, -0.098191, -0.490956,
          0.118131, 0.118131, 0.118131, -0.354393]),
    ],
    ids=["E1", "E2", "E3", "E4", "E7"],
)  # fmt: skip
def test_bnpo_worked_examples(
    rewards: list[float], group_size: int, overrides: list[str], expected: list[float]
) -> None:
    out = normalizer(BNPO, *BNPO_OPTIONS, *overrides)(make_rollout(rewards, group_size))
    close(out.values, expected)
    assert out.metrics["normalizer/alpha"] >= 1.0 and "normalizer/beta" in out.metrics


def test_bnpo_e1_fit_and_e5_low_accuracy() -> None:
    out = normalizer(BNPO, *BNPO_OPTIONS)(make_rollout(E1, 4))
    assert out.metrics["normalizer/alpha"] == pytest.approx(1.5, abs=1e-5)
    assert out.metrics["normalizer/beta"] == pytest.approx(1.5, abs=1e-5)
    groups = [[1] + [0] * 7, [1, 1] + [0] * 6, [0] * 8, [1] * 4 + [0] * 4]
    out = normalizer(BNPO, *BNPO_OPTIONS)(make_rollout([r for g in groups for r in g], 8))
    assert out.metrics["normalizer/alpha"] == pytest.approx(1.200521, abs=1e-5)
    assert out.metrics["normalizer/beta"] == pytest.approx(1.716146, abs=1e-5)
    close(out.values[[0, 1, 8, 9, 16, 24, 28]], [0.659397, -0.094200, 0.549264, 0.549264, 0, 0.426024, -0.426024])


def test_bnpo_e6_decomposition() -> None:
    rollout = make_rollout(
        [0] * 8, 4, rewards={"accuracy": [1, 0, 0, 0, 1, 1, 0, 0], "format": [1, 1, 0, 1, 1, 0, 0, 1]}
    )
    decomposed = normalizer(BNPO, *BNPO_OPTIONS, "normalizer.components={accuracy: [0, 1], format: [0, 1]}")
    close(decomposed(rollout).values, [0.345697, 0, -0.345697, 0, 0.340852, 0, -0.340852, 0])
    summed = make_rollout([2, 1, 0, 1, 2, 1, 0, 1], 4)  # one summed reward: sigma^2 = 0, the alpha = beta = 1 fallback
    out = normalizer(BNPO, *BNPO_OPTIONS, "normalizer.r_max=2.0")(summed)
    assert out.metrics["normalizer/fallbacks"] == 1.0 and torch.isfinite(out.values).all()


def test_bnpo_e8_degenerate_batches() -> None:
    bnpo = normalizer(BNPO, *BNPO_OPTIONS)
    close(bnpo(make_rollout([1, 0, 1, 0], 2)).values, [0.5, -0.5, 0.5, -0.5])
    close(bnpo(make_rollout([0, 0, 0, 0], 2)).values, [0, 0, 0, 0])
    close(bnpo(make_rollout([0, 0, 0, 0, 1, 1], 2)).values, [0] * 6)
    with pytest.raises(ValueError, match="at least 2 responses per prompt"):
        bnpo(make_rollout([1, 0, 1], 1))
    official = normalizer(BNPO, *BNPO_OPTIONS, "normalizer.official_compat=true")
    for rewards in ([1, 0, 1, 0], [0, 0, 0, 0]):  # the official code returns NaN / crashes: a clear error here
        with pytest.raises(ValueError, match="degenerate batch"):
            official(make_rollout(rewards, 2))


# --------------------------------------------------------------------------- docs/methods/dler.md D1–D5 via the recipes


def test_dler_d1_truncation() -> None:
    rollout = make_rollout([1, 1, 0, 1], 4, lengths=[1200, 4000, 3500, 4100], truncated=[False, False, False, True])
    paper = apply(transforms(DLER), rollout)
    close(paper.scores, [1, 1, 0, 0])
    close(paper.rewards["raw_score"], [1, 1, 0, 1])  # the raw score is kept for dynamic sampling
    official = apply(transforms(DLER_OFFICIAL), make_rollout([1, 1, 0, 1], 4, [1200, 4000, 3500, 4000], [0, 0, 0, 1]))
    close(official.scores, [1, 1, 0, 0.1])


D2 = [1, 0, 0, 0, 1, 1, 1, 0]


@pytest.mark.parametrize(
    ("name", "overrides", "lengths", "expected"),
    [
        (DLER, ["normalizer.std=unbiased", "normalizer.weighting=sequence", "normalizer.eps=1e-8"],
         [2, 4, 4, 2, 1, 2, 3, 4],
         [1.620185, -0.540062, -0.540062, -0.540062, 0.540062, 0.540062, 0.540062, -1.620185]),
        (DLER, ["normalizer.std=population"], [2, 4, 4, 2, 1, 2, 3, 4],
         [1.732051, -0.577350, -0.577350, -0.577350, 0.577350, 0.577350, 0.577350, -1.732051]),
        (DLER_OFFICIAL, ["normalizer.value=0.0"], [2, 4, 4, 2, 1, 2, 3, 4],
         [1.956729, -0.308957, -0.308957, -0.308957, 0.823886, 0.823886, 0.823886, -1.441800]),
        (DLER_OFFICIAL, ["normalizer.value=0.0"], [3] * 8,
         [1.695582, -0.565194, -0.565194, -0.565194, 0.565194, 0.565194, 0.565194, -1.695582]),
    ],
    ids=["D2-sequence-unbiased", "D2-sequence-population", "D2-token-official", "D3-equal-lengths"],
)  # fmt: skip
def test_dler_d2_d3_batch_normalization(
    name: str, overrides: list[str], lengths: list[int], expected: list[float]
) -> None:
    out = normalizer(name, *overrides)(make_rollout(D2, 4, lengths=lengths))
    close(out.values, expected)
    assert {"normalizer/batch_mean", "normalizer/batch_std"} <= set(out.metrics)


def test_dler_d5_difficulty_tiers() -> None:
    steps = transforms(DA_DLER)
    easy = apply(steps, make_rollout([1, 1, 1, 0], 4, lengths=[1500, 2500, 1800, 3900]))
    close(easy.scores, [1, 0, 1, 0])
    assert easy.data["max_length"].tolist() == [2000] * 4
    hard = apply(steps, make_rollout([1, 0, 0, 0], 4, lengths=[3000, 3900, 4000, 3990]))
    close(hard.scores, [1, 0, 0, 0])
    assert hard.metrics["difficulty/tier_0_groups"] == 1.0


def test_dler_d6_merge_through_renorm_merge(tmp_path: Path) -> None:
    tuned = torch.tensor([1.5, 0.9, 1.05, 0.2, 1.2, 1.0, 1.3, 0.98])
    for name, weight in (("base", torch.ones(8)), ("tuned", tuned)):
        (tmp_path / name).mkdir()
        save_file({"w": weight, "h": weight.to(torch.bfloat16)}, str(tmp_path / name / "model.safetensors"))
    out = tmp_path / "merged"
    assert renorm(["merge", str(tmp_path / "base"), str(tmp_path / "tuned"), str(out), "--density", "0.25"]) == 0
    merged = load_file(str(out / "model.safetensors"))
    close(merged["w"], [1.35, 1, 1, 0.44, 1, 1, 1, 1])
    assert merged["h"].dtype == torch.bfloat16


# ------------------------------------------------------------------------------- boost and degenerate batches


def test_correct_sample_boost_uses_the_raw_score() -> None:
    rollout = apply(transforms(DLER_OFFICIAL), make_rollout(D2, 4, lengths=[3] * 8, truncated=[0, 0, 0, 0, 1, 0, 0, 0]))
    boosted = normalizer(DLER_OFFICIAL)(rollout)
    plain = normalizer(DLER_OFFICIAL, "normalizer.value=0.0")(rollout)
    raw_correct = torch.tensor(D2, dtype=torch.bool)  # row 4 was truncated (score 0.1) but its raw score is 1
    close(boosted.values - plain.values, (0.1 * raw_correct.float()).tolist())
    assert boosted.metrics["advantage/boosted_frac"] == pytest.approx(0.5)


DEGENERATE = {
    "all-zero": ([0.0] * 8, 4),
    "all-one": ([1.0] * 8, 4),
    "one-group": ([1.0, 0.0, 1.0, 1.0], 4),
    "constant-groups": ([1.0] * 4 + [0.0] * 4, 4),
    "nan-row": ([1.0, math.nan, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0], 4),
}


@pytest.mark.parametrize("case", sorted(DEGENERATE))
@pytest.mark.parametrize("name", [BNPO, DLER, DA_DLER, GRPO, DLER_OFFICIAL, "tiny.yaml", "tiny_grpo.yaml"])
def test_degenerate_batches_give_finite_advantages(name: str, case: str) -> None:
    scores, group_size = DEGENERATE[case]
    config = recipe(name)
    steps = [instantiate(node, where="transforms") for node in config.get("transforms", [])]
    rollout = apply(steps, make_rollout(scores, group_size, [3] * len(scores), [False] * len(scores)))
    out = instantiate(config["normalizer"], where="normalizer")(rollout)
    assert torch.isfinite(out.values).all()
    if case in ("all-zero", "all-one", "constant-groups"):
        # Constant groups give exact zeros; the official recipe then adds its +0.1 boost to correct rows.
        boost = 0.1 * (torch.tensor(scores) >= 1).float() if name == DLER_OFFICIAL else torch.zeros(len(scores))
        assert torch.equal(out.values, boost)


def test_dler_singleton_groups_use_a_zero_baseline() -> None:
    out = normalizer(DLER)(make_rollout([1.0, 0.0, 1.0], 1))
    assert torch.isfinite(out.values).all() and out.values[0] > 0 > out.values[1]


# ------------------------------------------------------------------------------- the trainer path (tiny recipes)


class ScriptedSampler:
    """Returns hand-made groups (one script per call, cycling): (correct, length) per sample, graded for real."""

    def __init__(self, scripts: list[list[list[tuple[bool, int]]]]) -> None:
        self.scripts, self.calls = scripts, 0

    def sample(self, policy: Any, prompts: list[Any], group_size: int, generator: torch.Generator) -> Rollout:
        script = self.scripts[self.calls % len(self.scripts)]
        self.calls += 1
        rows = [(prompt, ok, n) for prompt, group in zip(prompts, script, strict=True) for ok, n in group]
        lengths = torch.tensor([n for _, _, n in rows])
        return Rollout(
            group_ids=torch.arange(len(rows)) // group_size,
            old_logprobs=torch.zeros(len(rows), int(lengths.max())),
            mask=torch.arange(int(lengths.max()))[None, :] < lengths[:, None],
            lengths=lengths,
            truncated=torch.zeros(len(rows), dtype=torch.bool),
            prompts=[p for p, _, _ in rows],
            completions=[f"<think></think>{p['answer'] if ok else 'x'}" for p, ok, _ in rows],
        )


def group(correct: Sequence[int], lengths: Sequence[int] = (4, 4, 4, 4)) -> list[tuple[bool, int]]:
    return [(bool(c), n) for c, n in zip(correct, lengths, strict=True)]


def tiny_trainer(tmp_path: Path, name: str = "tiny.yaml", *overrides: str) -> Any:
    return build_trainer(recipe(name, *FAST, f"trainer.run_dir={tmp_path}", *overrides))


def test_d4_dynamic_sampling_refills_on_the_raw_score(tmp_path: Path) -> None:
    trainer = tiny_trainer(tmp_path, "tiny.yaml", "policy.model.warm_start_steps=0")
    first = [group([0, 0, 0, 0]), group([1, 0, 1, 1]), group([1, 1, 1, 1]), group([0, 1, 0, 0])]  # D4: keep b, d
    second = [
        group([1, 1, 1, 0], (12, 12, 12, 12)),  # all truncated (penalized 0) but the raw score varies: kept
        group([1, 1, 1, 1], (4, 12, 4, 12)),  # the penalized score varies but the raw score does not: dropped
        group([0, 0, 0, 0]),
        group([1, 1, 1, 1]),
    ]
    trainer.sampler = ScriptedSampler([first, second])
    rollout = trainer.collect()
    raw = rollout.rewards["raw_score"].view(-1, 4).tolist()
    assert raw == [[1, 0, 1, 1], [0, 1, 0, 0], [1, 1, 1, 0], [1, 0, 1, 1]]
    assert rollout.metrics["filter/rounds"] == 3.0 and rollout.metrics["filter/kept_groups"] == 4.0
    assert rollout.scores is not None and rollout.scores.view(-1, 4)[2].tolist() == [0, 0, 0, 0]


def test_dynamic_sampling_cap_with_nothing_surviving_is_a_clear_error(tmp_path: Path) -> None:
    trainer = tiny_trainer(tmp_path, "tiny.yaml", "policy.model.warm_start_steps=0", "trainer.max_sampling_rounds=2")
    trainer.sampler = ScriptedSampler([[group([0, 0, 0, 0])] * 4])
    with pytest.raises(RefillCapError, match="only 0 of 4 target groups"):
        trainer.collect()
    assert trainer.sampler.calls == 2


def test_tiny_recipes_train_a_step(tmp_path: Path) -> None:
    for name, logged in (("tiny.yaml", "normalizer/batch_std"), ("tiny_grpo.yaml", "normalizer/zero_variance_groups")):
        trainer = tiny_trainer(tmp_path / name, name)
        before = {k: v.detach().clone() for k, v in trainer.policy.module.named_parameters()}
        metrics, rollout = trainer.step()
        assert math.isfinite(metrics["loss/policy"]) and logged in metrics
        assert rollout.advantages is not None and torch.isfinite(rollout.advantages).all()
        after = dict(trainer.policy.module.named_parameters())
        assert any(not torch.equal(before[k], after[k]) for k in before), f"{name}: no parameter moved"


def test_tiny_bnpo_step_logs_alpha_and_beta(tmp_path: Path) -> None:
    config = merge_configs(recipe("tiny_grpo.yaml"), load_config(ROOT / "configs" / "algorithms" / "bnpo.yaml"))
    config = merge_configs(config, {"trainer": {"run_dir": str(tmp_path), "progress": False, "group_size": 4}})
    metrics, _ = build_trainer(config).step()
    assert metrics["normalizer/alpha"] >= 1.0 and metrics["normalizer/beta"] >= 1.0


def test_reproduction_a_bnpo_at_three_halves_is_pi_over_8_grpo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/methods/bnpo.md §6: with α = β = 3/2, A = (π/8)(R − p̂)/√(p̂(1 − p̂)): GRPO with the population std, times
    π/8."""
    trainer = tiny_trainer(tmp_path, "tiny_grpo.yaml", "trainer.prompts_per_step=8", "trainer.group_size=8")
    rollout = trainer.sample_and_score()  # real rollouts of the warm-started tiny policy, graded by math-verify
    scores = rollout.scores.view(8, 8)
    mixed = ((scores > 0).any(1) & (scores < 1).any(1)).sum()
    assert mixed >= 2, "the sample needs groups with both right and wrong answers"
    fit_beta = beta_module.fit_beta

    def forced(p_hat: torch.Tensor, **options: Any) -> beta_module.BetaFit:
        fit = fit_beta(p_hat, **options)
        return fit._replace(
            alpha=torch.tensor(1.5, dtype=p_hat.dtype), beta=torch.tensor(1.5, dtype=p_hat.dtype), fallback=False
        )

    monkeypatch.setattr(beta_module, "fit_beta", forced)
    bnpo = normalizer(BNPO, *BNPO_OPTIONS)(rollout)
    assert bnpo.metrics["normalizer/alpha"] == 1.5 == bnpo.metrics["normalizer/beta"]
    population = GroupNormalizer(std="population", eps=0.0, eps_placement="std_plus_eps", std_floor=0.0)(rollout)
    close(bnpo.values, (math.pi / 8 * population.values).tolist())
    unbiased = GroupNormalizer(std="unbiased", eps=0.0, eps_placement="std_plus_eps", std_floor=0.0)(rollout)
    close(bnpo.values, (math.pi / 8 * math.sqrt(8 / 7) * unbiased.values).tolist())  # verl's GRPO (ε = 0)
