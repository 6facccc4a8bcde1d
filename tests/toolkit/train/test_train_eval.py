"""Evaluation during training (trainer.eval_every / eval_metric / eval_mode): eval/* metrics are logged, the best
checkpoint is kept under run_dir/best/, evaluating never changes training, bad settings fail clearly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from toolkit.config import load_config
from toolkit.io.checkpoint import load_checkpoint
from toolkit.train.eval_hook import BestCheckpoint
from toolkit.train.runner import build_trainer, fit
from toolkit.train.trainer_config import TrainerConfig

CONFIG = Path(__file__).resolve().parents[3] / "configs" / "demo" / "tiny_grpo.yaml"
SCRIPT = [0.3, 0.9, 0.5, 0.9, 1.2]


class ScriptedReport:
    def __init__(self, values: dict[str, float]) -> None:
        self.values = values

    def table(self) -> str:
        return str(self.values)

    def metrics(self) -> dict[str, float]:
        return self.values


class ScriptedEvaluator:
    """An `eval.evaluator` whose score follows SCRIPT, and which draws from every global RNG as real ones do."""

    def __init__(self, script: list[float] | None = None) -> None:
        self.script, self.calls = list(script or SCRIPT), 0
        self.disturb: torch.Generator | None = None  # a generator the hook draws from (the trainer's, in a test)

    def __call__(self, policy: Any, **_: Any) -> ScriptedReport:
        assert not policy.module.training  # the hook sees the policy in eval mode
        torch.rand(5)  # perturbs the global RNG: training must not notice
        if self.disturb is not None:
            torch.randint(0, 9, (3,), generator=self.disturb)
        value = self.script[self.calls % len(self.script)]
        self.calls += 1
        weights = float(sum(p.detach().sum() for p in policy.module.parameters()))
        return ScriptedReport({"score": value, "weight_sum": weights})


class NoMetrics:
    def __call__(self, **_: Any) -> Any:
        return object()


def _config(run_dir: Path, steps: int, *extra: str) -> dict[str, Any]:
    overrides = [f"trainer.run_dir={run_dir}", f"trainer.num_steps={steps}", "trainer.save_every=0",
                 "trainer.progress=false", *extra]  # fmt: skip
    return load_config(CONFIG, overrides)


def _scripted(*extra: str) -> list[str]:
    return ["+eval.evaluator._component_=tests.toolkit.train.test_train_eval.ScriptedEvaluator", *extra]


def test_eval_metrics_logged_and_best_checkpoint_kept(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    trainer = build_trainer(_config(tmp_path, 5, "trainer.eval_every=1", "trainer.eval_metric=score",
                                    "trainer.eval_mode=max", *_scripted()))  # fmt: skip
    fit(trainer)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    scores = [(r["step"], r["eval/score"]) for r in rows if "eval/score" in r]
    assert scores == list(enumerate(SCRIPT, start=1))
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert best["step"] == 5 and best["value"] == pytest.approx(1.2) and best["metric"] == "score"
    kept = sorted((tmp_path / "best" / "checkpoints").iterdir())
    assert [p.name for p in kept] == ["step_00000005"] and load_checkpoint(kept[0]).step == 5
    # The best weights are the weights the evaluator saw at that step.
    weight_sums = {r["step"]: r["eval/weight_sum"] for r in rows if "eval/weight_sum" in r}
    saved = load_checkpoint(kept[0]).model
    assert float(sum(v.sum() for v in saved.values())) == pytest.approx(weight_sums[5], rel=1e-5)


def test_min_mode_keeps_the_lowest_and_ties_do_not_replace(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    trainer = build_trainer(_config(tmp_path, 5, "trainer.eval_every=1", "trainer.eval_metric=score",
                                    "trainer.eval_mode=min", *_scripted()))  # fmt: skip
    fit(trainer)
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert best["step"] == 1 and best["value"] == pytest.approx(0.3)


def test_evaluation_does_not_change_training(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    plain = build_trainer(_config(tmp_path / "plain", 3))
    fit(plain)
    evaluated = build_trainer(_config(tmp_path / "eval", 3, "trainer.eval_every=1", *_scripted()))
    evaluated.evaluator.disturb = evaluated.generator  # the sampler and minibatch shuffles draw from it
    fit(evaluated)
    a, b = plain.policy.module.state_dict(), evaluated.policy.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_keeps_the_best_value(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    run = build_trainer(_config(tmp_path, 2, "trainer.eval_every=1", "trainer.eval_metric=score",
                                "trainer.save_every=1", *_scripted()))  # fmt: skip
    fit(run)  # scores 0.3, 0.9 -> best 0.9 at step 2
    resumed = build_trainer(_config(tmp_path, 3, "trainer.eval_every=1", "trainer.eval_metric=score",
                                    "trainer.save_every=1", *_scripted()))  # fmt: skip
    fit(resumed)  # a fresh evaluator starts its script again: step 3 scores 0.3 < 0.9, so the best stays
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert best["step"] == 2 and best["value"] == pytest.approx(0.9)
    assert BestCheckpoint(tmp_path, "score", "max").value == pytest.approx(0.9)
    assert BestCheckpoint(tmp_path, "other", "max").value is None  # a different metric starts afresh


def test_a_fresh_run_does_not_inherit_an_earlier_best(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    run = tmp_path / "run"
    first = build_trainer(_config(run, 2, "trainer.eval_every=1", "trainer.eval_metric=score",
                                  "trainer.eval_mode=max", *_scripted()))  # fmt: skip
    fit(first)  # best 0.9 at step 2
    again = build_trainer(_config(run, 1, "trainer.resume=never", "trainer.overwrite=true", "trainer.eval_every=1",
                                  "trainer.eval_metric=score", "trainer.eval_mode=max", *_scripted()))  # fmt: skip
    fit(again)  # scores 0.3 at step 1: worse than the old run's 0.9, but the old run is not this one
    best = json.loads((run / "best" / "best.json").read_text())
    assert best["step"] == 1 and best["value"] == pytest.approx(0.3)
    [old] = tmp_path.glob("run.old-*")
    previous = json.loads((old / "best" / "best.json").read_text())  # moved aside with its run, not deleted
    assert previous["step"] == 2 and previous["value"] == pytest.approx(0.9)
    (run / "checkpoints").rename(tmp_path / "kept")  # a best/ with no checkpoint to resume: a fresh run's start
    fit(build_trainer(_config(run, 1)))  # no selection: no best at all, the stale one set aside
    assert json.loads((run / "best.previous" / "best.json").read_text())["step"] == 1
    assert BestCheckpoint.read(run) is None


def test_bad_settings_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="eval.evaluator"):
        build_trainer(_config(tmp_path, 1, "trainer.eval_every=1"))
    with pytest.raises(ValueError, match="eval_every"):
        TrainerConfig(eval_metric="score")
    with pytest.raises(ValueError, match="eval_mode"):
        TrainerConfig(eval_every=1, eval_mode="best")  # type: ignore[arg-type]
    trainer = build_trainer(_config(tmp_path / "a", 1, "trainer.eval_every=1", "trainer.eval_metric=nope",
                                    *_scripted()))  # fmt: skip
    with pytest.raises(KeyError, match="nope.*score"):
        fit(trainer)
    no_metrics = "+eval.evaluator._component_=tests.toolkit.train.test_train_eval.NoMetrics"
    trainer = build_trainer(_config(tmp_path / "b", 1, "trainer.eval_every=1", no_metrics))
    with pytest.raises(TypeError, match="metrics"):
        fit(trainer)


def test_nan_never_becomes_best(tmp_path: Path) -> None:
    tracker = BestCheckpoint(tmp_path, "score", "min")
    assert tracker.improves(1.0) and not tracker.improves(float("nan"))


def test_hook_leaves_every_rng_and_the_trainer_generator_as_it_found_them(tmp_path: Path) -> None:
    import random

    import numpy as np

    from toolkit.train.eval_hook import evaluate_during_training

    trainer = build_trainer(_config(tmp_path, 1, "trainer.eval_every=1", *_scripted()))

    class Greedy(ScriptedEvaluator):
        def __call__(self, policy: Any, **kwargs: Any) -> ScriptedReport:
            random.random(), np.random.rand(), torch.randint(0, 9, (3,), generator=trainer.generator)
            return super().__call__(policy, **kwargs)

    trainer.evaluator = Greedy()
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy(), trainer.generator.get_state())
    assert evaluate_during_training(trainer)["score"] == pytest.approx(SCRIPT[0])
    after = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy(), trainer.generator.get_state())
    assert torch.equal(before[0], after[0]) and before[1] == after[1]
    assert np.array_equal(before[2], after[2]) and torch.equal(before[3], after[3])
    assert trainer.policy.module.training  # train mode restored
