"""DiDi-Instruct end to end: one `renorm train configs/diffusion_lm/tiny.yaml` step through the generic Trainer,
and a checkpoint resume that restores the student, its EMA and the self-training discriminator."""

from __future__ import annotations

from pathlib import Path

import torch

from modalities.diffusion_lm.didi_policy import StudentPolicy
from modalities.diffusion_lm.discriminator import DiscriminatorReward
from toolkit.config import load_config
from toolkit.train.runner import build_trainer, fit

CONFIG = Path(__file__).resolve().parents[3] / "configs" / "diffusion_lm" / "tiny.yaml"


def _config(run_dir: Path, steps: int) -> dict[str, object]:
    overrides = [
        f"trainer.run_dir={run_dir}",
        f"trainer.num_steps={steps}",
        "trainer.prompts_per_step=2",
        "trainer.save_every=1",
        "trainer.progress=false",
        "data.seq_len=16",
    ]
    return load_config(CONFIG, overrides)


def _parts(trainer: object) -> tuple[StudentPolicy, DiscriminatorReward]:
    policy = trainer.policy  # type: ignore[attr-defined]
    reward = trainer.rewards["discriminator"]  # type: ignore[attr-defined]
    assert isinstance(policy, StudentPolicy) and isinstance(reward, DiscriminatorReward)
    return policy, reward


def test_tiny_config_step_then_resume(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    trainer = build_trainer(_config(tmp_path, 1))
    policy, reward = _parts(trainer)
    student0 = {k: v.clone() for k, v in policy.module.state_dict().items()}
    head0 = [p.detach().clone() for p in reward.discriminator.head.parameters()]
    last = fit(trainer)
    assert last is not None
    moved = [k for k, v in policy.module.state_dict().items() if not torch.equal(v, student0[k])]
    assert moved, "the student did not change"
    assert any(not torch.equal(a, b) for a, b in zip(head0, reward.discriminator.head.parameters(), strict=True))
    assert reward.num_updates == 1 and policy.num_updates == 1
    assert policy.ema is not None and reward.discriminator is not None

    resumed = build_trainer(_config(tmp_path, 2))
    r_policy, r_reward = _parts(resumed)
    resumed.load(last)
    assert resumed.global_step == 1 and r_policy.num_updates == 1 and r_reward.num_updates == 1
    assert r_policy.ema is not None
    for key, value in policy.ema.state_dict().items():
        assert torch.equal(r_policy.ema.state_dict()[key], value), key
    for key, value in reward.discriminator.state_dict().items():
        assert torch.equal(r_reward.discriminator.state_dict()[key], value), key
    for key, value in policy.module.state_dict().items():
        assert torch.equal(r_policy.module.state_dict()[key], value), key
    metrics, _ = resumed.step()
    assert torch.isfinite(torch.tensor(metrics["loss/policy"])) and r_reward.num_updates == 2


def test_warmup_trains_the_discriminator_but_not_the_student(tmp_path: Path) -> None:
    """`trainer.critic_warmup_steps` without a critic: DiDi's discriminator warm-up (student frozen, no EMA step)."""
    torch.set_num_threads(1)
    config = load_config(CONFIG, [f"trainer.run_dir={tmp_path}", "trainer.num_steps=2", "trainer.prompts_per_step=2",
                                  "trainer.save_every=0", "trainer.progress=false", "data.seq_len=16",
                                  "trainer.critic_warmup_steps=1"])  # fmt: skip
    trainer = build_trainer(config)
    policy, reward = _parts(trainer)
    student0 = {k: v.clone() for k, v in policy.module.state_dict().items()}
    trainer.step()
    assert reward.num_updates == 1 and policy.num_updates == 0
    assert all(torch.equal(v, student0[k]) for k, v in policy.module.state_dict().items())
    trainer.step()  # after the warm-up the student trains
    assert reward.num_updates == 2 and policy.num_updates == 1
    assert any(not torch.equal(v, student0[k]) for k, v in policy.module.state_dict().items())


def test_nfe_table_during_training_selects_the_best_student(tmp_path: Path) -> None:
    """trainer.eval_every with the NFE-table hook: gen-PPL of the student and its EMA logged, best kept."""
    torch.set_num_threads(1)
    config = load_config(CONFIG, [f"trainer.run_dir={tmp_path}", "trainer.num_steps=2", "trainer.prompts_per_step=2",
                                  "trainer.save_every=0", "trainer.progress=false", "data.seq_len=16",
                                  "trainer.eval_every=1", "trainer.eval_metric=gen_ppl/student_ema@2",
                                  "trainer.eval_mode=min", "eval.evaluator.steps=[2]", "eval.evaluator.num_samples=4",
                                  "eval.evaluator.length=16", "eval.evaluator.evaluator_steps=2",
                                  "+eval.evaluator.include_teacher=false"])  # fmt: skip
    trainer = build_trainer(config)
    fit(trainer)
    import json

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/gen_ppl/student_ema@2" in r]
    assert [r["step"] for r in evals] == [1, 2]
    assert all(r["eval/gen_ppl/student@2"] > 1 and "eval/gen_ppl/teacher@2" not in r for r in evals)
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert best["value"] == min(r["eval/gen_ppl/student_ema@2"] for r in evals)
    assert trainer.evaluator._built is not None  # the tiny GPT-2 evaluator was trained once and reused


def test_data_holdout_from_the_config_monitors_the_valid_split(tmp_path: Path) -> None:
    """`data_holdout` as a YAML component: the corpus's valid split, never the rows the discriminator trains on."""
    torch.set_num_threads(1)
    config = load_config(CONFIG, [f"trainer.run_dir={tmp_path}", "trainer.num_steps=1", "trainer.prompts_per_step=2",
                                  "trainer.save_every=0", "trainer.progress=false", "data.seq_len=16",
                                  "+rewards.discriminator.data_holdout._component_="
                                  "modalities.diffusion_lm.text_data.TokenDataset",
                                  "+rewards.discriminator.data_holdout.seq_len=16",
                                  "+rewards.discriminator.data_holdout.split=valid",
                                  "+rewards.discriminator.data_holdout_size=8"])  # fmt: skip
    trainer = build_trainer(config)
    metrics, _ = trainer.step()
    _, reward = _parts(trainer)
    assert {"reward/discriminator/acc_real_holdout", "reward/discriminator/reward_real_holdout"} <= set(metrics)
    from modalities.diffusion_lm.text_data import TokenDataset

    train = {tuple(chunk) for chunk in TokenDataset(seq_len=16, split="train").chunks}
    valid = {tuple(chunk) for chunk in TokenDataset(seq_len=16, split="valid").chunks}
    assert reward.holdout_rows is not None and reward.holdout_rows.shape == (8, 16)
    held = {tuple(row) for row in reward.holdout_rows.tolist()}
    assert held <= valid and not held & train
