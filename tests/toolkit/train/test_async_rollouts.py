"""Async one-step-off-policy rollouts: the TIS/MIS correction by hand, exact equivalence with the synchronous path
when the overlap is off, the fast tiny GRPO demo trained with overlap, each rollout from the previous weights, and a
background rollout's failure raised by the next step with no thread left behind."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import cast

import pytest
import torch

from tests.demo_run import tiny_config
from toolkit.engines import EngineUnavailableError
from toolkit.interfaces import Policy
from toolkit.rollout import Rollout
from toolkit.train.async_rollouts import BEHAVIOUR_KEY, AsyncRollouts, importance_weights
from toolkit.train.runner import build_trainer
from toolkit.train.trainer_config import TrainerConfig


def test_importance_weights_truncate_or_mask_by_hand() -> None:
    old = torch.tensor([[0.0, math.log(2.0), math.log(4.0), 5.0]])
    behaviour = torch.zeros(1, 4)
    mask = torch.tensor([[True, True, True, False]])  # the untrained token's ratio (e^5) is ignored
    weights, kept, metrics = importance_weights(old, behaviour, mask, 3.0, "tis")
    torch.testing.assert_close(weights[mask], torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(kept, mask)
    assert metrics["async/is_ratio_mean"] == pytest.approx(7 / 3) and metrics["async/is_ratio_max"] == pytest.approx(4)
    assert metrics["async/is_clipped_frac"] == pytest.approx(1 / 3)
    weights, kept, metrics = importance_weights(old, behaviour, mask, 3.0, "mis")
    assert torch.equal(weights, torch.ones(1, 4))
    assert kept.tolist() == [[True, True, False, False]] and metrics["async/is_clipped_frac"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"async_ratio_cap": 0.5}, "async_ratio_cap"), ({"async_correction": "clip"}, "async_correction")],
)
def test_bad_async_settings_are_rejected(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainerConfig(**kwargs)  # type: ignore[arg-type]


def weights_after(tmp_path: Path, *overrides: str) -> dict[str, torch.Tensor]:
    trainer = build_trainer(tiny_config(tmp_path, "trainer.num_steps=2", *overrides))
    for _ in range(2):
        trainer.step()
    return {k: v.clone() for k, v in trainer.policy.module.state_dict().items()}


@pytest.mark.parametrize("minibatches", [1, 2])
def test_async_without_overlap_is_exactly_the_synchronous_path(tmp_path: Path, minibatches: int) -> None:
    sync = weights_after(tmp_path / "sync", f"trainer.num_minibatches={minibatches}")
    off = weights_after(
        tmp_path / "off",
        f"trainer.num_minibatches={minibatches}",
        "trainer.async_rollouts=true",
        "trainer.async_overlap=false",
    )
    assert sync.keys() == off.keys()
    for key, value in sync.items():
        assert torch.equal(value, off[key]), key
    overlapped = weights_after(tmp_path / "on", f"trainer.num_minibatches={minibatches}", "trainer.async_rollouts=true")
    assert any(not torch.equal(value, overlapped[key]) for key, value in sync.items())  # stale rollouts differ


def test_async_training_uses_the_previous_steps_weights(tmp_path: Path) -> None:
    """3 steps: step k > 0 trains on a rollout whose behaviour log-probs are those of step k - 1's weights."""
    trainer = build_trainer(tiny_config(tmp_path, "trainer.num_steps=3", "trainer.async_rollouts=true"))
    policy = trainer.policy
    before: list[dict[str, torch.Tensor]] = []
    for step in range(3):
        before.append({k: v.clone() for k, v in policy.module.state_dict().items()})
        metrics, rollout = trainer.step()
        assert metrics["async/staleness"] == (0.0 if step == 0 else 1.0)
        assert metrics["async/behaviour_step"] == max(step - 1, 0)
        assert all(math.isfinite(v) for v in metrics.values())
        if step == 0:
            assert BEHAVIOUR_KEY not in rollout.data and "async/is_ratio_mean" not in metrics
            continue
        assert {"async/is_ratio_mean", "async/is_ratio_max", "async/is_clipped_frac"} <= metrics.keys()
        current = {k: v.clone() for k, v in policy.module.state_dict().items()}
        policy.module.eval()
        with torch.no_grad():
            policy.module.load_state_dict(before[step - 1])  # the weights the rollout was generated with
            behaviour = policy.log_probs(rollout)
            policy.module.load_state_dict(before[step])  # the weights trained at this step, before its update
            trained = policy.log_probs(rollout)
        policy.module.load_state_dict(current)
        policy.module.train()
        mask = rollout.mask
        torch.testing.assert_close(rollout.data[BEHAVIOUR_KEY][mask], behaviour[mask], atol=1e-5, rtol=0)
        torch.testing.assert_close(rollout.old_logprobs[mask], trained[mask], atol=1e-5, rtol=0)
        assert not torch.allclose(behaviour[mask], trained[mask])  # the weights did move: the rollout is stale
        ratio = torch.exp(trained - behaviour)[mask]
        assert metrics["async/is_ratio_max"] == pytest.approx(float(ratio.max()), rel=1e-4)
    trainer.rollouts.close()  # type: ignore[union-attr]


class _LinearPolicy:
    def __init__(self) -> None:
        self.module = torch.nn.Linear(2, 2)


def _rollout() -> Rollout:
    return Rollout(torch.zeros(1, dtype=torch.long), torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool))


def test_a_failed_background_rollout_is_raised_by_the_next_step_and_leaves_no_thread() -> None:
    """Calls 2 and 4 (the prefetches of steps 1 and 2) fail: the first is raised by next(1), not by wait() (so a
    checkpoint of step 0 is still written); next(1) then samples in the foreground; close() drops the second."""
    policy = cast(Policy, _LinearPolicy())
    callers: list[tuple[threading.Thread, Policy]] = []
    release = threading.Event()

    def collect(with_policy: Policy) -> Rollout:
        callers.append((threading.current_thread(), with_policy))
        if len(callers) in (2, 4):
            release.wait(timeout=30)
            raise EngineUnavailableError(f"the rollout server at http://127.0.0.1:9/v1 failed (call {len(callers)})")
        return _rollout()

    rollouts = AsyncRollouts(collect, policy, num_steps=3)
    assert rollouts.next(0).metrics["async/staleness"] == 0.0
    (background,) = [t for t in threading.enumerate() if t.name == "renorm-rollout-1"]
    assert background.daemon and background.is_alive()  # a daemon: it never keeps the process alive
    release.set()
    rollouts.wait()
    assert not background.is_alive() and callers[1] == (background, rollouts.snapshot)
    with pytest.raises(EngineUnavailableError, match=r"127\.0\.0\.1:9/v1 failed \(call 2\)"):
        rollouts.next(1)
    retried = rollouts.next(1)
    assert retried.metrics["async/staleness"] == 0.0 and callers[2] == (threading.current_thread(), policy)
    rollouts.close()  # joins the failed prefetch of step 2 and drops its error
    assert len(callers) == 4 and not [t for t in threading.enumerate() if t.name.startswith("renorm-rollout")]
