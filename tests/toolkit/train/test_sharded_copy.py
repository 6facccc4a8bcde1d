"""Skeletons and copies of a policy's weights (toolkit.train.sharded_copy) and a policy's own checkpoint shards, in
one process (the 2-rank FSDP2 behaviour is tests/toolkit/train/test_fsdp_copies.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.toolkit.train.test_fsdp import tiny_model_and_optimizer
from toolkit.train.sharded_copy import (
    LOAD_SHARDS,
    POLICY_SHARDS,
    clone_into,
    frozen_skeleton,
    fsdp_pending,
    is_skeleton,
    meta_copy,
    named_tensors,
)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.full((4,), 2.0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.embed(ids) * self.scale)
        return out


def test_meta_copy_holds_no_storage_and_keeps_ties_and_flags() -> None:
    model = Tied()
    model.embed.weight.requires_grad_(False)
    skeleton = meta_copy(model)
    assert is_skeleton(skeleton) and not is_skeleton(model)
    assert skeleton.head.weight is skeleton.embed.weight and skeleton.embed.weight is not model.embed.weight
    assert not skeleton.embed.weight.requires_grad and skeleton.scale.shape == (4,)
    frozen = frozen_skeleton(model)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


def test_clone_into_copies_every_tensor_once_and_stays_independent() -> None:
    model = Tied()
    ids = torch.tensor([[1, 2, 3]])
    copy = clone_into(frozen_skeleton(model), named_tensors(model))
    assert copy.head.weight is copy.embed.weight and isinstance(copy.embed.weight, nn.Parameter)
    assert torch.equal(copy(ids), model(ids)) and not copy.embed.weight.requires_grad
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    assert not torch.equal(copy(ids), model(ids))  # a copy, not a view of the source


def test_clone_into_names_a_missing_or_misshapen_tensor() -> None:
    model = Tied()
    sources = named_tensors(model)
    with pytest.raises(ValueError, match="'scale'"):
        clone_into(meta_copy(model), {k: v for k, v in sources.items() if k != "scale"})
    with pytest.raises(ValueError, match=r"'scale': the copy holds shape \(4,\), the source \(5,\)"):
        clone_into(meta_copy(model), {**sources, "scale": torch.zeros(5)})


def test_fsdp_is_pending_only_once_an_fsdp_accelerator_state_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    assert not fsdp_pending()
    state = AcceleratorState._shared_state
    monkeypatch.setitem(state, "distributed_type", DistributedType.MULTI_CPU)  # DDP on CPUs
    assert not fsdp_pending()
    monkeypatch.setitem(state, "distributed_type", DistributedType.FSDP)  # what an FSDP launch's Accelerator leaves
    assert fsdp_pending()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_policys_own_shards_round_trip_through_the_loader_attached_to_its_state(tmp_path: Path) -> None:
    from toolkit.train.sharded_checkpoint import attach_policy_shards, save_sharded

    model, optimizer = tiny_model_and_optimizer(0)
    ema = {"ema": {"weight": torch.arange(6.0).reshape(2, 3)}}
    save_sharded(tmp_path / "sharded", model, optimizer, ema)
    objects: dict[str, Any] = {POLICY_SHARDS: {"ema": None, "num_updates": 3}, "other": {}}
    attach_policy_shards(tmp_path / "sharded", objects, POLICY_SHARDS)
    target = {"ema": {"weight": torch.zeros(2, 3)}}
    objects[POLICY_SHARDS][LOAD_SHARDS](target)
    assert torch.equal(target["ema"]["weight"], ema["ema"]["weight"]) and LOAD_SHARDS not in objects["other"]
    plain = tmp_path / "plain"
    save_sharded(plain, model, optimizer)  # no policy shards: nothing is attached
    objects = {POLICY_SHARDS: {"ema": None}}
    attach_policy_shards(plain, objects, POLICY_SHARDS)
    assert LOAD_SHARDS not in objects[POLICY_SHARDS]
