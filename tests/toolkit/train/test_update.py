"""The trainer's update stage and checkpoint parts as plain functions (toolkit.train.update and trainer_state): the
micro-batch loop's order and denominators, TRL's on-policy rule, and what a checkpoint holds per engine.

The whole Trainer is covered by test_trainer.py, test_trainer_hooks.py and test_onpolicy_skip.py; these pin the seams.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from toolkit.io.checkpoint import CheckpointState
from toolkit.rollout import Rollout
from toolkit.train import trainer_state, update
from toolkit.train.trainer_config import TrainerConfig


def rollout() -> Rollout:
    """8 rows in 4 groups of 2; row lengths 0..3 twice (rows 0 and 4 are empty)."""
    lengths = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    mask = torch.arange(3)[None, :] < lengths[:, None]
    return Rollout(group_ids=torch.arange(8) // 2, old_logprobs=torch.zeros(8, 3), mask=mask)


@pytest.mark.parametrize("count_empty_rows", [False, True])
def test_each_micro_batch_gets_its_minibatch_denominators_then_the_steps_run_in_order(count_empty_rows: bool) -> None:
    config = TrainerConfig(num_inner_epochs=2, num_minibatches=2, gradient_accumulation_steps=2)
    config.shuffle_minibatches = False  # rows 0-3, then 4-7: each minibatch holds 6 tokens in 3 non-empty rows
    accelerator = SimpleNamespace(sync_gradients=True)
    log: list[Any] = []

    def backward(micro: Rollout, num_tokens: float, num_seqs: float, num_rows: float | None) -> dict[str, float]:
        log.append((len(micro), num_tokens, num_seqs, num_rows, accelerator.sync_gradients))
        return {"loss/policy": float(micro.mask.sum())}

    steps = {
        "optim/grad_norm": lambda: log.append("actor") or 1.0,
        "critic/grad_norm": lambda: log.append("critic") or 2.0,
    }
    totals = update.run_update(rollout(), config, torch.Generator(), accelerator, count_empty_rows, backward, steps)
    rows = 4.0 if count_empty_rows else None
    minibatch = [(2, 6.0, 3.0, rows, False), (2, 6.0, 3.0, rows, True), "actor", "critic"]
    assert log == minibatch * 4  # 2 epochs × 2 minibatches, the sync flag set on the last micro-batch only
    assert accelerator.sync_gradients is True
    assert totals == {"loss/policy": [1.0, 5.0] * 4, "optim/grad_norm": [1.0] * 4, "critic/grad_norm": [2.0] * 4}


class Deferring:
    """A sampler that can leave the old log-probs to the update (`OldLogprobsDeferringSampler`)."""

    defer_old_logprobs = False

    def sample(self, *args: Any) -> Rollout:
        raise AssertionError("not sampled here")


class Rescoring:
    def sample(self, *args: Any) -> Rollout:
        raise AssertionError("not sampled here")


@pytest.mark.parametrize(
    ("epochs", "minibatches", "transforms_need_reference", "sampler", "expected"),
    [
        (1, 1, False, Deferring(), True),
        (2, 1, False, Deferring(), False),
        (1, 2, False, Deferring(), False),
        (1, 1, True, Deferring(), False),
        (1, 1, False, Rescoring(), False),
    ],
)
def test_old_logprobs_come_from_the_update_only_when_it_is_on_policy(
    epochs: int, minibatches: int, transforms_need_reference: bool, sampler: Any, expected: bool
) -> None:
    config = TrainerConfig(num_inner_epochs=epochs, num_minibatches=minibatches)
    assert update.old_logprobs_from_update(config, sampler, transforms_need_reference) is expected


class Counter:
    def __init__(self, count: int) -> None:
        self.count = count

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])


def optimization() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=0.5)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))


@pytest.mark.parametrize("kind", ["none", "deepspeed"])
def test_a_checkpoint_holds_every_part_and_no_zero_optimizer_state(kind: Any) -> None:
    optimizer, scheduler = optimization()
    generator = torch.Generator().manual_seed(3)
    parts = [("transform0", Counter(4))]
    objects = trainer_state.training_objects(kind, optimizer, scheduler, Counter(9), generator, parts)  # type: ignore[arg-type]
    assert list(objects) == ["optimizer", "scheduler", "data", "generator", "transform0"]
    assert (objects["optimizer"] is None) == (kind == "deepspeed")  # ZeRO's state would need unsafe unpickling
    assert objects["data"] == {"count": 9} and objects["transform0"] == {"count": 4}
    state = trainer_state.checkpoint_state(5, {"w": torch.ones(1)}, objects, {"api_key": "secret"}, [{"rank": 0}])
    assert state.step == state.meta["step"] == 5 and state.rng["ranks"] == [{"rank": 0}]
    assert "secret" not in repr(state.meta["config"])


def test_under_fsdp_one_rank_cannot_checkpoint_its_weights_alone() -> None:
    policy = SimpleNamespace(module=torch.nn.Linear(1, 1))
    with pytest.raises(RuntimeError, match="every rank"):
        trainer_state.policy_weights(policy, "fsdp")  # type: ignore[arg-type]
    assert set(trainer_state.policy_weights(policy, "none")) == {"weight", "bias"}  # type: ignore[arg-type]


@pytest.mark.parametrize("keep_new", [False, True])
def test_restore_puts_back_the_schedule_data_parts_and_generator(keep_new: bool) -> None:
    optimizer, scheduler = optimization()
    for _ in range(2):
        optimizer.step()
        scheduler.step()  # lr 0.5 / 3 at step 2
    saved_generator = torch.Generator().manual_seed(11)
    objects = trainer_state.training_objects("none", optimizer, scheduler, Counter(2), saved_generator, [])
    objects["transform0"] = {"count": 7}
    state = CheckpointState(step=2, model={}, objects=objects, rng={}, meta={})
    fresh_optimizer, fresh_scheduler = optimization()
    fresh_optimizer.param_groups[0]["lr"] = fresh_optimizer.param_groups[0]["initial_lr"] = 0.1  # a new config's lr
    fresh = [{"lr": 0.1, "initial_lr": 0.1}] if keep_new else None
    data, part, absent, generator = Counter(0), Counter(0), Counter(5), torch.Generator()
    restore = trainer_state.restore_state
    restore(state, fresh_optimizer, fresh_scheduler, data, generator, [("transform0", part), ("absent", absent)], fresh)  # type: ignore[arg-type]
    assert fresh_scheduler.last_epoch == 2 and data.count == 2 and part.count == 7 and absent.count == 5
    assert torch.equal(generator.get_state(), saved_generator.get_state())
    assert fresh_scheduler.get_last_lr()[0] == pytest.approx((0.1 if keep_new else 0.5) / 3)
